"""The benchmark scripts run and refuse bad arguments in one line (they are never timed here: a
timing figure on a shared machine is not a test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=300)


def test_overhead_prints_each_kind_with_its_bound():
    r = _run("overhead.py", "--kinds", "decay,information", "--rounds", "1", "--steps", "1",
             "--warmup", "0", "--batch", "4", "--json-only")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bounds"] == {"decay": 1.0, "information": pytest.approx(5 / 3, abs=1e-3)}
    assert out["decay"] > 0 and out["information"] > 0
    assert out["ratio_to_bound"]["decay"] == pytest.approx(out["decay"], abs=1e-3)
    # the bound divides (information's is 5/3, so this check can fail where decay's cannot)
    assert out["ratio_to_bound"]["information"] == pytest.approx(out["information"] * 3 / 5,
                                                                 abs=2e-3)  # both rounded


def test_memory_format_benchmark_times_both_layouts_of_an_arm():
    r = _run("memory_format.py", "--kinds", "bp", "--rounds", "1", "--steps", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bp"]["contiguous_ms"] > 0 and out["bp"]["channels_last_ms"] > 0, out


def test_overhead_times_a_rule_run_every_kth_step_in_whole_cycles():
    """information-every4 runs the rule on every 4th step: a block of 3 steps would hold one
    rule step in three blocks of four and none in the fourth, so the median block would not be
    the mean cost; blocks are whole cycles (4 steps) instead."""
    r = _run("overhead.py", "--kinds", "information-every4,fa", "--rounds", "1", "--steps", "3",
             "--warmup", "0", "--batch", "4", "--json-only")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout.strip().splitlines()[-1])["_meta"]
    assert meta["steps_per_block"] == {"information-every4": 4} and meta["non_finite_loss"] == []


@pytest.mark.parametrize("encoder", ["constant", "poisson"])
def test_eprop_benchmark_agrees_with_the_plain_per_step_update(encoder):
    """online_step folds a constant input's traces into one product per batch; its update is
    the plain per-step e-prop update (one trace and outer product per step) to float32."""
    r = _run("eprop.py", "--quick", "--rounds", "1", "--encoder", encoder)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["max_rel_diff"] < 1e-5 and out["agrees"] is True and out["encoder"] == encoder
    assert out["eprop_ms"] > 0 and out["speedup_vs_reference"] > 0


@pytest.mark.parametrize("script, args, message", [
    ("overhead.py", ["--kinds", "decay,amplitude"], "unknown kind(s) ['amplitude']"),
    ("overhead.py", ["--kinds", "decay,decay"], "--kinds lists a kind twice"),
    ("overhead.py", ["--rounds", "0"], "must be >= 1"),
    ("overhead.py", ["--threads", "0"], "must be >= 1"),
    ("memory_format.py", ["--steps", "0"], "--rounds and --steps must be >= 1"),
    ("memory_format.py", ["--kinds", "bp,usff"], "unknown arm(s) ['usff']"),
    ("memory_format.py", ["--kinds", "mirror"], "mirror learns in sleep phases"),
    ("eprop.py", ["--hidden", "0"], "--hidden must be >= 1"),
    ("eprop.py", ["--encoder", "latency"], "invalid choice: 'latency'"),
    ("ddp.py", ["--kinds", "fa,bp"], "unknown kind(s) ['bp']"),
    ("ddp.py", ["--kinds", "fa,fa"], "--kinds lists a kind twice"),
    ("ddp.py", ["--hidden", "32,x"], "--hidden takes comma-separated widths"),
    ("ddp.py", ["--world", "1"], "--world must be >= 2"),
    ("ddp.py", ["--kinds", ","], "--kinds lists no kind"),
    ("overhead.py", ["--kinds", ""], "--kinds lists no kind"),
    ("memory_format.py", ["--kinds", "bp,bp"], "--kinds lists an arm twice"),
])
def test_bad_arguments_are_one_line_errors(script, args, message):
    r = _run(script, *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1], r.stderr
    assert r.stdout == ""


def test_ddp_benchmark_times_each_kind_against_ddp_backprop_and_keeps_replicas_equal():
    r = _run("ddp.py", "--quick", "--kinds", "fa,kolen-pollack,mirror", "--json-only")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["replicas_equal"] is True
    for kind in ("fa", "kolen-pollack", "mirror"):
        assert out[kind] > 0 and out["bare"][kind] > 0 and kind in out["ddp_extra_ms"]
    assert set(out["_meta"]["ms"]) == {f"{k}/{m}" for k in ("bp", "fa", "kolen-pollack", "mirror")
                                       for m in ("ddp", "bare")}

"""The command line: runs, reports, and one-line errors with exit status 2 on bad input."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import plastic
from plastic import data, results
from plastic.cli import main

FAST = ["epochs=2", "train_limit=1000", "test_limit=500", "probe_size=200",
        "circuit.hidden=[32]", "threads=1"]


@pytest.fixture
def saved_figures(monkeypatch):
    """{file name: matplotlib figure} of every figure saved during the test (still written)."""
    import matplotlib.figure
    saved = {}
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (saved.__setitem__(Path(path).name, fig),
                                                 real(fig, path, **kw))[1])
    return saved


def _legend(fig) -> list[str]:
    """The texts of a figure's one legend (beside its panels)."""
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("plastic: error: ")
    return err[0]


def test_quickstart_protocol_runs_writes_results_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--arms", "bp,fa,dfa", "--set", *FAST])
    assert rc == 0
    table = capsys.readouterr().out
    assert "bp" in table and "dfa" in table
    r = results.read(out)
    assert r["spec"]["epochs"] == 2 and r["spec"]["circuit"]["hidden"] == [32]
    assert r["versions"]["torch"]
    # the machine too: the same code and seed round differently on another CPU
    assert r["machine"]["cpu"] and r["machine"]["cores"] >= 1 and r["machine"]["torch_threads"] >= 1
    with h5py.File(out / "results.h5") as h:
        assert json.loads(h.attrs["seeds"]) == [0]
        m = h["arms/fa/metrics"]
        assert list(m["epoch"][:]) == [0, 1, 2]
        for key in ("train_loss", "test_accuracy", "angle/1", "angle/3", "update_angle/1",
                    "signal_angle/1"):
            assert m[key].ndim == 1 and len(m[key]) == 3, key
        assert m["test_accuracy"][-1] > 0.6
        assert m["update_angle/1"][-1] < 90
        assert h["arms/bp/metrics/update_angle/1"][-1] < 1e-3
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "angles.png").stat().st_size > 1000
    assert main(["report", str(out)]) == 0
    assert "fa" in capsys.readouterr().out
    # --layers: per synapse, final values and the delivered error's angle over training
    assert main(["report", str(out), "--layers", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.startswith("| arm | test acc (%) | B–Wᵀ"))
    assert "B–Wᵀ angle (°), final: 1 / 3 |" in head  # the hidden synapse and the readout
    assert "error δ angle (°), mean over training: 1 |" in head
    fa = next(ln for ln in lines[lines.index(head):] if ln.startswith("| fa |")).split(" | ")
    with h5py.File(out / "results.h5") as h:
        m = h["arms/fa/metrics"]
        want = [np.mean(m["signal_angle/1"][1:])]  # epochs 1 and 2, not the untrained 0
        final = [m[f"angle/{n}"][-1] for n in ("1", "3")]
    assert fa[-1].rstrip(" |") == " / ".join(f"{v:.1f}" for v in want)
    assert fa[2] == " / ".join(f"{v:.1f}" for v in final)


def test_angle_figure_keeps_one_colour_per_synapse_in_circuit_order(tmp_path, saved_figures):
    """Synapse "13" comes after "3", not before it, and has the same colour in every panel (the
    readout has a B-W angle but no update angle, so the rows hold different sets)."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--arms", "bp,fa", "-q", "--set", *FAST[1:],
                 "epochs=1", "circuit.hidden=[16,16,16,16,16,16]"]) == 0
    colours, orders = {}, []
    for ax in saved_figures["angles.png"].axes:
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        orders.append([ln.get_label() for ln in lines])
        for ln in lines:
            assert colours.setdefault(ln.get_label(), ln.get_color()) == ln.get_color()
    assert max(orders, key=len) == ["1", "3", "5", "7", "9", "11", "13"]
    assert len(set(colours.values())) == len(colours)


def test_angle_figure_shows_the_delivered_error_and_angles_past_100_degrees(tmp_path,
                                                                            saved_figures):
    """angles.png has a row for each angle recorded, signal_angle included, and a row whose
    angles exceed 100° (an update against backprop's, up to 180°) is not clipped at 100."""
    import matplotlib.pyplot as plt
    from plastic.results import _angle_figure
    ep = np.array([0.0, 1.0])
    arms = {"fa": {"metrics": {"epoch": ep, "update_angle/1": np.array([150.0, 80.0]),
                               "signal_angle/1": np.array([91.0, 70.0]),
                               "angle/1": np.array([90.0, 85.0])}},
            "bp": {"metrics": {"epoch": ep, "update_angle/1": np.zeros(2),
                               "signal_angle/1": np.zeros(2), "angle/1": np.zeros(2)}}}
    assert _angle_figure(arms, tmp_path / "a.png", plt)
    axes = np.array(saved_figures["a.png"].axes).reshape(3, 2)
    assert [ax.get_title() for ax in axes[:, 0]] == [
        "fa: update ∠ to BP", "fa: error δ ∠ to BP's", "fa: ∠(B, Wᵀ)"]
    assert axes[0, 0].get_ylim()[1] >= 150 and axes[0, 1].get_ylim()[1] >= 150  # shared row
    assert axes[1, 0].get_ylim() == (0, 100) and axes[2, 0].get_ylim() == (0, 100)
    assert not _angle_figure({"x": {"metrics": {"epoch": ep}}}, tmp_path / "b.png", plt)


def test_figures_stay_readable_with_many_arms_many_synapses_and_several_seeds(tmp_path,
                                                                              saved_figures):
    """21 arms repeated colours after 10 and ran the legend off the figure, in the panel over
    the curves; 20 synapses repeated colours and each panel's legend covered its neighbours; a
    converted arm got a column of empty panels; nothing said the curves were means over seeds;
    a one-epoch run had ticks at epoch 0.95 ... 1.05."""
    import matplotlib.pyplot as plt
    from plastic.results import _angle_figure, _draw
    ep, seed = np.array([0.0, 1.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0, 1.0])
    syn = [f"s{i}" for i in range(20)]

    def metrics(acc):
        m = {"epoch": ep, "seed": seed, "test_accuracy": np.array([0.1, acc, 0.1, acc + 0.1]),
             "train_loss": np.array([2.3, 1.0, 2.3, 0.8])}
        m.update({f"angle/{s}": np.array([90.0, 40.0, 90.0, 50.0]) for s in syn})
        return m
    arms = {f"arm{i}": {"metrics": metrics(0.5 + i / 100), "synapses": syn} for i in range(21)}
    arms["converted"] = {"metrics": {"epoch": ep, "seed": seed,
                                     "test_accuracy": np.full(4, 0.3),
                                     "train_loss": np.full(4, np.nan)}}
    _draw(arms, [{"name": "p", "circuit": "c", "data": "d"}], tmp_path)
    curves = saved_figures["learning_curves.png"]
    styles = [(ln.get_color(), ln.get_linestyle()) for ln in curves.axes[0].get_lines()]
    assert len(styles) == 22 and len(set(styles)) == 22
    legend = _legend(curves)
    assert legend[0] == "arm0 (55.00%, 2 seeds)" and len(legend) == 22
    assert curves.axes[0].get_legend() is None  # beside the panels, not over the curves
    assert len(curves.axes[0].collections) == 22  # each arm's band over its two seeds
    assert [t.get_text() for t in curves.axes[0].get_xticklabels()] == ["1"]
    angles = saved_figures["angles.png"]
    shown = [ax for ax in angles.axes if ax.get_visible()]
    assert len(shown) == 21 and all(ax.get_title().endswith("∠(B, Wᵀ)") for ax in shown)
    assert angles.get_size_inches()[0] < 30 and len(angles.axes) == 3 * 8  # 8 arms a row, not 21
    assert angles.axes[8].get_title() == "arm8: ∠(B, Wᵀ)"
    colours = [ln.get_color() for ln in shown[0].get_lines() if not ln.get_label()[0] == "_"]
    assert len(colours) == 20 and len({tuple(np.atleast_1d(c)) for c in colours}) == 20
    assert _legend(angles) == syn
    title = angles._suptitle.get_text()
    assert "means over 2 seeds" in title and "no angle recorded: converted" in title


def test_rate_histograms_of_two_epochs_share_their_bins(tmp_path, saved_figures):
    from plastic.plots import recording_figures
    rec = {0: {"2/rates": np.linspace(0, 0.01, 50)}, 3: {"2/rates": np.linspace(0, 0.05, 50)}}
    recording_figures(rec, tmp_path, "a")
    bars = saved_figures["rates_a.png"].axes[0].patches
    widths = {round(b.get_width(), 9) for b in bars}
    assert len(bars) == 80 and len(widths) == 1


def test_a_diverging_rule_is_stopped_with_a_hint_at_its_coefficients(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main(["run", "--out", str(out), "--arms", "information", "-q", "--set", *FAST,
               "epochs=1", "arms.information.feedback={amp=1e8,null=1e8,decay=1}"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "training loss became nan in epoch 1; lower its lr (now 0.05) or its feedback " \
           "rule's coefficients" in err
    assert "Traceback" not in err


def test_a_batch_of_one_at_a_1x1_batch_norm_is_a_one_line_error(tmp_path, capsys):
    # resnet18's ImageNet stem brings a 28x28 image to 1x1 before its last batch norm; 33 images
    # in batches of 32 leave a last batch of one sample, which batch norm cannot train on
    rc = main(["run", "mnist", "--out", str(tmp_path / "r"), "--arms", "bp", "-q", "--set",
               "data=mnist-sample", "seeds=[0]", "circuit=resnet18", "circuit.stem=imagenet",
               "epochs=1", "train_limit=33", "test_limit=16", "batch_size=32", "probe_size=8",
               "threads=1"])
    assert rc == 2
    line = _err_line(capsys)
    assert "arm 'bp': a batch of one sample reaches a batch norm whose input is 1x1" in line
    assert "choose batch_size, train_limit and probe_size" in line


def test_seeds_give_mean_and_std_and_same_seed_same_numbers(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    sets = [*FAST, "seeds=[0,1]", "epochs=1"]
    assert main(["run", "--out", str(a), "--arms", "fa", "-q", "--set", *sets]) == 0
    assert main(["run", "--out", str(b), "--arms", "fa", "-q", "--set", *sets]) == 0
    out = capsys.readouterr().out
    assert "±" in out
    ma, mb = results.read(a)["arms"]["fa"]["metrics"], results.read(b)["arms"]["fa"]["metrics"]
    assert np.array_equal(ma["test_accuracy"], mb["test_accuracy"])
    assert np.allclose(ma["train_loss"], mb["train_loss"], equal_nan=True)
    assert sorted(set(ma["seed"])) == [0, 1]


def test_run_in_parts_and_combined_report(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--out", str(a), "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    assert main(["run", "--out", str(b), "--arms", "usf", "-q", "--set", *FAST, "epochs=1"]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(l.startswith("bp ") for l in lines) and any(l.startswith("usf ") for l in lines)


def test_report_pools_seeds_of_one_spec_and_separates_other_specs(tmp_path, capsys,
                                                                   saved_figures):
    """One seed per file pools into one row with mean ± std; the same arm under another spec
    gets its own row, named by its directory, and a note says which keys differ."""
    s0, s1, other = tmp_path / "s0", tmp_path / "s1", tmp_path / "other"
    for out, sets in ((s0, ["seeds=[0]"]), (s1, ["seeds=[1]"]), (other, ["circuit.hidden=[16]"])):
        assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *FAST, "epochs=1",
                     *sets]) == 0
    capsys.readouterr()
    rows = results.summary([results.read(p) for p in (s0, s1, other)])
    assert [r["arm"] for r in rows] == ["fa [s0, s1]", "fa [other]"]
    assert rows[0]["seeds"] == rows[0]["done"] == 2 and rows[1]["seeds"] == 1
    accs = [results.read(p)["arms"]["fa"]["metrics"]["test_accuracy"][-1] for p in (s0, s1)]
    assert np.allclose(rows[0]["test_accuracy"], accs)
    assert rows[1]["differs"] == ["circuit.hidden"]
    assert main(["report", str(s0), str(s1), str(other)]) == 0
    out, err = capsys.readouterr()
    assert "±" in out.splitlines()[2] and "fa [other]" in out
    assert "fa [other] and fa [s0, s1] ran under different specs (circuit.hidden)" in err
    # --out: one pair of figures for all the files, the arms named and pooled as in the table
    assert main(["report", str(s0), str(s1), str(other), "--out", str(tmp_path / "all")]) == 0
    assert (tmp_path / "all" / "angles.png").stat().st_size > 1000
    titles = [ax.get_title() for ax in saved_figures["angles.png"].axes]
    assert "fa [s0, s1]: ∠(B, Wᵀ)" in titles and "fa [other]: ∠(B, Wᵀ)" in titles
    legend = _legend(saved_figures["learning_curves.png"])
    pooled = 100 * np.mean(accs)
    assert f"fa [s0, s1] ({pooled:.2f}%, 2 seeds)" in legend


def test_the_arm_of_a_protocol_without_arms_is_named_by_its_kind():
    """"backprop" named the arm backprop and "transpose" named it bp, so a resume under the
    other spelling trained a second arm of the same experiment from epoch 0."""
    from plastic.spec import resolve_protocol
    for fb, arm in (("backprop", "bp"), ("Transpose", "bp"), ("BP", "bp"), ("FA", "fa"),
                    ({"amp": 1.0, "decay": 1.0}, "arm")):
        assert list(resolve_protocol({"feedback": fb})["arms"]) == [arm]


def test_names_of_optimizers_schedules_encoders_and_layouts_are_read_in_any_case():
    """Populations and feedback kinds were read in any case, but "SGD", "OneCycle", "Poisson"
    and "Channels_Last" were refused as unknown."""
    from plastic.spec import resolve_protocol
    spec = resolve_protocol({"optimizer": {"name": "SGD"}, "schedule": {"name": "OneCycle"},
                             "time": {"encoder": "Poisson"}, "memory_format": "Channels_Last"})
    assert (spec["optimizer"]["name"], spec["schedule"]["name"], spec["time"]["encoder"],
            spec["memory_format"]) == ("sgd", "onecycle", "poisson", "channels_last")


def test_report_pools_an_arm_whose_kind_is_spelt_otherwise(tmp_path, capsys):
    """bp = "backprop" in one file and "bp" in another (or another description) is one
    experiment: one row of two seeds, not two rows 'under different specs'."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--out", str(a), "--arms", "bp", "-q", "--set", *FAST, "epochs=1",
                 "seeds=[0]"]) == 0
    assert main(["run", "--out", str(b), "--arms", "bp", "-q", "--set", *FAST, "epochs=1",
                 "seeds=[1]", "arms.bp.feedback=Backprop", "arms.bp.description=control"]) == 0
    capsys.readouterr()
    rows = results.summary([results.read(p) for p in (a, b)])
    assert [(r["arm"], r["seeds"]) for r in rows] == [("bp", 2)]


@pytest.mark.parametrize("sets, message", [
    (["arms.fa.feedback=foo"], "unknown rule 'foo'"),
    (["epochz=3"], "unknown key 'epochz' (did you mean 'epochs'?)"),
    (["optimizer.lrr=0.1"], "unknown key optimizer.'lrr'"),
    (["epochs=abc"], "epochs must be an integer"),
    (["circuit.input_shape=[3,32,32]"], "expects input [3, 32, 32] but the data set gives [1, 28, 28]"),
    (["circuit.hidden=[0]"], "circuit.hidden must be a list of positive integers"),
    (["circuit=nonexistent"], "unknown circuit 'nonexistent'"),
    (["data=no-such-data"], "data set 'no-such-data' not found"),
    (["schedule.name=warp"], "unknown schedule 'warp'"),
    (["schedule.pct_start=1"], "schedule.pct_start must be in [0, 1), got 1"),
    (["schedule.div_factor=0"], "schedule.div_factor must be > 0"),
    (["optimizer.momentum=-0.5"], "optimizer.momentum must be in [0, 1)"),
    (["arms.bp.lr=-1"], "arms.bp.lr must be >= 0, got -1"),
    (["loss.label_smoothing=2"], "loss.label_smoothing must be in [0, 1]"),
    (["augment.shift=-1"], "augment.shift must be >= 0"),
    (["train_limit=-5"], "train_limit must be >= 0"),
    (['arms.usff.lr=0.1'], "no arm 'usff' (did you mean 'usf'?); a new arm needs its feedback"),
    (["device=gpu"], "device 'gpu' is not a torch device"),
    (["device=cuda:99"], "device 'cuda:99' is not available on this machine"),
    (['arms.fa.feedback={amp="a"}'], "arms.fa.feedback: coefficient of 'amp' must be a finite number"),
    (["arms.fa.feedback={ampp=1}"], "arms.fa.feedback: unknown primitive 'ampp'"),
    (["arms.fa.feedback={amp=1,nul=2}"],
     "arms.fa.feedback: unknown primitive 'nul' (did you mean 'null'?)"),
    (["arms.fa.feedback={amp=nan,null=1}"], "coefficient of 'amp' must be a finite number, got nan"),
    (["arms.fa.feedback=information", "arms.fa.feedback_options={normalise=true}"],
     "unknown feedback option 'normalise' (did you mean 'normalize'?)"),
    (['arms.fa.feedback={"3"="fa","*"={amp=1,decay="x"}}'],
     "arms.fa.feedback.*: coefficient of 'decay' must be a finite number, got 'x'"),
    (["optimizer.lr=abc"], "optimizer.lr must be a number, got 'abc'"),
    (["optimizer.lr=inf"], "optimizer.lr must be a finite number, got inf"),
    (["arms.bp.lr=nan"], "arms.bp.lr must be a finite number, got nan"),
    (["feedback=banana"], "unknown rule 'banana' in feedback"),
    (["seeds=[0,0]"], "seeds lists a seed twice"),
])
def test_bad_specs_are_one_line_errors(tmp_path, capsys, sets, message):
    rc = main(["run", "--out", str(tmp_path / "x"), "--set", *sets])
    assert rc == 2
    assert message in _err_line(capsys)


def test_a_sleep_driven_arm_without_sleep_phases_is_refused(tmp_path, capsys):
    """The weight mirror learns only in sleep phases: with sleep.every = 0 it would silently
    stay a random B (feedback alignment under another name)."""
    assert main(["run", "--out", str(tmp_path / "x"), "--arms", "bp", "--set", *FAST,
                 'arms.bp.feedback="mirror"']) == 2
    err = _err_line(capsys)
    assert "arm 'bp': the feedback of synapse(s) ['1', '3'] learns only in sleep phases" in err
    assert not (tmp_path / "x").exists()


def test_unknown_arm_and_bad_protocol_file(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "x"), "--arms", "nope"]) == 2
    assert "unknown arm(s) ['nope']" in _err_line(capsys)
    assert main(["run", "--out", str(tmp_path / "x"), "--arms", " , "]) == 2
    assert "--arms names no arm; arms of this protocol: bp, fa" in _err_line(capsys)
    (tmp_path / "afile").write_text("")
    assert main(["run", "--out", str(tmp_path / "afile"), "--arms", "bp", "--set", *FAST]) == 2
    assert "--out takes a directory (the run writes DIR/results.h5" in _err_line(capsys)
    assert main(["run", "--out", str(tmp_path / "afile" / "sub"), "--arms", "bp", "--set",
                 *FAST]) == 2
    assert "cannot write results to" in _err_line(capsys)
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [unclosed")
    assert main(["run", str(bad)]) == 2
    assert "invalid TOML" in _err_line(capsys)
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "protocol file not found" in _err_line(capsys)


def test_corrupt_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "results.h5"
    bad.write_bytes(b"this is not HDF5")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a readable HDF5 results file" in _err_line(capsys)
    data_file = tmp_path / "data.h5"
    data_file.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    assert main(["run", "--out", str(tmp_path / "o"), "--set", f"data={data_file}"]) == 2
    assert "not a readable plastic data file" in _err_line(capsys)
    with h5py.File(tmp_path / "empty.h5", "w") as h:
        h.create_group("train")
    assert main(["run", "--out", str(tmp_path / "o"), "--set", f"data={tmp_path / 'empty.h5'}"]) == 2
    assert "no /train/images" in _err_line(capsys)
    with h5py.File(tmp_path / "other.h5", "w") as h:
        h.attrs["x"] = 1
    assert main(["report", str(tmp_path / "other.h5")]) == 2
    assert "not a plastic results file, or a damaged one (it has no spec)" in _err_line(capsys)
    # a data set's file was h5py's "Unable to synchronously open attribute (can't locate ...)"
    assert main(["report", str(data.dataset_path("mnist-sample"))]) == 2
    assert "not a plastic results file (it holds the data set 'mnist-sample')" in \
        _err_line(capsys)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no results file" in _err_line(capsys)


def test_existing_results_need_resume(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--arms", "bp", "--set", *FAST, "epochs=1"]) == 2
    assert "already exists" in _err_line(capsys)
    # --resume adds an arm to the same file and skips the finished one
    assert main(["run", "--out", str(out), "--arms", "bp,fa", "--resume", "-q", "--set", *FAST,
                 "epochs=1"]) == 0
    assert set(results.read(out)["arms"]) == {"bp", "fa"}
    # a different spec is refused, naming the keys that differ
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--arms", "bp", "--resume", "-q", "--set", *FAST,
                 "epochs=1", "batch_size=32", "circuit.hidden=[16]"]) == 2
    assert "(batch_size, circuit.hidden)" in _err_line(capsys)
    # a spec recorded before a key joined the schema resumes: the key takes its default
    with h5py.File(results.results_path(out), "a") as f:
        spec = json.loads(f.attrs["spec"])
        del spec["circuit"]["blocks"]
        f.attrs["spec"] = json.dumps(spec)
    assert main(["run", "--out", str(out), "--arms", "bp,fa", "--resume", "-q", "--set", *FAST,
                 "epochs=1"]) == 0
    # where a run executes is not part of it: a run recorded on a GPU resumes here, with other
    # threads, and the spec then records this machine's settings
    with h5py.File(results.results_path(out), "a") as f:
        spec = json.loads(f.attrs["spec"])
        spec["device"] = "cuda:0"
        f.attrs["spec"] = json.dumps(spec)
    threads = torch.get_num_threads()
    try:
        assert main(["run", "--out", str(out), "--arms", "bp,fa,usf", "--resume", "-q", "--set",
                     *FAST[:-1], "threads=2", "epochs=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = results.read(out)
    assert set(r["arms"]) == {"bp", "fa", "usf"}
    assert r["spec"]["device"] == "cpu" and r["spec"]["threads"] == 2


def test_resume_adds_seeds_to_the_same_file(tmp_path, capsys):
    """--resume with more seeds runs only the new ones; their rows equal a fresh run's."""
    out, fresh = tmp_path / "r", tmp_path / "fresh"
    sets = [*FAST, "epochs=1"]
    assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *sets]) == 0
    assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--resume", "--set", *sets,
                 "seeds=[0,1]"]) == 0
    assert main(["run", "--out", str(fresh), "--arms", "fa", "-q", "--set", *sets,
                 "seeds=[1]"]) == 0
    r, f = results.read(out), results.read(fresh)
    assert r["spec"]["seeds"] == [0, 1] and r["arms"]["fa"]["attrs"]["done_seeds"] == [0, 1]
    m, mf = r["arms"]["fa"]["metrics"], f["arms"]["fa"]["metrics"]
    one = m["seed"] == 1
    assert np.array_equal(m["test_accuracy"][one], mf["test_accuracy"])
    assert results.summary([r])[0]["seeds"] == 2


def test_a_results_file_being_written_can_be_reported_but_not_resumed(tmp_path, capsys):
    """While another process holds results.h5 open for writing (a run in progress), `plastic
    report` reads it as of its last flushed epoch, and `--resume` into it is refused in one
    line (it used to be "not a readable HDF5 results file" for both)."""
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; "
                               f"f = h5py.File({str(out / 'results.h5')!r}, 'a'); "
                               "print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert main(["report", str(out)]) == 0
        assert capsys.readouterr().out.splitlines()[2].startswith("bp ")
        assert main(["run", "--out", str(out), "--arms", "bp", "--resume", "--set", *FAST,
                     "epochs=1"]) == 2
        assert "is open in another process (is a run still writing it?)" in _err_line(capsys)
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_keeps_finished_epochs_and_resume_completes(tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "plastic.cli", "run", "--out", str(out), "--arms", "fa", "--set",
           *FAST, "epochs=40", "train_limit=2000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # a background job inherits SIGINT ignored; the child gets Python's default Ctrl-C handling
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    for line in p.stderr:
        if "epoch 3/40" in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "finished epochs are kept" in err
    m = results.read(out)["arms"]["fa"]["metrics"]
    kept = int(m["epoch"].max())
    assert kept >= 3 and list(m["epoch"]) == list(range(kept + 1))
    # resume continues from the checkpoint of the last finished epoch
    rc = subprocess.run(cmd[:-2] + ["epochs=40", "train_limit=2000"] + ["--resume"],
                        capture_output=True, text=True, env=env, timeout=600)
    assert rc.returncode == 0, rc.stderr
    assert f"resumed after epoch {kept}" in rc.stderr
    m = results.read(out)["arms"]["fa"]["metrics"]
    assert list(m["epoch"]) == list(range(41))


def test_ctrl_c_during_the_epoch_writes_leaves_results_and_checkpoint_agreeing(tmp_path, capsys,
                                                                              monkeypatch):
    """SIGINT arriving in the middle of an epoch's results row is held until that row and the
    epoch's checkpoint are both written; then the run stops with status 130."""
    import torch
    out = tmp_path / "w"
    real_append = results.ResultsWriter.append

    def append(self, arm, row):
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # lands between the datasets' resizes
        real_append(self, arm, row)

    monkeypatch.setattr(results.ResultsWriter, "append", append)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *FAST,
                     "epochs=5"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    m = results.read(out)["arms"]["fa"]["metrics"]
    assert list(m["epoch"]) == [0, 1, 2] and all(len(v) == 3 for v in m.values())
    ckpt = torch.load(out / "checkpoints" / "fa-seed0.pt", weights_only=False)
    assert ckpt["epoch"] == 2
    monkeypatch.setattr(results.ResultsWriter, "append", real_append)
    hint = capsys.readouterr().err.split("continue with: ")[1].rsplit(")", 1)[0]
    again = shlex.split(hint)  # the command the message gives, run as given
    assert again[:2] == ["plastic", "run"] and "--resume" in again and again[-1] == "-q"
    assert main(again[1:-1]) == 0  # without -q, to see where it resumed
    assert "resumed after epoch 2" in capsys.readouterr().err
    assert list(results.read(out)["arms"]["fa"]["metrics"]["epoch"]) == [0, 1, 2, 3, 4, 5]


def test_a_run_that_ignores_ctrl_c_keeps_ignoring_it_during_the_epoch_writes():
    from plastic.train import _deferred_interrupt
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job
    try:
        with _deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_plastic_with_only_options_runs_the_quickstart(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "q"), "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    r = results.read(tmp_path / "q")
    assert r["spec"]["name"] == "quickstart" and set(r["arms"]) == {"bp"}
    with h5py.File(tmp_path / "q" / "results.h5") as h:
        assert h.attrs["seed"] == 0


def test_learned_arms_and_sleep_phases_run_from_a_protocol(tmp_path, capsys):
    out = tmp_path / "learned"
    proto = tmp_path / "p.toml"
    proto.write_text("""
name = "learned"
data = "mnist-sample"
circuit = "mlp-small"
epochs = 2
train_limit = 1000
test_limit = 300
probe_size = 200
[sleep]
every = 1
batches = 4
[arms.fa]
feedback = "fa"
[arms.mirror]
feedback = "mirror"
[arms.info]
feedback = {amp = 1e-3, null = 1e-3, decay = 1e-3}
""")
    assert main(["run", str(proto), "--out", str(out), "-q"]) == 0
    r = results.read(out)["arms"]
    fa, mirror = r["fa"]["metrics"], r["mirror"]["metrics"]
    assert mirror["angle/1"][-1] < fa["angle/1"][-1] - 20  # sleep phases align B with W^T
    assert "rule/amp/1" in r["info"]["metrics"] and "norm_ratio/1" in r["info"]["metrics"]
    # --layers shows each primitive's final value (recorded, and shown nowhere)
    capsys.readouterr()
    assert main(["report", str(out), "--layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = lines.index(next(ln for ln in lines if ln.startswith("amp R, final: ")))
    info = next(ln for ln in lines[i:] if ln.split()[:1] == ["info"]).split()
    assert float(info[2]) == pytest.approx(r["info"]["metrics"]["rule/amp/1"][-1], rel=1e-2)


def test_a_diverging_arm_stops_alone_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--arms", "fa,bp", "-q", "--set", *FAST, "epochs=1",
               "arms.fa.lr=1e37"])
    assert rc == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()[-1]
    assert err.startswith("plastic: error: ") and "Traceback" not in cap.err
    assert "arm 'fa': training loss became " in err and "the other arms are in" in err
    r = results.read(out / "results.h5")
    assert r["arms"]["bp"]["metrics"]["epoch"][-1] == 1  # bp ran to the end after fa diverged
    # and its table and figures are there all the same
    assert any(ln.split()[:1] == ["bp"] for ln in cap.out.splitlines())
    assert (out / "learning_curves.png").exists()
    # the file says fa's seed diverged, and the table and report say so
    assert "training loss became" in r["arms"]["fa"]["attrs"]["diverged_seeds"]["0"]
    assert "0/1 (1 diverged)" in next(ln for ln in cap.out.splitlines() if ln.startswith("fa "))
    assert main(["report", str(out)]) == 0
    assert "plastic: note: fa seed 0 diverged (arm 'fa': training loss became" in \
        capsys.readouterr().err


def test_a_diverged_seed_is_neither_pooled_as_a_result_nor_taken_for_one_still_running(tmp_path):
    """A seed that diverged after epoch 3 stood in the table as fa's result (the furthest epoch
    any seed reached) while seed 1 was at epoch 2; and a diverged seed read as "1/2", like a
    run still going."""
    w = results.ResultsWriter(tmp_path, {"name": "x", "seeds": [0, 1], "arms": {"fa": {}}})
    w.arm_group("fa", {"feedback": "fa"})
    for seed, last, acc in ((0, 3, 0.11), (1, 2, 0.6)):
        for e in range(last + 1):
            w.append("fa", {"seed": seed, "epoch": e, "test_accuracy": acc})
    w.mark_diverged("fa", 0, "arm 'fa': training loss became nan in epoch 4")
    w.close()
    (row,) = results.summary([results.read(tmp_path / "results.h5")])
    assert row["test_accuracy"] == [0.6] and row["diverged"] == {0: "arm 'fa': training loss "
                                                                  "became nan in epoch 4"}
    assert results._seeds_cell(row) == "0/2 (1 diverged)"
    # a resume that finishes the seed clears it
    w = results.ResultsWriter(tmp_path / "again", {"name": "x", "seeds": [0, 1],
                                                   "arms": {"fa": {}}})
    w.arm_group("fa", {"feedback": "fa"})
    w.append("fa", {"seed": 0, "epoch": 4, "test_accuracy": 0.5})
    w.mark_diverged("fa", 0, "arm 'fa': training loss became nan in epoch 5")
    w.mark_done("fa", 0)
    # every seed diverged, at different epochs: the row shows each one's last epoch
    w.arm_group("all", {"feedback": "fa"})
    for seed, last in ((0, 2), (1, 1)):
        for e in range(last + 1):
            w.append("all", {"seed": seed, "epoch": e, "test_accuracy": 0.1 * (seed + 1)})
        w.mark_diverged("all", seed, f"diverged in epoch {last + 1}")
    # a seed started again is no longer marked (a resume on other hardware may not diverge)
    w.arm_group("again", {"feedback": "fa"})
    w.append("again", {"seed": 0, "epoch": 0, "test_accuracy": 0.1})
    w.mark_diverged("again", 0, "diverged in epoch 1")
    w.drop_rows("again", 0, from_epoch=1)
    w.close()
    rows = {r["arm"]: r for r in results.summary([results.read(tmp_path / "again" / "results.h5")])}
    assert rows["fa"]["diverged"] == {} and rows["fa"]["test_accuracy"] == [0.5]
    assert rows["all"]["test_accuracy"] == [0.1, 0.2] and rows["all"]["all_diverged"]
    assert results._seeds_cell(rows["all"]) == "0/2 (2 diverged)"
    assert rows["again"]["diverged"] == {}


@pytest.mark.parametrize("arm", ["mirror", "fa"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, arm):
    """A run interrupted after epoch 1 and resumed ends with the same weights, W and B, as an
    uninterrupted run (optimizer, schedule, data order and random state restored).  With a sleep
    phase every 2nd wake batch, the wake-step count that places the sleep phases resumes with the
    run too (it restarted at 0, shifting every later sleep phase)."""
    from plastic import spec as S, train as T
    sets = ["epochs=2", "train_limit=96", "test_limit=64", "probe_size=16", "batch_size=32",
            "circuit.hidden=[16]", "threads=1", "sleep.every=2", "arms.mirror.feedback=mirror"]
    spec = S.load_protocol("quickstart", sets)
    T.run_protocol(spec, tmp_path / "a", arms=[arm], progress=False)
    save = T._save_atomic

    def interrupting(obj, path):
        save(obj, path)
        if "checkpoints" in str(path) and obj["epoch"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(T, "_save_atomic", interrupting)
    with pytest.raises(KeyboardInterrupt):
        T.run_protocol(spec, tmp_path / "b", arms=[arm], progress=False)
    monkeypatch.setattr(T, "_save_atomic", save)
    T.run_protocol(spec, tmp_path / "b", arms=[arm], resume=True, progress=False)
    a, b = (torch.load(tmp_path / d / "weights" / f"{arm}-seed0.pt") for d in "ab")
    assert any(k.endswith("feedback.weight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_during_the_epoch_writes_is_held_until_they_end():
    """kill (SIGTERM) inside the end-of-epoch writes takes effect after them, as Ctrl-C does."""
    code = ("import os, signal, sys\nfrom plastic.train import _deferred_interrupt\n"
            "with _deferred_interrupt():\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('writes finished', flush=True)\nprint('not reached', flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGTERM, p.stderr
    assert p.stdout.split() == ["writes", "finished"]


def test_a_half_written_row_is_dropped_on_report_and_on_resume(tmp_path, capsys):
    """A run killed between the resizes of one row (SIGKILL cannot be held) leaves one metric a
    row short: report reads the complete rows with a warning, resume cuts the others back, and a
    file damaged otherwise is a one-line error."""
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *FAST, "epochs=1"]) == 0
    path = results.results_path(out)
    with h5py.File(path, "a") as h:
        m = h["arms/fa/metrics"]
        m["test_accuracy"].resize((1,))  # epoch 1's row cut in half
        del h["arms/fa"].attrs["done_seeds"]
    with pytest.warns(UserWarning, match="half-written last row"):
        assert main(["report", str(out)]) == 0
    p = subprocess.run([sys.executable, "-m", "plastic.cli", "report", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.startswith("plastic: warning: ") \
        and len(p.stderr.splitlines()) == 1, p.stderr  # one line, no Python source line
    with pytest.warns(UserWarning, match="half-written last row"):
        assert list(results.read(out)["arms"]["fa"]["metrics"]["epoch"]) == [0]
    with pytest.warns(UserWarning, match="half-written last row.*dropping it"):
        assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--resume", "--set", *FAST,
                     "epochs=1"]) == 0
    m = results.read(out)["arms"]["fa"]["metrics"]
    assert list(m["epoch"]) == [0, 1] and all(len(v) == 2 for v in m.values())
    capsys.readouterr()
    for damage, message in [(lambda h: h.attrs.__setitem__("spec", "[1, 2]"), "spec is not a table"),
                            (lambda h: h.__delitem__("arms/fa/metrics/epoch"), "no epoch column")]:
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        (bad / "results.h5").write_bytes(path.read_bytes())
        with h5py.File(bad / "results.h5", "a") as h:
            damage(h)
        assert main(["report", str(bad)]) == 2
        assert message in _err_line(capsys)


def test_probe_size_0_skips_the_probe_metrics_and_bad_seeds_are_refused(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["run", "--out", str(out), "--arms", "info", "-q", "--set", *FAST, "epochs=1",
                 "probe_size=0", "arms.info.feedback=information"]) == 0
    m = results.read(out)["arms"]["info"]["metrics"]
    assert not [k for k in m if k.startswith(("update_angle/", "signal_angle/", "rule/"))]
    assert [k for k in m if k.startswith("angle/")] and np.all(m["test_accuracy"] > 0)
    capsys.readouterr()
    assert main(["run", "--out", str(tmp_path / "s"), "--set", *FAST, "seeds=[true]"]) == 2
    assert "seeds must be a non-empty list of integers" in _err_line(capsys)


def test_optimizer_and_schedule_settings_that_are_not_read_are_reported(tmp_path, capsys):
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["run", "--out", str(tmp_path / "o"), "--arms", "bp", "-q", "--set", *FAST,
                     "epochs=1", "optimizer.name=adam", "optimizer.momentum=0.5"]) == 0
        said = [str(w.message) for w in seen if "is not read by" in str(w.message)]
        assert said == ["optimizer.momentum = 0.5 is not read by the 'adam' optimizer, so it "
                        "has no effect"]  # once, and not again when the report re-reads it
        assert main(["report", str(tmp_path / "o")]) == 0
        assert len([w for w in seen if "is not read by" in str(w.message)]) == 1
    # quickstart tunes the one-cycle warm-up (pct_start 0.2): a cosine override still runs
    with pytest.warns(UserWarning, match=r"schedule.pct_start = 0.2 is not read by the 'cosine'"):
        assert main(["run", "--out", str(tmp_path / "c"), "--arms", "bp", "-q", "--set", *FAST,
                     "epochs=1", "schedule.name=cosine"]) == 0


def test_report_counts_seeds_not_yet_started_and_takes_completion_with_the_rows(
        tmp_path, monkeypatch, saved_figures):
    """A run stopped after seed 0 of every arm and seed 1 of bp reports fa as 1/2 seeds (it
    showed 1, as if complete); the figure's legend gives the table's final accuracy."""
    from plastic import spec as S, train as T
    spec = S.load_protocol("quickstart", [*FAST, "epochs=1", "seeds=[0,1]"])
    real = T.run_arm

    def stop_at_fa_seed1(spec_, arm, *a, **k):
        if arm == "fa" and a[1] == 1:
            raise KeyboardInterrupt
        return real(spec_, arm, *a, **k)
    monkeypatch.setattr(T, "run_arm", stop_at_fa_seed1)
    with pytest.raises(KeyboardInterrupt):
        T.run_protocol(spec, tmp_path / "r", arms=["bp", "fa"], progress=False)
    rows = {r["arm"]: r for r in results.summary([results.read(tmp_path / "r")])}
    table = results.format_table(list(rows.values()))
    assert [ln.split()[3] for ln in table.splitlines()[2:]] == ["2", "1/2"]
    results.combined_figures([tmp_path / "r"], tmp_path / "f")
    legend = _legend(saved_figures["learning_curves.png"])
    mean_bp = 100 * np.mean(rows["bp"]["test_accuracy"])
    assert legend[0] == f"bp ({mean_bp:.2f}%, 2 seeds)"


def test_resume_refuses_an_arm_whose_settings_changed(tmp_path, capsys):
    """Resuming bp as usf trained epochs 1-2 as bp and the rest as usf, under usf's name."""
    out = str(tmp_path / "r")
    assert main(["run", "--out", out, "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    capsys.readouterr()
    for change in ("arms.bp.feedback=usf", "arms.bp.lr=0.2"):
        rc = main(["run", "--out", out, "--arms", "bp", "-q", "--resume", "--set", *FAST,
                   "epochs=1", change])
        assert rc == 2
        assert f"({change.split('=')[0]})" in _err_line(capsys)
    # another arm may still join the file
    assert main(["run", "--out", out, "--arms", "fa", "-q", "--resume", "--set", *FAST,
                 "epochs=1"]) == 0
    # another spelling of the same kind is the same arm (it was refused as a changed arm)
    for same in ("backprop", "BP", "transpose"):
        assert main(["run", "--out", out, "--arms", "bp", "-q", "--resume", "--set", *FAST,
                     "epochs=1", f"arms.bp.feedback={same}"]) == 0, capsys.readouterr().err


def test_resume_ignores_a_checkpoint_the_results_file_has_no_row_of(tmp_path, monkeypatch,
                                                                     capsys):
    """A leftover checkpoint beside a new results file was loaded: the run 'resumed after epoch
    2' of another run, and wrote only the later epochs."""
    from plastic import train as T
    monkeypatch.setattr(T, "_save_weights", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *FAST]) == 130
    assert (out / "checkpoints" / "fa-seed0.pt").exists()
    (out / "results.h5").unlink()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"has no row of it; \[fa seed 0\] starts from epoch 0"):
        assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--resume", "--set", *FAST,
                     "epochs=1"]) == 0
    assert list(results.read(out)["arms"]["fa"]["metrics"]["epoch"]) == [0, 1]
    assert not (out / "checkpoints").exists()  # an empty folder was left behind
    with pytest.warns(UserWarning, match=r"--resume: there is no results file at .*; starting "
                                         r"a new run"):  # a misspelt --out passed as a resume
        assert main(["run", "--out", str(tmp_path / "typo"), "--arms", "fa", "-q", "--resume",
                     "--set", *FAST, "epochs=1"]) == 0


def test_a_seed_stopped_at_epoch_0_is_not_pooled_with_finished_ones(tmp_path, monkeypatch):
    from plastic import spec as S, train as T
    real = T._Progress.epoch

    def stop(self, msg):
        real(self, msg)
        if msg.startswith("[fa seed 1] epoch 0:"):
            raise KeyboardInterrupt
    monkeypatch.setattr(T._Progress, "epoch", stop)
    spec = S.load_protocol("quickstart", [*FAST, "epochs=1", "seeds=[0,1]"])
    with pytest.raises(KeyboardInterrupt):
        T.run_protocol(spec, tmp_path / "r", arms=["fa"], progress=False)
    r = results.read(tmp_path / "r")
    m = r["arms"]["fa"]["metrics"]
    assert sorted(zip(m["seed"], m["epoch"])) == [(0, 0), (0, 1), (1, 0)]
    (row,) = results.summary([r])
    seed0 = float(m["test_accuracy"][(m["seed"] == 0) & (m["epoch"] == 1)][0])
    assert row["test_accuracy"] == [seed0] and row["epochs"] == 1
    assert results.format_table([row]).splitlines()[2].split()[3] == "1/2"


def test_out_naming_a_file_and_a_directory_named_like_a_protocol(tmp_path, monkeypatch, capsys):
    """--out x.h5 was a traceback that left a directory behind; a directory named like a
    protocol (a run's --out) hid the built-in protocol (IsADirectoryError)."""
    from plastic import spec as S
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", "x.h5", "-q", "--set", *FAST]) == 2
    assert "--out takes a directory" in _err_line(capsys)
    assert not (tmp_path / "x.h5").exists()
    (tmp_path / "quickstart").mkdir()
    assert S.load_protocol("quickstart")["name"] == "quickstart"
    (tmp_path / "mine").mkdir()
    with pytest.raises(S.SpecError, match="mine is a directory, not a protocol file"):
        S.load_protocol("mine")


def test_a_truncated_results_file_is_reported_damaged_not_busy(tmp_path, capsys):
    """h5py's 'sblock' (superblock) message matched "lock": the file was said to be busy."""
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.h5").write_bytes((out / "results.h5").read_bytes()[:3000])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "d")]) == 2
    assert "not a readable HDF5 results file (" in _err_line(capsys)


def test_a_top_level_feedback_that_no_arm_reads_is_reported(tmp_path):
    from plastic import spec as S
    with pytest.warns(UserWarning, match="feedback = 'fa' is not read: every arm sets its own"):
        S.load_protocol("quickstart", ["feedback=fa"])


def test_plastic_run_refuses_to_start_under_torchrun(tmp_path, monkeypatch, capsys):
    """Each rank ran the whole protocol and raced for one results file."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--out", str(tmp_path / "r"), "-q", "--set", *FAST]) == 2
    assert "under torchrun (WORLD_SIZE=2)" in _err_line(capsys)
    assert not (tmp_path / "r").exists()


def test_resume_ignores_an_arm_s_description_and_no_arms_means_the_top_level_feedback(tmp_path,
                                                                                     capsys):
    from plastic import spec as S
    out = str(tmp_path / "r")
    assert main(["run", "--out", out, "--arms", "bp", "-q", "--set", *FAST, "epochs=1"]) == 0
    assert main(["run", "--out", out, "--arms", "bp", "-q", "--resume", "--set", *FAST,
                 "epochs=1", "arms.bp.description=the control"]) == 0
    arms = S.resolve_protocol({"feedback": "fa"})["arms"]
    assert list(arms) == ["fa"] and arms["fa"]["feedback"] == "fa"  # it ran bp
    assert list(S.resolve_protocol({})["arms"]) == ["bp"]


def test_an_interrupt_takes_the_progress_bar_off_and_says_what_was_kept(tmp_path, capsys,
                                                                       monkeypatch):
    """Ctrl-C mid-epoch closes the terminal's progress bar (it was left mid-line, under the
    message); Ctrl-C before the results file exists says nothing was written (it said finished
    epochs were kept in a file that did not exist)."""
    from plastic import train as T
    bars, steps = [], []
    monkeypatch.setattr(T._Progress, "__init__",
                        lambda self, enabled: setattr(self, "tty", enabled) or
                        setattr(self, "enabled", enabled) or setattr(self, "bar", None))
    start = T._Progress.start
    monkeypatch.setattr(T._Progress, "start",
                        lambda self, total, desc: start(self, total, desc) or bars.append(self.bar))
    update = T._Progress.update

    def interrupting_update(self, loss, n=1):
        steps.append(loss)
        if len(steps) == 3:
            raise KeyboardInterrupt
        update(self, loss, n)
    monkeypatch.setattr(T._Progress, "update", interrupting_update)
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--arms", "fa", "--markdown", "--set", *FAST]) == 130
    assert len(bars) == 1 and bars[0].disable  # closed
    printed, err = capsys.readouterr()
    assert f"interrupted; finished epochs are kept in {out / 'results.h5'}" in err
    # the table as asked (it was plain text), and the command to continue keeps --markdown
    assert printed.startswith("| arm |") and err.rstrip().endswith("--resume --markdown)")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "ResultsWriter", interrupted)
    assert main(["run", "--out", str(tmp_path / "early"), "--arms", "fa", "--set", *FAST]) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing was written yet (continue with: plastic run --out" in err
    assert not (tmp_path / "early" / "results.h5").exists()


def test_report_lists_a_resnet_s_synapses_in_circuit_order(tmp_path, capsys, saved_figures):
    """Names sorted as text put a ResNet's readout "fc" second, in --layers and angles.png."""
    out, proto = tmp_path / "r", tmp_path / "resnet.toml"
    proto.write_text('name = "tiny-resnet"\ndata = "mnist-sample"\nepochs = 1\nthreads = 1\n'
                     'train_limit = 256\ntest_limit = 128\nprobe_size = 64\n[circuit]\n'
                     'kind = "resnet"\nchannels = [4, 8]\nblocks = [1, 1]\n'
                     '[arms.fa]\nfeedback = "fa"\n')
    assert main(["run", str(proto), "--out", str(out), "-q"]) == 0
    order = results.read(out)["arms"]["fa"]["attrs"]["synapses"]
    assert order[0] == "conv1" and order[-1] == "fc" and len(order) > 4
    capsys.readouterr()
    assert main(["report", str(out), "--layers", "--figures"]) == 0
    heading = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("B–Wᵀ angle"))
    assert heading.split(": ", 1)[1].split(" / ") == order
    assert _legend(saved_figures["angles.png"]) == order
    assert main(["report", str(out), "--out", str(tmp_path / "combined")]) == 0  # the same
    assert _legend(saved_figures["angles.png"]) == order


def test_a_diverged_arm_s_legend_says_it_trained_no_epoch(tmp_path, saved_figures):
    """An arm that diverged in its first epoch showed its untrained accuracy under the legend
    title "final test accuracy"."""
    out = tmp_path / "d"
    assert main(["run", "--out", str(out), "--arms", "bp,fa", "-q", "--set", *FAST,
                 "epochs=1", "arms.fa.lr=1e37"]) == 2
    legend = _legend(saved_figures["learning_curves.png"])
    assert legend[0].startswith("bp (") and legend[0].endswith("%)")
    assert legend[1].startswith("fa (no epoch trained; ") and legend[1].endswith("% untrained)")


def test_a_resume_on_another_machine_is_recorded(tmp_path, monkeypatch):
    from plastic import spec as S
    spec = S.load_protocol("quickstart", [])
    results.ResultsWriter(tmp_path, spec).close()
    results.ResultsWriter(tmp_path, spec, resume=True).close()  # the same machine: nothing
    with h5py.File(tmp_path / "results.h5") as h:
        assert "resumed_on" not in h.attrs
    other = {**results.machine(), "cpu": "another CPU"}
    monkeypatch.setattr(results, "machine", lambda: other)
    for _ in range(2):  # once, however often
        results.ResultsWriter(tmp_path, spec, resume=True).close()
    with h5py.File(tmp_path / "results.h5") as h:
        assert json.loads(h.attrs["resumed_on"]) == [other]


def test_report_says_when_files_ran_on_different_machines(tmp_path, capsys):
    import shutil
    assert main(["run", "--out", str(tmp_path / "a"), "-q", "--arms", "bp", "--set", *FAST,
                 "epochs=1"]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "different machines" not in capsys.readouterr().err  # one machine
    with h5py.File(tmp_path / "b" / "results.h5", "a") as h:
        h.attrs["machine"] = json.dumps({**json.loads(h.attrs["machine"]), "cpu": "another CPU"})
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "these files ran on 2 different machines (" in err and "another CPU (" in err


def test_recordings_of_the_first_seed_are_the_protocol_s_first(tmp_path):
    """With seeds [2, 10], "seed10" < "seed2" as text: seed 10's recording was returned."""
    w = results.ResultsWriter(tmp_path, {"name": "x", "seeds": [2, 10], "arms": {"a": {}}})
    w.arm_group("a", {"feedback": "fa"})
    for s in (10, 2):
        w.append("a", {"seed": s, "epoch": 0, "test_accuracy": 0.1})
        w.write_recording("a", s, 0, {"2/rates": np.full(3, float(s))})
    w.close()
    assert results.read_recordings(tmp_path, "a")[0]["2/rates"].tolist() == [2.0] * 3
    assert results.read_recordings(tmp_path, "a", seed=10)[0]["2/rates"].tolist() == [10.0] * 3
    with pytest.raises(results.ResultsError, match="no recording of seed 3; recorded seeds: 2, 10"):
        results.read_recordings(tmp_path, "a", seed=3)


def test_a_protocol_finds_its_circuit_and_data_files_beside_it(tmp_path, monkeypatch):
    """circuit = "c.toml" and data = "d.h5" in proj/p.toml were looked for in the working
    directory only: `plastic run proj/p.toml` said "circuit file not found"."""
    import shutil
    from plastic import data as data_mod
    from plastic.spec import CIRCUITS_DIR, load_protocol, resolve_circuit
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(CIRCUITS_DIR / "mlp-small.toml", proj / "c.toml")
    shutil.copy(data_mod.REPO_DATA / "mnist-sample.h5", proj / "d.h5")
    (proj / "p.toml").write_text('name = "p"\ndata = "d.h5"\ncircuit = "c.toml"\n'
                                 '[arms.fa]\nfeedback = "fa"\n')
    monkeypatch.chdir(tmp_path)
    spec = load_protocol("proj/p.toml")
    assert spec["data"] == str(proj / "d.h5") and spec["circuit"]["name"] == "c"
    sets = ["--set", "epochs=1", "train_limit=128", "test_limit=64", "probe_size=0"]
    assert main(["run", "proj/p.toml", "--out", "proj/r", "-q", *sets]) == 0
    # the files beside the protocol come first: a circuit of that name here is another one
    (tmp_path / "c.toml").write_text('kind = "mlp"\nhidden = [64, 64]\n')
    assert load_protocol("proj/p.toml")["circuit"]["hidden"] == \
        resolve_circuit(str(CIRCUITS_DIR / "mlp-small.toml"))["hidden"] != [64, 64]
    # and the run resumes from the protocol's own folder (its data path was recorded as
    # relative to where it started)
    monkeypatch.chdir(proj)
    assert main(["run", "p.toml", "--out", "r", "-q", "--resume", *sets]) == 0


def test_an_install_without_the_checkout_s_folders_says_so(tmp_path, monkeypatch, capsys):
    """A wheel (pip install .) holds the package only: the quickstart said 'protocol file not
    found: .../protocols/quickstart.toml' with no hint why."""
    from plastic import data as data_mod
    from plastic import spec as spec_mod
    gone = tmp_path / "site-packages"
    monkeypatch.setattr(spec_mod, "PROTOCOLS_DIR", gone / "protocols")
    monkeypatch.setattr(spec_mod, "CIRCUITS_DIR", gone / "circuits")
    monkeypatch.setattr(data_mod, "REPO_DATA", gone / "data")
    for named in ([], ["mnist"], ["quickstart"]):  # the default, and protocols by name
        assert main(["run", *named, "--out", str(tmp_path / "r")]) == 2
        assert "non-editable install" in _err_line(capsys)
    with pytest.raises(plastic.SpecError, match="circuit 'mlp-small': .*pip install -e"):
        spec_mod.resolve_circuit("mlp-small")
    with pytest.raises(plastic.DataError, match="embedded sample 'mnist-sample': .*non-editable"):
        data_mod.load("mnist-sample")


def test_a_warning_is_shown_once_per_command(tmp_path):
    """Each arm is built twice (checked before anything is written, then trained): its
    warnings, such as Dale's law on tanh populations, were printed twice."""
    with pytest.warns(UserWarning) as got:
        assert main(["run", "--out", str(tmp_path / "r"), "--arms", "fa", "-q", "--set", *FAST,
                     "epochs=1", "circuit.excitatory=0.8"]) == 0
    assert sum("Dale's law with 'tanh'" in str(w.message) for w in got) == 1


_RSS_AFTER_FREE = """
import os, sys, torch
from plastic.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "kept" else False
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for _ in range(3):  # torch's own first-use allocations settle
    x = torch.ones(64 << 18)  # 64 MiB, every page touched
    del x
x = torch.ones(64 << 18)
peak = rss()
del x
print(applied, (peak - rss()) >> 20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_the_plastic_command_keeps_freed_memory_for_the_next_step(monkeypatch, tmp_path):
    """glibc unmaps a freed 64 MiB block, so the next step faults in fresh pages; after
    keep_freed_memory the block stays for reuse.  Only the command does it (main called from
    Python leaves the caller's allocator alone), and PLASTIC_MALLOC=default or the user's own
    malloc settings leave malloc alone."""
    import ctypes.util
    import plastic.allocator
    import plastic.cli
    calls = []
    monkeypatch.setattr(plastic.allocator, "keep_freed_memory", lambda: calls.append(1))
    run = ["run", "--out", str(tmp_path / "r"), "--arms", "bp", "-q", "--set", "epochs=1",
           "train_limit=64", "test_limit=32", "probe_size=8", "circuit.hidden=[8]"]
    assert main(run) == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["plastic", *run[:2], str(tmp_path / "s"), *run[3:]])
    assert plastic.cli.console_main() == 0 and calls == [1]
    monkeypatch.undo()
    if "libc.so.6" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("not glibc")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("PLASTIC_MALLOC", "GLIBC_TUNABLES")}

    def freed(mode, **env):
        r = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True,
                           text=True, env={**clean, **env}, timeout=120)
        assert r.returncode == 0, r.stderr
        applied, dropped = r.stdout.split()
        return applied, int(dropped)
    applied, kept = freed("kept")
    assert applied == "True" and kept < 8  # the freed block stayed (MiB returned to the kernel)
    assert freed("default")[1] >= 60       # glibc's default: returned at once
    assert freed("kept", PLASTIC_MALLOC="default")[0] == "False"
    applied, dropped = freed("kept", MALLOC_TRIM_THRESHOLD_="131072")  # the user's own stand
    assert applied == "False" and dropped >= 60
    with pytest.raises(ValueError, match="positive number of bytes"):
        plastic.allocator.keep_freed_memory(0)
    for env, theirs in ((dict(GLIBC_TUNABLES="glibc.malloc.trim_threshold=5"), True),
                        (dict(MALLOC_TOP_PAD_="1"), True),
                        (dict(GLIBC_TUNABLES="glibc.malloc.arena_max=2"), False),
                        (dict(MALLOC_ARENA_MAX="2"), False)):
        with monkeypatch.context() as m:
            for k in ("GLIBC_TUNABLES", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"):
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            assert plastic.allocator._user_settings() is theirs, env


def _two_seed_file(tmp_path, rows=((0, 0), (0, 1), (1, 0), (1, 1), (1, 2))):
    """A results file of arm fa, by default seed 0 at epochs 0-1 and seed 1 at epochs 0-2;
    angle/1 holds 10 * seed + epoch and test_accuracy a hundredth of it, so a row out of line
    shows."""
    from plastic import spec as S
    w = results.ResultsWriter(tmp_path / "r", S.load_protocol("quickstart", [*FAST,
                                                                           "seeds=[0,1]"]))
    w.arm_group("fa", {"feedback": "fa"})
    for seed, epoch in rows:
        w.append("fa", {"seed": seed, "epoch": epoch, "test_accuracy": (10 * seed + epoch) / 100,
                        "angle/1": 10 * seed + epoch, "train_loss": 1.0})
    return w


def _rows(path):
    m = results.read(path)["arms"]["fa"]["metrics"]
    assert np.array_equal(m["angle/1"], 10 * m["seed"] + m["epoch"])  # in line
    assert np.allclose(m["test_accuracy"], m["angle/1"] / 100)
    return sorted(zip(m["seed"].astype(int), m["epoch"].astype(int)))


def test_restarting_a_seed_can_be_interrupted_without_losing_or_misaligning_rows(tmp_path,
                                                                                 monkeypatch):
    """drop_rows (a seed restarted on resume) rewrote the columns one at a time: an interrupt
    part-way left them out of line and lost a finished seed's row for good.  The kept rows now
    go to a new group that replaces the old one whole."""
    w = _two_seed_file(tmp_path)
    calls = []
    real_create = h5py.Group.create_dataset

    def interrupted(self, *a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_create(self, *a, **k)
    monkeypatch.setattr(h5py.Group, "create_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.drop_rows("fa", 0)
    monkeypatch.undo()
    w.close()
    everything = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert _rows(tmp_path / "r") == everything  # the old columns, whole
    # cut between deleting the old group and moving the new one in
    w = results.ResultsWriter(tmp_path / "r", w_spec := json.loads(
        h5py.File(tmp_path / "r" / "results.h5", "r").attrs["spec"]), resume=True)
    monkeypatch.setattr(h5py.Group, "move", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        w.drop_rows("fa", 0)
    monkeypatch.undo()
    w.close()
    with h5py.File(tmp_path / "r" / "results.h5", "r") as h:
        assert "metrics" not in h["arms/fa"]
    assert _rows(tmp_path / "r") == everything[2:]  # read takes the compacted group
    w = results.ResultsWriter(tmp_path / "r", w_spec, resume=True)  # and resume moves it in
    w.close()
    with h5py.File(tmp_path / "r" / "results.h5", "r") as h:
        assert sorted(h["arms/fa"]) == ["metrics"]
    assert _rows(tmp_path / "r") == everything[2:]


def test_report_takes_each_seed_from_the_file_where_it_got_furthest(tmp_path):
    """A finished seed 1 in one file and an interrupted re-run of it in another: the table
    depended on the order of the files, and one order dropped the finished seed."""
    from plastic import spec as S
    a = _two_seed_file(tmp_path / "a", [(s, e) for s in (0, 1) for e in (0, 1, 2)])
    a.mark_done("fa", 0)
    a.mark_done("fa", 1)
    a.close()
    b = results.ResultsWriter(tmp_path / "b" / "r", S.load_protocol("quickstart",
                                                                    [*FAST, "seeds=[0,1]"]))
    b.arm_group("fa", {"feedback": "fa"})
    b.append("fa", {"seed": 1, "epoch": 0, "test_accuracy": 99, "angle/1": 99})
    b.close()
    files = [results.read(tmp_path / "a" / "r"), results.read(tmp_path / "b" / "r")]
    for order in (files, files[::-1]):
        (row,) = results.summary(order)
        assert row["seeds"] == 2 and row["done"] == 2 and row["test_accuracy"] == [0.02, 0.12]


def test_the_figure_of_a_file_pools_the_seeds_the_table_pools(tmp_path, saved_figures):
    """A seed interrupted at epoch 1 of 2 was averaged into the curve at epoch 1, while the
    table left it out."""
    w = _two_seed_file(tmp_path)  # seed 1 reached epoch 2, seed 0 only epoch 1
    w.close()
    results.figures(tmp_path / "r")
    (line,) = saved_figures["learning_curves.png"].axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2]
    assert np.allclose(line.get_ydata(), [100 * (1 - 0.11), 100 * (1 - 0.12)])  # seed 1's


def test_damaged_links_and_checkpoints_are_one_line_errors(tmp_path, capsys, monkeypatch):
    w = _two_seed_file(tmp_path)
    w.close()
    with h5py.File(tmp_path / "r" / "results.h5", "a") as h:
        h["arms/fa/metrics/lost"] = h5py.SoftLink("/nowhere")
    assert main(["report", str(tmp_path / "r")]) == 2
    assert "broken link" in _err_line(capsys)
    from plastic import train as T
    monkeypatch.setattr(T, "_save_weights", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "c"
    assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *FAST]) == 130
    monkeypatch.undo()
    ckpt = out / "checkpoints" / "fa-seed0.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:len(ckpt.read_bytes()) // 2])
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--resume", "--set", *FAST]) == 2
    assert "a damaged checkpoint" in _err_line(capsys)


@pytest.mark.parametrize("name", ["x/y", ".", "..", "", "fa\\u0000x"])
def test_an_arm_name_that_cannot_name_a_results_group_is_refused(tmp_path, capsys, name):
    """'x/y' trained and then left the results file unreadable; '.' made every arm's group
    unreadable; '' ended in an h5py traceback; a NUL wrote to the group of the name cut at it,
    then ended in a traceback."""
    toml = (Path(plastic.__file__).parents[1] / "protocols" / "quickstart.toml").read_text()
    (tmp_path / "p.toml").write_text(toml.replace("[arms.usf]", f'[arms."{name}"]'))
    assert main(["run", str(tmp_path / "p.toml"), "--out", str(tmp_path / "x")]) == 2
    import tomllib
    parsed = tomllib.loads(f'x = "{name}"')["x"]  # "\u0000" is NUL, which h5py cut short
    assert f"arm name {parsed!r} cannot name a group of the results file" in _err_line(capsys)
    assert not (tmp_path / "x").exists()


def test_resume_without_out_is_refused(capsys):
    assert main(["run", "--resume"]) == 2
    assert "--resume needs --out DIR" in _err_line(capsys)


def test_report_of_different_experiments_says_so_and_titles_each(tmp_path, capsys,
                                                                 saved_figures):
    a = {"name": "quickstart", "circuit": {"name": "mlp-small"}, "data": "mnist-sample"}
    b = {"name": "cifar10", "circuit": {"name": "convnet-cifar"}, "data": "cifar10"}
    assert results.experiments([a, b, dict(a)]) == ["quickstart: mlp-small on mnist-sample",
                                                   "cifar10: convnet-cifar on cifar10"]
    # files that differ only where the table still pools seeds are one experiment
    assert results.experiments([a, {**a, "name": "copy", "seeds": [3]}]) == [
        "quickstart: mlp-small on mnist-sample"]
    assert results.experiments([a, {**a, "epochs": 9}]) == [
        "quickstart: mlp-small on mnist-sample (#1)", "quickstart: mlp-small on mnist-sample (#2)"]
    for d, width in (("a", 32), ("b", 16)):  # FAST's circuit, and a narrower one
        assert main(["run", "--out", str(tmp_path / d), "--arms", "fa", "-q", "--set", *FAST,
                     "epochs=1", f"circuit.hidden=[{width}]"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "f")]) == 0
    assert "these files hold 2 different experiments" in capsys.readouterr().err
    title = saved_figures["learning_curves.png"]._suptitle.get_text()
    assert "mnist-sample (#1)" in title and "mnist-sample (#2)" in title


def test_resume_repairs_an_arm_killed_during_its_first_row(tmp_path):
    """append() creates a new arm's columns one by one: a kill part-way leaves some without
    seed or epoch.  Resume (which now reads the file first) refused such a file as damaged."""
    w = _two_seed_file(tmp_path)
    g = w.h5["arms"].require_group("usf").require_group("metrics")
    g.create_dataset("train_loss", data=[1.0], maxshape=(None,), chunks=(256,))
    spec = json.loads(w.h5.attrs["spec"])
    w.close()
    with pytest.warns(UserWarning, match="half-written last row"):
        assert results.read(tmp_path / "r")["arms"]["usf"]["metrics"] == {}
    with pytest.warns(UserWarning, match="half-written last row"):
        w = results.ResultsWriter(tmp_path / "r", spec, resume=True)
    w.arm_group("usf", {"feedback": "usf"})
    w.append("usf", {"seed": 0, "epoch": 0, "test_accuracy": 0.5, "train_loss": 2.0})
    w.close()
    m = results.read(tmp_path / "r")["arms"]["usf"]["metrics"]
    assert list(m["train_loss"]) == [2.0] and list(m["seed"]) == [0]


def test_a_resumed_checkpoint_is_read_on_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    """The checkpoint was loaded with map_location=device: on a GPU its random states became CUDA
    tensors, which Generator.set_state and torch.set_rng_state refuse (every GPU resume was a
    traceback)."""
    from plastic import spec as S, train as T
    spec = S.load_protocol("quickstart", ["epochs=2", "train_limit=64", "test_limit=32",
                                          "probe_size=8", "batch_size=32", "circuit.hidden=[8]"])
    save = T._save_atomic

    def interrupting(obj, path):
        save(obj, path)
        if "checkpoints" in str(path) and obj["epoch"] == 1:
            assert obj["cuda_rng"] is None  # a GPU run saves the GPU's random state too
            raise KeyboardInterrupt
    monkeypatch.setattr(T, "_save_atomic", interrupting)
    with pytest.raises(KeyboardInterrupt):
        T.run_protocol(spec, tmp_path, arms=["fa"], progress=False)
    monkeypatch.setattr(T, "_save_atomic", save)
    real, where = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: (where.append(k.get("map_location")),
                                                        real(*a, **k))[1])
    T.run_protocol(spec, tmp_path, arms=["fa"], resume=True, progress=False)
    assert where == ["cpu"]


def test_a_run_refuses_up_front_what_it_would_find_out_late(tmp_path, capsys):
    """A conversion arm's bad population or unconvertible source arm failed after the source arm
    had trained; convert_from naming the arm itself or another converted arm was accepted (with
    the wrong advice later); device xpu or meta passed and failed after epoch 0; a shift as wide
    as the image trained on blank crops; a sleep.every beyond the run's steps left the mirror's
    B untrained, silently; lr 1e40 was torch's overflow traceback."""
    base = ["run", "rate_vs_spiking", "--out", str(tmp_path / "o"), "-q", "--set",
            "data=mnist-sample", "epochs=1", "train_limit=64", "test_limit=32", "threads=1"]
    cases = [
        (["--arms", "rate-bp,converted", "--set", "arms.converted.population=relu"],
         "arm 'converted': unknown spiking population 'relu'"),
        (["--arms", "rate-bp,converted", "--set", "circuit.population=tanh"],
         "arm 'converted': spiking_version: population 2 has the activation 'tanh'"),
        (["--set", "arms.c2.feedback=fa", "arms.c2.convert_from=converted"],
         "names 'converted', itself a converted arm"),
        (["--arms", "rate-bp", "--set", "device=meta"], "plastic runs on cpu, cuda or mps"),
        (["--arms", "rate-bp", "--set", "augment.shift=28"], "not smaller than the 28x28"),
        (["--arms", "rate-bp", "--set", "arms.rate-bp.lr=1e40"], "must be a float32 number"),
    ]
    for extra, what in cases:
        assert main(base[:-6] + extra + base[-6:] if extra[0] == "--arms"
                    else base + extra[1:]) == 2, extra
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "o").exists(), extra  # nothing trained, nothing written
    assert main(["run", "--out", str(tmp_path / "m"), "-q", "--arms", "m", "--set", *FAST,
                 "epochs=1", "arms.m.feedback=mirror", "sleep.every=100"]) == 2
    err = capsys.readouterr().err
    assert "sleep.every = 100 wake batches, but the run has 16" in err
    assert main(["run", "--out", str(tmp_path / "s"), "-q", "--set", *FAST, "epochs=1",
                 "arms.self.feedback=fa", "arms.self.convert_from=self"]) == 2
    assert "must name an earlier arm" in capsys.readouterr().err


def test_a_divergence_in_the_last_step_is_not_reported_as_a_result(tmp_path, capsys):
    """Only the training loss, taken before each step, was checked: a last step that blew the
    weights up was measured, marked done and reported (exit 0)."""
    rc = main(["run", "--out", str(tmp_path), "-q", "--arms", "bp", "--set", "epochs=1",
               "train_limit=32", "test_limit=32", "probe_size=8", "batch_size=32",
               "circuit.hidden=[8]", "circuit.population=relu", "arms.bp.lr=1e30"])
    assert rc == 2
    assert "test loss became nan after epoch 1" in capsys.readouterr().err
    assert results.read(tmp_path / "results.h5")["arms"]["bp"]["attrs"].get("done_seeds", []) == []


def test_setting_the_arm_of_a_protocol_without_arms(tmp_path, capsys):
    """Its one arm (named by its feedback) could not be reached by --set arms.NAME, and a new
    arm replaced it instead of joining it."""
    from plastic.spec import load_protocol
    p = tmp_path / "p.toml"
    p.write_text('name = "p"\ndata = "mnist-sample"\ncircuit = "mlp-small"\nfeedback = "fa"\n')
    assert load_protocol(str(p), ["arms.fa.lr=0.3"])["arms"]["fa"]["lr"] == 0.3
    both = load_protocol(str(p), ["arms.kp.feedback=kolen-pollack"])["arms"]
    assert list(both) == ["fa", "kp"] and both["fa"]["feedback"] == "fa"
    assert list(load_protocol(str(p), ["feedback=usf", "arms.usf.lr=0.2"])["arms"]) == ["usf"]


def test_a_spiking_blow_up_and_a_diverged_source_arm_are_divergences(tmp_path, capsys):
    """Spikes are bounded, so a spiking circuit blown up by its last step kept a finite test loss
    (1.9e29) and was reported as a result; and a conversion arm whose source arm diverged ended
    the whole run with advice to run the source first."""
    rc = main(["run", "rate_vs_spiking", "--out", str(tmp_path), "-q",
               "--arms", "rate-bp,converted,lif-fa", "--set", "data=mnist-sample", "epochs=1",
               "train_limit=128",
               "batch_size=128", "test_limit=64", "probe_size=8", "threads=1",
               "arms.rate-bp.lr=1e30", "arms.lif-fa.lr=1e30"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "arm 'converted': not run for seed 0, as arm 'rate-bp' diverged" in err
    assert "arm 'lif-fa': test loss became" in err
    r = results.read(tmp_path / "results.h5")
    assert r["arms"]["lif-fa"]["attrs"].get("done_seeds", []) == []


def test_adam_s_overflowing_first_step_is_a_divergence(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "-q", "--arms", "bp", "--set", "epochs=1",
                 "train_limit=256", "test_limit=64", "probe_size=8", "threads=1",
                 "optimizer.name=adam", "arms.bp.lr=1e38"]) == 2
    err = capsys.readouterr().err
    assert "the optimizer step overflowed in epoch 1" in err and "Traceback" not in err


def test_reports_of_files_beside_each_other_keep_their_figures_and_say_what_they_cannot(
        tmp_path, capsys, monkeypatch):
    """Two results files in one directory drew into the same learning_curves.png (the first
    lost, silently); a .hdf5 results file was looked for as DIR/results.h5; a figure that could
    not be written was a PermissionError traceback; a report piped into head a BrokenPipeError."""
    import shutil
    assert main(["run", "--out", str(tmp_path / "a"), "-q", "--arms", "bp,fa", "--set", *FAST,
                 "epochs=1"]) == 0
    col = tmp_path / "col"
    col.mkdir()
    shutil.copy(tmp_path / "a" / "results.h5", col / "s0.h5")
    shutil.copy(tmp_path / "a" / "results.h5", col / "s1.hdf5")
    capsys.readouterr()
    assert main(["report", str(col / "s0.h5"), str(col / "s1.hdf5"), "--figures"]) == 0
    err = capsys.readouterr().err
    assert f"figure: {col / 's0_learning_curves.png'}" in err
    assert f"figure: {col / 's1_learning_curves.png'}" in err
    assert main(["report", str(col / "s0.h5"), "--out", str(col)]) == 0  # beside its own
    assert f"figure: {col / 'combined_learning_curves.png'}" in capsys.readouterr().err
    # beside another run's figures: they were overwritten by those of the files reported
    own = (tmp_path / "a" / "learning_curves.png").read_bytes()
    assert main(["report", str(col / "s1.hdf5"), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "learning_curves.png").read_bytes() == own
    assert (tmp_path / "a" / "combined_learning_curves.png").exists()
    assert main(["run", "--out", str(tmp_path / "x.hdf5"), "-q", "--arms", "bp", "--set", *FAST,
                 "epochs=1"]) == 2  # a directory, not the results file
    assert "--out takes a directory" in capsys.readouterr().err
    import matplotlib.figure

    def denied(self, path, *a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", denied)
    assert main(["report", str(tmp_path / "a"), "--figures"]) == 2
    err = capsys.readouterr().err
    assert "cannot write figures to" in err and "Permission denied" in err and "Traceback" not in err
    monkeypatch.undo()
    p = subprocess.run(f"{shlex.quote(sys.executable)} -m plastic.cli report "
                       f"{shlex.quote(str(tmp_path / 'a'))} --layers | head -1", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


def test_recording_figures_span_the_simulated_time_in_circuit_order_and_one_epoch_once(tmp_path):
    """The raster's axis ran to the recorded steps times every (21 ms of a 20 ms run); panels
    were in text order ("10" above "2"); a converted arm's one recording was drawn twice as
    before/after; record.every beyond the steps kept only step 0."""
    import matplotlib.pyplot as plt
    from plastic.plots import recording_figures
    from plastic.spec import load_protocol
    rec = {2: {f"{p}/spikes": np.zeros((7, 1, 4)) for p in ("10", "2")}}
    made = []
    real = plt.subplots

    def keep(*a, **k):
        fig, axes = real(*a, **k)
        made.append(axes)
        return fig, axes
    plt.subplots = keep
    try:
        recording_figures(rec, tmp_path, "conv", every=3, steps=20)
    finally:
        plt.subplots = real
    axes = made[0]
    assert axes.shape == (2, 1)  # one recorded epoch: one column
    assert [a.get_title() for a in axes[:, 0]] == ["conv: 2, epoch 2", "conv: 10, epoch 2"]
    assert axes[0, 0].get_xlim() == (0.0, 20.0)
    with pytest.raises(plastic.SpecError, match="record.every = 20 keeps every 20th of 20"):
        load_protocol("rate_vs_spiking", ["time.steps=20", "record.every=20", "record.samples=2"])
    load_protocol("mnist", ["record.samples=2", "record.every=30"])  # a rate circuit ignores it


def test_a_rate_population_takes_a_per_neuron_numpy_tau():
    from plastic.populations import RateParameters, RateState, rate_step
    tau = np.array([0.01, 0.02])
    r, _ = rate_step(torch.ones(3, 2), RateState(torch.zeros(3, 2)), RateParameters(tau, 1e-3))
    assert torch.allclose(r[0], torch.tensor([0.1, 0.05]) * torch.tanh(torch.tensor(1.0)))
    with pytest.raises(plastic.SpecError, match="tau > 0"):
        rate_step(torch.ones(3, 2), RateState(torch.zeros(3, 2)),
                  RateParameters(np.array([0.01, -1.0]), 1e-3))


def test_the_last_review_s_edges(tmp_path, capsys, monkeypatch):
    """A conversion arm without a population runs lif, so record.every >= time.steps is refused
    for it too; --out naming a file is refused before the advice to --resume; an interrupt
    before the first row says no epoch had finished; a run directory named x.hdf5 is still a
    directory; a file named combined.h5 beside --out is refused, not overwritten."""
    import shutil
    from plastic import train as T
    from plastic.spec import load_protocol
    with pytest.raises(plastic.SpecError, match="record.every = 5 keeps every 5th of 5"):
        load_protocol("quickstart", ["time.steps=5", "record.every=5", "record.samples=2",
                                     "circuit.population=relu", "arms.c.convert_from=bp",
                                     "arms.c.feedback=fa"])
    (tmp_path / "f.h5").write_bytes(b"")
    assert main(["run", "--out", str(tmp_path / "f.h5"), "-q", "--set", *FAST]) == 2
    assert "--out takes a directory" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "evaluate", interrupted)
    assert main(["run", "--out", str(tmp_path / "i"), "-q", "--arms", "fa", "--set", *FAST]) == 130
    assert "interrupted; no epoch had finished" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["run", "--out", str(tmp_path / "x.hdf5"), "-q", "--arms", "bp", "--set",
                 *FAST, "epochs=1"]) == 2  # refused: it names a file
    (tmp_path / "x.hdf5").mkdir()  # a run directory of that name, from before
    assert main(["run", "--out", str(tmp_path / "x.hdf5"), "-q", "--arms", "bp", "--set",
                 *FAST, "epochs=1"]) == 0
    assert (tmp_path / "x.hdf5" / "results.h5").exists()
    assert main(["report", str(tmp_path / "x.hdf5")]) == 0
    shutil.copy(tmp_path / "x.hdf5" / "results.h5", tmp_path / "x.hdf5" / "combined.h5")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "x.hdf5" / "combined.h5"), "--out",
                 str(tmp_path / "x.hdf5")]) == 2
    assert "holds combined.h5" in capsys.readouterr().err


def test_report_of_a_run_without_a_finished_epoch_and_of_a_file_of_another_kind(tmp_path,
                                                                                 capsys):
    """A run stopped before its first epoch ended was reported as an empty table and an empty
    figure (with matplotlib's legend warning); a .pt file was 'no results file at x.pt/results.h5'."""
    from plastic.results import ResultsWriter
    from plastic.spec import load_protocol
    w = ResultsWriter(tmp_path / "r", load_protocol("quickstart", ["epochs=1"]))
    w.arm_group("bp", {"feedback": "transpose", "lr": 0.05})
    w.close()
    assert main(["report", str(tmp_path / "r"), "--figures"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no arm has finished an epoch yet" in captured.err
    assert not (tmp_path / "r" / "learning_curves.png").exists()
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    assert main(["report", str(f)]) == 2
    assert f"{f} is neither a run directory nor a results file (.h5 or .hdf5)" in _err_line(capsys)


def test_the_loss_read_every_few_steps_gives_the_same_run_and_still_stops_a_divergence(
        tmp_path, monkeypatch, capsys):
    """On a GPU the loss is read every SYNC_EVERY steps (each read waits for the device): the
    epoch's loss, summed on the device, is the same, and a divergence is still stopped."""
    from plastic import train as T
    rows = []
    for every in (1, 3):
        monkeypatch.setattr(T, "_loss_reads_every", lambda device: every)
        out = tmp_path / f"e{every}"
        assert main(["run", "--out", str(out), "--arms", "fa", "-q", "--set", *FAST]) == 0
        rows.append(results.read(out)["arms"]["fa"]["metrics"])
    for k in ("train_loss", "test_accuracy", "test_loss"):
        assert np.array_equal(rows[0][k], rows[1][k], equal_nan=True), k
    rc = main(["run", "--out", str(tmp_path / "nan"), "--arms", "information", "-q", "--set",
               *FAST, "epochs=1", "arms.information.feedback={amp=1e8,null=1e8,decay=1}"])
    assert rc != 0 and "training loss became nan in epoch 1" in capsys.readouterr().err


def test_a_conversion_arm_s_ignored_settings_recorded_before_do_not_split_it(tmp_path, capsys):
    """Older runs recorded settings a conversion arm never read (lr, feedback, ...); now refused,
    they made the recorded spec fail to resolve, so the file could not be resumed and report
    did not pool the arm. A file with no finished epoch beside a full one is named, not
    counted as another experiment."""
    import copy
    from plastic.results import ResultsWriter, _differences, _resolved
    from plastic.spec import load_protocol
    spec = load_protocol("rate_vs_spiking")
    old = copy.deepcopy(spec)
    old["arms"]["converted"].update(lr=0.5, feedback="fa", learning="backprop")
    assert _differences(_resolved(old)["arms"]["converted"], _resolved(spec)["arms"]["converted"]) == []
    # and a run whose conversion arm names its source's feedback resumes under the same spec
    same = load_protocol("rate_vs_spiking", ["arms.converted.convert_from=rate-fa",
                                             "arms.converted.feedback=fa"])
    ResultsWriter(tmp_path / "same", same).close()
    ResultsWriter(tmp_path / "same", same, resume=True).close()
    full = tmp_path / "full"
    assert main(["run", "--out", str(full), "--arms", "fa", "-q", "--set", *FAST, "epochs=1"]) == 0
    w = ResultsWriter(tmp_path / "empty", load_protocol("quickstart", [*FAST, "epochs=1"]))
    w.arm_group("bp", {"feedback": "transpose", "lr": 0.05})
    w.close()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "empty"), str(full)]) == 0
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'empty'}: no arm has finished an epoch yet" in err
    assert "different experiments" not in err and "fa" in out

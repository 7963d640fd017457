"""channels_last against contiguous memory format: one training step (forward, backward with the
feedback rule, SGD step) of the CIFAR-10 protocol's ConvNet at batch 128, per arm of
``protocols/cifar10.toml`` (its feedback kind and options).

The two formats are timed interleaved, in alternating order (A B, B A, ...), with the garbage
collector off, and the medians compared; the candidate is the protocol option
``memory_format = "channels_last"``.  Prints one line per kind and, last, one JSON object with the
milliseconds per step and the ratio channels_last / contiguous for each kind, and ``_meta``.

    python benchmarks/memory_format.py [--rounds 12] [--kinds bp,information] [--threads N]
"""
import argparse
import gc
import json
import statistics
import sys
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's plastic
sys.path.insert(0, str(ROOT / "benchmarks"))

import plastic  # noqa: E402
from overhead import Runner  # noqa: E402  benchmarks/overhead.py: one model's timed steps
from plastic import train  # noqa: E402
from plastic.spec import resolve_protocol  # noqa: E402
KINDS = ("bp", "fa", "usf", "information", "activation", "symmetric", "kolen-pollack")


def _model(spec, kind, channels_last):
    arm = spec["arms"][kind]
    torch.manual_seed(0)
    m = plastic.convert(train.build_circuit(spec["circuit"], (3, 32, 32), 10), arm["feedback"],
                        options=arm.get("feedback_options") or {})
    return m.to(memory_format=torch.channels_last) if channels_last else m


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed sample")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help="arms of protocols/cifar10.toml, comma-separated")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's default)")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds:
        ap.error("--kinds lists no arm")
    if len(set(kinds)) != len(kinds):
        ap.error("--kinds lists an arm twice")
    spec = resolve_protocol(tomllib.loads((ROOT / "protocols/cifar10.toml").read_text()))
    unknown = [k for k in kinds if k not in spec["arms"]]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; protocols/cifar10.toml has {', '.join(spec['arms'])}")
    if "mirror" in kinds:  # its wake step is fa's; it learns in sleep phases
        ap.error("mirror learns in sleep phases, which this benchmark does not time; "
                 "overhead.py times the concurrent mirror (mirror-concurrent)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    out = {}
    for kind in kinds:
        runners = {fmt: Runner(fmt, _model(spec, kind, fmt == "channels_last"), x, y)
                   for fmt in ("contiguous", "channels_last")}
        times = {fmt: [] for fmt in runners}
        gc.collect()
        gc.disable()
        try:
            for r in range(args.rounds + 2):  # the first two rounds warm up
                order = list(runners) if r % 2 == 0 else list(runners)[::-1]
                for fmt in order:
                    t = runners[fmt].block(args.steps) / args.steps * 1e3
                    if r >= 2:
                        times[fmt].append(t)
        finally:
            gc.enable()
        med = {fmt: statistics.median(v) for fmt, v in times.items()}
        out[kind] = {"contiguous_ms": round(med["contiguous"], 1),
                     "channels_last_ms": round(med["channels_last"], 1),
                     "ratio": round(med["channels_last"] / med["contiguous"], 3)}
        print(kind, out[kind], flush=True)
    out["_meta"] = {"rounds": args.rounds, "steps": args.steps, "batch": 128,
                    "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

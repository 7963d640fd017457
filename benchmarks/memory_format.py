"""channels_last against contiguous memory format: one training step (forward, backward with the
feedback rule, SGD step) of the CIFAR-10 protocol's ConvNet at batch 128, per arm of
``protocols/cifar10.toml`` (its feedback kind and options).

The two formats are timed interleaved (A B A B ...) and the medians compared; the candidate is the
protocol option ``memory_format = "channels_last"``.  Prints one line per kind and, last, one JSON
object with the milliseconds per step and the ratio channels_last / contiguous.

    python benchmarks/memory_format.py [--rounds 12] [--kinds bp,information]
"""
import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path

import torch

import plastic
from overhead import Runner  # benchmarks/overhead.py: one model's timed training steps
from plastic import train
from plastic.spec import resolve_protocol

ROOT = Path(__file__).resolve().parents[1]
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
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    spec = resolve_protocol(tomllib.loads((ROOT / "protocols/cifar10.toml").read_text()))
    unknown = [k for k in args.kinds.split(",") if k not in spec["arms"]]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; protocols/cifar10.toml has {', '.join(spec['arms'])}")
    if "mirror" in args.kinds.split(","):  # its wake step is fa's; it learns in sleep phases
        ap.error("mirror learns in sleep phases, which this benchmark does not time; "
                 "overhead.py times the concurrent mirror (mirror-concurrent)")
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    out = {}
    for kind in args.kinds.split(","):
        runners = {fmt: Runner(fmt, _model(spec, kind, fmt == "channels_last"), x, y)
                   for fmt in ("contiguous", "channels_last")}
        times = {fmt: [] for fmt in runners}
        for r in range(args.rounds + 2):  # the first two rounds warm up
            for fmt, runner in runners.items():
                t = runner.block(args.steps) / args.steps * 1e3
                if r >= 2:
                    times[fmt].append(t)
        med = {fmt: statistics.median(v) for fmt, v in times.items()}
        out[kind] = {"contiguous_ms": round(med["contiguous"], 1),
                     "channels_last_ms": round(med["channels_last"], 1),
                     "ratio": round(med["channels_last"] / med["contiguous"], 3)}
        print(kind, out[kind], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

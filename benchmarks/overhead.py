"""Step-time overhead of each feedback kind relative to plain PyTorch backprop.

One training step = zero_grad, forward, cross-entropy loss, backward, SGD-momentum step, on the
small ConvNet ``plastic.models.convnet(3, (32, 64, 128), 10, "relu", batch_norm=True,
image_size=32)`` with a random CIFAR-sized batch (3x32x32), on the CPU.

The baseline is the plain ``nn.Module`` (no ``plastic.convert``); every candidate starts from a
``copy.deepcopy`` of the same initial weights.  After a warm-up, the baseline and the candidates
are timed interleaved: each round runs one timed block of ``--steps`` steps per model, in an order
shuffled anew every round, so that drifting machine load (other jobs) hits all of them alike.
A kind that runs its rule on every k-th step only (``information-every4``) is timed in blocks
of whole cycles (``--steps`` rounded up to a multiple of k), so every block holds the same share
of rule steps.  Per model we take the median per-step time over rounds; the ratio of a kind is
median(kind) / median(baseline).  ``transpose`` (backprop through ``convert``) measures the
overhead of the plastic machinery itself and should be ~1.0.

Output: human-readable lines, then as the LAST line of stdout one JSON object
``{"transpose": 1.0, "fa": 1.03, ..., "bounds": {...}, "ratio_to_bound": {...}, "_meta": {...}}``:
each kind's step-time ratio to backprop; when learned rules were timed, ``bounds`` (each rule's
operation-count lower bound) and ``ratio_to_bound`` (ratio / bound, the issue's limit is 1.15);
extra information under ``_meta`` (``non_finite_loss`` lists kinds whose loss diverged).

    python benchmarks/overhead.py [--rounds 15] [--steps 3] [--batch 128] [--threads N]
                                  [--kinds fa,dfa,information,...] [--json-only]

The default ``--kinds`` is every entry of ``CANDIDATES``.

To add a kind, add an entry to ``CANDIDATES``: a name -> factory taking the plain model and
returning the model to train (it must not modify its argument).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import statistics
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's plastic

import plastic  # noqa: E402
from plastic.models import convnet  # noqa: E402

SEED = 0
IMAGE_SHAPE = (3, 32, 32)
N_CLASSES = 10
LR, MOMENTUM = 0.01, 0.9
BASELINE = "backprop"

Factory = Callable[[nn.Module], nn.Module]


def _converted(kind, **options) -> Factory:
    """A factory converting the plain model with feedback ``kind`` (a kind name or a mapping
    {name or pattern: kind}, see ``plastic.convert``) and learned-feedback ``options``."""
    def make(model: nn.Module) -> nn.Module:
        return plastic.convert(model, kind, seed=SEED, options=options or None)  # deep-copies
    return make


#: candidates: name -> factory(plain model) -> model to time.  Add kinds here.
CANDIDATES: dict[str, Factory] = {
    "transpose": _converted("transpose"),
    "fa": _converted("fa"),
    "usf": _converted("usf"),
    "brsf": _converted("brsf"),
    "frsf": _converted("frsf"),
    "dfa": _converted("dfa"),
    # learned feedback (Kunin et al. 2020): rules as data, B.grad written in the same backward
    "decay": _converted({"decay": 1e-3}),
    "self": _converted({"self": 1e-3}),
    "amp": _converted({"amp": 1e-3}),
    "null": _converted({"null": 1e-3}),
    "sparse": _converted({"sparse": 1e-3}),
    "information": _converted({"amp": 1e-3, "null": 1e-3, "decay": 1e-3}),
    # as in protocols/cifar10.toml: activity batch-centred and normalised per sample, error
    # routed through B at its initial norm
    "information-normalized": _converted({"amp": 0.025, "null": 0.025, "decay": 0.0025},
                                         normalize_input=True, normalize=True, center="batch"),
    # cheaper approximations, reported apart and never behind the figures above: the rule on
    # every 4th step, or on a quarter of the batch (no operation-count bound: they skip work)
    "information-every4": _converted({"amp": 1e-3, "null": 1e-3, "decay": 1e-3}, every=4),
    "information-subsample0.25": _converted({"amp": 1e-3, "null": 1e-3, "decay": 1e-3},
                                            subsample=0.25),
    "symmetric": _converted("symmetric"),
    "activation": _converted({"amp": 1e-3, "sparse": 1e-3}),
    "kolen-pollack": _converted("kolen-pollack"),
    "mirror-concurrent": lambda m: _mirror_concurrent(m),
}

#: operation-count lower bounds of the learned rules: a backprop step is 3 weight-sized passes
#: (forward, input gradient, weight gradient); each extra weight-gradient-sized or projection
#: operation a rule needs is one more pass.
BOUNDS = {"decay": 1.0, "self": 1.0, "symmetric": 1.0, "kolen-pollack": 1.0, "amp": 4 / 3,
          "null": 5 / 3, "sparse": 5 / 3, "information": 5 / 3, "activation": 5 / 3,
          "information-normalized": 5 / 3,
          "mirror-concurrent": 5 / 3}

#: kinds that run their rule on every k-th step only: timed in blocks of whole cycles
PERIODS = {"information-every4": 4}


def _mirror_concurrent(model):
    """The weight mirror run concurrently with training: Amp + Decay on white noise of the
    pre population's shape, in every backward pass (one forward projection + one weight-gradient
    operation)."""
    from plastic.learned import LearnedFeedback
    net = plastic.convert(model, "fa", seed=SEED)
    for _, syn in plastic.synapses(net):
        syn.set_feedback(LearnedFeedback(syn.weight, {"amp": 1e-3, "decay": 1e-3}, drive="noise"))
    return net
#: the reference every ratio is taken against
BASELINE_FACTORY: Factory = copy.deepcopy


def make_model() -> nn.Module:
    return convnet(IMAGE_SHAPE[0], (32, 64, 128), N_CLASSES, "relu", batch_norm=True,
                   image_size=IMAGE_SHAPE[1])


class Runner:
    """One model with its own optimizer; ``block(k)`` runs k training steps on the fixed batch
    and returns the wall time in seconds."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.name, self.model, self.x, self.y = name, model.train(), x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        self.last_loss = float("nan")

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def block(self, k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            loss = self.step()
        dt = time.perf_counter() - t0
        self.last_loss = loss.item()
        return dt


def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--steps", type=int, default=3, help="training steps per timed block (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up blocks per model (default 2)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default)")
    p.add_argument("--kinds", default=",".join(CANDIDATES),
                   help=f"comma-separated kinds (default: {','.join(CANDIDATES)})")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    a = p.parse_args(argv)
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not a.kinds:
        p.error("--kinds lists no kind")
    unknown = [k for k in a.kinds if k not in CANDIDATES]
    if unknown:
        p.error(f"unknown kind(s) {unknown}; known: {', '.join(CANDIDATES)}")
    if len(set(a.kinds)) != len(a.kinds):
        p.error("--kinds lists a kind twice")
    if a.rounds < 1 or a.steps < 1 or a.batch < 1 or a.warmup < 0 or (
            a.threads is not None and a.threads < 1):
        p.error("--rounds, --steps, --batch, --threads must be >= 1 and --warmup >= 0")
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    say = (lambda *a, **k: None) if args.json_only else (lambda *a, **k: print(*a, **k, flush=True))
    t_start = time.perf_counter()

    torch.manual_seed(SEED)
    base = make_model()
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(args.batch, *IMAGE_SHAPE, generator=g)
    y = torch.randint(0, N_CLASSES, (args.batch,), generator=g)

    names = [BASELINE] + args.kinds
    factories = {BASELINE: BASELINE_FACTORY, **{k: CANDIDATES[k] for k in args.kinds}}
    runners = {n: Runner(n, factories[n](base), x, y) for n in names}
    # steps per block: whole cycles of a kind's period, the same share of rule steps in each
    block = {n: math.ceil(args.steps / PERIODS.get(n, 1)) * PERIODS.get(n, 1) for n in names}

    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps, warm-up {args.warmup} blocks")
    for _ in range(args.warmup):
        for n in names:
            runners[n].block(block[n])

    rng = random.Random(SEED)
    times: dict[str, list[float]] = {n: [] for n in names}  # seconds per step, one per round
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            order = names[:]
            rng.shuffle(order)
            for n in order:
                times[n].append(runners[n].block(block[n]) / block[n])
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()

    med = {n: statistics.median(v) for n, v in times.items()}
    spread = 0.0  # the largest IQR / median over models
    base_med = med[BASELINE]
    result: dict = {}
    paired_all: dict[str, float] = {}
    diverged = []
    say(f"{'kind':<10} {'median ms':>10} {'ratio':>7} {'IQR ms':>15} {'paired':>7}  final loss")
    for n in names:
        v = [t * 1e3 for t in times[n]]
        q1, q3 = _quantile(v, 0.25), _quantile(v, 0.75)
        ratio = med[n] / base_med
        # median of the per-round ratios, a cross-check robust to slow drifts in load
        paired = statistics.median(t / b for t, b in zip(times[n], times[BASELINE]))
        loss = runners[n].last_loss
        flag = "" if math.isfinite(loss) else "  NON-FINITE LOSS"
        if flag:
            diverged.append(n)
        say(f"{n:<10} {med[n] * 1e3:10.1f} {ratio:7.3f} {q1:7.1f}-{q3:7.1f} {paired:7.3f}"
            f"  {loss:.3f}{flag}")
        if n != BASELINE:
            result[n] = round(ratio, 3)
            paired_all[n] = round(paired, 3)
        spread = max(spread, (q3 - q1) / (med[n] * 1e3))
    elapsed = time.perf_counter() - t_start
    bounds = {n: round(BOUNDS[n], 3) for n in args.kinds if n in BOUNDS}
    if bounds:
        result["bounds"] = bounds
        result["ratio_to_bound"] = {n: round(result[n] / b, 3) for n, b in bounds.items()}
        say("learned rules, ratio / operation-count bound (target <= 1.15): " + ", ".join(
            f"{n} {result[n]:.3f}/{b:.3f}={result[n] / b:.2f}" for n, b in bounds.items()))
    result["_meta"] = {
        "baseline_ms": round(base_med * 1e3, 2),
        "ms": {n: round(m * 1e3, 2) for n, m in med.items()},
        "paired_ratio": paired_all, "max_iqr_over_median": round(spread, 3),
        "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
        "steps_per_block": {n: k for n, k in block.items() if k != args.steps},
        "non_finite_loss": diverged,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "wall_s": round(elapsed, 1),
    }
    if spread > 0.15:
        say(f"note: step times are noisy (IQR up to {spread:.0%} of the median; the machine is "
            "busy), so ratios are uncertain by roughly that much; more --rounds, or --threads 1 "
            "when other jobs compete for the cores, narrow it")
    say(f"wall time {elapsed:.1f} s")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

"""What DistributedDataParallel costs each feedback kind, against plain DDP backprop on the same
MLP, in the same run.

```
python benchmarks/ddp.py                        # fa, dfa, usf, symmetric, kolen-pollack, mirror
python benchmarks/ddp.py --kinds fa,kolen-pollack --rounds 30
python benchmarks/ddp.py --forward-sync-buffers  # DDP's default: re-send buffers every forward
python benchmarks/ddp.py --kinds transpose --constrained --hidden 1000  # Dale's law and masks
python benchmarks/ddp.py --quick                # smoke run (small sizes, 2 rounds)
```

Two gloo processes (``--world``) on this machine, one intra-op thread each, train a
784-1000-1000-10 tanh MLP (``plastic.models.mlp``) on a fixed random batch of 64 per process:
one SGD-momentum step is zero_grad, forward, cross-entropy, backward, step.  Every kind is the
same initial MLP through ``plastic.convert`` (``transpose`` is backprop through it: the cost of
plastic's machinery alone).  ``--constrained`` puts Dale's law (80 % excitatory) and a 20 %
connectivity mask on every converted arm (``apply_circuit_constraints``, kept by ``attach``);
plain backprop stays unconstrained; every arm's MLP is then a ReLU one (Dale's law needs
non-negative rates).  Each is timed twice in the same processes: wrapped
in DDP, and bare (each process steps alone, no communication), which separates the rule's own
cost from what DDP adds to it.  Rounds visit the (arm, wrapped or bare) blocks in an order
shuffled afresh each round, the same on every process; the figures are medians over rounds.

DDP is built as the README advises: ``forward_sync_buffers=False`` (unless
``--forward-sync-buffers``; fixed B, masks and signs are buffers, re-sent every forward pass by
default), and ``find_unused_parameters=True`` for the weight mirror, whose B learns only in sleep
phases (its wake steps are timed; a sleep step is one all-reduce of B's update).

The last line of stdout is one JSON object: kind -> step-time ratio to plain DDP backprop, and

- ``bare``: kind -> the same ratio without DDP (the rule's own cost);
- ``ddp_extra_ms``: kind -> what DDP adds to this kind's step beyond what it adds to
  backprop's, (ddp - bare) - (ddp_bp - bare_bp);
- ``replicas_equal``: whether every process ends with the same parameters and buffers;
- ``_meta``: the medians in ms, sizes, world, torch version, wall time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import random
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plastic  # noqa: E402
from plastic import models  # noqa: E402
from plastic.constraints import apply_circuit_constraints, attach  # noqa: E402
from plastic.feedback import FEEDBACK_KINDS  # noqa: E402

DEFAULT_KINDS = "fa,dfa,usf,symmetric,kolen-pollack,mirror"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arms(args):
    """name -> model, every one from the same initial MLP."""
    torch.manual_seed(0)
    mlp = models.mlp(args.inputs, args.hidden, 10, args.activation)
    arms = {"bp": copy.deepcopy(mlp)}
    for kind in args.kinds:
        arms[kind] = plastic.convert(copy.deepcopy(mlp), kind, seed=0)
        if args.constrained:
            apply_circuit_constraints(arms[kind], 0.8, 0.2, seed=0)
    return arms


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # DDP's note that find_unused_parameters found none
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = None
    try:
        g = torch.Generator().manual_seed(rank)  # each process its own shard
        x = torch.randn(args.batch, args.inputs, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        blocks = []
        for name, net in _arms(args).items():
            mirror = name == "mirror"
            ddp = torch.nn.parallel.DistributedDataParallel(
                net, find_unused_parameters=mirror,
                forward_sync_buffers=args.forward_sync_buffers)
            bare = copy.deepcopy(net)  # the same circuit, stepping alone
            for mode, model in (("ddp", ddp), ("bare", bare)):
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                if args.constrained and name != "bp":
                    attach(opt, model)
                blocks.append((name, mode, model, opt))

        def block(model, opt):
            for _ in range(args.steps):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

        for _, _, model, opt in blocks:  # warm-up
            block(model, opt)
        times = {(n, m): [] for n, m, _, _ in blocks}
        order = list(range(len(blocks)))
        for r in range(args.rounds):
            random.Random(r).shuffle(order)  # the same order on every process
            for i in order:
                name, mode, model, opt = blocks[i]
                dist.barrier()
                t0 = time.perf_counter()
                block(model, opt)
                times[name, mode].append((time.perf_counter() - t0) / args.steps)
            if rank == 0 and not args.json_only:
                print(f"  round {r + 1}/{args.rounds}", flush=True)
        states = {n: [t.detach().clone() for t in (*m.module.parameters(), *m.module.buffers())]
                  for n, mode, m, _ in blocks if mode == "ddp"}
        result = ("ok", {k: statistics.median(v) * 1e3 for k, v in times.items()}, states)
    except BaseException as e:  # reported by the parent in one line
        result = ("error", f"{type(e).__name__}: {e}")
    with open(f"{out}/rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        pass
    # gloo can abort while the interpreter finalizes (pytorch/pytorch#179291); the results are
    # written, so leave without finalizing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=DEFAULT_KINDS,
                    help=f"comma-separated feedback kinds (default {DEFAULT_KINDS})")
    ap.add_argument("--hidden", default=None, help="hidden widths (default 1000,1000)")
    ap.add_argument("--batch", type=int, default=None, help="batch per process (default 64)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed block (default 3)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    ap.add_argument("--world", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--forward-sync-buffers", action="store_true",
                    help="DDP's default: re-send every buffer before each forward pass")
    ap.add_argument("--constrained", action="store_true",
                    help="Dale's law (80%% excitatory) and 20%% connectivity on the converted arms")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (smoke test)")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds:
        ap.error("--kinds lists no kind")
    unknown = [k for k in kinds if k not in FEEDBACK_KINDS or k in ("bp", "backprop")]
    if unknown:
        ap.error(f"unknown kind(s) {unknown} (plain DDP backprop is always timed); known: "
                 f"{', '.join(sorted(set(FEEDBACK_KINDS) - {'bp', 'backprop'}))}")
    if len(set(kinds)) != len(kinds):
        ap.error("--kinds lists a kind twice")
    args.kinds = kinds
    quick = {"hidden": "32,32", "batch": 8, "steps": 1, "rounds": 2}
    full = {"hidden": "1000,1000", "batch": 64, "steps": 3, "rounds": 15}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.hidden = [int(h) for h in str(args.hidden).split(",")]
    except ValueError:
        ap.error(f"--hidden takes comma-separated widths, got {args.hidden!r}")
    for opt in ("batch", "steps", "rounds", "threads"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be >= 1")
    if args.world < 2:
        ap.error("--world must be >= 2 (the replicas are compared)")
    if min(args.hidden) < 1:
        ap.error("--hidden widths must be >= 1")
    args.inputs = 64 if args.quick else 784
    args.activation = "relu" if args.constrained else "tanh"

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.world, _free_port(), args, out), nprocs=args.world,
                 join=True)
        results = [pickle.load(open(f"{out}/rank{r}.pkl", "rb")) for r in range(args.world)]
    for r in results:
        if r[0] != "ok":
            sys.exit(f"ddp.py: a process failed: {r[1]}")
    ms = results[0][1]
    states = [r[2] for r in results]
    equal = all(all(torch.equal(a, b) for a, b in zip(states[0][n], s[n]))
                for s in states[1:] for n in states[0])
    bp_ddp, bp_bare = ms["bp", "ddp"], ms["bp", "bare"]
    report = {k: ms[k, "ddp"] / bp_ddp for k in kinds}
    report["bare"] = {k: ms[k, "bare"] / bp_bare for k in kinds}
    report["ddp_extra_ms"] = {k: (ms[k, "ddp"] - ms[k, "bare"]) - (bp_ddp - bp_bare)
                              for k in kinds}
    report["replicas_equal"] = equal
    report["_meta"] = {"ms": {f"{n}/{m}": v for (n, m), v in ms.items()},
                       "inputs": args.inputs, "hidden": args.hidden,
                       "activation": args.activation, "batch_per_process": args.batch,
                       "world": args.world, "threads": args.threads,
                       "forward_sync_buffers": args.forward_sync_buffers,
                       "constrained": args.constrained,
                       "rounds": args.rounds, "steps": args.steps,
                       "torch": torch.__version__,
                       "wall_s": time.perf_counter() - t_start}
    if not args.json_only:
        print(f"{'kind':16s} {'ddp ms':>8s} {'ratio':>6s} {'bare ms':>8s} {'ratio':>6s} "
              f"{'DDP extra ms':>13s}")
        for k in ["bp", *kinds]:
            extra = report["ddp_extra_ms"].get(k, 0.0)
            print(f"{k:16s} {ms[k, 'ddp']:8.2f} {ms[k, 'ddp'] / bp_ddp:6.2f} "
                  f"{ms[k, 'bare']:8.2f} {ms[k, 'bare'] / bp_bare:6.2f} {extra:13.2f}")
        print(f"replicas equal: {equal}")

    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return v
    print(json.dumps(rounded(report)))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

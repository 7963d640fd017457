"""Where Information Alignment's B settles on a CIFAR-10 ConvNet, and how far that is from W.

Trains the convnet-cifar circuit with backprop for 300 steps (lr 0.2 one-cycle, batch 128), then,
for each synapse, solves the equilibrium of Amp + Null + Decay with activity normalised per sample
(the ``normalize_input`` option): (C + r·λ_max(C) I) B = A, with A = E[ŷ x̂ᵀ] and C = E[ŷ ŷᵀ]
(per output position for conv layers, ignoring the overlap of patches), and prints the angle
between that B and W for several decay-to-null ratios r.  With ``--centering`` it also does so
for Kunin et al.'s centring options (code: ``center_input``, per-sample centring before the
normalisation; ``batch_center_backward_input``, Amp reads batch-centred activity) and for
batch-centred activity on both terms.  Last line: one JSON object.
Needs ``plastic data fetch cifar10``.  About a minute on 2 cores.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's plastic

import plastic  # noqa: E402
from plastic import data, metrics, models  # noqa: E402


VARIANTS = ("plain", "sample_center", "sample+batch_center", "batch_center_both")


def _equilibrium(xi, W, op, variant):
    """Angles between W and B* = (C + r λ_max I)⁻¹ A for the activity ``xi`` of one synapse."""
    v = xi
    if variant in ("sample_center", "sample+batch_center"):
        v = v - v.flatten(1).mean(1).view(-1, *[1] * (v.dim() - 1))
    if variant == "batch_center_both":
        v = v - v.mean(0, keepdim=True)
    xn = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
    yn = op.forward(xn, W)
    xa = xn - xn.mean(0, keepdim=True) if variant == "sample+batch_center" else xn
    A = op.weight_grad(xa, yn).reshape(W.shape[0], -1)
    yy = yn.transpose(0, 1).reshape(yn.shape[1], -1) if yn.dim() > 2 else yn.t()
    C = yy @ yy.t()
    lam = float(torch.linalg.eigvalsh(C)[-1])
    eye = torch.eye(C.shape[0])
    d = {f"r={r:g}": round(metrics.angle(torch.linalg.solve(C + r * lam * eye, A).reshape(W.shape), W), 1)
         for r in (1.0, 0.1, 0.01, 1e-3, 1e-4)}
    d["amp_only"] = round(metrics.angle(A.reshape(W.shape), W), 1)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--centering", action="store_true",
                    help="also Kunin et al.'s centring options and batch centring on both terms")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        ds = data.load("cifar10", train_limit=128 * 300, test_limit=10)
    except plastic.PlasticError as e:
        sys.exit(f"information_equilibrium.py: error: {e}")
    m = plastic.convert(models.convnet(3, [32, 64, 128], 10, "relu", True, 32, 0.25), feedback="bp")
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=300, pct_start=0.25)
    for x, t in ds.batches("train", 128, shuffle=True):
        loss = torch.nn.functional.cross_entropy(m(x), t, label_smoothing=0.1)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    acts = {}
    for n, s in plastic.synapses(m):
        s.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, i[0].detach()))
    x, _ = next(iter(ds.batches("train", 512, shuffle=True)))
    with torch.no_grad():
        m(x)
    out = {}
    for n, s in plastic.synapses(m):
        xi, W, op = acts[n], s.weight.detach(), s.operator()
        out[n] = {}
        for variant in VARIANTS if args.centering else ("plain",):
            d = _equilibrium(xi, W, op, variant)
            out[n][variant] = d
            print(n, variant, d, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Alignment metrics, computed on the training circuit itself (no second model).

* ``weight_angles``: the angle between each feedback weight B and W^T.
* ``update_angles``: the angle between the weight update a rule delivers to each hidden synapse
  and the update backprop would deliver on the same batch (the weight-update counterpart of
  Lillicrap et al. 2016's angle between hidden-unit updates, Δh_FA ∠ Δh_BP, which
  ``hidden_angles`` also gives: the signal angle).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .convert import synapses
from .feedback import Transpose
from .synapses import plasticity_paused

__all__ = ["angle", "weight_angles", "norm_ratios", "rule_values", "update_angles", "hidden_angles", "backprop", "preserved_buffers"]


def unwrapped(model: nn.Module) -> nn.Module:
    """The circuit inside a DistributedDataParallel (or DataParallel) wrapper: the metrics run
    their own passes on it, outside the wrapper's reducer, and name synapses as the circuit does."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors, flattened."""
    # in float64, on the CPU for a device without it (MPS)
    where = "cpu" if a.device.type == "mps" else a.device
    a, b = (t.detach().reshape(-1).to(where, torch.float64) for t in (a, b))
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    c = torch.clamp(a @ b / (na * nb), -1.0, 1.0)
    return math.degrees(math.acos(float(c)))


def _synapses_of(model: nn.Module) -> list:
    """(name, synapse) of a circuit's plastic synapses; a model without any (not converted)
    is an error, not an empty measurement."""
    syns = list(synapses(model))
    if not syns:
        from .errors import SpecError
        raise SpecError(f"{type(model).__name__} has no plastic synapse to measure; convert it "
                        "first (plastic.convert(model, feedback))")
    return syns


def _compared(model: nn.Module):
    """(name, synapse, B) for every synapse whose B stands in for W^T: B has W's shape and is
    not a hidden layer's direct-feedback matrix (which projects from the output and has no W^T
    to compare with, whatever its shape).  B is drawn with the random stream forked, so a kind
    that redraws B (brsf) neither moves the training's stream nor differs between two calls."""
    model = unwrapped(model)
    out = []
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        for name, syn in _synapses_of(model):
            if syn.feedback.direct and not syn.is_output:
                continue
            b = syn.feedback.matrix(syn.weight)
            if b.shape == syn.weight.shape:
                out.append((name, syn, b))
    return out


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def weight_angles(model: nn.Module) -> dict[str, float]:
    """{synapse name: angle(B, W^T) in degrees} for every synapse whose B stands in for W^T."""
    return {name: angle(b, syn.weight) for name, syn, b in _compared(model)}


def norm_ratios(model: nn.Module) -> dict[str, float]:
    """{synapse name: ||B|| / ||W||} for every synapse whose B stands in for W^T."""
    return {name: float(b.norm() / syn.weight.detach().norm().clamp_min(1e-30))
            for name, syn, b in _compared(model)}


@torch.no_grad()
def rule_values(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """{"<primitive>/<synapse>": R} for every learned feedback synapse, from the activity of
    one forward pass on ``x`` (buffers are restored)."""
    model = unwrapped(model)
    from .learned import LearnedFeedback

    named = [(n, s) for n, s in _synapses_of(model) if isinstance(s.feedback, LearnedFeedback)]
    if not named:
        return {}
    seen: dict[str, list] = {}

    def keep(n, syn, i, o):
        # a copy of the output: a later in-place operation (ReLU(inplace=True)) overwrites it;
        # one sample without a batch dimension is a batch of one, as the synapse takes it
        x, y = i[0].detach(), o.detach().clone()
        if x.dim() == syn.unbatched_dim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        seen.setdefault(n, []).append((x, y))
    hooks = [s.register_forward_hook(lambda m, i, o, n=n: keep(n, m, i, o)) for n, s in named]
    try:
        # with grad enabled, as in training: without it a time-stepped circuit propagates spikes
        # event by event around the synapse modules, and their hooks would see nothing; the
        # random stream (dropout, a Poisson encoder) is left as it was
        with preserved_buffers(model), torch.enable_grad(), \
                torch.random.fork_rng(devices=_cuda_devices(model)):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, s in named:
        for xin, y in seen.get(n, ()):  # a synapse used twice: the rule descends the sum
            for k, v in s.feedback.values(s, xin, s.without_bias(y)).items():
                out[f"{k}/{n}"] = out.get(f"{k}/{n}", 0.0) + v
    return out


@contextlib.contextmanager
def backprop(model: nn.Module):
    """Temporarily route every synapse's error through W^T (exact backprop): for the forward
    passes run inside it (a synapse's backward routes through the feedback of its own forward
    pass, as autograd keeps its W; ``plasticity_paused`` acts at the backward pass instead)."""
    saved = []
    for _, syn in synapses(model):
        saved.append((syn, syn.feedback))
        syn._modules["feedback"] = Transpose()
    try:
        yield model
    finally:
        for syn, fb in saved:
            syn._modules["feedback"] = fb


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Restore every buffer (batch-norm running statistics, ...) on exit."""
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in saved and v.shape == saved[k].shape:
                    # through .data: the values the forward pass saw, without a new version, so
                    # a backward pending from before the measurement still runs (batch norm
                    # saved its running statistics; an in-place restore broke it)
                    v.data.copy_(saved[k])


def same_draws(model: nn.Module | None = None):
    """A context manager factory: every ``with replay():`` block sees the same random draws, and
    the caller's random stream (the CPU's, and those of the GPUs ``model`` is on) is left as it
    was (for comparing two passes on one batch)."""
    devices = _cuda_devices(model) if model is not None else []
    with torch.random.fork_rng(devices=devices):
        seed = int(torch.randint(0, 2**62, (1,)))

    @contextlib.contextmanager
    def replay():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    return replay


def hidden_angles(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                  include_output: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Two angles per synapse between what the rule delivers and what backprop would deliver on
    the same batch (x, y):

    * update: between the weight updates dL/dW;
    * signal: between the error signals delta arriving at the synapse's post population, over
      the whole batch and every use of the synapse (Lillicrap et al. 2016's angle between
      Δh_FA and Δh_BP).

    Uses ``torch.autograd.grad`` with plasticity paused, so the parameters' ``.grad`` (B's too)
    are untouched; buffers (batch-norm statistics) are restored.  The output synapse (always
    0 degrees for layer-wise rules) is left out unless ``include_output``."""
    model = unwrapped(model)
    syns = _synapses_of(model)
    # the output synapse: the one convert marked, or in a circuit built by hand, the last
    output = {id(s) for _, s in syns if s.is_output} or {id(s) for _, s in syns[-1:]}
    named = [(n, s) for n, s in syns if include_output or id(s) not in output]
    if not named:
        return {}, {}
    params = [s.weight for _, s in named]

    def grads():
        outs = {n: [] for n, _ in named}  # every use of a synapse (a tied or reused one)
        # the output itself is kept and a copy passed on: an in-place operation after the
        # synapse (ReLU(inplace=True)) would otherwise rewrite it, and its error would be the
        # activation's output's, without f'
        hooks = [s.register_forward_hook(lambda m, i, o, n=n: (outs[n].append(o), o.clone())[1])
                 for n, s in named]
        try:
            loss = loss_fn(model(x), y)
        finally:
            for h in hooks:
                h.remove()
        # a synapse the forward pass did not use (an auxiliary head) has no error, and a frozen
        # one (requires_grad False) no update: NaN
        want = params + [o for n, _ in named for o in outs[n]]
        live = [t for t in want if t.requires_grad]
        g = iter(torch.autograd.grad(loss, live, allow_unused=True) if live else ())
        g = [next(g) if t.requires_grad else None for t in want]
        g_uses, signals = iter(g[len(params):]), []
        for n, _ in named:  # the error over all of a synapse's uses (0 at a use it skips)
            mine = [(next(g_uses), o) for o in outs[n]]
            ok = any(e is not None for e, _ in mine)
            signals.append(torch.cat([(e if e is not None else torch.zeros_like(o)).reshape(-1)
                                      for e, o in mine]) if ok else None)
        return g[:len(params)], signals

    # both passes see the same random draws (a Poisson encoder, brsf's B), and the training's
    # random stream is left untouched
    replay = same_draws(model)
    with preserved_buffers(model), plasticity_paused(), torch.enable_grad():
        with replay():
            w_rule, s_rule = grads()
        with backprop(model), replay():
            w_bp, s_bp = grads()

    def ang(a, b):
        return angle(a, b) if a is not None and b is not None else float("nan")

    def applied(s, g):
        """The update training applies: with the synapse's gradient masks (a sparse
        connectivity's absent entries never change), as ``constraints.attach`` masks .grad."""
        from .constraints import constraints_of
        cs = constraints_of(s)
        if g is None or not cs:
            return g
        g = g.clone()
        with torch.no_grad():
            for c in cs:
                c.mask_grad_weight_(s, g)
        return g
    update = {n: ang(applied(s, a), applied(s, b)) for (n, s), a, b in zip(named, w_rule, w_bp)}
    signal = {n: ang(a, b) for (n, _), a, b in zip(named, s_rule, s_bp)}
    return update, signal


def update_angles(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                  include_output: bool = False) -> dict[str, float]:
    """{synapse name: angle between the rule's and backprop's dL/dW} on batch (x, y); see
    ``hidden_angles``."""
    return hidden_angles(model, loss_fn, x, y, include_output)[0]

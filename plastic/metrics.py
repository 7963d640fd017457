"""Alignment metrics, computed on the training circuit itself (no second model).

* ``weight_angles``: the angle between each feedback weight B and W^T.
* ``update_angles``: the angle between the weight update a rule delivers to each hidden synapse
  and the update backprop would deliver on the same batch (Lillicrap et al. 2016, Fig. 2).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .convert import synapses
from .feedback import Transpose

__all__ = ["angle", "weight_angles", "update_angles", "backprop", "preserved_buffers"]


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors, flattened."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    c = torch.clamp(a @ b / (na * nb), -1.0, 1.0)
    return math.degrees(math.acos(float(c)))


def weight_angles(model: nn.Module) -> dict[str, float]:
    """{synapse name: angle(B, W^T) in degrees} for every synapse whose B has W's shape.
    (Direct-feedback matrices of hidden layers project from the output and have no W^T to
    compare with; they are left out.)"""
    out = {}
    for name, syn in synapses(model):
        b = syn.feedback.matrix(syn.weight)
        if b.shape == syn.weight.shape:
            out[name] = angle(b, syn.weight)
    return out


@contextlib.contextmanager
def backprop(model: nn.Module):
    """Temporarily route every synapse's error through W^T (exact backprop)."""
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
                    v.copy_(saved[k])


def update_angles(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                  include_output: bool = False) -> dict[str, float]:
    """{synapse name: angle between the rule's dL/dW and backprop's dL/dW} on batch (x, y).

    Uses ``torch.autograd.grad``, so the parameters' ``.grad`` are untouched; buffers are
    restored.  The output synapse (always 0 degrees for layer-wise rules) is left out unless
    ``include_output``."""
    named = [(n, s) for n, s in synapses(model) if include_output or not s.is_output]
    if not named:
        return {}
    params = [s.weight for _, s in named]
    with preserved_buffers(model), torch.enable_grad():
        g_rule = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
        with backprop(model):
            g_bp = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
    return {n: (angle(a, b) if a is not None and b is not None else float("nan"))
            for (n, _), a, b in zip(named, g_rule, g_bp)}

"""Plasticity rules for feedback weights: Kunin et al.'s primitives and their weighted sums.

Kunin, Nayebi, Sagastuy-Brena, Ganguli, Bloom & Yamins, "Two Routes to Scalable Credit Assignment
without Weight Symmetry", ICML 2020 (Table 1; reference code neuroailab/Neural-Alignment,
``Alignments/primitives.py``).  Each primitive is a regulariser R(B); learning is ΔB ∝ -∂R/∂B,
and ``grad`` returns ∂R/∂B, which reaches ``B.grad`` through the synapse's backward pass so that
any optimizer applies it.  Notation (column convention of the paper, B maps post to pre): x is the
synapse's pre activity (its input), y = W x its post pre-activation (no bias), both from the same
forward pass (reused, never recomputed).  In plastic, B is stored in the forward layout (the
shape of W, i.e. B^T of the paper), so B^T x is ``op(x, B)`` (the forward operator with B) and
B (W x) is ``op_back(y, B)`` (the input-gradient operator with B).  Batch averages are over the
first (batch) dimension; conv layers sum over channels and positions.

    Decay  (local)       R = ½ ||B||²                       ∂R/∂B = B
    Amp    (local)       R = -⟨x, B W x⟩ = -⟨B^T x, W x⟩      ∂R/∂B = -(1/N) y xᵀ   (pre/post Hebbian)
    Null   (local)       R = ½ ||B W x||²                    ∂R/∂B = (1/N) y (B y)ᵀ
    Sparse (non-local)   R = ½ ||B^T x||²                    ∂R/∂B = (1/N) (B^T x) xᵀ
    Self   (non-local)   R = -tr(B W)                        ∂R/∂B = -W

(gradients written in the forward layout, B stored like W; in the paper's layout Self's is
-Wᵀ).  Non-local primitives read the other pathway's weight (Self) or route activity forward
through B (Sparse), as the paper classifies them.

Cost (in weight-sized passes, a backprop step being 3): Decay and Self are element-wise (0);
Amp one weight-gradient operation (1); Null one projection and one weight-gradient operation,
Sparse likewise (2).  ``fused_grad`` shares the weight-gradient operation between Amp and Null
(both are ``weight_grad(·, y)``) or between Amp and Sparse (both are ``weight_grad(x, ·)``), so
Information Alignment (Amp + Null + Decay) and Activation Alignment (Amp + Sparse) each cost 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch

from .errors import SpecError, suggest

__all__ = ["Signals", "Operator", "PRIMITIVES", "COMPOSITES", "parse_rule", "primitive_grad",
           "fused_grad", "primitive_value"]


class Operator(NamedTuple):
    """The synapse's three operators, with any weight in the forward layout.

    forward(x, K)      -> K applied forward (y = W x when K = W)
    backward(g, K, x)  -> K applied backward to g, shaped like x (W^T g when K = W)
    weight_grad(a, g)  -> the weight-shaped outer product g aᵀ (summed over batch and positions)
    """
    forward: Callable
    backward: Callable
    weight_grad: Callable


class Signals(NamedTuple):
    """What a feedback synapse's rule may read: pre activity x, post pre-activation y = W x,
    the error arriving at the post population, its own weight B and, only for non-local rules,
    the forward weight W (``None`` when the rule is local)."""
    x: torch.Tensor
    y: torch.Tensor
    delta: torch.Tensor | None
    B: torch.Tensor
    W: torch.Tensor | None
    op: Operator


@dataclass(frozen=True)
class Primitive:
    name: str
    local: bool
    passes: int  # extra weight-sized passes it costs alone
    doc: str


PRIMITIVES = {
    "decay": Primitive("decay", True, 0, "½||B||²"),
    "amp": Primitive("amp", True, 1, "-<x, B W x> (Hebbian pre/post)"),
    "null": Primitive("null", True, 2, "½||B W x||²"),
    "sparse": Primitive("sparse", False, 2, "½||Bᵀ x||²"),
    "self": Primitive("self", False, 0, "-tr(B W)"),
}

#: named composites (Kunin et al. 2020, Sec. 4).  The coefficients are provisional defaults,
#: small enough to be stable with SGD at lr ~0.05 on normalised MNIST-sized inputs (the Hebbian
#: Amp term grows with the input covariance); give explicit coefficients to tune them.
COMPOSITES = {
    "information": {"amp": 1e-2, "null": 1e-2, "decay": 1e-2},
    "symmetric": {"self": 1.0, "decay": 1.0},
    "activation": {"amp": 1e-2, "sparse": 1e-2},
}


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range (10**400)
        return False


def parse_rule(rule: Mapping[str, float] | str) -> dict[str, float]:
    """A rule as data: a composite name or a mapping of primitive names to coefficients,
    e.g. ``{"amp": 2e-3, "null": 1e-3, "decay": 1e-3}``."""
    if isinstance(rule, str):
        if rule not in COMPOSITES:
            raise SpecError(f"unknown rule {rule!r}; composites: {', '.join(COMPOSITES)}")
        return dict(COMPOSITES[rule])
    out = {}
    for k, v in dict(rule).items():
        if k not in PRIMITIVES:
            raise SpecError(f"unknown primitive {k!r}{suggest(k, PRIMITIVES)}; "
                            f"known: {', '.join(PRIMITIVES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
            raise SpecError(f"coefficient of {k!r} must be a finite number, got {v!r}")
        if v:
            out[k] = float(v)
    return out


def is_local(rule: Mapping[str, float]) -> bool:
    return all(PRIMITIVES[k].local for k in rule)


def primitive_grad(name: str, s: Signals) -> torch.Tensor:
    """∂R/∂B of one primitive, in B's (forward) layout."""
    n = s.x.shape[0]
    if name == "decay":
        return s.B
    if name == "amp":
        return s.op.weight_grad(s.x, s.y).div_(-n)
    if name == "null":
        r = s.op.backward(s.y, s.B, s.x)
        return s.op.weight_grad(r, s.y).div_(n)
    if name == "sparse":
        z = s.op.forward(s.x, s.B)
        return s.op.weight_grad(s.x, z).div_(n)
    if name == "self":
        if s.W is None:
            raise SpecError("self is non-local: it needs the forward weight W")
        return -s.W
    raise SpecError(f"unknown primitive {name!r}")


def fused_grad(rule: Mapping[str, float], s: Signals) -> torch.Tensor:
    """Σ_k c_k ∂R_k/∂B with shared weight-gradient operations (see module docstring)."""
    n = s.x.shape[0]
    c = {k: rule.get(k, 0.0) for k in PRIMITIVES}
    total = None

    def add(t):
        nonlocal total
        total = t if total is None else total.add_(t)

    if c["sparse"]:
        # weight_grad(x, c_sparse B^T x - c_amp y): Amp shares Sparse's operation
        z = s.op.forward(s.x, s.B).mul_(c["sparse"])
        if c["amp"]:
            z.sub_(s.y, alpha=c["amp"])
        add(s.op.weight_grad(s.x, z).div_(n))
        amp_done = True
    else:
        amp_done = False
    if c["null"] or (c["amp"] and not amp_done):
        # weight_grad(c_null B y - c_amp x, y): Amp shares Null's operation
        if c["null"]:
            a = s.op.backward(s.y, s.B, s.x).mul_(c["null"])
            if c["amp"] and not amp_done:
                a.sub_(s.x, alpha=c["amp"])
        else:
            a = s.x * (-c["amp"])
        add(s.op.weight_grad(a, s.y).div_(n))
    if c["decay"]:
        add(s.B * c["decay"])
    if c["self"]:
        if s.W is None:
            raise SpecError("self is non-local: it needs the forward weight W")
        add(s.W * (-c["self"]))
    return total if total is not None else torch.zeros_like(s.B)


def primitive_value(name: str, s: Signals) -> float:
    """The value of R itself (for the metrics), from the same signals."""
    n = s.x.shape[0]
    with torch.no_grad():
        if name == "decay":
            return 0.5 * float(s.B.pow(2).sum())
        if name == "amp":
            return -float((s.op.forward(s.x, s.B) * s.y).sum()) / n
        if name == "null":
            return 0.5 * float(s.op.backward(s.y, s.B, s.x).pow(2).sum()) / n
        if name == "sparse":
            return 0.5 * float(s.op.forward(s.x, s.B).pow(2).sum()) / n
        if name == "self":
            return -float((s.B * s.W).sum())
    raise SpecError(f"unknown primitive {name!r}")

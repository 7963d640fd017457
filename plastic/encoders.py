"""Encoders: data (intensities in [0, 1]) -> time-major inputs (T, *shape) for spiking circuits."""
from __future__ import annotations

import torch

from .errors import SpecError

__all__ = ["poisson", "constant_current", "latency", "ENCODERS"]


def _check(x: torch.Tensor, steps: int):
    if not (isinstance(steps, int) and steps >= 1):
        raise SpecError(f"encoder steps must be a positive integer, got {steps!r}")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise SpecError(f"encoders take intensities in [0, 1], got [{float(x.min()):.3g}, "
                        f"{float(x.max()):.3g}]; scale the data first")


def poisson(x: torch.Tensor, steps: int, f_max: float = 100.0, dt: float = 1e-3,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent Bernoulli spikes with probability x·f_max·dt per step (a Poisson process of
    rate x·f_max, as norse's ``PoissonEncoder``)."""
    _check(x, steps)
    p = (x * (f_max * dt)).clamp_(max=1.0)
    u = torch.rand((steps, *x.shape), generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return (u < p).to(x.dtype)


def constant_current(x: torch.Tensor, steps: int, scale: float = 1.0) -> torch.Tensor:
    """The intensity as a constant input current, every step (a view, no copy)."""
    _check(x, steps)
    return (x * scale).expand(steps, *x.shape)


def latency(x: torch.Tensor, steps: int, threshold: float = 0.01) -> torch.Tensor:
    """One spike per input at step round((1 − x)(T − 1)): stronger inputs spike earlier; inputs
    at or below ``threshold`` never spike (time-to-first-spike coding)."""
    _check(x, steps)
    t = ((1 - x) * (steps - 1)).round().long()
    out = torch.zeros((steps, *x.shape), dtype=x.dtype, device=x.device)
    out.scatter_(0, t.unsqueeze(0), (x > threshold).to(x.dtype).unsqueeze(0))
    return out


ENCODERS = {"poisson": poisson, "constant": constant_current, "latency": latency}

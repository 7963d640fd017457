"""Encoders: data (intensities in [0, 1]) -> time-major inputs (T, *shape) for spiking circuits."""
from __future__ import annotations

import torch

from .errors import SpecError

__all__ = ["poisson", "constant_current", "latency", "ENCODERS"]


def _check(x: torch.Tensor, steps: int, values: bool = True) -> torch.Tensor:
    """``x`` as a floating tensor of intensities in [0, 1] (integer or boolean data, e.g. binarised
    images, are taken as floats), after checking ``steps`` (and, with ``values``, the range: a
    host sync on a GPU, which a caller that has clamped x skips)."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise SpecError(f"encoder steps must be a positive integer, got {steps!r}")
    if not isinstance(x, torch.Tensor):
        raise SpecError(f"encoders take a tensor of intensities, got {type(x).__name__}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if values and x.numel() and not (float(x.min()) >= 0 and float(x.max()) <= 1):  # NaN fails
        raise SpecError(f"encoders take intensities in [0, 1], got [{float(x.min()):.3g}, "
                        f"{float(x.max()):.3g}]{' and NaN' if bool(x.isnan().any()) else ''}; "
                        "scale the data first")
    return x


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Spike probabilities and times computed in float16/bfloat16 are off (a rate of 0.02 became
    0.0395 in bfloat16): compute them in float32 and give only the spikes the input's dtype."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def poisson(x: torch.Tensor, steps: int, f_max: float = 100.0, dt: float = 1e-3,
            generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
    """Independent Bernoulli spikes with probability x·f_max·dt per step (a Poisson process of
    rate x·f_max, as norse's ``PoissonEncoder``).  The uniform draws come from ``generator``, on
    its device, else from torch's stream on x's device.  ``check=False`` skips the range check
    of x (for intensities already clamped to [0, 1]; on a GPU the check waits for the device)."""
    x = _check(x, steps, check)
    if not (f_max > 0 and dt > 0 and f_max * dt <= 1):
        raise SpecError(f"poisson: the spike probability per step f_max·dt must be in (0, 1], got "
                        f"f_max = {f_max} Hz, dt = {dt} s (above 1 every rate saturates at 1/dt)")
    xp = _at_least_float32(x)
    p = xp * (f_max * dt)
    where = generator.device if generator is not None else x.device
    u = torch.rand((steps, *x.shape), generator=generator, dtype=xp.dtype, device=where)
    u = u.to(x.device, non_blocking=True)
    return (u < p).to(x.dtype)


def constant_current(x: torch.Tensor, steps: int, scale: float = 1.0) -> torch.Tensor:
    """The intensity as a constant input current, every step (a view, no copy)."""
    x = _check(x, steps)
    return (x * scale).expand(steps, *x.shape)


def latency(x: torch.Tensor, steps: int, threshold: float = 0.01,
            check: bool = True) -> torch.Tensor:
    """One spike per input at step round((1 − x)(T − 1)): stronger inputs spike earlier; inputs
    at or below ``threshold`` never spike (time-to-first-spike coding).  ``check`` as for
    ``poisson``."""
    x = _check(x, steps, check)
    t = ((1 - _at_least_float32(x)) * (steps - 1)).round().long().clamp_(0, steps - 1)
    out = torch.zeros((steps, *x.shape), dtype=x.dtype, device=x.device)
    out.scatter_(0, t.unsqueeze(0), (x > threshold).to(x.dtype).unsqueeze(0))
    return out


ENCODERS = {"poisson": poisson, "constant": constant_current, "latency": latency}

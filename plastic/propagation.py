"""Propagating spikes through a dense weight: dense (a matrix product) or event-driven.

``propagate(spikes, weight, bias)`` is ``spikes @ weight.T + bias`` for spike tensors
(..., n_in).  A dense product costs m·n_in·n_out multiply-adds for m = spikes.numel() / n_in
samples, whatever the spikes; the event-driven path costs one scan of the spikes plus
n_out additions per spike (a row of weight.T summed into its sample's output, the
"synaptic operations" of an event-driven simulator; e.g. Brette et al. 2007, J Comput Neurosci
23:349, sec. 2.2).  It uses ``embedding_bag(mode="sum")``: the nonzero (sample, neuron) pairs
are bags of rows of weight.T, one bag per sample; the spike values enter as per-sample weights,
so graded (non-binary) inputs are propagated correctly too.

Equality: both paths compute the same sums, in different orders (BLAS blocks vs one spike after
another), so they agree to float rounding (~1e-6 relative; ``tests/test_spiking_speed.py``
checks 1e-5) — and exactly when every partial sum is representable, e.g. binary spikes and
dyadic weights k / 2^8 with |Σ| < 2^16 in float32.

Choosing (``mode="auto"``): the event path wins when the spike density d (fraction of nonzero
entries) is below

    d* = DENSE_PER_EVENT − SCAN / n_out − TRANSPOSE / m

the break-even of the cost model (per spike entry, in units of one event addition)
  dense:  n_out · DENSE_PER_EVENT        event:  SCAN + d · n_out + TRANSPOSE · n_out / m
(SCAN: finding the nonzeros; TRANSPOSE: copying weight.T contiguous, once per call — not
cached, since in-place updates through ``.data`` do not bump a tensor's version counter, and
``embedding_bag`` on the strided weight.T is 10x slower).  Measured on this machine (2-core
Xeon, torch 2.13 CPU, float32, one thread) with ``python benchmarks/spiking.py --crossover
--threads 1``: break-even densities 0.078 (784→1000, m = 3200), 0.062 (1024→1024, m = 8000),
0.057 (1000→500), 0.045 (1000→300), none for n_out ≤ 100 (the scan alone costs more than the
product) or m = 32 (the transpose and per-call overheads do not pay off); a least-squares fit
in 1/n_out gives DENSE_PER_EVENT = 0.080, SCAN = 10.9, and TRANSPOSE is the measured cost of
the copy per weight entry (0.9 ns) over that of an event addition (0.1 ns).  So: event-driven
below ~6-7% spikes for wide layers, dense always for a 10-way readout or a single time step.
With two threads on this machine while other jobs used the cores, every parallel op of the
event path (nonzero, searchsorted, the gather, embedding_bag, the bias) waited on descheduled
threads and the break-even fell to 0.006-0.046; pass ``threshold=`` to override d*.

Under autograd (grad enabled and anything requiring grad) the dense product is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SpecError

__all__ = ["propagate", "crossover_density", "MODES", "DENSE_PER_EVENT", "SCAN", "TRANSPOSE"]

MODES = ("auto", "dense", "event")

#: cost of one dense multiply-add in units of one event addition (measured, see module doc)
DENSE_PER_EVENT = 0.08
#: cost of scanning one spike entry for nonzeros, in event additions
SCAN = 11.0
#: cost of copying one weight entry into weight.T, in event additions
TRANSPOSE = 9.0


_PROBE_ROWS, _PROBE_SLACK = 32, 16  # rows sampled before the scan, and a few spikes of slack


def crossover_density(m: int, n_in: int, n_out: int) -> float:
    """The density d* below which ``mode="auto"`` propagates event by event (module doc)."""
    return DENSE_PER_EVENT - SCAN / max(n_out, 1) - TRANSPOSE / max(m, 1)


def _nonzero(flat: torch.Tensor):
    rows, cols = flat.nonzero().unbind(1)  # row-major: the samples come sorted
    return rows, cols


def _event(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           nz=None) -> torch.Tensor:
    """Σ over the nonzero (sample, neuron) pairs of value · weight.T[neuron], per sample."""
    m = flat.shape[0]
    rows, cols = _nonzero(flat) if nz is None else nz
    offsets = torch.searchsorted(rows, torch.arange(m + 1, device=flat.device))
    out = F.embedding_bag(cols, weight.t().contiguous(), offsets, mode="sum",
                          per_sample_weights=flat[rows, cols], include_last_offset=True)
    return out if bias is None else out.add_(bias)


def _forward_ad(*tensors) -> bool:
    """Whether a tensor carries a forward-mode tangent (``torch.autograd.forward_ad``) or is a
    ``torch.func`` transform's tensor: the event path's embedding bag supports neither."""
    import torch.autograd.forward_ad as fwAD
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
    return any(t is not None and (fwAD.unpack_dual(t).tangent is not None or wrapped(t))
               for t in tensors)


def propagate(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              mode: str = "auto", threshold: float | None = None) -> torch.Tensor:
    """``spikes @ weight.T + bias`` for spikes (..., n_in) and weight (n_out, n_in): (..., n_out).

    ``mode``: ``"dense"`` (``F.linear``), ``"event"`` (sum the rows of weight.T of the active
    inputs) or ``"auto"`` (event when the spike density, the fraction of nonzero entries, is
    below ``threshold``, by default ``crossover_density(m, n_in, n_out)``; the density is
    counted by the event path's own scan, after a 32-row probe that skips the scan when the
    spikes are clearly dense).  Results agree to float summation order
    (module doc).  Under autograd (reverse or forward mode) the dense product is always used, and
    ``"auto"`` uses it off the CPU too: the crossover is a CPU measurement, and counting the
    spikes would wait for the device."""
    if mode not in MODES:
        raise SpecError(f"unknown propagation mode {mode!r}; known: {', '.join(MODES)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise SpecError(f"weight must be a matrix (n_out, n_in), got shape "
                        f"{tuple(getattr(weight, 'shape', ()))}")
    n_out, n_in = weight.shape
    if not isinstance(spikes, torch.Tensor) or spikes.dim() < 1 or spikes.shape[-1] != n_in:
        raise SpecError(f"spikes (..., {n_in}) expected for a weight {tuple(weight.shape)}, got "
                        f"{tuple(getattr(spikes, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,)
                             or bias.dtype != weight.dtype):
        raise SpecError(f"bias must be a tensor of shape ({n_out},) in the weight's dtype "
                        f"{weight.dtype}, got {type(bias).__name__} "
                        f"{tuple(getattr(bias, 'shape', ()))} {getattr(bias, 'dtype', '')}")
    if spikes.dtype != weight.dtype:
        spikes = spikes.to(weight.dtype)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (spikes, weight, bias))
    if mode == "dense" or grad or n_in == 0 or _forward_ad(spikes, weight, bias):
        return F.linear(spikes, weight, bias)
    lead = spikes.shape[:-1]
    flat = spikes.reshape(-1, n_in)
    m = flat.shape[0]
    nz = None
    if mode == "auto":
        if spikes.device.type != "cpu":
            return F.linear(spikes, weight, bias)
        d_star = crossover_density(m, n_in, n_out) if threshold is None else float(threshold)
        if d_star <= 0 or m == 0:
            return F.linear(spikes, weight, bias)
        probe = flat[::max(1, m // _PROBE_ROWS)][:_PROBE_ROWS]  # skip the scan if clearly dense
        if int(torch.count_nonzero(probe)) > 2 * d_star * probe.numel() + _PROBE_SLACK:
            return F.linear(spikes, weight, bias)
        nz = _nonzero(flat)  # the event path's scan gives the exact density
        if nz[0].numel() >= d_star * flat.numel():
            return F.linear(spikes, weight, bias)
    return _event(flat, weight, bias, nz).reshape(*lead, n_out)

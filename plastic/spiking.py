"""Spiking populations: leaky integrate-and-fire neurons with explicit state.

The reference dynamics are norse's ``lif_feed_forward_step`` (norse 1.1, ``norse/torch/functional/
lif.py``): a current-based LIF neuron integrated by forward Euler,

    i ← i + I_in                                   (input current jumps)
    v ← v + dt/τ_mem · ((v_leak − v) + i)
    i ← i − dt/τ_syn · i
    z = H(v − v_th),   v ← (1 − z) v + z v_reset

written here with the same operations in the same order, so that the spikes and voltages are
bit-for-bit norse's (``tests/test_spiking.py`` checks 1000 steps).  The spike nonlinearity H has
the SuperSpike surrogate gradient 1/(α|x| + 1)² (Zenke & Ganguli 2018, sec. 3.3.2) for training
through time.  State is a NamedTuple passed in and out, never hidden in the module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["LIFParameters", "LIFState", "lif_step", "LIFBoxParameters", "LIFBoxState",
           "lif_box_step", "AdaptiveLIFParameters", "AdaptiveLIFState", "adaptive_lif_step",
           "superspike", "LIFPopulation", "SPIKING_KINDS"]


class LIFParameters(NamedTuple):
    """Parameters of a current-based LIF neuron (norse's defaults and names)."""
    tau_syn_inv: torch.Tensor = torch.as_tensor(1.0 / 5e-3)
    tau_mem_inv: torch.Tensor = torch.as_tensor(1.0 / 1e-2)
    v_leak: torch.Tensor = torch.as_tensor(0.0)
    v_th: torch.Tensor = torch.as_tensor(1.0)
    v_reset: torch.Tensor = torch.as_tensor(0.0)
    alpha: torch.Tensor = torch.as_tensor(100.0)  # surrogate-gradient sharpness


class LIFState(NamedTuple):
    v: torch.Tensor  # membrane voltage
    i: torch.Tensor  # synaptic current


class _SuperSpike(torch.autograd.Function):
    """H(x) forward; dH/dx ≈ 1/(α|x| + 1)² backward (Zenke & Ganguli 2018, sec. 3.3.2)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return torch.gt(x, torch.as_tensor(0.0)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (ctx.alpha * x.abs() + 1.0).pow(2), None


def superspike(x: torch.Tensor, alpha: torch.Tensor | float = 100.0) -> torch.Tensor:
    """Heaviside step (0 for x <= 0) with the SuperSpike surrogate gradient."""
    return _SuperSpike.apply(x, alpha)


def _reset(z: torch.Tensor, v: torch.Tensor, v_reset: torch.Tensor) -> torch.Tensor:
    """v after the jump condition: v_reset where a spike was emitted (norse's ``reset_value``)."""
    return (1 - z) * v + z * v_reset


def lif_step(input_current: torch.Tensor, state: LIFState, p: LIFParameters = LIFParameters(),
             dt: float = 1e-3) -> tuple[torch.Tensor, LIFState]:
    """One Euler step of the current-based LIF neuron (norse's ``lif_feed_forward_step``).
    Returns (spikes, new state)."""
    i_new = state.i + input_current
    v_decayed = state.v + dt * p.tau_mem_inv * ((p.v_leak - state.v) + i_new)
    i_decayed = i_new + (-dt * p.tau_syn_inv * i_new)
    z = superspike(v_decayed - p.v_th, p.alpha)
    return z, LIFState(_reset(z, v_decayed, p.v_reset), i_decayed)


class LIFBoxParameters(NamedTuple):
    """A LIF neuron without synaptic current (norse's ``LIFBoxParameters``, value reset)."""
    tau_mem_inv: torch.Tensor = torch.as_tensor(1.0 / 1e-2)
    v_leak: torch.Tensor = torch.as_tensor(0.0)
    v_th: torch.Tensor = torch.as_tensor(1.0)
    v_reset: torch.Tensor = torch.as_tensor(0.0)
    alpha: torch.Tensor = torch.as_tensor(100.0)


class LIFBoxState(NamedTuple):
    v: torch.Tensor


def lif_box_step(input_current: torch.Tensor, state: LIFBoxState,
                 p: LIFBoxParameters = LIFBoxParameters(), dt: float = 1e-3):
    """v ← v + dt/τ_mem (I + v_leak − v); z = H(v − v_th); v ← (1 − z) v + z v_reset
    (norse's ``lif_box_feed_forward_step``)."""
    v_decayed = state.v + dt * p.tau_mem_inv * (input_current + p.v_leak - state.v)
    z = superspike(v_decayed - p.v_th, p.alpha)
    return z, LIFBoxState(_reset(z, v_decayed, p.v_reset))


class AdaptiveLIFParameters(NamedTuple):
    """A LIF neuron with an adaptive threshold b (Bellec et al. 2018's LSNN; norse's
    ``LSNNParameters``): b relaxes to v_th with τ_adapt and jumps by β at every spike."""
    tau_syn_inv: torch.Tensor = torch.as_tensor(1.0 / 5e-3)
    tau_mem_inv: torch.Tensor = torch.as_tensor(1.0 / 1e-2)
    tau_adapt_inv: torch.Tensor = torch.as_tensor(1.0 / 800)
    v_leak: torch.Tensor = torch.as_tensor(0.0)
    v_th: torch.Tensor = torch.as_tensor(1.0)
    v_reset: torch.Tensor = torch.as_tensor(0.0)
    beta: torch.Tensor = torch.as_tensor(1.8)
    alpha: torch.Tensor = torch.as_tensor(100.0)


class AdaptiveLIFState(NamedTuple):
    v: torch.Tensor
    i: torch.Tensor
    b: torch.Tensor  # the adaptive threshold


def adaptive_lif_step(input_current: torch.Tensor, state: AdaptiveLIFState,
                      p: AdaptiveLIFParameters = AdaptiveLIFParameters(), dt: float = 1e-3):
    """One step of norse's ``lsnn_feed_forward_step`` (the input current enters after the step)."""
    v_decayed = state.v + dt * p.tau_mem_inv * ((p.v_leak - state.v) + state.i)
    i_decayed = state.i + (-dt * p.tau_syn_inv * state.i)
    b_decayed = state.b + dt * p.tau_adapt_inv * (p.v_th - state.b)
    z = superspike(v_decayed - b_decayed, p.alpha)
    return z, AdaptiveLIFState(_reset(z, v_decayed, p.v_reset), i_decayed + input_current,
                               b_decayed + z * p.beta)


#: kind -> (step function, default parameters, state type)
SPIKING_KINDS = {
    "lif": (lif_step, LIFParameters(), LIFState),
    "lif_box": (lif_box_step, LIFBoxParameters(), LIFBoxState),
    "adaptive_lif": (adaptive_lif_step, AdaptiveLIFParameters(), AdaptiveLIFState),
}


class LIFPopulation(nn.Module):
    """A population of spiking neurons, a thin module over one of the pure step functions:
    ``kind`` is ``"lif"`` (current-based, the default), ``"lif_box"`` (no synaptic current) or
    ``"adaptive_lif"`` (adaptive threshold)."""

    def __init__(self, p: NamedTuple | None = None, dt: float = 1e-3, kind: str = "lif"):
        super().__init__()
        if kind not in SPIKING_KINDS:
            from .errors import SpecError
            raise SpecError(f"unknown spiking population {kind!r}; known: {', '.join(SPIKING_KINDS)}")
        self.kind = kind
        self._step, default, self._state = SPIKING_KINDS[kind]
        self.p, self.dt = (default if p is None else p), float(dt)

    def initial_state(self, input_current: torch.Tensor):
        """Resting state shaped like one step's input: v = v_leak, i = 0, b = v_th (each kind's
        state type takes the fields it has)."""
        zero = torch.zeros_like(input_current)
        rest = {"v": lambda: zero + self.p.v_leak.to(input_current), "i": lambda: zero,
                "b": lambda: zero + self.p.v_th.to(input_current)}
        return self._state(*(rest[f]() for f in self._state._fields))

    def step(self, input_current: torch.Tensor, state=None):
        """One step in time: (spikes, state)."""
        if state is None:
            state = self.initial_state(input_current)
        return self._step(input_current, state, self.p, self.dt)

    def forward(self, currents: torch.Tensor, state: LIFState | None = None):
        """Run over a time-major sequence of input currents (T, ...): (spikes (T, ...), state)."""
        out = []
        for t in range(currents.shape[0]):
            z, state = self.step(currents[t], state)
            out.append(z)
        return torch.stack(out), state

    def extra_repr(self):
        taus = ", ".join(f"{name[:-4]}={1 / float(getattr(self.p, name)):g}"
                         for name in ("tau_mem_inv", "tau_syn_inv", "tau_adapt_inv")
                         if name in self.p._fields)
        return f"kind={self.kind!r}, {taus}, v_th={float(self.p.v_th):g}, dt={self.dt:g}"

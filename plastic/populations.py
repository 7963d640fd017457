"""Populations: groups of neurons with explicit state and dynamics.

A rate population has the dynamics  tau dr/dt = -r + f(I)  (Dayan & Abbott 2001, eq. 7.11).
``rate_step`` is the pure step function (norse style: NamedTuple parameters and state);
``RatePopulation`` is a thin module over it.  Its ``forward`` is the steady state r = f(I), which
is what rate benchmarks train."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError

__all__ = ["ACTIVATIONS", "RateParameters", "RateState", "rate_step", "RatePopulation"]

def identity(x: torch.Tensor) -> torch.Tensor:
    """f(I) = I (a module-level function, so a circuit using it can be pickled)."""
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": identity,
    "linear": identity,
    "gelu": F.gelu,
    "elu": F.elu,
    "softplus": F.softplus,
    "leaky_relu": F.leaky_relu,
    "hardtanh": F.hardtanh,
    "silu": F.silu,
}


class RateParameters(NamedTuple):
    """tau: time constant (s); dt: integration step (s).  tau == dt jumps to the steady state;
    the Euler step is stable for dt < 2 tau."""
    tau: float = 10e-3
    dt: float = 1e-3


class RateState(NamedTuple):
    r: torch.Tensor  # firing rate


def _numbers(v):
    """A time constant as a number or a tensor (a per-neuron numpy array or list as a tensor)."""
    if isinstance(v, (int, float, torch.Tensor)):
        return v
    try:
        return torch.as_tensor(v, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise SpecError(f"a rate population's tau and dt are numbers or per-neuron tensors, got "
                        f"{v!r}") from None


def _check_rate_parameters(p) -> None:
    """tau > 0 and 0 < dt < 2 tau (the Euler step diverges otherwise); tau may be per neuron."""
    if not isinstance(p, RateParameters):
        raise SpecError(f"rate population parameters must be a RateParameters(tau, dt), got "
                        f"{type(p).__name__}")
    tau, dt = _numbers(p.tau), _numbers(p.dt)
    if isinstance(tau, torch.Tensor) or isinstance(dt, torch.Tensor):
        tau, dt = torch.as_tensor(tau), torch.as_tensor(dt)
        ok = bool(((tau > 0) & (dt > 0) & (dt < 2 * tau)).all())
    else:
        ok = tau > 0 and 0 < dt < 2 * tau  # False for NaN
    if not ok:
        raise SpecError(f"rate dynamics need tau > 0 and 0 < dt < 2 tau (the Euler step "
                        f"diverges otherwise), got tau={p.tau}, dt={p.dt}")


def rate_step(input_current: torch.Tensor, state: RateState, p: RateParameters,
              activation: Callable = torch.tanh) -> tuple[torch.Tensor, RateState]:
    """One Euler step of tau dr/dt = -r + f(I).  Returns (rate, new state)."""
    _check_rate_parameters(p)
    k = _numbers(p.dt) / _numbers(p.tau)
    if isinstance(k, torch.Tensor):  # per neuron: on the input's device, in its dtype
        k = k.to(input_current)
    r = state.r + k * (activation(input_current) - state.r)
    return r, RateState(r)


class RatePopulation(nn.Module):
    """A rate population with any activation (a name from ``ACTIVATIONS`` or a callable)."""

    def __init__(self, activation: str | Callable = "relu", p: RateParameters = RateParameters()):
        super().__init__()
        if isinstance(activation, str):
            if activation.lower() not in ACTIVATIONS:
                raise SpecError(f"unknown activation {activation!r}; known: "
                                f"{', '.join(sorted(ACTIVATIONS))}")
            self.activation_name = activation.lower()
            self.activation = ACTIVATIONS[self.activation_name]
        elif callable(activation):
            self.activation_name = getattr(activation, "__name__", "custom")
            self.activation = activation
        else:
            raise SpecError(f"activation must be a name or a callable, got {activation!r}")
        _check_rate_parameters(p)
        self.p = p

    def initial_state(self, input_current: torch.Tensor) -> RateState:
        return RateState(torch.zeros_like(input_current))

    def step(self, input_current: torch.Tensor, state: RateState | None = None):
        """One step in time: (rate, state)."""
        if state is None:
            state = self.initial_state(input_current)
        return rate_step(input_current, state, self.p, self.activation)

    def forward(self, input_current: torch.Tensor) -> torch.Tensor:
        """The steady-state rate f(I)."""
        return self.activation(input_current)

    def extra_repr(self):
        return f"activation={self.activation_name!r}, tau={self.p.tau}, dt={self.p.dt}"

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

import numpy as np
import torch
from torch import nn

__all__ = ["LIFParameters", "LIFState", "lif_step", "LIFBoxParameters", "LIFBoxState",
           "lif_box_step", "lif_integrate", "lif_box_integrate", "spike_and_reset",
           "AdaptiveLIFParameters", "AdaptiveLIFState", "adaptive_lif_step",
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
    v, i = lif_integrate(input_current, state, p, dt)
    z, v = spike_and_reset(v, p)
    return z, LIFState(v, i)


def lif_integrate(input_current: torch.Tensor, state: LIFState, p: LIFParameters = LIFParameters(),
                  dt: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-threshold part of ``lif_step``: (v before the jump condition, decayed i)."""
    i_new = state.i + input_current
    v_decayed = state.v + dt * p.tau_mem_inv * ((p.v_leak - state.v) + i_new)
    return v_decayed, i_new + (-dt * p.tau_syn_inv * i_new)


def spike_and_reset(v: torch.Tensor, p) -> tuple[torch.Tensor, torch.Tensor]:
    """The jump condition of ``lif_step`` and ``lif_box_step``: (spikes, v after the reset)."""
    z = superspike(v - p.v_th, p.alpha)
    return z, _reset(z, v, p.v_reset)


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
    z, v = spike_and_reset(lif_box_integrate(input_current, state, p, dt), p)
    return z, LIFBoxState(v)


def lif_box_integrate(input_current: torch.Tensor, state: LIFBoxState,
                      p: LIFBoxParameters = LIFBoxParameters(), dt: float = 1e-3) -> torch.Tensor:
    """The sub-threshold part of ``lif_box_step``: v before the jump condition."""
    return state.v + dt * p.tau_mem_inv * (input_current + p.v_leak - state.v)


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
    ``"adaptive_lif"`` (adaptive threshold).  Its parameters ``p`` are tensors (or numbers) in
    a NamedTuple, as in norse: not ``nn.Parameter`` s, so ``parameters()``, ``state_dict()`` and
    DDP do not see them; to learn one (a per-neuron ``v_th``, say), give it ``requires_grad``,
    hand it to the optimizer and save it yourself."""

    def __init__(self, p: NamedTuple | None = None, dt: float = 1e-3, kind: str = "lif"):
        super().__init__()
        if kind not in SPIKING_KINDS:
            from .errors import SpecError
            raise SpecError(f"unknown spiking population {kind!r}; known: {', '.join(SPIKING_KINDS)}")
        self.kind = kind
        self._step, default, self._state = SPIKING_KINDS[kind]
        self.p, self.dt = (default if p is None else p), float(dt)
        self.check()

    def check(self) -> None:
        """A one-line error for parameters of another kind of neuron, or for a step ``dt`` that
        the forward-Euler integration does not take (0 <= dt/τ < 2 for every time constant, as
        for rate populations; beyond, the state diverges silently)."""
        from .errors import SpecError
        fields = SPIKING_KINDS[self.kind][1]._fields
        missing = _missing_fields(self.p, self.kind)
        if missing:
            raise SpecError(f"{self.kind!r} population: its parameters ({type(self.p).__name__}) "
                            f"lack {', '.join(missing)}; they are another kind's "
                            f"(use {type(SPIKING_KINDS[self.kind][1]).__name__})")
        own = type(SPIKING_KINDS[self.kind][1])
        others = {type(d) for _, d, _ in SPIKING_KINDS.values()} - {own}
        if type(self.p) in others:  # its extra fields (adaptation, a synaptic τ) would be unused
            raise SpecError(f"{self.kind!r} population: its parameters are another kind's "
                            f"({type(self.p).__name__}); use {own.__name__}")
        if not self.dt > 0:
            raise SpecError(f"{self.kind!r} population: dt must be > 0, got {self.dt}")
        alpha = _host(self.p.alpha)
        if alpha is not None and not bool(torch.isfinite(alpha).all() and (alpha > 0).all()):
            # 1/(α|x| + 1)² with α < 0 has a pole at |x| = 1/|α|: infinite gradients
            raise SpecError(f"{self.kind!r} population: the surrogate's alpha must be a finite "
                            f"number > 0, got {alpha.tolist()}")
        for name in ("v_th", "v_leak", "v_reset", "beta"):  # NaN would silently fill the state
            v = _host(getattr(self.p, name)) if name in fields else None
            if v is not None and not bool(torch.isfinite(v).all()):
                raise SpecError(f"{self.kind!r} population: {name} must be finite")
        for name in ("tau_syn_inv", "tau_mem_inv", "tau_adapt_inv"):
            if name in fields:
                v = _host(getattr(self.p, name))
                if v is None:
                    continue
                lo, hi = float(v.min()) * self.dt, float(v.max()) * self.dt
                if not (lo >= 0 and hi < 2):
                    raise SpecError(
                        f"{self.kind!r} population: dt {self.dt:g} s and {name} give "
                        f"dt/τ in [{lo:g}, {hi:g}]; the Euler step needs 0 <= dt/τ < 2 "
                        f"(it diverges otherwise): take a smaller dt or a longer τ")
                if hi > 1:
                    import warnings
                    warnings.warn(f"{self.kind!r} population: dt {self.dt:g} s and {name} give "
                                  f"dt/τ up to {hi:g} > 1: the Euler step overshoots, and the "
                                  "state flips sign from step to step instead of decaying; take "
                                  "a smaller dt or a longer τ", UserWarning, stacklevel=3)

    def initial_state(self, input_current: torch.Tensor):
        """Resting state shaped like one step's input: v = v_leak, i = 0, b = v_th (each kind's
        state type takes the fields it has)."""
        zero = torch.zeros_like(input_current)
        # the parameters' copy on the input's device (a host tensor was copied to a GPU at every
        # call); a number is added as the step function adds it
        p = self._params_on(input_current)

        def plus(v):
            return zero + (v if isinstance(v, (int, float)) else
                           torch.as_tensor(v).to(input_current))
        rest = {"v": lambda: plus(p.v_leak), "i": lambda: zero, "b": lambda: plus(p.v_th)}
        return self._state(*(rest[f]() for f in self._state._fields))

    def _params_on(self, x: torch.Tensor):
        """The parameters for input x: they are tensors in a NamedTuple, which ``.to()`` does
        not reach, so a copy follows the input: on its device, and per-neuron ones in its dtype
        (scalars stay as they are; a tensor operand of the input's dtype keeps it).  ``self.p``
        itself is never changed, so a bf16 input does not round a later float32 run's
        parameters.  The copy is cached for the current parameters, device, dtype and the
        tensors' versions (an in-place change that torch counts, such as an optimizer step,
        makes a new copy; one through ``.data`` is not counted);
        parameters that require grad are copied afresh at every call, so gradients reach them."""
        p = self.p
        arrays = any(isinstance(v, np.ndarray) for v in p)
        if arrays:  # NumPy per-neuron values as tensors (they keep no version: never cached)
            p = type(p)(*(torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in p))

        def fits(v):
            return not torch.is_tensor(v) or v.device == x.device and (
                v.dim() == 0 or not v.is_floating_point() or v.dtype == x.dtype)
        if all(fits(v) for v in p):
            return p

        def converted():
            return type(p)(*(v.to(x.device, x.dtype if v.is_floating_point() and v.dim() else
                                  v.dtype) if torch.is_tensor(v) else v for v in p))
        if arrays or any(torch.is_tensor(v) and v.requires_grad for v in p):
            return converted()  # a differentiable copy belongs to this call's graph: not cached
        key = (x.device, x.dtype, tuple(_version(v) for v in p))
        cache = self.__dict__.get("_params_cache")
        if cache is None or cache[0] is not p or cache[1] != key:
            cache = self.__dict__["_params_cache"] = (p, key, converted())
        return cache[2]

    def step(self, input_current: torch.Tensor, state=None):
        """One step in time: (spikes, state)."""
        if state is None:
            state = self.initial_state(input_current)
        return self._step(input_current, state, self._params_on(input_current), self.dt)

    def forward(self, currents: torch.Tensor, state: LIFState | None = None):
        """Run over a time-major sequence of input currents (T, ...): (spikes (T, ...), state).
        The kinds in ``FUSED_KINDS`` run as one ``lif_sequence`` (the same spikes, one autograd
        node); the others loop over their step function."""
        if self.kind in FUSED_KINDS:
            return lif_sequence(currents, state, self._params_on(currents), self.dt,
                                kind=self.kind)
        _check_sequence(currents, self.p, self.kind, f"a {self.kind!r} population")
        out = []
        for t in range(currents.shape[0]):
            z, state = self.step(currents[t], state)
            out.append(z)
        return torch.stack(out), state

    def extra_repr(self):
        def value(v, invert=False):  # a per-neuron parameter shows its range
            v = _host(v)
            if v is None:
                return "(on the meta device)"
            v = 1 / v if invert else v
            return f"{float(v):g}" if v.numel() == 1 else \
                f"{float(v.min()):g}..{float(v.max()):g} (per neuron)"
        taus = ", ".join(f"{name[:-4]}={value(getattr(self.p, name), invert=True)}"
                         for name in ("tau_mem_inv", "tau_syn_inv", "tau_adapt_inv")
                         if name in self.p._fields)
        return f"kind={self.kind!r}, {taus}, v_th={value(self.p.v_th)}, dt={self.dt:g}"


def _host(v):
    """A parameter's values as a float64 tensor on the CPU, for checks and display (also under
    ``with torch.device("meta")``); None for a tensor on the meta device, which has no values."""
    if torch.is_tensor(v):
        return None if v.is_meta else v.detach().to("cpu", torch.float64)
    return torch.tensor(v, dtype=torch.float64, device="cpu")


def _missing_fields(p, kind: str) -> list[str]:
    """The fields ``kind``'s dynamics read that the parameters ``p`` lack (another kind's)."""
    return [f for f in SPIKING_KINDS[kind][1]._fields if not hasattr(p, f)]


def _check_sequence(currents, p, kind: str, what: str) -> None:
    """One-line errors for a sequence a ``kind`` population cannot run: currents that are not a
    floating-point (T >= 1, ...) tensor, parameters that lack the kind's fields, or per-neuron
    parameters that do not broadcast to one step."""
    if not isinstance(currents, torch.Tensor) or currents.dim() < 1 or currents.shape[0] == 0:
        raise _spec_error(f"{what} needs time-major currents (T, ...) with T >= 1, got "
                          f"{tuple(getattr(currents, 'shape', ()))}")
    if not currents.is_floating_point():
        raise _spec_error(f"currents must be floating point, got {currents.dtype}")
    missing = _missing_fields(p, kind)
    if missing:
        raise _spec_error(f"{kind!r} parameters need {', '.join(missing)}; "
                          f"{type(p).__name__} are another kind's")
    shape = currents.shape[1:]
    for name in SPIKING_KINDS[kind][1]._fields:
        value = getattr(p, name)
        if isinstance(value, torch.Tensor) and not _fits(value.shape, shape):
            raise _spec_error(f"parameter {name} of shape {tuple(value.shape)} does not "
                              f"broadcast to one step's shape {tuple(shape)}")


def _spans_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ranges two tensors reach meet (conservative: interleaved views that
    share no element count as meeting)."""
    def span(t):
        lo = t.data_ptr() + t.element_size() * sum(s * (n - 1) for s, n in zip(t.stride(), t.shape)
                                                   if s < 0)
        hi = t.data_ptr() + t.element_size() * (1 + sum(s * (n - 1) for s, n in
                                                        zip(t.stride(), t.shape) if s > 0))
        return lo, hi
    (a0, a1), (b0, b1) = span(a), span(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def _version(v):
    """A tensor's in-place version counter (a fresh object, never equal, where it has none: an
    inference tensor); None for a non-tensor."""
    if not torch.is_tensor(v):
        return None
    try:
        return v._version
    except RuntimeError:
        return object()


# -- whole sequences: one autograd node for T steps -------------------------------------------
#
# ``lif_sequence`` runs T steps of ``lif_step`` (or ``lif_box_step``) in one no-grad loop of
# in-place ops that are the step function's float operations in the same order, so its spikes
# and voltages equal the step loop's bit for bit (``tests/test_spiking_speed.py``, 1000 steps).
# Three rewrites are exact rather than literal:
#   H(v − v_th) as v > v_th: x − y > 0 iff x > y in IEEE arithmetic with gradual underflow
#     (torch's default; not under torch.set_flush_denormal(True));
#   the reset (1 − z)·v + z·v_reset as lerp(v, v_reset, z): torch's lerp computes
#     v + z (v_reset − v) for z < 1/2 and v_reset − (v_reset − v)(1 − z) otherwise, so z ∈ {0, 1}
#     gives v or v_reset exactly (finite voltages; only the sign of a zero may differ);
#   with v_leak = 0, (v_leak − v) + i as i − v (IEEE: (0 − v) + i = i − v), and for lif_box
#     (I + v_leak) − v as I − v.
# For the backward it keeps only the pre-reset voltages (and the spikes it returns anyway); the
# backward is the hand-written adjoint in ``_LIFSequence``.

#: kinds that ``lif_sequence`` runs fused (the others loop over their step function)
FUSED_KINDS = ("lif", "lif_box")
_DEVICE_CHUNK = 1 << 24  # the same off the CPU: few kernels, a bounded extra memory
_CHUNK = 1 << 15  # elements per block of time steps in the backward's elementwise passes:
#                   at most torch's intra-op grain size (32768), so they stay serial and in cache

__all__ += ["lif_sequence", "FUSED_KINDS"]


def _spec_error(message: str):
    from .errors import SpecError
    return SpecError(message)


def _is_zero(x) -> bool:
    """Whether a parameter is known to be 0 without waiting for a device: a tensor off the CPU
    (or on the meta device, without values) is not known to be (the general path computes the
    same values)."""
    if torch.is_tensor(x):
        return x.device.type == "cpu" and bool((x == 0).all())
    return bool(np.all(np.asarray(x) == 0))  # a number or a numpy array


def _as_param(x):
    """A number as a 0-d float64 tensor: ops cast it to the tensor's dtype exactly as they cast
    a Python number, so the fused loop computes what the step function computes."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def _fits(shape: torch.Size, step_shape: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to one step's shape without enlarging it."""
    try:
        return torch.broadcast_shapes(shape, step_shape) == step_shape
    except RuntimeError:
        return False


def _unbroadcast(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient of the step shape back to the shape of a broadcast initial state."""
    if g.shape == shape:
        return g
    lead = g.dim() - len(shape)
    g = g.sum(dim=tuple(range(lead))) if lead else g
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and g.shape[d] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _lif_sequence_forward(kind, currents, v0, i0, p, dt, save, record, out=None):
    """The fused no-grad loop.  Returns (spikes (T, ...), v, i, pre-reset voltages (T, ...) if
    ``save``, post-reset voltages (T, ...) if ``record``)."""
    T, shape = currents.shape[0], currents.shape[1:]
    like = dict(dtype=currents.dtype, device=currents.device)
    a = dt * p.tau_mem_inv  # the coefficients exactly as the step functions form them
    v = torch.empty(shape, **like)
    v.copy_(v0)  # broadcasts a per-neuron initial state
    i = None
    if kind == "lif":
        b = -dt * p.tau_syn_inv
        i = torch.empty(shape, **like)
        i.copy_(i0)
    leak0 = _is_zero(p.v_leak)
    v_leak, v_th = _as_param(p.v_leak), _as_param(p.v_th)
    v_reset = torch.as_tensor(p.v_reset).to(**like)  # z · v_reset rounds v_reset so too
    spikes = torch.empty((T, *shape), **like) if out is None else out
    pre = torch.empty((T, *shape) if save else shape, **like)
    post = torch.empty((T, *shape), **like) if record else None
    tmp = torch.empty(shape, **like)
    for t in range(T):
        vd = pre[t] if save else pre
        if kind == "lif":
            i.add_(currents[t])                  # i_new = i + I
            if leak0:
                torch.sub(i, v, out=tmp)         # (v_leak − v) + i_new with v_leak = 0
            else:
                torch.sub(v_leak, v, out=tmp)
                tmp.add_(i)
            # the coefficient on the left, as the step function and norse write it: in half
            # precision (0-d float32) * bf16 and bf16 * (0-d float32) round differently on CPU
            torch.mul(a, tmp, out=tmp)
            torch.add(v, tmp, out=vd)            # v_dec = v + dt/τ_mem · (...)
            torch.mul(b, i, out=tmp)
            i.add_(tmp)                          # i_dec = i_new + (−dt/τ_syn · i_new)
        else:
            if leak0:
                torch.sub(currents[t], v, out=tmp)   # (I + v_leak) − v with v_leak = 0
            else:
                torch.add(currents[t], v_leak, out=tmp)
                tmp.sub_(v)
            torch.mul(a, tmp, out=tmp)
            torch.add(v, tmp, out=vd)
        z = spikes[t]
        torch.gt(vd, v_th, out=z)                # z = H(v_dec − v_th), as 0./1.
        if record:
            v = post[t]
        torch.lerp(vd, v_reset, z, out=v)        # v = (1 − z) v_dec + z v_reset
    if record:
        v = v.clone()  # the final state must not alias the voltage trace
    return spikes, v, i, (pre if save else None), post


class _LIFSequence(torch.autograd.Function):
    """T steps of the LIF neuron as one node.  Backward: the adjoint of the step, with
    a = dt/τ_mem, c = 1 − dt/τ_syn, s_t = 1/(α|V_t − v_th| + 1)² (SuperSpike) at the
    pre-reset voltage V_t, and D_t = ∂v_t/∂V_t = (1 − z_t) + (v_reset − V_t) s_t (the reset,
    with the gradient through the spike):

        u_t = ∂L/∂V_t = ((1 − a) u_{t+1} + ∂L/∂v_t|direct) D_t + ∂L/∂z_t s_t
        w_t = ∂L/∂I_t = c w_{t+1} + a u_t                       (lif; lif_box: w_t = a u_t)

    with u_T, w_T from the loss on the final state; the initial state gets (1 − a) u_0 and w_0.
    The per-step recurrences are one fused multiply-add each; s_t and D_t are computed in blocks
    of time steps."""

    @staticmethod
    def forward(ctx, currents, v0, i0, kind, p, dt, record):
        spikes, v, i, pre, post = _lif_sequence_forward(kind, currents, v0, i0, p, dt, True,
                                                        record)
        ctx.save_for_backward(pre, spikes)
        ctx.kind, ctx.p, ctx.dt, ctx.record = kind, p, dt, record
        ctx.v0_shape = v0.shape
        ctx.i0_shape = None if i0 is None else i0.shape
        ctx.set_materialize_grads(False)
        out = (spikes, v) + ((i,) if kind == "lif" else ())
        return out + ((post,) if record else ())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, gv, *rest):
        pre, spikes = ctx.saved_tensors
        kind, p, dt = ctx.kind, ctx.p, ctx.dt
        gi = rest[0] if kind == "lif" else None
        gpost = rest[-1] if ctx.record else None
        T, shape = pre.shape[0], pre.shape[1:]
        like = dict(dtype=pre.dtype, device=pre.device)
        a = torch.as_tensor(dt * p.tau_mem_inv, **like)
        one_minus_a = 1 - a
        # the forward's decay, i + (-dt/τ_syn) i, rounds -dt/τ_syn in the parameters' dtype and
        # then works in the currents': so does its derivative (1 + that, in the currents' dtype)
        c = 1 + torch.as_tensor(-dt * p.tau_syn_inv, **like) if kind == "lif" else None
        alpha, v_th, v_reset = (torch.as_tensor(x).to(**like)
                                for x in (p.alpha, p.v_th, p.v_reset))
        U = torch.empty_like(pre)
        # blocks that stay in a CPU's cache; on another device far larger ones (one step per
        # block was ~8 small kernels per step), still bounded (T steps at once held two more
        # sequence-sized temporaries)
        chunk = _CHUNK if pre.device.type == "cpu" else _DEVICE_CHUNK
        block = max(1, chunk // max(1, pre[0].numel()))
        u_next = w_next = None
        for t1 in range(T, 0, -block):
            t0 = max(0, t1 - block)
            V = pre[t0:t1]
            s = torch.sub(V, v_th).abs_().mul_(alpha).add_(1).pow_(-2)        # surrogate
            D = torch.sub(v_reset, V).mul_(s).sub_(spikes[t0:t1]).add_(1)
            H = None if gz is None else s.mul_(gz[t0:t1])                     # ∂L/∂z s
            if gpost is not None:
                H = D * gpost[t0:t1] if H is None else H.addcmul_(D, gpost[t0:t1])
            if t1 == T:  # the last step: the loss on the final voltage enters here
                last = torch.zeros(shape, **like) if gv is None else gv * D[-1]
                U[T - 1] = last if H is None else last.add_(H[-1])
                u_next, t1_loop = U[T - 1], T - 1
            else:
                t1_loop = t1
            E = D.mul_(one_minus_a)
            for t in range(t1_loop - 1, t0 - 1, -1):
                k = t - t0
                if H is None:
                    torch.mul(u_next, E[k], out=U[t])
                else:
                    torch.addcmul(H[k], u_next, E[k], out=U[t])
                u_next = U[t]
            u_next = U[t0].clone()  # U[t0:t1] becomes ∂L/∂I below
            U[t0:t1].mul_(a)
            if kind == "lif":
                for t in range(t1 - 1, t0 - 1, -1):
                    if w_next is None:  # the last step: the loss on the final current
                        if gi is not None:
                            U[t].addcmul_(gi, c)
                    else:
                        U[t].addcmul_(w_next, c)
                    w_next = U[t]
        g_v0 = _unbroadcast(u_next * one_minus_a, ctx.v0_shape)
        g_i0 = None if kind != "lif" else _unbroadcast(U[0].clone(), ctx.i0_shape)
        return U, g_v0, g_i0, None, None, None, None


def lif_sequence(currents: torch.Tensor, state=None, p: NamedTuple | None = None,
                 dt: float = 1e-3, kind: str = "lif", record_voltage: bool = False,
                 out: torch.Tensor | None = None):
    """Run a time-major sequence of input currents (T, B, ...) through ``kind``'s dynamics
    (``"lif"``: ``lif_step``; ``"lif_box"``: ``lif_box_step``) in one fused loop.

    Returns (spikes (T, ...), final state), or with ``record_voltage`` (spikes, final state,
    post-reset voltages (T, ...)).  Spikes and voltages are bit-identical to looping the step
    function (see the comment above ``FUSED_KINDS``); gradients to the currents and the initial
    state come from the adjoint in ``_LIFSequence`` and agree with autograd through the step
    loop (to float rounding).  Parameters that require grad are not differentiated by the
    adjoint: then the step loop runs under autograd instead.  ``state=None`` starts at rest
    (v = v_leak, i = 0).  ``out``: a (T, ...) tensor to write the spikes into, for runs without
    autograd; it may be ``currents`` itself (step t reads currents[t] before it writes
    spikes[t]), which spares allocating (and page-faulting) a second sequence-sized buffer."""
    if kind not in SPIKING_KINDS:
        raise _spec_error(f"unknown spiking population {kind!r}; known: {', '.join(SPIKING_KINDS)}")
    if kind not in FUSED_KINDS:
        raise _spec_error(f"lif_sequence runs {', '.join(FUSED_KINDS)}; loop {kind!r}'s step "
                          "function (LIFPopulation does)")
    step, default, state_type = SPIKING_KINDS[kind]
    p = default if p is None else p
    _check_sequence(currents, p, kind, "lif_sequence")
    shape = currents.shape[1:]
    if state is None:
        zero = currents.new_zeros(shape)
        state = state_type(*((zero + torch.as_tensor(p.v_leak).to(zero)) if f == "v" else zero
                             for f in state_type._fields))
    if not isinstance(state, tuple) or len(state) != len(state_type._fields):
        raise _spec_error(f"{kind} state needs fields {state_type._fields}")
    for name, value in zip(state_type._fields, state):
        if not isinstance(value, torch.Tensor) or not _fits(value.shape, shape):
            raise _spec_error(f"state {name} of shape {tuple(getattr(value, 'shape', ()))} does "
                              f"not broadcast to one step's shape {tuple(shape)}")
    grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (currents, *state, *p))
    if out is not None and (grad or not isinstance(out, torch.Tensor)
                            or out.shape != currents.shape or out.dtype != currents.dtype
                            or out.device != currents.device):
        raise _spec_error("out= needs a tensor shaped, typed and placed like the currents, and "
                          "no autograd (run under torch.no_grad())")
    if out is not None:
        # the currents themselves (step t reads currents[t] before writing spikes[t]) or memory
        # of its own; an expanded view (a constant current) would write every step at once
        itself = out.data_ptr() == currents.data_ptr() and out.stride() == currents.stride()
        overlap = torch._debug_has_internal_overlap(out)  # 0 no, 1 yes, 2 cannot tell
        if overlap == 1 or overlap == 2 and any(s == 0 and n > 1 for s, n in
                                                zip(out.stride(), out.shape)) \
                or (not itself and _spans_meet(out, currents)):
            raise _spec_error("out= must not overlap itself (an expanded view, such as a constant "
                              "current) nor overlap the currents other than being them; pass a "
                              "contiguous buffer")
    if grad and any(isinstance(x, torch.Tensor) and x.requires_grad for x in p):
        spikes, vs = [], []  # the adjoint has no parameter gradients: autograd through steps
        for t in range(currents.shape[0]):
            z, state = step(currents[t], state, p, dt)
            spikes.append(z)
            vs.append(state.v)
        res = (torch.stack(spikes), state)
        return res + (torch.stack(vs),) if record_voltage else res
    dtype = currents.dtype
    v0 = state.v.to(dtype)
    i0 = state.i.to(dtype) if kind == "lif" else None
    if grad:
        res = _LIFSequence.apply(currents, v0, i0, kind, p, dt, record_voltage)
    else:
        spikes, v, i, _, post = _lif_sequence_forward(kind, currents, v0, i0, p, dt, False,
                                                      record_voltage, out)
        res = (spikes, v) + ((i,) if kind == "lif" else ()) + ((post,) if record_voltage else ())
    new_state = state_type(*res[1:3]) if kind == "lif" else state_type(res[1])
    return (res[0], new_state) + ((res[-1],) if record_voltage else ())

"""Online learning from eligibility traces: every synapse of a spiking circuit updates from
signals available at that step, without storing the history (e-prop; Bellec et al. 2020,
"A solution to the learning dilemma for recurrent networks of spiking neurons", Nat. Commun. 11,
3625, eqs. 1-3 and Methods "Eligibility traces for LIF neurons").

For the current-based LIF neuron of ``plastic.spiking.lif_step`` with input current
I_t = W a_t + b, the derivative of the pre-reset voltage v_t with respect to W_ij factorises into
a presynaptic trace (the reset is ignored, as in e-prop):

    c_t = (1 − dt/τ_syn) c_{t−1} + a_t            (∂i_t/∂W_ij, the synaptic-current trace)
    ε_t = (1 − dt/τ_mem) ε_{t−1} + dt/τ_mem · c_t   (∂v_t/∂W_ij, the eligibility vector)

(for ``lif_box``, which has no synaptic current, ε_t = (1 − dt/τ_mem) ε_{t−1} + dt/τ_mem · a_t).
The eligibility trace is e_ij,t = ψ_i,t ε_j,t with ψ the surrogate derivative of the spike at
v_t (eq. 3), and the update is ΔW_ij = Σ_t L_i,t e_ij,t: the product of a learning signal and a
trace, one weight-gradient-sized product per step.  The traces' memory does not grow with T;
a spike encoder's input (Poisson, latency) is drawn for all T steps up front, T × B × inputs,
as ``TimeStepped.run`` draws it (a constant input is held once).  A constant input
current makes the first synapse's traces scalar multiples of its input, so its products fold
into one per batch (``_online_updates``).

The learning signal L_t comes from the per-step readout error err_t = softmax(y_t) − onehot
(the loss is the mean over steps of the cross-entropy of the readout y_t) and reaches each
population through the circuit's own feedback synapses: B δ for layer-wise kinds (fa, usf,
transpose, …), B_l err for direct ones (dfa), with δ = L ⊙ ψ passed down layer by layer (from
one hidden population to the one before it as (dt/τ_mem) B δ, the current entering the
voltage by dt/τ_mem; so with one step, T = 1, transpose feedback's update is BPTT's gradient
exactly, the reset left out as e-prop leaves it).  So
random feedback gives e-prop's "random e-prop", transpose its "symmetric e-prop".  The change is
added to ``.grad`` of W and b, so any optimizer applies it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .feedback import FeedbackSynapse
from .learned import KolenPollack, LearnedFeedback, mean_over_processes
from .simulator import TimeStepped
from .spiking import (LIFBoxState, LIFPopulation, LIFState, lif_box_integrate, lif_integrate,
                      spike_and_reset)
from .synapses import Dense, Synapse

__all__ = ["presynaptic_traces", "online_step", "surrogate_derivative"]


def presynaptic_traces(a, c, eps, p, dt: float, kind: str = "lif"):
    """One step of the presynaptic traces (c, ε) for input a (module docstring).  ``c`` is None
    for ``lif_box``.  Returns the new (c, ε).  ``a``, ``c`` and ``ε`` may be Python numbers (the
    trace of a constant input)."""
    read = {"lif": ("tau_syn_inv", "tau_mem_inv"), "lif_box": ("tau_mem_inv",)}.get(kind, ())
    missing = [f for f in read if not hasattr(p, f)]
    if missing:
        raise SpecError(f"presynaptic_traces: {kind!r} traces need the parameters "
                        f"{', '.join(missing)}; {type(p).__name__} are another kind's")
    if kind == "lif" and c is None:
        raise SpecError("presynaptic_traces: a 'lif' population's traces need c, the synaptic-"
                        "current trace (0 at the start); only 'lif_box' has none")
    return _traces(a, c, eps, *_trace_factors(p, dt, kind))


def _trace_factors(p, dt: float, kind: str):
    """(1 − dt/τ_syn or None for lif_box, dt/τ_mem): Python numbers for one τ per population,
    tensors for one per neuron (which ``presynaptic_traces`` broadcasts as the caller shapes
    them; ``online_step`` refuses them)."""
    if kind not in ("lif", "lif_box"):
        raise SpecError(f"online learning supports lif and lif_box populations, not {kind!r}")

    def rate(v):  # dt/τ as the dynamics form it (dt * τ⁻¹, in τ⁻¹'s own dtype)
        r = dt * v
        return float(r) if torch.is_tensor(r) and r.numel() == 1 else r
    km = rate(p.tau_mem_inv)
    return (1 - rate(p.tau_syn_inv) if kind == "lif" else None), km


def _traces(a, c, eps, ks, km, inplace=False):
    if inplace:
        if ks is not None:
            c = c.mul_(ks).add_(a)
        return c, eps.mul_(1 - km).add_(a if ks is None else c, alpha=km)
    if ks is not None:
        c = c * ks + a
    return c, eps * (1 - km) + km * (a if ks is None else c)


def surrogate_derivative(v: torch.Tensor, p) -> torch.Tensor:
    """ψ = 1/(α|v − v_th| + 1)², the SuperSpike pseudo-derivative of the spike (Zenke & Ganguli
    2018), the same as the population's surrogate gradient."""
    return (p.alpha * (v - p.v_th).abs() + 1).pow(-2)


def _surrogate_derivative_(v: torch.Tensor, p) -> torch.Tensor:
    """``surrogate_derivative`` in place on one temporary (no autograd; α broadcast to v)."""
    d = (v - p.v_th).abs_().mul_(p.alpha).add_(1)
    return d.mul_(d).reciprocal_()


def _lif_step_with_voltage(pop: LIFPopulation, current, state, p):
    """(spikes, new state, v before the reset) by the population's own step functions."""
    if pop.kind == "lif":
        v, i = lif_integrate(current, state, p, pop.dt)
        z, v_after = spike_and_reset(v, p)
        return z, LIFState(v_after, i), v
    v = lif_box_integrate(current, state, p, pop.dt)
    z, v_after = spike_and_reset(v, p)
    return z, LIFBoxState(v_after), v


def _layers(model: TimeStepped):
    """[(synapse, population or None)] of a dense spiking circuit; flatten modules pass."""
    from .simulator import _hooked
    if _hooked(model) or _hooked(model.circuit):
        raise SpecError("online learning: the time-stepped circuit has hooks, which the online "
                        "updates would skip; remove them, or learn by backprop through time")
    out, seq = [], list(model.circuit)
    for i, m in enumerate(seq):
        if _hooked(m) or isinstance(m, Synapse) and not _plain_dense(m) or (
                isinstance(m, LIFPopulation) and (type(m).forward is not LIFPopulation.forward
                                                  or type(m).step is not LIFPopulation.step)):
            # online learning computes the currents and steps itself: a hook (an ablation, a
            # pruning mask) or an overridden forward would change model(x) but not the updates
            raise SpecError(f"online learning: module {i} ({type(m).__name__}) has hooks, a "
                            "pruning mask or its own forward, which the online updates would "
                            "skip; remove them, or learn by backprop through time")
        if isinstance(m, nn.Flatten):
            continue
        if isinstance(m, Synapse):
            if not isinstance(m, Dense):
                raise SpecError("online learning supports dense synapses; got "
                                f"{type(m).__name__}")
            if out and out[-1][1] is None:
                raise SpecError(f"online learning: synapse {i} follows synapse "
                                f"{seq.index(out[-1][0])} with no population between; every "
                                "synapse but the readout must be followed by a LIF population")
            fb = m.feedback
            if isinstance(fb, LearnedFeedback):
                raise SpecError("online learning does not apply learned feedback rules (they read "
                                "the backward pass); use a fixed or derived kind, or kolen-pollack")
            out.append([m, None])
        elif isinstance(m, LIFPopulation):
            if not out or out[-1][1] is not None:
                raise SpecError("online learning: every population must follow a synapse")
            if m.kind not in ("lif", "lif_box"):
                raise SpecError(f"online learning supports lif and lif_box populations, not "
                                f"{m.kind!r}")
            per_neuron = [f for f in ("tau_syn_inv", "tau_mem_inv") if f in m.p._fields
                          and torch.as_tensor(getattr(m.p, f)).numel() > 1]
            if per_neuron:  # the traces filter each input by the post neurons' time constants
                raise SpecError(f"online learning needs one {' and one '.join(per_neuron)} per "
                                "population, not one per neuron")
            out[-1][1] = m
        else:
            raise SpecError(f"online learning supports Flatten, Dense and LIF populations, not "
                            f"{type(m).__name__}")
    if not out or out[-1][1] is not None:
        raise SpecError("online learning needs a circuit that ends in a readout synapse")
    return out


def _plain_dense(m: Synapse) -> bool:
    """A Dense synapse whose current is F.linear(x, W, b), W a leaf parameter (not a pruned
    weight recomputed by a pre-hook)."""
    return (not isinstance(m, Dense) or type(m)._forward_op is Dense._forward_op
            and type(m).forward is Synapse.forward) and isinstance(m.weight, nn.Parameter)


def check_online(model) -> list:
    """A one-line error now, before anything runs, if ``online_step`` cannot train ``model``;
    else its [(synapse, population or None)] (``_layers``)."""
    from .metrics import unwrapped
    model = unwrapped(model)  # a DDP-wrapped circuit: the circuit inside
    if not isinstance(model, TimeStepped):
        raise SpecError("learning = \"online\" needs a spiking population")
    if model.delays:
        raise SpecError("online learning does not support synaptic delays yet")
    return _layers(model)


@torch.no_grad()
def online_step(model: TimeStepped, x: torch.Tensor, target: torch.Tensor,
                label_smoothing: float = 0.0, return_loss: bool = False):
    """Simulate one batch step by step and add the eligibility-trace updates of every synapse
    to its ``.grad`` (call ``optimizer.step()`` after).  Under torch.distributed the updates
    are averaged over processes here, since no autograd pass runs for DDP to all-reduce.
    Returns the readout averaged over the steps (the same readout as ``model(x)``).  No history
    of the circuit is stored: the traces take the memory of one step (the encoded input is
    drawn whole; module docstring).  What is averaged is the whole ``.grad`` of the
    circuit's synapses, as DDP's own all-reduce would, in one all-reduce; inside
    ``ddp.no_sync()`` nothing is (micro-batches accumulate; the next synchronised step averages
    the sum).  ``label_smoothing`` mixes the one-hot target with
    the uniform distribution, as in ``F.cross_entropy``.  A DDP-wrapped circuit may be passed
    (the circuit inside is stepped).  With ``return_loss``: (readout, loss), the loss being
    the one the updates descend, the mean over steps of the per-step readout's cross-entropy
    (not the cross-entropy of the averaged readout)."""
    from .metrics import unwrapped
    from .synapses import is_plasticity_paused
    out, layers, gw, gb, loss = _online_updates(unwrapped(model), x, target, label_smoothing)
    updated = []

    def add(p, g):  # a frozen parameter gets nothing (an optimizer steps any .grad it finds)
        if p.requires_grad:
            FeedbackSynapse.accumulate(p, g)
            updated.append(p)
    for k, (syn, _) in enumerate(layers):
        add(syn.weight, gw[k])
        if syn.bias is not None:
            add(syn.bias, gb[k])
        # Kolen-Pollack's B takes W's update, as in backprop: not for a frozen W, nor while
        # plasticity is paused
        if isinstance(syn.feedback, KolenPollack) and syn.weight.requires_grad \
                and not is_plasticity_paused():
            add(syn.feedback.weight, gw[k])
    # no autograd pass for DDP to hook: average over processes here, as DDP would, the whole
    # .grad (what ddp.no_sync() micro-batches accumulated included), in one all-reduce; inside
    # no_sync, nothing
    if getattr(model, "require_backward_grad_sync", True):
        mean_over_processes([p.grad for p in updated])
    return (out, loss) if return_loss else out


def online_update_angles(model: TimeStepped, loss_fn, x: torch.Tensor, target: torch.Tensor,
                         label_smoothing: float = 0.0) -> dict[str, float]:
    """{hidden synapse: angle between the weight update ``online_step`` applies (e-prop) and
    backprop through time's dL/dW} on one batch, with the same random draws (a Poisson
    encoder); nothing is written into ``.grad``.  L is the loss e-prop descends, the mean over
    steps of ``loss_fn`` on each step's readout (the cross-entropy of the averaged readout has
    another gradient, 18° from it on a small circuit)."""
    from .convert import synapses
    from .metrics import angle, backprop, same_draws, unwrapped
    from .synapses import plasticity_paused

    model = unwrapped(model)
    replay = same_draws(model)
    with replay():
        _, layers, gw, _, _ = _online_updates(model, x, target, label_smoothing)
    names = {id(s): n for n, s in synapses(model)}
    hidden = [(names[id(s)], s, g) for (s, _), g in zip(layers, gw) if not s.is_output]
    if not hidden:  # a readout alone: no hidden synapse to compare
        return {}
    with backprop(model), plasticity_paused(), torch.enable_grad(), replay():
        steps = model.run(x, per_step=True)[0]  # (T, B, classes)
        loss = loss_fn(steps.flatten(0, 1), target.repeat(steps.shape[0]))
        bp = torch.autograd.grad(loss, [s.weight for _, s, _ in hidden], allow_unused=True)
    return {n: angle(g, b) if b is not None else float("nan")
            for (n, _, g), b in zip(hidden, bp)}


def _add_product(g: torch.Tensor, delta: torch.Tensor, a: torch.Tensor) -> None:
    """g += δᵀ a, in g's (the parameter's) dtype: under autocast δ and a come in a lower one,
    and a gradient goes back in its parameter's dtype, as autocast's casts give."""
    g.addmm_(delta.t().to(g.dtype), a.to(g.dtype))


@torch.no_grad()
def _online_updates(model: TimeStepped, x, target, label_smoothing):
    """(readout averaged over steps, layers, weight updates, bias updates, the loss descended:
    the mean over steps of the readout's cross-entropy) of one batch.

    A constant input current a makes the first synapse's traces scalar multiples of a
    (c_t = s_t a, ε_t = e_t a, with s_t, e_t the traces of a constant 1, i.e. the bias's), so
    its update Σ_t δ_tᵀ e_t a is accumulated as D = Σ_t e_t δ_t and applied once, Dᵀ a."""
    layers = check_online(model)
    classes = layers[-1][0].out_features
    if not (0 <= label_smoothing <= 1):
        raise SpecError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (isinstance(target, torch.Tensor) and target.dim() == 1 and len(target) == len(x)
            and not target.is_floating_point() and not target.is_complex()
            and target.dtype != torch.bool):
        raise SpecError(f"online learning takes one class index per sample, (B,) = "
                        f"({len(x)},); got {getattr(target, 'dtype', type(target).__name__)} "
                        f"{tuple(getattr(target, 'shape', ()))}")
    seq, const = model.encode(x)
    t_steps, b, n = model.steps, x.shape[0], len(layers)
    try:
        onehot = F.one_hot(target.long(), classes).to(seq.dtype if seq.is_floating_point()
                                                      else torch.get_default_dtype())
    except RuntimeError as e:  # a class index out of range, in torch's words
        if "Class values" not in str(e):
            raise
        raise SpecError(f"online learning: class indices must be in [0, {classes}) for the "
                        f"circuit's {classes} outputs") from None
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / classes
    gw = [torch.zeros_like(s.weight) for s, _ in layers]
    gb = [None if s.bias is None else torch.zeros_like(s.bias) for s, _ in layers]
    # each feedback matrix once per batch (W does not change within it; brsf draws once)
    fbm = [None if s.feedback.direct else s.feedback.matrix(s.weight) for s, _ in layers]
    params = [None] * n      # each population's parameters on the current's device and dtype
    factors = [None] * n     # (1 − dt/τ_syn, dt/τ_mem) of each population's traces
    states = [None] * n
    traces = [None] * n      # (c, ε) of each hidden synapse's input
    scalar = [(0.0, 0.0)] * n  # (s, e): the traces of a constant 1 (the bias's input)
    psi, inputs = [None] * n, [None] * n
    folded = None            # D of a constant input (docstring)
    out_sum = loss_sum = 0.0
    first_current = None
    for t in range(t_steps):
        a = (seq if const else seq[t]).flatten(1)
        for k, (syn, pop) in enumerate(layers):
            inputs[k] = a
            if k == 0 and const:
                if first_current is None:
                    first_current = F.linear(a, syn.weight, syn.bias)
                current = first_current
            else:
                current = F.linear(a, syn.weight, syn.bias)
            if pop is None:  # the readout
                y = current
                break
            if params[k] is None:
                params[k] = pop._params_on(current)
                # one-number time constants from the host copy: read on the device, each was a
                # wait for it at every batch
                host = type(params[k])(*(
                    h if isinstance(h, (int, float)) or torch.is_tensor(h) and h.numel() == 1
                    else m for h, m in zip(pop.p, params[k])))
                factors[k] = _trace_factors(host, pop.dt, pop.kind)
                states[k] = pop.initial_state(current)
            ks, km = factors[k]
            scalar[k] = _traces(1.0, *scalar[k], ks, km)
            if not (k == 0 and const):
                if traces[k] is None:
                    traces[k] = (None if ks is None else torch.zeros_like(a), torch.zeros_like(a))
                traces[k] = _traces(a, *traces[k], ks, km, inplace=True)
            a, states[k], v = _lif_step_with_voltage(pop, current, states[k], params[k])
            psi[k] = _surrogate_derivative_(v, params[k])
        out_sum = out_sum + y
        loss_sum = loss_sum - (onehot * torch.log_softmax(y, -1)).sum()  # the loss descended
        err = (torch.softmax(y, -1) - onehot) / (t_steps * b)
        delta = err
        for k in range(n - 1, -1, -1):
            readout = k == n - 1
            if k == 0 and const:
                e = 1.0 if readout else scalar[0][1]
                folded = delta * e if folded is None else folded.add_(delta, alpha=e)
            else:
                _add_product(gw[k], delta, inputs[k] if readout else traces[k][1])
                if gb[k] is not None:
                    gb[k].add_(delta.sum(0), alpha=1.0 if readout else scalar[k][1])
            if k == 0:
                break
            fb = layers[k][0].feedback
            if fb.direct:
                fb.materialize(inputs[k].shape[1:], err.device, err.dtype)
                signal = fb.project(err, inputs[k].shape)
            else:
                signal = delta @ fbm[k]
                if not readout:  # δ is ∂L/∂v of population k; its current enters v by dt/τ_mem
                    signal.mul_(factors[k][1])
            delta = signal * psi[k - 1]
    if folded is not None:
        _add_product(gw[0], folded, inputs[0])
        if gb[0] is not None:
            gb[0].add_(folded.sum(0))
    return out_sum / t_steps, layers, gw, gb, loss_sum / (t_steps * b)

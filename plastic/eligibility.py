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
trace, one weight-gradient-sized product per step, memory independent of T.

The learning signal L_t comes from the per-step readout error err_t = softmax(y_t) − onehot
(the loss is the mean over steps of the cross-entropy of the readout y_t) and reaches each
population through the circuit's own feedback synapses: B δ for layer-wise kinds (fa, usf,
transpose, …), B_l err for direct ones (dfa), with δ = L ⊙ ψ passed down layer by layer.  So
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
from .spiking import LIFPopulation
from .synapses import Dense, Synapse

__all__ = ["presynaptic_traces", "online_step", "surrogate_derivative"]


def presynaptic_traces(a: torch.Tensor, c: torch.Tensor | None, eps: torch.Tensor, p, dt: float,
                       kind: str = "lif"):
    """One step of the presynaptic traces (c, ε) for input a (module docstring).  ``c`` is None
    for ``lif_box``.  Returns the new (c, ε)."""
    km = dt * p.tau_mem_inv
    if kind == "lif":
        c = c * (1 - dt * p.tau_syn_inv) + a
        return c, eps * (1 - km) + km * c
    if kind == "lif_box":
        return None, eps * (1 - km) + km * a
    raise SpecError(f"online learning supports lif and lif_box populations, not {kind!r}")


def surrogate_derivative(v: torch.Tensor, p) -> torch.Tensor:
    """ψ = 1/(α|v − v_th| + 1)², the SuperSpike pseudo-derivative of the spike (Zenke & Ganguli
    2018), the same as the population's surrogate gradient."""
    return (p.alpha * (v - p.v_th).abs() + 1).pow(-2)


def _pre_reset_voltage(pop: LIFPopulation, current, state):
    """v_t before the reset, by the step's own operations (so it equals lif_step's)."""
    p, dt = pop._params_on(current), pop.dt
    if pop.kind == "lif":
        return state.v + dt * p.tau_mem_inv * ((p.v_leak - state.v) + (state.i + current))
    return state.v + dt * p.tau_mem_inv * (current + p.v_leak - state.v)


def _layers(model: TimeStepped):
    """[(synapse, population or None)] of a dense spiking circuit; flatten modules pass."""
    out, seq = [], list(model.circuit)
    for m in seq:
        if isinstance(m, nn.Flatten):
            continue
        if isinstance(m, Synapse):
            if not isinstance(m, Dense):
                raise SpecError("online learning supports dense synapses; got "
                                f"{type(m).__name__}")
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
    is stored: memory is that of one step.  ``label_smoothing`` mixes the one-hot target with
    the uniform distribution, as in ``F.cross_entropy``.  A DDP-wrapped circuit may be passed
    (the circuit inside is stepped).  With ``return_loss``: (readout, loss), the loss being
    the one the updates descend, the mean over steps of the per-step readout's cross-entropy
    (not the cross-entropy of the averaged readout)."""
    from .metrics import unwrapped
    out, layers, gw, gb, loss = _online_updates(unwrapped(model), x, target, label_smoothing)
    # no autograd pass for DDP to hook: average over processes here
    mean_over_processes([*gw, *(g for g in gb if g is not None)])
    for k, (syn, _) in enumerate(layers):
        FeedbackSynapse.accumulate(syn.weight, gw[k])
        if syn.bias is not None:
            FeedbackSynapse.accumulate(syn.bias, gb[k])
        if isinstance(syn.feedback, KolenPollack):
            FeedbackSynapse.accumulate(syn.feedback.weight, gw[k])
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


@torch.no_grad()
def _online_updates(model: TimeStepped, x, target, label_smoothing):
    """(readout averaged over steps, layers, weight updates, bias updates, the loss descended:
    the mean over steps of the readout's cross-entropy) of one batch."""
    layers = check_online(model)
    seq, const = model.encode(x)
    t_steps, b = model.steps, x.shape[0]
    classes = layers[-1][0].out_features
    onehot = F.one_hot(target, classes).to(x.dtype)
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / classes
    n = len(layers)
    states = [None] * n
    traces = [[None, None, None, None] for _ in range(n)]  # c, ε, c_bias, ε_bias
    gw = [torch.zeros_like(s.weight) for s, _ in layers]
    # each feedback matrix once per batch (W does not change within it; brsf draws once)
    fbm = [None if s.feedback.direct else s.feedback.matrix(s.weight) for s, _ in layers]
    gb = [None if s.bias is None else torch.zeros_like(s.bias) for s, _ in layers]
    psi = [None] * n
    inputs = [None] * n
    out_sum = loss_sum = 0.0
    first_current = None
    for t in range(t_steps):
        a = seq if const else seq[t]
        a = a.flatten(1)
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
            pp = pop._params_on(current)  # on the current's device and dtype
            c, eps, cb, eb = traces[k]
            if eps is None:
                eps = torch.zeros_like(a)
                c = torch.zeros_like(a) if pop.kind == "lif" else None
                eb = torch.zeros((), dtype=a.dtype, device=a.device)
                cb = torch.zeros_like(eb) if pop.kind == "lif" else None
            c, eps = presynaptic_traces(a, c, eps, pp, pop.dt, pop.kind)
            cb, eb = presynaptic_traces(torch.ones((), dtype=a.dtype, device=a.device), cb, eb,
                                        pp, pop.dt, pop.kind)
            traces[k] = [c, eps, cb, eb]
            if states[k] is None:
                states[k] = pop.initial_state(current)
            psi[k] = surrogate_derivative(_pre_reset_voltage(pop, current, states[k]), pp)
            z, states[k] = pop.step(current, states[k])
            a = z
        out_sum = out_sum + y
        loss_sum = loss_sum - (onehot * torch.log_softmax(y, -1)).sum()  # the loss descended
        err = (torch.softmax(y, -1) - onehot) / (t_steps * b)
        delta = err
        for k in range(n - 1, -1, -1):
            gw[k].addmm_(delta.t(), inputs[k] if k == n - 1 else traces[k][1])
            if gb[k] is not None:
                gb[k].add_(delta.sum(0) if k == n - 1 else delta.sum(0) * traces[k][3])
            if k == 0:
                break
            syn = layers[k][0]
            fb = syn.feedback
            if fb.direct:
                fb.materialize(inputs[k].shape[1:], err.device, err.dtype)
                signal = fb.project(err, inputs[k].shape)
            else:
                signal = delta @ fbm[k]
            delta = signal * psi[k - 1]
    return out_sum / t_steps, layers, gw, gb, loss_sum / (t_steps * b)

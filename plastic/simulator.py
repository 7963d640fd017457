"""Time-stepped circuits: one circuit definition, simulated for T steps of dt.

``TimeStepped`` wraps a sequential circuit (``models.mlp``, ``models.convnet``) whose populations
are spiking (``LIFPopulation``) or rate ones.  A rate population responds instantly, with its
steady state f(I) at every step (its τ is not simulated here; ``rate_step`` is its dynamics);
every spiking population steps by the simulator's ``dt``.  The data are encoded into T steps (``encoders``),
spikes travel through the same forward synapses, and errors through the same feedback synapses
as in rate mode, so every feedback kind and learned rule trains a spiking circuit unchanged:
surrogate-gradient backpropagation through time in which each synapse's backward pass routes the
error through its feedback synapse B, never through Wᵀ (``synapses._Route``).

A feed-forward circuit is simulated population by population: a synapse or any stateless module
(flatten, pooling, batch norm) sees the T steps folded into the batch, one call for the whole
sequence; only a population loops over time (``LIFPopulation.forward``).  The spikes are the same
as stepping the whole circuit step by step (tested), because no population sees a later step of
another.  A constant-current input is applied once and broadcast over time, not T times.

Synaptic delays of whole steps shift a synapse's input sequence in time (the first d steps see
zero).  The readout is the output synapse's current averaged over the T steps (a rate readout).
``run`` also returns recordings (spikes, voltages) and inference statistics: mean firing rate,
synaptic operations per inference (active inputs × fan-out, summed over steps and synapses) and
steps to decision (the first step after which the running readout's argmax no longer changes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from . import encoders
from .errors import SpecError
from .populations import RatePopulation
from .propagation import propagate
from .spiking import FUSED_KINDS, SPIKING_KINDS, LIFPopulation, lif_sequence
from .synapses import Conv2d, Dense, Synapse

__all__ = ["TimeStepped", "Recording", "spiking_version", "is_time_stepped", "fan_out",
           "synaptic_events", "decision_steps", "inference_stats"]

ENCODINGS = ("constant", "poisson", "latency")
#: what counts as a synapse of a circuit: plastic synapses, and torch layers not yet converted
SYNAPSES = (Synapse, nn.Linear, nn.Conv2d)


def fan_out(syn: Synapse) -> float:
    """Synaptic events one active input unit causes: out_features for a dense synapse; for a conv
    synapse, out_channels/groups × k_h k_w / (stride_h stride_w) (the mean over positions)."""
    if isinstance(syn, (Dense, nn.Linear)):
        return float(syn.out_features)
    if isinstance(syn, (Conv2d, nn.Conv2d)):
        kh, kw = syn.kernel_size
        return syn.out_channels / syn.groups * kh * kw / (syn.stride[0] * syn.stride[1])
    raise SpecError(f"no fan-out rule for {type(syn).__name__}")


def synaptic_events(syn: nn.Module, x: torch.Tensor) -> float:
    """Synaptic events the non-zero entries of ``x`` (a synapse's input, any leading dims)
    cause: each active input unit times its fan-out (``fan_out``).  Under a sparse connectivity
    mask (``plastic.constraints.SparseMask``) each input unit counts only the synapses it has."""
    from .constraints import SparseMask, constraints_of
    mask = next((c.mask for c in constraints_of(syn) if isinstance(c, SparseMask)), None)
    if mask is None:
        return float((x != 0).sum()) * fan_out(syn)
    active = x != 0
    if isinstance(syn, (Dense, nn.Linear)):  # mask (out, in): input j reaches mask[:, j].sum()
        per_input = mask.sum(0)
        return float((active.reshape(-1, per_input.numel()).sum(0) * per_input).sum())
    # mask (out, in/groups, kh, kw); as in fan_out, the mean over positions
    per_input = mask.sum((2, 3)).reshape(syn.groups, -1, mask.shape[1]).sum(1).reshape(-1)  # (in,)
    per_channel = active.movedim(-3, 0).reshape(per_input.numel(), -1).sum(1)
    return float((per_channel * per_input).sum()) / (syn.stride[0] * syn.stride[1])


def decision_steps(outputs: torch.Tensor) -> torch.Tensor:
    """Per sample, the 1-based step from which the running mean readout's argmax equals the final
    one for every later step.  ``outputs``: (T, B, classes) readout currents per step."""
    t = outputs.shape[0]
    pred = outputs.cumsum(0).argmax(-1)                      # (T, B); the mean has the same argmax
    wrong = pred != pred[-1:]
    steps = torch.arange(1, t + 1, device=outputs.device).view(-1, 1).expand_as(pred)
    last_wrong = torch.where(wrong, steps, torch.zeros_like(steps)).amax(0)
    return last_wrong + 1


@dataclass
class Recording:
    """What one ``run`` recorded.  ``spikes``/``voltages``: {population name: (T', B, ...)} every
    ``every`` steps; ``stats``: mean firing rate (spikes per neuron per step), synaptic operations
    per sample, steps to decision (per sample) when asked for."""
    spikes: dict = field(default_factory=dict)
    voltages: dict = field(default_factory=dict)
    outputs: torch.Tensor | None = None   # (T, B, classes) readout per step
    ops: float = 0.0                      # synaptic operations per sample
    spike_count: float = 0.0              # spikes per sample, all populations
    neuron_steps: float = 0.0             # neurons × steps, all populations

    @property
    def firing_rate(self) -> float:
        return self.spike_count / self.neuron_steps if self.neuron_steps else float("nan")


class TimeStepped(nn.Module):
    """A sequential circuit simulated for ``steps`` steps of ``dt`` seconds.

    circuit: an ``nn.Sequential`` of synapses, populations and stateless modules.
    encoder: ``"constant"`` (the input as a constant current every step), ``"poisson"`` or
        ``"latency"`` (spikes; these need intensities in [0, 1], recovered from normalised data
        with ``input_mean``/``input_std``).  ``encoder_options``: ``scale`` (the current of a
        unit input or one input spike; default 1, and 1/(f_max dt) for Poisson spikes, so that
        their mean current is the intensity), ``f_max`` (Poisson, default 100 Hz).
    delays: {synapse name (index in the circuit, as in ``plastic.synapses``): whole steps}.
    """

    def __init__(self, circuit: nn.Sequential, steps: int = 25, dt: float = 1e-3,
                 encoder: str = "constant", encoder_options: dict | None = None,
                 delays: dict | None = None, input_mean=None, input_std=None):
        super().__init__()
        if not isinstance(circuit, nn.Sequential):
            raise SpecError("time-stepped simulation needs a sequential circuit (mlp, convnet); "
                            f"got {type(circuit).__name__}")
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise SpecError(f"time steps must be a positive integer, got {steps!r}")
        if encoder not in ENCODINGS:
            raise SpecError(f"unknown encoder {encoder!r}; known: {', '.join(ENCODINGS)}")
        self.circuit, self._steps, self._dt = circuit, steps, float(dt)
        self.encoder, self.encoder_options = encoder, dict(encoder_options or {})
        known = {"constant": ("scale",), "poisson": ("scale", "f_max"),
                 "latency": ("scale",)}[encoder]
        unknown = sorted(set(self.encoder_options) - set(known))
        if unknown:  # a misspelt option (fmax) was ignored
            raise SpecError(f"unknown option(s) {unknown} of the {encoder!r} encoder; it takes "
                            f"{', '.join(known)}")
        bad = [k for k in (delays or {}).values()
               if isinstance(k, bool) or not isinstance(k, int) and not (
                   isinstance(k, float) and k.is_integer())]
        if bad:  # 1.7 was truncated to 1
            raise SpecError(f"delays are whole steps, got {bad[0]!r}")
        names = {str(i) for i, m in enumerate(circuit) if isinstance(m, SYNAPSES)}
        self.delays = {str(k): int(v) for k, v in (delays or {}).items()}
        for k, v in self.delays.items():
            if k not in names:
                raise SpecError(f"delay for unknown synapse {k!r}; synapses: {sorted(names)}")
            if v < 0 or v >= steps:
                raise SpecError(f"delay of synapse {k} must be in [0, {steps - 1}] steps, got {v}")
        nested = _nested(circuit, LIFPopulation)
        if nested:  # it got the whole (T*B, ...) sequence as one step, or a tuple downstream
            raise SpecError(f"spiking population {nested} sits inside module "
                            f"{nested.split('.')[0]} of the circuit: a time-stepped circuit steps "
                            "only its own top-level populations; flatten it, e.g. "
                            "nn.Sequential(*block, *rest)")
        self.dt = dt  # every population steps by the simulator's dt (its own is set to it)
        self._check_latency(steps)
        if encoder != "constant":
            if input_mean is None or input_std is None:
                raise SpecError(f"encoder {encoder!r} needs input_mean and input_std to recover "
                                "intensities in [0, 1] from normalised data")
        self.register_buffer("input_mean", None if input_mean is None else torch.as_tensor(input_mean).float())
        self.register_buffer("input_std", None if input_std is None else torch.as_tensor(input_std).float())
        self._gen = None

    def __setstate__(self, state):
        # a whole TimeStepped pickled (torch.save(model)) before steps and dt were properties
        for name in ("steps", "dt"):
            if name in state and f"_{name}" not in state:
                state[f"_{name}"] = state.pop(name)
        super().__setstate__(state)

    @property
    def steps(self) -> int:
        """Time steps per input (checked against the delays when set)."""
        return self._steps

    @steps.setter
    def steps(self, steps: int) -> None:
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise SpecError(f"time steps must be a positive integer, got {steps!r}")
        for k, v in self.delays.items():
            if v >= steps:
                raise SpecError(f"delay of synapse {k} must be in [0, {steps - 1}] steps, got {v}")
        self._check_latency(steps)
        self._steps = steps

    @property
    def dt(self) -> float:
        """The step in seconds; setting it sets every population's (and checks it there)."""
        return self._dt

    @dt.setter
    def dt(self, dt: float) -> None:
        pops = [m for m in self.circuit if isinstance(m, LIFPopulation)]
        old = [m.dt for m in pops]
        try:
            for m in pops:
                m.dt = float(dt)
                m.check()
        except SpecError:  # all or none
            for m, d in zip(pops, old):
                m.dt = d
            raise
        self._dt = float(dt)

    def _check_latency(self, steps: int) -> None:
        adaptive = sum(isinstance(m, LIFPopulation) and m.kind == "adaptive_lif"
                       for m in self.circuit)
        latency = adaptive + sum(self.delays.values())
        if latency and steps <= latency:
            # an adaptive LIF population (norse's LSNN step) adds its input after the step, so
            # each delays the signal a step, as a synaptic delay does: the readout would not
            # depend on the input
            raise SpecError(f"the input reaches the readout after {latency} step(s) ({adaptive} "
                            f"adaptive_lif population(s), {sum(self.delays.values())} step(s) of "
                            f"synaptic delay): {steps} time step(s) leave the output independent "
                            f"of the input; take more than {latency} steps")

    # -- encoding --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        """(sequence, constant): the input as (T, B, ...) or, for a constant current, (B, ...)
        with constant=True (the same every step; broadcast lazily)."""
        scale = self.encoder_options.get("scale")
        if self.encoder == "constant":
            return x * (1.0 if scale is None else scale), True
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not x.is_floating_point():  # uint8 images: a std of 1/255 cast to them was 0
            x = x.to(self.input_std.dtype)
        intensity = (x * self.input_std.view(shape).to(x) + self.input_mean.view(shape).to(x))
        intensity = intensity.clamp(0, 1)
        # in [0, 1] now, but NaN stays NaN (silence if not refused): checked on the CPU, where
        # it costs nothing; off it the check would wait for the device at every step
        check = intensity.device.type == "cpu"
        if self.encoder == "poisson":
            f_max = self.encoder_options.get("f_max", 100.0)
            z = encoders.poisson(intensity, self.steps, f_max=f_max, dt=self.dt, check=check)
            # by default each spike carries 1/(f_max dt), so the mean input current is the
            # intensity, as with a constant-current input of the intensity
            return z.mul_(1.0 / (f_max * self.dt) if scale is None else scale), False
        z = encoders.latency(intensity, self.steps, check=check)
        return (z if scale is None else z.mul_(scale)), False

    # -- simulation ------------------------------------------------------------------------
    def run(self, x: torch.Tensor, record: tuple = (), every: int = 1, stats: bool = False,
            per_step: bool = False):
        """Simulate the circuit on a batch ``x`` (B, ...): (readout (B, classes), Recording);
        with ``per_step`` the readout of every step, (T, B, classes), instead of its mean.
        ``record``: any of "spikes", "voltages"; ``stats``: count firing and synaptic operations
        and keep the per-step readout."""
        if not (isinstance(every, int) and every >= 1):
            raise SpecError(f"record every must be a positive number of steps, got {every!r}")
        unknown = sorted(set(record) - {"spikes", "voltages"})
        if isinstance(record, str) or unknown:
            raise SpecError(f"record takes a tuple of 'spikes' and 'voltages', got {record!r}")
        t, b = self.steps, x.shape[0]
        if stats:
            _check_stats_batch(b)
        seq, const = self.encode(x)
        rec = Recording()
        spiking_input = self.encoder != "constant"
        for i, m in enumerate(self.circuit):
            name = f"circuit.{i}"  # the population's module name in the time-stepped circuit
            if isinstance(m, SYNAPSES):
                d = self.delays.get(str(i), 0)
                if d:
                    if const:
                        seq, const = seq.expand(t, *seq.shape), False
                    seq = torch.cat([seq.new_zeros((d, *seq.shape[1:])), seq[:t - d]])
                if stats:
                    rec.ops += synaptic_events(m, seq) / b * (t if const else 1)
                seq = self._through(m, seq, const, spiking_input)
                spiking_input = False
            elif isinstance(m, LIFPopulation):
                if const:
                    seq, const = seq.expand(t, *seq.shape), False
                if "voltages" in record:
                    z, v = self._with_voltages(m, seq)
                    rec.voltages[name] = _thinned(v, every)
                    # the spikes passed on are the module's own call's when anything can change
                    # them (a hook, such as an ablation; an overridden forward): the recorded run
                    # is then the one trained and evaluated (the voltages are the neurons', from
                    # the currents before any pre-hook)
                    own = _hooked(m) or type(m).forward is not LIFPopulation.forward
                    seq = m(seq)[0] if own else z
                else:
                    seq, _ = m(seq)
                spiking_input = True
                if "spikes" in record:
                    rec.spikes[name] = _thinned(seq, every)
                if stats:
                    rec.spike_count += float(seq.detach().sum()) / b
                    rec.neuron_steps += seq[0, 0].numel() * t
            else:
                seq = self._through(m, seq, const, False)
                if isinstance(m, RatePopulation) and stats:
                    # a rate population inside a time-stepped circuit: its rate counts as firing
                    rec.spike_count += float(seq.detach().sum()) / b * (t if const else 1)
                    rec.neuron_steps += seq[0].numel() * t if const else seq[0, 0].numel() * t
        if per_step:
            out = seq.expand(t, *seq.shape) if const else seq
            if stats:
                rec.outputs = out.detach()
        elif const:
            out = seq
            if stats:
                rec.outputs = seq.detach().unsqueeze(0).expand(t, *seq.shape)
        else:
            out = seq.mean(0)
            if stats:
                rec.outputs = seq.detach()
        return out, rec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    @staticmethod
    def _through(m: nn.Module, seq: torch.Tensor, const: bool, spikes: bool) -> torch.Tensor:
        if const:
            return m(seq)
        t, b = seq.shape[:2]
        flat = seq.reshape(t * b, *seq.shape[2:])
        if spikes and not torch.is_grad_enabled() and _plain_linear(m):
            y = propagate(flat, m.weight, m.bias)  # event-driven where the spikes are sparse
            kind = y.device.type
            # in the dtype m(flat) would give, whatever the density: autocast lowers float32
            # (and leaves float64 alone)
            if y.dtype == torch.float32 and _autocast_on(kind):
                y = y.to(torch.get_autocast_dtype(kind))
        else:
            y = m(flat)
        return y.reshape(t, b, *y.shape[1:])

    @staticmethod
    def _with_voltages(pop: LIFPopulation, currents: torch.Tensor):
        """(spikes, post-reset voltages), both (T, ...), from one pass of the population."""
        if pop.kind in FUSED_KINDS:
            z, _, v = lif_sequence(currents, None, pop._params_on(currents), pop.dt, pop.kind,
                                   record_voltage=True)
            return z, v
        state, zs, vs = None, [], []
        for k in range(currents.shape[0]):
            z, state = pop.step(currents[k], state)
            zs.append(z)
            vs.append(state.v)
        return torch.stack(zs), torch.stack(vs)

    def extra_repr(self):
        d = f", delays={self.delays}" if self.delays else ""
        return f"steps={self.steps}, dt={self.dt:g}, encoder={self.encoder!r}{d}"


def _thinned(seq: torch.Tensor, every: int) -> torch.Tensor:
    """Every ``every``-th step of a (T, ...) sequence, detached; a copy when thinned, so the
    recording does not keep the whole sequence alive."""
    return seq.detach() if every == 1 else seq[::every].detach().clone()


def is_time_stepped(model: nn.Module) -> bool:
    return isinstance(model, TimeStepped)


def spiking_version(model: nn.Module, kind: str = "lif", steps: int = 25, dt: float = 1e-3,
                    params=None, **options) -> TimeStepped:
    """The same circuit with spiking populations: every rate population of a sequential
    ``model`` becomes a ``LIFPopulation`` of ``kind``; the synapses (and their weights and
    feedback synapses) are deep copies of the model's.  Used to run trained rate weights as a
    spiking network (conversion)."""
    if kind not in SPIKING_KINDS:
        raise SpecError(f"unknown spiking population {kind!r}; known: {', '.join(SPIKING_KINDS)}")
    if isinstance(model, TimeStepped):
        model = model.circuit
    new = copy.deepcopy(model)
    if not isinstance(new, nn.Sequential):
        raise SpecError("spiking_version needs a sequential circuit (mlp, convnet)")
    nested = _nested(new, (RatePopulation, LIFPopulation, nn.ReLU) + _ACTIVATIONS)
    if nested:  # it stayed a rate population in the "spiking" circuit, silently
        raise SpecError(f"spiking_version: population {nested} sits inside module "
                        f"{nested.split('.')[0]} of the circuit; only top-level populations "
                        "become spiking ones; flatten it, e.g. nn.Sequential(*block, *rest)")
    converted = 0
    for i, m in enumerate(new):
        if isinstance(m, RatePopulation) and not _is_relu(m.activation):
            raise SpecError(f"spiking_version: population {i} has the activation "
                            f"{m.activation_name!r}; only ReLU populations become spiking ones "
                            "(a spiking neuron's rate is a rectified function of its current)")
        if isinstance(m, (RatePopulation, nn.ReLU)):
            new[i] = LIFPopulation(params, dt, kind)
            converted += 1
        elif isinstance(m, _ACTIVATIONS):
            raise SpecError(f"spiking_version: module {i} is a torch {type(m).__name__}; only "
                            "ReLU populations and nn.ReLU become spiking populations")
    if not converted:
        raise SpecError("spiking_version: the circuit has no rate population (or nn.ReLU) to "
                        "make spiking")
    return TimeStepped(new, steps, dt, **options)


def _nested(circuit: nn.Sequential, types) -> str | None:
    """The name (as in ``circuit.named_modules()``) of the first module of ``types`` inside a
    top-level module of the circuit that is not itself of ``types``; None if there is none."""
    for i, m in enumerate(circuit):
        if not isinstance(m, types):
            for name, sub in m.named_modules():
                if name and isinstance(sub, types):
                    return f"{i}.{name}"
    return None


def _plain_linear(m: nn.Module) -> bool:
    """Whether ``m(x)`` is exactly ``propagate(x, m.weight, m.bias)``: a Dense synapse or a
    Linear with their own forward and no hooks (a pruning mask, a hook on the output, a
    subclass's or an instance's own forward were skipped by the event-driven shortcut)."""
    plain = ((isinstance(m, Dense) and type(m).forward is Synapse.forward
              and type(m)._forward_op is Dense._forward_op)
             or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward))
    return plain and not _hooked(m)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (False where torch cannot say per device, and
    for a device type autocast does not know)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):
        return False


def _hooked(m: nn.Module) -> bool:
    """Whether ``m(x)`` may differ from its class's own forward: a forward hook or pre-hook (its
    own or a global one), or a forward set on the instance."""
    from torch.nn.modules import module as M
    return bool(m._forward_hooks or m._forward_pre_hooks or M._global_forward_hooks
                or M._global_forward_pre_hooks or "forward" in m.__dict__)


def _is_relu(f) -> bool:
    """Whether an activation is the ReLU (by its values, so a custom rectifier counts; a capped
    one such as relu6 does not)."""
    z = torch.cat([torch.linspace(-3, 3, 13),
                   torch.tensor([-1e4, -0.37, 0.37, 7.3, 123.4, 1e4])])
    try:
        return bool(torch.equal(f(z), torch.relu(z)))
    except Exception:
        return False


# torch activations that are not a ReLU: a spiking population's rate is not one of them
_ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SELU, nn.SiLU, nn.LeakyReLU, nn.Softplus,
                nn.Hardtanh, nn.Mish, nn.PReLU, nn.CELU)


@torch.no_grad()
def _fold_batch_norm(seq: nn.Sequential) -> None:
    """Fold every batch norm of a sequential circuit into the synapse just before it, with its
    running statistics (W' = W γ/σ, b' = (b − μ) γ/σ + β), and replace it by Identity: the same
    currents at inference, and a synapse whose scaling then scales all of them."""
    for i, m in enumerate(seq):
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        syn = seq[i - 1] if i else None
        if not isinstance(syn, SYNAPSES) or m.running_mean is None:
            raise SpecError(f"calibrate_conversion: batch norm {i} must follow a synapse and keep "
                            "running statistics, to be folded into it")
        scale = (m.running_var + m.eps).rsqrt()
        shift = -m.running_mean * scale
        if m.affine:
            scale, shift = scale * m.weight, shift * m.weight + m.bias
        w = syn.weight
        w.mul_(scale.to(w).view(-1, *([1] * (w.dim() - 1))))
        if syn.bias is None:
            syn.bias = nn.Parameter(w.new_zeros(w.shape[0]))
        syn.bias.mul_(scale.to(w)).add_(shift.to(w))
        seq[i] = nn.Identity()


@torch.no_grad()
def _check_stats_batch(b: int) -> None:
    if not b:  # per-sample statistics of no sample (a ZeroDivisionError)
        raise SpecError("statistics (firing rate, synaptic operations) of an empty batch: give "
                        "at least one sample")


def inference_stats(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(output, stats) on a batch: ``firing_rate`` (spikes per neuron per step for spiking
    populations; a rate population's mean activity), ``synaptic_ops`` per inference (active
    inputs × fan-out, over steps and synapses; for a rate circuit the non-zero inputs' MACs)
    and ``decision_steps`` (1 for a rate circuit, which decides in one pass)."""
    if isinstance(model, TimeStepped):
        out, rec = model.run(x, stats=True)
        return out, {"firing_rate": rec.firing_rate, "synaptic_ops": rec.ops,
                     "decision_steps": float(decision_steps(rec.outputs).float().mean())}
    b = x.shape[0]
    _check_stats_batch(b)
    acc = {"ops": 0.0, "act": 0.0, "n": 0.0}

    def syn_hook(m, inp, out):
        acc["ops"] += synaptic_events(m, inp[0]) / b

    def pop_hook(m, inp, out):
        acc["act"] += float(out.sum()) / b
        acc["n"] += out[0].numel()

    hooks = [s.register_forward_hook(syn_hook) for s in model.modules() if isinstance(s, SYNAPSES)]
    hooks += [m.register_forward_hook(pop_hook) for m in model.modules()
              if isinstance(m, RatePopulation)]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, {"firing_rate": acc["act"] / acc["n"] if acc["n"] else float("nan"),
                 "synaptic_ops": acc["ops"], "decision_steps": 1.0}



@torch.no_grad()
def calibrate_conversion(snn: TimeStepped, rate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         gains=(1.0, 2.0, 4.0, 8.0), percentile: float = 99.9) -> dict:
    """Data-based weight normalisation for running a trained rate circuit as a spiking one
    (Diehl et al. 2015, IJCNN, sec. III.B; Rueckauer et al. 2017, eq. 8 with the 99.9th
    percentile): each hidden synapse l gets W_l · λ_{l−1}/λ_l and b_l/λ_l, where λ_l is the
    percentile of population l's rate activity on the calibration batch x (λ_0 = 1), so the
    activity of every population is about 1 at its percentile; then one gain g on the hidden
    synapses, chosen from ``gains`` by accuracy on (x, y), sets where that activity falls on the
    LIF neurons' rate curve.  Batch norms are folded into the synapses before them first.
    Changes ``snn`` in place; returns {"lambdas", "gain", "accuracy"}."""
    rate_seq = rate.circuit if isinstance(rate, TimeStepped) else rate
    acts, hooks = [], []
    for m in rate_seq:
        if isinstance(m, RatePopulation):
            hooks.append(m.register_forward_hook(lambda mod, i, o: acts.append(o.detach())))
    was = rate.training
    rate.eval()
    try:
        rate(x)
    finally:
        for h in hooks:
            h.remove()
        rate.train(was)
    lambdas = [float(torch.quantile(a.flatten()[:1_000_000].float(), percentile / 100)) or 1.0
               for a in acts]
    _fold_batch_norm(snn.circuit)
    syns = [m for m in snn.circuit if isinstance(m, SYNAPSES)]
    if len(syns) != len(lambdas) + 1:
        others = sorted({type(m).__name__ for m in rate_seq  # torch's activation modules
                         if type(m).__module__ == "torch.nn.modules.activation"
                         and not list(m.parameters())})
        hint = (f"; its activations are torch modules ({', '.join(others)}), whose rates it does "
                "not read: build the rate circuit with plastic.models (RatePopulation)"
                if others else "")
        raise SpecError(f"calibrate_conversion: the rate circuit has {len(lambdas)} rate "
                        f"population(s) for {len(syns)} synapses; it needs one after every hidden "
                        f"synapse{hint}")
    base = [(s.weight.detach().clone(), None if s.bias is None else s.bias.detach().clone())
            for s in syns]
    prev = [1.0] + lambdas

    def set_gain(g):
        for k, (s, (w, b)) in enumerate(zip(syns, base)):
            last = k == len(syns) - 1
            scale = prev[k] if last else g * prev[k] / lambdas[k]
            s.weight.copy_(w * scale)
            if b is not None:
                s.bias.copy_(b if last else b * (g / lambdas[k]))

    best = (-1.0, gains[0])
    was = snn.training
    snn.eval()
    for g in gains:
        set_gain(g)
        acc = float((snn(x).argmax(1) == y).float().mean())
        if acc > best[0]:
            best = (acc, g)
    set_gain(best[1])
    snn.train(was)
    return {"lambdas": lambdas, "gain": best[1], "accuracy": best[0]}

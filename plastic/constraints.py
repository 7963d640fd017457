"""Biological constraints on forward synapses: Dale's law and fixed sparse connectivity.

A constraint is a small ``nn.Module`` attached to a synapse with ``constrain(synapse, ...)``; it
lives in the synapse's ``constraints`` ModuleList, so it shows in the synapse's repr, its tensors
(the signs, the mask) are buffers that follow ``.to(device/dtype)`` and are saved in the
``state_dict``.  Every constraint is a projection onto a closed set of weights: it is applied once
when attached, and after every optimizer step by ``enforce(model)`` (projected gradient descent);
``attach(optimizer, model)`` registers that as an optimizer step post-hook, with a step pre-hook
that first masks the gradients of absent synapses so that no optimizer state (momentum, Adam's
moments) builds up on them.

Only the forward weight W is constrained; the feedback synapse is a separate object.  Derived
feedback (``transpose``, ``usf``, ``frsf``) reads the constrained W, fixed random feedback (``fa``,
``dfa``) does not depend on W, and learned feedback by a rule (``information``, ``mirror``, ...)
learns from the synapse's local signals.  The one exception is Kolen-Pollack, whose B is defined
to receive W's update: W's update is now the *projected* one, so B gets the same gradient mask and
the same projection (it is in W's layout).  Projections onto a convex set are non-expansive, so
||B - W|| still decays under weight decay; left alone, B would integrate the gradient of synapses
that cannot move (absent ones, ones held at zero by Dale's law) and diverge.  The bias is not a
synapse from a pre neuron and is never constrained.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from .convert import _seed_for, circuit_name, synapses
from .errors import SpecError
from .feedback import FeedbackSynapse
from .learned import KolenPollack
from .synapses import Conv2d, Dense, Synapse, stored_weight

__all__ = ["Constraint", "Dale", "SparseMask", "dale_signs", "random_mask", "constrain",
           "constraints_of", "enforce", "mask_gradients", "attach", "Attachment",
           "apply_circuit_constraints", "n_pre", "constrained_weights"]


def _label(synapse: Synapse) -> str:
    return repr(synapse.name) if getattr(synapse, "name", "") else type(synapse).__name__


def n_pre(synapse: Synapse) -> int:
    """The number of neurons of a synapse's pre population as Dale's law counts them: the input
    features of a dense synapse, the input channels of a conv synapse."""
    if isinstance(synapse, Dense):
        return synapse.in_features
    if isinstance(synapse, Conv2d):
        return synapse.in_channels
    raise SpecError(f"constraints apply to Dense and Conv2d synapses, not {type(synapse).__name__}")


def constrained_weights(synapse: Synapse) -> list[torch.Tensor]:
    """The weights a synapse's constraints act on: W, and a Kolen-Pollack feedback weight B
    (which receives W's update, so it gets W's constraints too; see the module docstring).  A
    pruned synapse's W is computed from the stored ``weight_orig`` each forward: the constraints
    act on that (the 0/1 mask keeps its signs and its zeros)."""
    stored = stored_weight(synapse)  # pruned: weight_orig, which W is times the mask
    if stored is None:
        # W computed from another tensor (a parametrization, weight_norm): a projection would
        # change a temporary copy, silently
        raise SpecError(f"constraints of synapse {_label(synapse)}: its W is not a parameter but "
                        "computed (a parametrization, weight or spectral norm), and a projection "
                        "cannot reach what it is computed from; constrain a synapse whose W is "
                        "a parameter (pruning is fine)")
    ws = [stored[0]]
    fb = getattr(synapse, "feedback", None)
    if isinstance(fb, KolenPollack) and fb.weight.shape == synapse.weight.shape:
        ws.append(fb.weight)
    return ws


class Constraint(nn.Module):
    """Base class: a projection of a synapse's weight onto a closed set, in place.  Subclasses
    implement ``project_weight_(synapse, w)`` (and optionally ``initialize_weight_`` and
    ``mask_grad_weight_``) for one weight tensor ``w`` in the synapse's forward layout."""

    def bind(self, synapse: Synapse) -> None:
        """Validate against ``synapse`` (raise ``SpecError``) and move buffers to its device."""

    @torch.no_grad()
    def initialize_(self, synapse: Synapse) -> None:
        """Make the synapse's current weights satisfy the constraint (when attached)."""
        for w in constrained_weights(synapse):
            self.initialize_weight_(synapse, w)

    @torch.no_grad()
    def project_(self, synapse: Synapse) -> None:
        """Project the synapse's weights back onto the constraint set, in place."""
        for w in constrained_weights(synapse):
            self.project_weight_(synapse, w)

    @torch.no_grad()
    def mask_grad_(self, synapse: Synapse) -> None:
        """Remove the parts of the weights' ``.grad`` the constraint forbids."""
        for w in constrained_weights(synapse):
            if w.grad is not None:
                self.mask_grad_weight_(synapse, w.grad)

    def initialize_weight_(self, synapse: Synapse, w: torch.Tensor) -> None:
        self.project_weight_(synapse, w)

    def project_weight_(self, synapse: Synapse, w: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def mask_grad_weight_(self, synapse: Synapse, grad: torch.Tensor) -> None:
        """Default: the gradient is left alone (the projection after the step suffices)."""

    def summary(self) -> dict:
        return {}


def _on_a_real_device(t: torch.Tensor, what: str) -> None:
    """A one-line error for a constraint built on, or bound to, the meta device: its signs and
    masks are values, which a meta tensor does not hold (``to_empty`` would fill them with
    whatever memory held)."""
    if t.is_meta:
        raise SpecError(f"{what} on the meta device: constraints hold values (signs, masks); "
                        "attach them after the circuit is materialised (to_empty and "
                        "reset_parameters)")


# ---------------------------------------------------------------------------------------- Dale


def dale_signs(n: int, excitatory: float = 0.8, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """±1 signs of ``n`` neurons, ``round(excitatory * n)`` of them excitatory (+1), the rest
    inhibitory (-1).  Without a generator the excitatory neurons are the first ones (a contiguous
    E block then an I block, the layout of Song, Yang & Wang 2016): the signs then depend on
    ``n`` only, so synapses reading the same population get the same signs, as Dale's law needs.
    With a generator, which neurons are excitatory is a random permutation of that (still exactly
    ``round(excitatory * n)`` excitatory).  An 80/20 split is the usual cortical ratio."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise SpecError(f"dale_signs: n must be a positive integer, got {n!r}")
    n = int(n)
    if not isinstance(excitatory, numbers.Real) or isinstance(excitatory, bool) \
            or not 0.0 <= excitatory <= 1.0:
        raise SpecError(f"dale_signs: the excitatory fraction must be a number in [0, 1], "
                        f"got {excitatory!r}")
    n_exc = int(math.floor(excitatory * n + 0.5))
    signs = torch.full((n,), -1.0)
    if generator is None:
        signs[:n_exc] = 1.0
    else:
        signs[torch.randperm(n, generator=generator)[:n_exc]] = 1.0
    return signs


class Dale(Constraint):
    """Dale's law: every synapse out of a neuron has that neuron's sign, excitatory (+1, W >= 0) or
    inhibitory (-1, W <= 0), forever.  ``signs`` (±1, or bool with True = excitatory) runs over
    the pre population: ``in_features`` of a dense synapse, ``in_channels`` of a conv synapse.

    When attached the weights are made sign-consistent, W <- s |W| (the initialisation of
    excitatory-inhibitory networks in Song, Yang & Wang 2016, PLoS Comput. Biol. 12:e1004792,
    "Training excitatory-inhibitory recurrent neural networks for cognitive tasks"); after every
    optimizer step they are projected back, W <- s relu(s W): a synapse whose update would carry
    it across zero stays at zero (projected gradient descent; cf. Cornford et al. 2021, ICLR,
    "Learning to live with Dale's principle")."""

    def __init__(self, signs):
        super().__init__()
        s = torch.as_tensor(signs)
        _on_a_real_device(s, "Dale")
        if s.dim() != 1 or s.numel() == 0:
            raise SpecError(f"Dale: signs must be a non-empty 1-D tensor over the pre neurons, "
                            f"got shape {tuple(s.shape)}")
        if s.dtype == torch.bool:
            s = torch.where(s, 1.0, -1.0)
        s = s.detach().to(torch.float32)
        if not bool(((s == 1) | (s == -1)).all()):
            bad = s[(s != 1) & (s != -1)].unique()[:5].tolist()
            raise SpecError(f"Dale: signs must be +1 (excitatory) or -1 (inhibitory), got {bad}")
        self.register_buffer("signs", s)

    @property
    def n_excitatory(self) -> int:
        return int((self.signs > 0).sum())

    def bind(self, synapse):
        n = n_pre(synapse)
        what = "in_features" if isinstance(synapse, Dense) else "in_channels"
        if self.signs.numel() != n:
            raise SpecError(f"Dale on synapse {_label(synapse)}: {self.signs.numel()} signs given "
                            f"but the pre population has {n} neurons ({what})")
        self.signs = self.signs.to(device=synapse.weight.device)

    def weight_signs(self, synapse: Synapse, w: torch.Tensor | None = None) -> torch.Tensor:
        """The signs broadcast against the synapse's weight (grouped convs map each output
        channel's local input channels to their pre neurons)."""
        w = synapse.weight if w is None else w
        s = self.signs.to(device=w.device, dtype=w.dtype)
        if isinstance(synapse, Dense):
            return s.view(1, -1)
        g = synapse.groups
        if g == 1:
            return s.view(1, -1, 1, 1)
        out, ipg = w.shape[:2]
        group = torch.arange(out, device=w.device) // (out // g)
        idx = group.unsqueeze(1) * ipg + torch.arange(ipg, device=w.device)
        return s[idx].view(out, ipg, 1, 1)

    def initialize_weight_(self, synapse, w):
        w.abs_().mul_(self.weight_signs(synapse, w))  # W <- s |W|

    def project_weight_(self, synapse, w):
        s = self.weight_signs(synapse, w)
        w.mul_(s).clamp_(min=0).mul_(s)  # s relu(s W), in place (s = ±1: exact)

    def summary(self):
        n = self.signs.numel()
        return {"n_pre": n, "excitatory": self.n_excitatory, "inhibitory": n - self.n_excitatory}

    def extra_repr(self):
        n, e = self.signs.numel(), self.n_excitatory
        return f"n={n}, excitatory={e}, inhibitory={n - e}"


class NonNegativeGain(Constraint):
    """Dale's law through a batch norm after the synapse: the norm scales post neuron i's input
    by γ_i/σ_i, so a negative γ_i would turn every synapse onto neuron i the other sign.  γ is
    kept >= 0 (projected after every step, as W is).  Attached by ``apply_circuit_constraints``
    together with ``Dale``; the norm is referenced, not owned (it stays where the circuit has
    it, and in no second place of the state dict)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        object.__setattr__(self, "norm", norm)  # not a submodule

    @torch.no_grad()
    def initialize_(self, synapse):
        self.project_(synapse)

    @torch.no_grad()
    def project_(self, synapse):
        if self.norm.weight is not None:
            self.norm.weight.clamp_(min=0)

    def mask_grad_(self, synapse):
        pass

    def extra_repr(self):
        return f"norm={type(self.norm).__name__}({self.norm.num_features})"


def _norm_after(model: nn.Module, synapse: nn.Module):
    """The batch norm right after ``synapse`` in the circuit's module order (conv, norm), if its
    features are the synapse's outputs; else None."""
    mods = [m for m in model.modules() if not isinstance(m, (Constraint, FeedbackSynapse))]
    i = next((k for k, m in enumerate(mods) if m is synapse), None)
    nxt = mods[i + 1] if i is not None and i + 1 < len(mods) else None
    if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == \
            synapse.weight.shape[0]:
        return nxt
    return None


# ----------------------------------------------------------------------------------- sparsity


def random_mask(shape, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool connectivity mask of ``shape`` (a weight's shape, ``(out, ...)``) with a fixed
    in-degree: every post neuron (row ``out``) receives exactly ``k = max(1, round(density *
    fan_in))`` of its ``fan_in = prod(shape[1:])`` possible synapses, chosen uniformly at random
    (a fixed-in-degree random graph, as in Brunel 2000, J. Comput. Neurosci. 8:183).  The
    realised density is ``k / fan_in`` (exactly ``density`` when that is a whole number of
    synapses); no post neuron is left without input.  Drawn on the CPU from ``generator``."""
    try:
        shape = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise SpecError(f"random_mask: shape must be a sequence of integers, "
                        f"got {shape!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise SpecError(f"random_mask: shape must be a weight shape (out, in, ...), got {shape}")
    _check_density(density, "random_mask")
    rows, fan_in = shape[0], math.prod(shape[1:])
    k = max(1, int(math.floor(density * fan_in + 0.5)))
    scores = torch.rand(rows, fan_in, generator=generator)
    mask = torch.zeros(rows, fan_in, dtype=torch.bool)
    mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask.view(shape)


def _check_density(density, what):
    if not isinstance(density, numbers.Real) or isinstance(density, bool) \
            or not (0.0 < density <= 1.0):
        raise SpecError(f"{what}: density (connectivity) must be a number in (0, 1], "
                        f"got {density!r}")


class SparseMask(Constraint):
    """Fixed sparse connectivity: synapses outside ``mask`` (a bool or 0/1 tensor of the weight's
    shape) do not exist.  They are zeroed when attached, their gradient is masked before every
    optimizer step (so momentum and Adam's moments never move them) and they are zeroed again
    after it (in case of weight decay or anything else), so they stay exactly zero."""

    def __init__(self, mask):
        super().__init__()
        m = torch.as_tensor(mask).detach()
        _on_a_real_device(m, "SparseMask")
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise SpecError("SparseMask: the mask must be bool or hold only 0 and 1")
            m = m != 0
        if m.dim() < 2:
            raise SpecError(f"SparseMask: the mask must have a weight's shape (out, in, ...), "
                            f"got shape {tuple(m.shape)}")
        if not bool(m.any()):
            raise SpecError("SparseMask: the mask has no connections (density 0); "
                            "density must be in (0, 1]")
        self.register_buffer("mask", m.clone())

    @property
    def density(self) -> float:
        """The fraction of synapses present."""
        return float(self.mask.sum()) / self.mask.numel()

    def bind(self, synapse):
        n_pre(synapse)  # type check
        if tuple(self.mask.shape) != tuple(synapse.weight.shape):
            raise SpecError(f"SparseMask on synapse {_label(synapse)}: mask shape "
                            f"{tuple(self.mask.shape)} does not match the weight's shape "
                            f"{tuple(synapse.weight.shape)}")
        self.mask = self.mask.to(device=synapse.weight.device)

    def _factor(self, like: torch.Tensor) -> torch.Tensor:
        """The mask as 0/1 in ``like``'s dtype and device, cached until the mask changes
        (a multiplication is ~10x faster than ``masked_fill_`` with a bool mask on CPU)."""
        m, cached = self.mask, self.__dict__.get("_factor_cache")
        if cached is None or cached[0] is not m or cached[1] != (m._version, like.dtype,
                                                                  like.device):
            cached = self.__dict__["_factor_cache"] = (
                m, (m._version, like.dtype, like.device), m.to(like.device, like.dtype))
        return cached[2]

    def project_weight_(self, synapse, w):
        w.mul_(self._factor(w))

    def mask_grad_weight_(self, synapse, grad):
        grad.mul_(self._factor(grad))

    def summary(self):
        return {"density": self.density}

    def extra_repr(self):
        return f"shape={tuple(self.mask.shape)}, density={self.density:.4g}"


# ----------------------------------------------------------------------------------------- API


def constraints_of(synapse: nn.Module) -> list[Constraint]:
    """The constraints attached to a synapse (empty if none)."""
    cs = synapse._modules.get("constraints") if isinstance(synapse, nn.Module) else None
    return list(cs) if cs is not None else []


def constrain(synapse: Synapse, *constraints: Constraint) -> Synapse:
    """Attach ``constraints`` to a Dense or Conv2d synapse (appended to its ``constraints``
    ModuleList) and make its weights satisfy them now.  Returns the synapse."""
    if not isinstance(synapse, (Dense, Conv2d)):
        raise SpecError(f"constrain: needs a plastic Dense or Conv2d synapse (use plastic.convert "
                        f"first), got {type(synapse).__name__}")
    _on_a_real_device(synapse.weight, f"constrain: synapse {_label(synapse)}")
    existing = constraints_of(synapse)
    for c in constraints:
        if not isinstance(c, Constraint):
            raise SpecError(f"constrain: {c!r} is not a Constraint (Dale, SparseMask)")
        if isinstance(c, Dale) and any(isinstance(e, Dale) for e in existing):
            raise SpecError(f"constrain: synapse {_label(synapse)} already obeys Dale's law; "
                            "a neuron has one sign")
        c.bind(synapse)
        existing.append(c)
    constrained_weights(synapse)  # refused here, before anything is attached
    if "constraints" not in synapse._modules:
        synapse.constraints = nn.ModuleList()
    for c in constraints:
        synapse.constraints.append(c)
        c.initialize_(synapse)
    return synapse


def _constrained(model: nn.Module):
    for _, syn in synapses(model):
        cs = constraints_of(syn)
        if cs:
            yield syn, cs


def _each(model: nn.Module, method: str) -> int:
    """Call ``method`` of every constraint of every constrained synapse; the synapse count."""
    if not isinstance(model, nn.Module):
        raise SpecError(f"constraints: needs a torch.nn.Module (a circuit or a synapse), got "
                        f"{type(model).__name__}")
    n = 0
    for syn, cs in _constrained(model):
        for c in cs:
            getattr(c, method)(syn)
        n += 1
    return n


@torch.no_grad()
def enforce(model: nn.Module) -> int:
    """Project every constrained synapse of ``model`` (a circuit or one synapse) back onto its
    constraints, in place.  Returns the number of synapses projected."""
    return _each(model, "project_")


@torch.no_grad()
def mask_gradients(model: nn.Module) -> int:
    """Zero the gradient of every absent synapse (``SparseMask``) of ``model``, in place."""
    return _each(model, "mask_grad_")


class Attachment:
    """The optimizer hooks registered by ``attach``; ``remove()`` unregisters them."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(optimizer: torch.optim.Optimizer, model: nn.Module) -> Attachment:
    """Keep ``model``'s constraints through training with ``optimizer``: a step pre-hook masks the
    gradients (``mask_gradients``), a step post-hook projects the weights (``enforce``).  The
    synapses are looked up at every step, so constraints attached later are kept too.  Gradient
    clipping, if any, runs before ``step`` and so still sees the unmasked gradients."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SpecError(f"attach: needs a torch optimizer, got {type(optimizer).__name__}")
    enforce(model)

    def before_step(opt, args, kwargs):
        mask_gradients(model)

    def after_step(opt, args, kwargs):
        enforce(model)

    return Attachment([optimizer.register_step_pre_hook(before_step),
                       optimizer.register_step_post_hook(after_step)])


def _goes_negative(m: nn.Module) -> bool:
    """Whether a torch activation module can output negative rates."""
    if isinstance(m, nn.Hardtanh):  # ReLU6 and Hardtanh(0, 1) among them
        return m.min_val < 0
    if isinstance(m, nn.Threshold):  # x where x > threshold, else value
        return m.threshold < 0 or m.value < 0
    return isinstance(m, (nn.Tanh, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
                          nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardswish, nn.Tanhshrink,
                          nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.GLU))


def apply_circuit_constraints(model: nn.Module, excitatory: float | None,
                              connectivity: float | None, seed: int = 0) -> dict[str, dict]:
    """The circuit spec's constraints on a converted circuit.

    excitatory: Dale's law with this fraction of excitatory neurons on every synapse except the
        first (which reads the raw input, not neurons); signs from ``dale_signs(n, excitatory)``,
        the first neurons excitatory, so synapses reading the same population agree.
    connectivity: a fixed random sparse mask of this density (``random_mask``) on every synapse,
        the first included; drawn from a generator seeded by ``seed`` and the synapse's name, so
        the same circuit gets the same masks.  ``1.0`` (like ``None``) adds no mask.

    Returns ``{name: {"n_pre", "excitatory" (None if unconstrained), "density"}}``."""
    from .metrics import unwrapped
    model = unwrapped(model)  # a DDP or DataParallel wrapper: the circuit's own names and masks
    syns = list(synapses(model))
    if not syns:
        raise SpecError("apply_circuit_constraints: the circuit has no plastic synapse "
                        "(use plastic.convert first)")
    if excitatory is not None and (isinstance(excitatory, bool)
                                   or not isinstance(excitatory, numbers.Real)
                                   or not 0.0 <= excitatory <= 1.0):
        raise SpecError(f"excitatory fraction must be a number in [0, 1], got {excitatory!r}")
    if connectivity is not None:
        _check_density(connectivity, "connectivity")
    if excitatory is not None:
        from .populations import RatePopulation
        signed = sorted({m.activation_name for m in model.modules()
                         if isinstance(m, RatePopulation) and m.activation_name in (
                             "tanh", "identity", "linear", "gelu", "elu", "leaky_relu",
                             "hardtanh", "silu")}
                        | {type(m).__name__ for m in model.modules() if _goes_negative(m)})
        if signed:
            warnings.warn(f"Dale's law with {', '.join(map(repr, signed))} populations: their "
                          "rates go negative, and an excitatory neuron with a negative rate "
                          "inhibits (use relu, sigmoid or softplus, or spiking populations)",
                          stacklevel=2)
        from .models import BasicBlock
        if any(isinstance(m, BasicBlock) for m in model.modules()):
            warnings.warn("Dale's law constrains the synapses only: the identity skip connections "
                          "of residual blocks pass every neuron's activity on with sign +1, "
                          "inhibitory neurons included", stacklevel=2)
    if excitatory is not None or (connectivity is not None and connectivity < 1.0):
        for _, syn in syns:  # every synapse checked before any is constrained
            constrained_weights(syn)
    summary = {}
    for i, (name, syn) in enumerate(syns):
        cs = []
        if excitatory is not None and i > 0:
            cs.append(Dale(dale_signs(n_pre(syn), float(excitatory))))
        if connectivity is not None and connectivity < 1.0:
            key = "connectivity:" + circuit_name(model, name)  # rate and spiking alike
            g = torch.Generator().manual_seed(_seed_for(seed, key))
            cs.append(SparseMask(random_mask(syn.weight.shape, float(connectivity), g)))
        norm = _norm_after(model, syn) if excitatory is not None and i > 0 else None
        if norm is not None:  # its gain must not flip the synapses' signs; last, so older
            cs.append(NonNegativeGain(norm))  # state dicts keep their constraint indices
        if cs:
            constrain(syn, *cs)
        row = {"n_pre": n_pre(syn), "excitatory": None, "density": 1.0}
        for c in cs:
            s = c.summary()
            if "excitatory" in s:
                row["excitatory"] = s["excitatory"]
            if "density" in s:
                row["density"] = s["density"]
        summary[name] = row
    return summary

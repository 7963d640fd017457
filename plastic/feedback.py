"""Feedback synapses: the explicit objects that carry error from a synapse's post population back
to its pre population (layer-wise), or from the circuit's output straight to any layer (direct).

Every feedback synapse exposes ``matrix(W)``: the weight B it routes the error through, stored in
the *forward layout* of the synapse it belongs to (the shape of W, ``(out, in, ...)``).  For a dense
synapse the pre-synaptic error is then ``delta_pre = B^T-layout @ delta_post``, i.e. B in the usual
column convention is ``matrix(W).T``, so "the angle between B and W^T" is the angle between
``matrix(W)`` and ``W``.  Keeping the forward layout lets dense and conv synapses share one
operator (``torch.ops.aten.convolution_backward`` takes B in place of W and nothing else changes).

Fixed or derived feedback weights are buffers.  Learned ones (``plastic.learned``) are ``nn.Parameter`` s
and receive ``.grad`` from the synapse's backward pass, so any optimizer updates them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import SpecError

__all__ = [
    "FeedbackSynapse", "Transpose", "FixedRandom", "UniformSignSymmetry", "BatchRandomSignSymmetry",
    "FixedRandomSignSymmetry", "DirectRandom", "DirectFeedbackHub", "FEEDBACK_KINDS", "make_feedback",
]


def is_nhwc(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored channels_last (NHWC) and not also contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last)


def randn_like_logical(t: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(t)`` drawn in logical (index) order, then laid out like ``t``:
    ``randn_like`` fills a channels_last tensor in memory order, so the same random stream gave
    a conv layer other draws in the two layouts (brsf's B differed by 0.16 after 3 steps)."""
    if t.is_contiguous():
        return torch.randn_like(t)
    return torch.empty_like(t).copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))


def _sign_scale(w: torch.Tensor) -> torch.Tensor:
    """RMS of W's nonzero entries: the scale that gives sign(W) (and |R| o sign(W), E R² = 1) W's
    norm.  On a dense W it is RMS(W); absent synapses (W = 0 under a sparse mask or Dale's law)
    carry no feedback, so they do not dilute it."""
    w = w.detach()
    n = max(w.numel(), 1)
    # RMS(W) times sqrt(n / nonzero), which is exactly 1 on a dense W (no host sync on a GPU);
    # in at least float32: a half-precision count overflows above 65504 (the scale became 0)
    wide = torch.promote_types(w.dtype, torch.float32)
    return ((torch.linalg.vector_norm(w, dtype=wide) / math.sqrt(n)) * (
        n / torch.count_nonzero(w).clamp_min(1).to(wide)).sqrt()).to(w.dtype)


def _state_of(generator: torch.Generator | None) -> tuple[str, torch.Tensor]:
    """(device, state) of the stream a feedback weight is about to be drawn from (the
    generator's, or torch's global CPU stream), so that it can be drawn again exactly."""
    if generator is None:
        return "cpu", torch.get_rng_state().clone()
    return str(generator.device), generator.get_state().clone()


def _generator(drawn) -> torch.Generator:
    device, state = drawn if isinstance(drawn, tuple) else ("cpu", drawn)  # a bare state: CPU
    g = torch.Generator(device=device)
    g.set_state(state)
    return g


def _device_of(generator: torch.Generator | None):
    """Where a generator draws (a CUDA generator's draws on the CPU were an error)."""
    return generator.device if generator is not None else "cpu"


def _redraw(weight: torch.Tensor, drawn_from) -> None:
    """Draw a feedback weight again, in place, exactly as it was drawn from the stream state
    ``drawn_from`` (``_state_of``): torch's ``to_empty`` + ``reset_parameters`` idiom."""
    with torch.no_grad():
        weight.copy_(random_like(weight, _generator(drawn_from)))


def random_like(forward_weight: torch.Tensor, generator=None) -> torch.Tensor:
    """A random weight of W's shape, drawn like W's default initialisation, independent of W."""
    return _kaiming_uniform_like(forward_weight.shape, math.prod(forward_weight.shape[1:]),
                                 generator, forward_weight.device, forward_weight.dtype)


def _kaiming_uniform_like(shape, fan_in: int, generator, device, dtype) -> torch.Tensor:
    # the same distribution as torch.nn.Linear / Conv2d's default weight init
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    u = torch.rand(shape, generator=generator, device=_device_of(generator), dtype=torch.float64)
    return ((2 * u - 1) * bound).to(device=device, dtype=dtype)


class FeedbackSynapse(nn.Module):
    """Base class.  ``kind`` names the rule; ``direct`` marks output-to-layer projections."""

    kind = "base"
    direct = False
    #: whether this feedback synapse only reads signals available at the synapse (its pre and
    #: post activity, the arriving error and its own weight), never the forward weight W
    local = True
    #: whether it learns: then the synapse's backward pass calls ``plasticity`` with its local
    #: signals, and the change of B it returns becomes ``B.grad`` (so any optimizer applies it)
    plastic = False
    #: the tensors kept in W's layout (shape and dtype), checked when the synapse takes it
    layout = ("weight",)

    @property
    def reads_post(self) -> bool:
        """Whether ``plasticity`` reads the post pre-activation ``y``: only then does the synapse
        keep its output for the backward pass (so a kind that does not read it tolerates an
        in-place operation on the output, e.g. ``ReLU(inplace=True)``).  Assumed for a custom
        plastic kind; otherwise ``y`` is None."""
        return self.plastic

    def matrix(self, forward_weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def learned_weight(self) -> torch.Tensor | None:
        """The parameter that ``plasticity`` updates in the backward pass (``self.weight`` for a
        learned kind), or None.  The forward synapse hands it to autograd, which accumulates the
        returned change into its ``.grad`` (and DDP all-reduces it)."""
        w = getattr(self, "weight", None)
        # a Parameter, or a tensor that requires grad in its place (torch.func.functional_call)
        return w if self.plastic and isinstance(w, torch.Tensor) and (
            isinstance(w, nn.Parameter) or w.requires_grad) else None

    def plasticity(self, synapse, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                   dw: torch.Tensor | None) -> torch.Tensor | None:
        """Learned feedback: the change of B (a gradient, shaped like B: the optimizer steps
        against it) from the local signals of the same backward pass, with no extra forward
        pass: the pre activity ``x``, the post pre-activation ``y = W x`` (bias removed), the
        error ``delta`` arriving at the post population, and the forward weight's own update
        ``dw``.  It must be a new tensor.  None: no change this step.  Fixed and derived kinds
        do nothing."""
        return None

    @staticmethod
    def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` to ``param.grad`` as autograd would."""
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.add_(grad)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class Transpose(FeedbackSynapse):
    """Backprop, the control: B = W^T exactly.  Non-local by construction (it reads W)."""

    kind = "transpose"
    local = False

    def matrix(self, forward_weight):
        return forward_weight.detach()


class FixedRandom(FeedbackSynapse):
    """Feedback alignment (Lillicrap et al. 2016, Nat. Commun. 7:13276): a fixed random B drawn
    from the same distribution as W's initialisation, independent of W."""

    kind = "fa"

    def __init__(self, forward_weight: torch.Tensor, generator: torch.Generator | None = None):
        super().__init__()
        self._drawn_from = _state_of(generator)  # for reset_parameters
        self.register_buffer("weight", random_like(forward_weight, generator))

    def reset_parameters(self):
        """Redraw B exactly as it was drawn (torch's ``to_empty`` + ``reset_parameters`` idiom
        for a model built on the meta device)."""
        _redraw(self.weight, self._drawn_from)

    def matrix(self, forward_weight):
        return self.weight


class UniformSignSymmetry(FeedbackSynapse):
    """uSF (Liao, Leibo & Poggio 2016, AAAI; Xiao et al. 2018): B = s * sign(W) with one scalar
    s = RMS of W's nonzero entries, so that ||B|| = ||W||.  Reads the sign of W, hence not
    strictly local."""

    kind = "usf"
    local = False

    def matrix(self, forward_weight):
        w = forward_weight.detach()
        return torch.sign(w).mul_(_sign_scale(w))


class BatchRandomSignSymmetry(FeedbackSynapse):
    """brSF (Liao, Leibo & Poggio 2016; Moskovitz, Litwin-Kumar & Abbott 2018): B = |R| o sign(W),
    R ~ N(0, s^2) redrawn for every batch (every backward pass), s the RMS of W's nonzero entries
    (``||B|| ≈ ||W||``).  Where W is 0 (an absent synapse) B is 0, as for uSF and frSF.  Each
    backward call of the synapse draws: a synapse used twice in one forward pass (by hand) gets
    two draws, as do the micro-batches of an accumulated step; a time-stepped circuit folds its
    steps into one call.  Drawn from torch's global random stream."""

    kind = "brsf"
    local = False

    def matrix(self, forward_weight):
        w = forward_weight.detach()
        return randn_like_logical(w).abs_().mul_(torch.sign(w)).mul_(_sign_scale(w))


class FixedRandomSignSymmetry(FeedbackSynapse):
    """frSF (Liao et al. 2016; Moskovitz et al. 2018): B = |R| o sign(W) with R ~ N(0, 1) fixed at
    construction and scaled by the RMS of W's nonzero entries."""

    kind = "frsf"
    local = False
    layout = ("magnitude",)

    def __init__(self, forward_weight: torch.Tensor, generator: torch.Generator | None = None):
        super().__init__()
        self._drawn_from = _state_of(generator)  # for reset_parameters
        r = torch.randn(forward_weight.shape, generator=generator, dtype=torch.float64,
                        device=_device_of(generator))
        self.register_buffer("magnitude", r.abs().to(forward_weight.device, forward_weight.dtype))

    def reset_parameters(self):
        """Redraw |R| exactly as it was drawn."""
        g = _generator(self._drawn_from)
        r = torch.randn(self.magnitude.shape, generator=g, dtype=torch.float64, device=g.device)
        with torch.no_grad():
            self.magnitude.copy_(r.abs())

    def matrix(self, forward_weight):
        w = forward_weight.detach()
        return torch.sign(w).mul_(self.magnitude).mul_(_sign_scale(w))


class _Pass:
    """One forward pass through a direct-feedback circuit: the hidden synapses' uses, then the
    output synapse's.  Held by the autograd graph of that pass (and by the hub until the next
    pass starts), so a hidden synapse takes the output error of its own pass."""

    __slots__ = ("uses", "outputs", "errors", "seq", "task")

    def __init__(self, seq: int, task: int | None):
        self.uses: dict[int, int] = {}  # id(hidden synapse) -> how many times it ran
        self.outputs = 0  # how many times the output synapse ran
        self.errors: dict[int, torch.Tensor] = {}  # output use -> its error, set in backward
        self.seq = seq  # passes in the order they started
        self.task = task  # the backward pass it was recomputed in (reentrant checkpointing)


def _backward_task() -> int | None:
    """autograd's id of the backward pass running now, or None outside one."""
    f = getattr(torch._C, "_current_graph_task_id", None)
    task = f() if f is not None else -1
    return None if task == -1 else task


class DirectFeedbackHub:
    """Shared by the synapses of one circuit that use direct feedback.  A forward pass is the
    hidden synapses' forwards followed by the output synapse's; a hidden synapse running after
    the output starts the next pass.  In the backward pass the output synapse records its error
    e = dL/dy_out (autograd runs it before the hidden synapses' backward), and each hidden
    synapse takes:

    * the error of its own pass (two passes back-propagated together each get their own; two
      passes interleaved layer by layer are paired use by use);
    * else the latest error recorded in the same backward pass, of a later forward pass
      (backprop through time by hand, with a loss on the last step only: every step takes
      that step's error), or of any pass if this one was recomputed inside that backward
      (reentrant checkpointing);
    * else nothing: it is an error, never an error of an earlier backward pass (step).

    Limits: a loss on the hidden layers of a pass that never reaches the output, back-propagated
    together with a later pass that does, takes that pass's error (the bookkeeping cannot tell it
    from backprop through time by hand).  Under reentrant checkpointing a recomputed pass loses
    its identity: an output synapse inside a reentrant checkpoint is refused (the error above),
    and steps whose outputs the loss does not read get a zero error of their own (autograd hands
    them zeros); ``use_reentrant=False`` (torch's recommendation) is exact in every case tested.
    Nothing to reset.  Not an ``nn.Module``: it holds no weights."""

    def __init__(self):
        self.n_outputs: int | None = None
        self.output_name = ""  # the output synapse's name, for messages
        self._pass: _Pass | None = None
        self._closed = True  # the current pass's output synapse has run
        self._seq = 0
        # (pass seq, backward task, error) last recorded
        self._latest: tuple[int, int | None, torch.Tensor] | None = None

    def _new_pass(self) -> _Pass:
        self._seq += 1
        return _Pass(self._seq, _backward_task())

    def forward_of(self, synapse, is_output: bool) -> tuple[_Pass, int]:
        """Note a synapse's forward: (its pass, which use of the synapse in that pass)."""
        if is_output:  # joins the pass of its hidden layers, in the same backward context
            same = self._pass is not None and self._pass.task == _backward_task()
            p = self._pass if same else self._new_pass()
            self._pass, self._closed = p, True
            p.outputs += 1
            return p, p.outputs - 1
        if self._closed or self._pass.task != _backward_task():  # a recomputation (or the
            self._pass, self._closed = self._new_pass(), False  # first pass after it) is its own
        p = self._pass
        k = p.uses.get(id(synapse), 0)
        p.uses[id(synapse)] = k + 1
        return p, k

    def record(self, p: _Pass, use: int, error: torch.Tensor) -> None:
        """The output synapse's error for its ``use`` in pass ``p`` (in its backward)."""
        p.errors[use] = error
        self._latest = (p.seq, _backward_task(), error)

    def error_of(self, p: _Pass, synapse, k: int, name: str) -> torch.Tensor:
        """The output error for use ``k`` of a hidden ``synapse`` in pass ``p``."""
        n, uses = p.outputs, p.uses.get(id(synapse), 0)
        if n > 1 and uses != n:
            raise RuntimeError(
                f"direct feedback at {name}: the output synapse ran {n} times after it ran {uses} "
                "times, so which output error belongs to which use is ambiguous; run each forward "
                "pass up to the output before the next one starts")
        e = p.errors.get(k if n > 1 else 0)
        if e is None and self._latest is not None:
            seq, task, latest = self._latest
            now = _backward_task()
            if (task is not None and task == now and seq > p.seq) or (
                    p.task is not None and task == p.task):
                e = latest
        if e is None:
            out = f"output synapse {self.output_name!r}" if self.output_name else \
                "circuit's output synapse"
            raise RuntimeError(
                f"direct feedback at {name}: no output error for this forward pass; the loss "
                f"must be computed from the {out} (by default the last synapse registered; "
                "choose another with convert(..., output=name), or arms.NAME.output in a "
                "protocol)")
        return e

    def __repr__(self):
        return f"DirectFeedbackHub(n_outputs={self.n_outputs})"


class DirectRandom(FeedbackSynapse):
    """Direct feedback alignment (Nøkland 2016, NeurIPS, eq. 3): the output error e is projected by
    a fixed random matrix B_l straight onto the synapse's pre population,
    delta_pre = B_l e (then ⊙ f'(a) by the population's own backward).

    ``weight`` has shape ``(n_outputs, *pre_shape)`` and is drawn from ``seed`` by the first
    forward pass that routes an error to the pre population (grad enabled, an input that
    requires it), when its shape is known (conv layers); U(-1/sqrt(d), 1/sqrt(d)) with d the
    size of the pre population, the scale of W^T for a dense layer of that fan-in.  A first
    layer, whose input needs no error, never draws one."""

    kind = "dfa"
    direct = True

    def __init__(self, hub: DirectFeedbackHub, seed: int = 0, device=None, dtype=None):
        super().__init__()
        self.hub = hub
        self.seed = int(seed)
        # lazy, on the synapse's device and in its dtype (a checkpoint's B loads there)
        self.register_buffer("weight", torch.empty(0, device=device, dtype=dtype))

    def materialize(self, pre_shape, device, dtype, memory_format=torch.contiguous_format):
        n_out = self.hub.n_outputs
        if n_out is None:
            raise SpecError("dfa feedback: the circuit has no output synapse to take the error from")
        shape = (n_out, *pre_shape)
        if tuple(self.weight.shape) != shape:
            if self.weight.numel():
                raise SpecError(f"dfa feedback: pre population shape changed from "
                                f"{tuple(self.weight.shape[1:])} to {tuple(pre_shape)}")
            self.weight = self._draw(shape, device, dtype).contiguous(
                memory_format=memory_format)

    def _draw(self, shape, device, dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return _kaiming_uniform_like(shape, math.prod(shape[1:]), g, device, dtype)

    def reset_parameters(self):
        """Draw B again from ``seed`` (a lazy B stays lazy): torch's ``to_empty`` +
        ``reset_parameters`` idiom for a circuit built on the meta device."""
        if self.weight.numel():
            with torch.no_grad():
                self.weight.copy_(self._draw(self.weight.shape, self.weight.device,
                                             self.weight.dtype))

    def project(self, error: torch.Tensor, pre_shape) -> torch.Tensor:
        if error.dim() != 2:
            raise SpecError(f"dfa feedback: the output error has shape {tuple(error.shape)}; "
                            "direct feedback takes a (batch, outputs) error, one per sample")
        b = self.weight
        if is_nhwc(b):
            # B in NHWC: read it in storage order (a view, no copy of B) and give the error in
            # channels_last, the layout of the rest of the backward pass
            n, c, h, w = pre_shape
            e = error.flatten(1) @ b.permute(0, 2, 3, 1).flatten(1)
            return e.view(n, h, w, c).permute(0, 3, 1, 2)
        return (error.flatten(1) @ b.flatten(1)).reshape(pre_shape)  # flatten: also of 0 outputs

    def matrix(self, forward_weight):
        return self.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        got = tuple(state_dict[key].shape) if key in state_dict else None
        n_out = self.hub.n_outputs
        if got not in (None, (0,)) and (not got or (n_out is not None and got[0] != n_out) or (
                self.weight.numel() and got != tuple(self.weight.shape))):
            # not this circuit's direct feedback (another kind's B has W's shape)
            want = tuple(self.weight.shape) if self.weight.numel() else f"({n_out}, <pre shape>)"
            raise RuntimeError(f"size mismatch for {key}: a DFA feedback weight is {want}, the "
                               f"checkpoint's is {got} (saved from another feedback kind?)")
        if got == (0,):  # saved before its first forward: lazy again, drawn at the next one
            self.weight = torch.empty(0, device=self.weight.device, dtype=self.weight.dtype)
        elif got is not None and got != tuple(self.weight.shape):
            # shaped like the checkpoint's, in this module's device and dtype (load_state_dict
            # casts), as for any other buffer
            self.weight = torch.empty(state_dict[key].shape, device=self.weight.device,
                                      dtype=self.weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"kind='dfa', shape={tuple(self.weight.shape) or 'lazy'}"


def canonical_kind(name: str) -> str:
    """A kind's name in one spelling: lower case, and the aliases of transpose (``bp``,
    ``backprop``) as ``transpose``."""
    kind = name.lower()
    return "transpose" if FEEDBACK_KINDS.get(kind) == "alias of transpose" else kind


FEEDBACK_KINDS = {
    "transpose": "backprop: B = W^T",
    "bp": "alias of transpose",
    "backprop": "alias of transpose",
    "fa": "feedback alignment: fixed random B",
    "usf": "uniform sign symmetry: B = RMS(W's nonzero entries) sign(W)",
    "brsf": "batchwise random-magnitude sign symmetry: |R| o sign(W), R redrawn per batch",
    "frsf": "fixed random-magnitude sign symmetry: |R| o sign(W), R fixed",
    "dfa": "direct feedback alignment: output error projected by fixed random B_l",
    # learned feedback (plastic.learned, plastic.rules)
    "information": "Information Alignment: Amp + Null + Decay (Kunin et al. 2020)",
    "symmetric": "Symmetric Alignment: Self + Decay (Kunin et al. 2020)",
    "activation": "Activation Alignment: Amp + Sparse (Kunin et al. 2020)",
    "mirror": "weight mirror: Amp + Decay on noise in sleep phases (Akrout et al. 2019)",
    "kolen-pollack": "Kolen-Pollack: B receives W's update and decay",
}
LEARNED_KINDS = ("information", "symmetric", "activation", "mirror", "kolen-pollack")


def is_rule(spec) -> bool:
    """Whether ``spec`` is a rule given as data: a mapping of primitive names to numbers (a
    mapping of numbers with any primitive name counts, so a misspelt primitive is reported as
    such by ``rules.parse_rule``)."""
    from .rules import PRIMITIVES
    return (isinstance(spec, dict) and bool(spec) and any(k in PRIMITIVES for k in spec)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec.values()))


def check_meant_as_rule(where: str, fb) -> None:
    """A mapping that names a primitive, or maps names to numbers, was meant as a rule
    ({amp = "a"}, {ampp = 1}): say what is wrong with it as a rule, rather than read it as a
    table of synapses."""
    from .rules import PRIMITIVES, parse_rule
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(fb, dict) and fb and not is_rule(fb) and (
            any(k in PRIMITIVES for k in fb) or all(number(v) for v in fb.values())):
        try:
            parse_rule(fb)
        except SpecError as e:
            hint = ("" if any(k in PRIMITIVES for k in fb) else
                    " (a table of synapses maps each to a kind or a rule, not to a number)")
            raise SpecError(f"{where}: {e}{hint}") from None


def is_learned(kind) -> bool:
    """Whether ``kind`` (a name or a rule) makes a learned feedback synapse."""
    return is_rule(kind) or (isinstance(kind, str) and kind.lower() in LEARNED_KINDS)


def make_feedback(kind, forward_weight: torch.Tensor, *, generator=None, hub=None,
                  seed: int = 0, options: dict | None = None) -> FeedbackSynapse:
    """A feedback synapse of ``kind``: a name from ``FEEDBACK_KINDS`` or a rule mapping such as
    ``{"amp": 2e-3, "null": 1e-3, "decay": 1e-3}``."""
    if is_learned(kind):
        from .learned import make_learned
        return make_learned(kind.lower() if isinstance(kind, str) else kind, forward_weight,
                            generator=generator, **(options or {}))
    if options:
        raise SpecError(f"feedback options {sorted(options)} apply to learned feedback only, "
                        f"not to {kind!r}")
    if not isinstance(kind, str):
        raise SpecError(f"feedback must be a kind name or a rule of primitives, got {kind!r}")
    kind = canonical_kind(kind)
    if kind == "transpose":
        return Transpose()
    if kind == "fa":
        return FixedRandom(forward_weight, generator)
    if kind == "usf":
        return UniformSignSymmetry()
    if kind == "brsf":
        return BatchRandomSignSymmetry()
    if kind == "frsf":
        return FixedRandomSignSymmetry(forward_weight, generator)
    if kind == "dfa":
        if hub is None:
            raise SpecError("dfa feedback needs a DirectFeedbackHub (use plastic.convert)")
        return DirectRandom(hub, seed, forward_weight.device, forward_weight.dtype)
    raise SpecError(f"unknown feedback kind {kind!r}; known: {', '.join(sorted(FEEDBACK_KINDS))}")

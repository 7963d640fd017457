"""Forward synapses (dense, conv2d).  Each owns a separate feedback synapse object.

One learning step in rate mode: the forward pass is ordinary autograd, y = W x + b.
In the backward pass the synapse's ``autograd.Function`` routes the arriving error delta through its
feedback synapse, B delta (or, for direct feedback, B_l e from the output error), instead of
W^T delta.  W.grad = delta x^T as usual, so every torch optimizer, schedule and DDP work unchanged.
The cost is exactly that of backprop: the same two weight-sized products, one with B in place of W.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .errors import SpecError
from .feedback import DirectFeedbackHub, FeedbackSynapse, is_nhwc, make_feedback

__all__ = ["Synapse", "Dense", "Conv2d", "plasticity_paused"]

_paused = 0  # > 0 inside plasticity_paused()


@contextlib.contextmanager
def plasticity_paused():
    """Backward passes inside route errors through the feedback synapses as usual, but no
    feedback synapse learns: nothing is written into B.grad.  The metrics use it, so measuring
    a circuit never trains its feedback."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` where it is on; else one that does
    nothing (``torch.autocast`` itself refuses device types it does not know, such as meta)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 has no per-device query; an unknown type
        on = (torch.is_autocast_cpu_enabled() if device_type == "cpu"
              else device_type == "cuda" and torch.is_autocast_enabled())
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


@contextlib.contextmanager
def _as_at_forward(fb: nn.Module, held):
    """The feedback synapse's own tensors as they were at the forward pass: the same objects,
    unless ``torch.func.functional_call`` swapped in others for that forward only (its B was then
    ignored: the error went through the module's B).  Nothing to do otherwise."""
    params, buffers = held
    if all(fb._parameters.get(k) is v for k, v in params.items()) and \
            all(fb._buffers.get(k) is v for k, v in buffers.items()):
        yield
        return
    now = fb._parameters.copy(), fb._buffers.copy()
    fb._parameters.update(params)
    fb._buffers.update(buffers)
    try:
        yield
    finally:  # exactly as they were (a key the forward's had and these lack is not left)
        for d, was in zip((fb._parameters, fb._buffers), now):
            d.clear()
            d.update(was)


def stored_weight(synapse: nn.Module):
    """(the tensor a synapse's W is stored in, the pruning mask W is that times, or None): a
    pruned W is ``weight_orig * weight_mask`` at each forward; None when W is computed some other
    way (a parametrization, weight or spectral norm), so nothing written to W would last."""
    orig = getattr(synapse, "weight_orig", None)
    if isinstance(orig, nn.Parameter) and hasattr(synapse, "weight_mask"):
        return orig, synapse.weight_mask
    w = synapse.weight
    if isinstance(w, nn.Parameter) or "weight" in synapse._buffers:
        return w, None
    return None


def is_plasticity_paused() -> bool:
    """Whether this runs inside ``plasticity_paused()``."""
    return _paused > 0


class _Route(torch.autograd.Function):
    """y = op(x, W, b) forward; backward sends delta through the synapse's feedback synapse.
    A learned feedback synapse's weight B is an input too (unused forward): its plasticity, the
    change of B computed from the same backward pass, is returned as B's gradient, so autograd
    accumulates it into ``B.grad`` and DDP all-reduces it like any other gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, learned, synapse):
        ctx.synapse = synapse
        # the feedback synapse and its tensors now, which the backward routes through (also if
        # set_feedback gives the synapse another before it runs)
        fb = ctx.feedback = synapse.feedback
        ctx.held = (fb._parameters.copy(), fb._buffers.copy())
        hub = ctx.hub = synapse.hub  # the forward's, as its feedback synapse
        # direct feedback: note the pass, so the backward pairs each hidden synapse with its
        # own pass's output error
        ctx.direct = (hub.forward_of(synapse, synapse.is_output) if hub is not None and
                      (synapse.is_output or synapse.feedback.direct) else None)
        y = synapse._forward_op(x, weight, bias)
        if synapse.feedback.reads_post:  # the rule reuses the forward pre-activation
            ctx.save_for_backward(x, weight, y)
        else:
            ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    @once_differentiable  # a second backward (a gradient penalty) is an error, not wrong grads
    def backward(ctx, dy):
        syn: Synapse = ctx.synapse
        fb = ctx.feedback
        try:
            saved = ctx.saved_tensors
        except RuntimeError as e:  # autograd's version check, in the synapse's own words
            if "inplace" not in str(e):
                raise
            what = "input or output" if fb.reads_post else "input"
            raise RuntimeError(
                f"synapse {syn.name or type(syn).__name__}: its {what} was modified by an in-place "
                f"operation after the forward pass (e.g. ReLU(inplace=True)), and its backward "
                f"pass{' (the ' + fb.kind + ' rule reads the activity W x)' if fb.reads_post else ''}"
                f" needs it; make that operation out of place") from e
        x, weight = saved[:2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        hub = ctx.hub
        if hub is not None and syn.is_output:
            hub.record(*ctx.direct, dy.detach())
        # under autocast the forward ran in a lower precision (dy's dtype): so does the backward,
        # and each gradient goes back in its own input's dtype, as autocast's casts would give
        cdt, x_dtype, w_dtype = dy.dtype, x.dtype, weight.dtype
        mixed = cdt != w_dtype or cdt != x_dtype
        xc, wc = (x.to(cdt), weight.to(cdt)) if mixed else (x, weight)
        with _as_at_forward(fb, ctx.held):  # the forward's B (functional_call)
            if fb.direct:
                if need_x:
                    name = syn.name or type(syn).__name__
                    if hub is None:
                        raise RuntimeError(f"direct feedback at {name}: the synapse has no hub to "
                                           "take the output error from (use plastic.convert)")
                    run, use = ctx.direct
                    error = dy.detach() if syn.is_output else hub.error_of(run, syn, use, name)
                    if error.shape[0] != dy.shape[0]:
                        raise RuntimeError(f"direct feedback at {name}: the output error has "
                                           f"{error.shape[0]} samples, the synapse {dy.shape[0]}")
                    dx = fb.project(error.to(fb.weight.dtype), x.shape)
                else:
                    dx = None
                _, dw, db = syn._backward_op(dy, xc, wc, False, need_w, need_b)
            else:
                b = fb.matrix(weight)
                dx, dw, db = syn._backward_op(dy, xc, b.to(cdt) if mixed else b, need_x, need_w,
                                              need_b)
            if mixed:
                dx = dx.to(x_dtype) if dx is not None else None
                dw = dw.to(w_dtype) if dw is not None else None
                db = db.to(syn.bias.dtype) if db is not None else None
            d_learned = None
            # a learned B with requires_grad False is frozen; a kind without a learned weight
            # (sleep-driven, or a custom one writing .grad itself) still gets its call
            if fb.plastic and not _paused and (ctx.needs_input_grad[3]
                                               or fb.learned_weight() is None):
                y = syn.without_bias(saved[2]) if len(saved) > 2 else None
                if mixed:  # the rule reads the activity at the precision of its weights
                    x, dy = x.to(w_dtype), dy.to(w_dtype)
                    y = None if y is None else y.to(w_dtype)
                # at the weights' precision, also for a backward() called inside autocast (a conv
                # rule's own passes met mixed dtypes)
                with autocast_off(dy.device.type):
                    d_learned = fb.plasticity(syn, x, y, dy, dw)
                if not ctx.needs_input_grad[3]:
                    d_learned = None
            return dx, dw, db, d_learned, None


class Synapse(nn.Module):
    """Base class of forward synapses: a weight W, an operator, and a feedback synapse."""

    def __init__(self):
        super().__init__()
        self.hub: DirectFeedbackHub | None = None
        self.is_output = False
        self.name = ""

    def set_feedback(self, feedback: FeedbackSynapse | str, *, generator=None, hub=None, seed=0,
                     options: dict | None = None):
        if isinstance(feedback, (str, dict)):
            feedback = make_feedback(feedback, self.weight, generator=generator, hub=hub, seed=seed,
                                     options=options)
        if not isinstance(feedback, FeedbackSynapse):
            raise SpecError(f"feedback must be a kind name, a rule or a FeedbackSynapse, "
                            f"got {feedback!r}")
        if self.weight.is_complex():  # the routed error and dW would lack the conjugates
            raise SpecError(f"synapse {self.name or type(self).__name__}: complex weights are "
                            "not supported")
        if not feedback.direct:  # B (and frsf's |R|) in W's layout and dtype
            w = self.weight
            for what in feedback.layout:
                b = getattr(feedback, what, None)
                if not isinstance(b, torch.Tensor):
                    continue
                if b.shape != w.shape:
                    raise SpecError(f"feedback {what} of shape {tuple(b.shape)} for a synapse "
                                    f"whose W is {tuple(w.shape)}: B is stored in W's layout")
                if b.dtype != w.dtype:
                    raise SpecError(f"feedback {what} in {b.dtype} for a synapse whose W is "
                                    f"{w.dtype}: B takes W's dtype (convert the model with "
                                    ".to() after setting its feedback)")
        self.feedback = feedback
        if feedback.direct:
            self.hub = feedback.hub
        return self

    def without_bias(self, y: torch.Tensor) -> torch.Tensor:
        """The pre-activation W x from the synapse's output W x + b."""
        if self.bias is None:
            return y
        return y - self.bias.detach().view(1, -1, *([1] * (y.dim() - 2)))

    #: the input's number of dimensions without a batch dimension (a single sample)
    unbatched_dim = -1

    def forward(self, input):
        x = input  # torch's name for it, so a call input=... works as on nn.Linear
        if isinstance(x, tuple):  # a spiking population's (spikes, state), outside TimeStepped
            raise SpecError(f"synapse {self.name or type(self).__name__} got a (spikes, state) "
                            "tuple: a circuit with spiking populations runs in time, inside "
                            "plastic.simulator.TimeStepped")
        if x.dim() == self.unbatched_dim:  # one sample, as torch.nn accepts: a batch of one
            return self.forward(x.unsqueeze(0)).squeeze(0)
        fb = self.feedback
        if fb.direct and torch.is_grad_enabled() and x.requires_grad:
            # B is drawn (in the weights' dtype, also when autocast hands x in a lower one) by
            # the first forward pass whose input needs the error it routes: not by an evaluation
            # (of any input size), nor for a first layer, whose input needs none
            if not fb.weight.numel():  # the first such input sets B's shape: check it first
                if x.dim() != self.unbatched_dim + 1:
                    raise SpecError(f"direct feedback at {self.name or type(self).__name__} "
                                    f"takes one sample per row, {self.unbatched_dim + 1}-D input; "
                                    f"got {tuple(x.shape)}")
                with torch.no_grad():
                    self._forward_op(x, self.weight, self.bias)  # torch's error, if wrong
            fb.materialize(x.shape[1:], x.device, self.weight.dtype,  # B laid out like x
                           torch.channels_last if is_nhwc(x) else torch.contiguous_format)
        elif fb.plastic and hasattr(fb, "pre_shape"):
            fb.pre_shape = tuple(x.shape[1:])  # for noise-driven (sleep) phases
        learned = fb.learned_weight()
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                              or (learned is not None and learned.requires_grad))):
            return self._forward_op(x, self.weight, self.bias)
        return _Route.apply(x, self.weight, self.bias, learned, self)


class Dense(Synapse):
    """A dense synapse, y = x W^T + b (the layout of ``torch.nn.Linear``)."""

    unbatched_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 feedback: FeedbackSynapse | str = "transpose", *, generator=None, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.set_feedback(feedback, generator=generator)

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(cls, m: nn.Linear, feedback="transpose", **kw):
        new = cls.__new__(cls)
        Synapse.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.weight, new.bias = m.weight, m.bias  # the same Parameters: ties stay tied
        new.set_feedback(feedback, **kw)
        return new.train(m.training)

    def _forward_op(self, x, w, b):
        return F.linear(x, w, b)

    def without_bias(self, y: torch.Tensor) -> torch.Tensor:
        """W x from W x + b; features are the last dimension (inputs may be (batch, ..., in))."""
        return y if self.bias is None else y - self.bias.detach()

    def operator(self):
        """Forward, backward and weight-gradient operators with any weight K (rules.Operator)."""
        from .rules import Operator
        n_in, n_out = self.in_features, self.out_features
        return Operator(
            forward=lambda x, k: F.linear(x, k),
            backward=lambda g, k, x: g @ k,
            weight_grad=lambda a, g: g.flatten(0, -2).t() @ a.flatten(0, -2))

    def _backward_op(self, dy, x, b_matrix, need_x, need_w, need_b):
        dx = dy @ b_matrix if need_x else None
        # flatten, not reshape(-1, n): that is ambiguous for a layer of 0 inputs or outputs
        dy2 = dy.flatten(0, -2)
        dw = dy2.t() @ x.flatten(0, -2) if need_w else None
        db = dy2.sum(0) if need_b else None
        return dx, dw, db

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv_padding(padding, kernel_size, stride, dilation) -> tuple[int, int]:
    """Zero padding as two ints; ``"valid"`` and ``"same"`` (stride 1, odd extent) as torch
    reads them."""
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return (0, 0)
    if padding == "same" and tuple(_pair(stride)) == (1, 1):
        k = [d * (s - 1) for d, s in zip(_pair(dilation), _pair(kernel_size))]
        if any(v % 2 for v in k):
            raise SpecError("Conv2d padding='same' with an even kernel is not supported")
        return tuple(v // 2 for v in k)
    raise SpecError(f"Conv2d padding={padding!r} is not supported (a number, a pair, 'valid', "
                    "or 'same' at stride 1)")


def _check_padding_mode(mode: str) -> None:
    if mode != "zeros":
        raise SpecError(f"Conv2d with padding_mode={mode!r} is not supported (only 'zeros')")


class Conv2d(Synapse):
    """A 2-D convolutional synapse (the layout of ``torch.nn.Conv2d``, zero padding).  Its backward
    pass is one ``aten.convolution_backward`` call with B in place of W: the input gradient is the
    transposed convolution with B, the weight gradient is unchanged."""

    unbatched_dim = 3

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros",
                 feedback: FeedbackSynapse | str = "transpose", *, generator=None, device=None,
                 dtype=None):
        super().__init__()
        _check_padding_mode(padding_mode)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.dilation, self.groups = _pair(dilation), int(groups)
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise SpecError(f"Conv2d: in_channels ({self.in_channels}) and out_channels "
                            f"({self.out_channels}) must be divisible by groups ({self.groups})")
        self.padding = _conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.set_feedback(feedback, generator=generator)

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(cls, m: nn.Conv2d, feedback="transpose", **kw):
        _check_padding_mode(m.padding_mode)
        padding = _conv_padding(m.padding, m.kernel_size, m.stride, m.dilation)
        new = cls.__new__(cls)
        Synapse.__init__(new)
        new.in_channels, new.out_channels = m.in_channels, m.out_channels
        new.kernel_size, new.stride = tuple(m.kernel_size), tuple(m.stride)
        new.padding, new.dilation, new.groups = tuple(padding), tuple(m.dilation), m.groups
        new.weight, new.bias = m.weight, m.bias  # the same Parameters: ties stay tied
        new.set_feedback(feedback, **kw)
        return new.train(m.training)

    def _forward_op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def operator(self):
        """Forward, backward and weight-gradient operators with any weight K (rules.Operator)."""
        from .rules import Operator
        st, pad, dil, gr = self.stride, self.padding, self.dilation, self.groups
        w = self.weight
        return Operator(
            forward=lambda x, k: F.conv2d(x, k, None, st, pad, dil, gr),
            backward=lambda g, k, x: self._conv_backward(g, x, k, True, False, False)[0],
            weight_grad=lambda a, g: self._conv_backward(g, a, w, False, True, False)[1])

    def _conv_backward(self, dy, x, k, need_x, need_w, need_b):
        """One ``aten.convolution_backward`` call with weight ``k`` (B for the input gradient;
        the weight gradient does not depend on it)."""
        return torch.ops.aten.convolution_backward(
            dy, x, k, [self.out_channels] if need_b else None, list(self.stride),
            list(self.padding), list(self.dilation), False, [0, 0], self.groups,
            [need_x, need_w, need_b])

    def _backward_op(self, dy, x, b_matrix, need_x, need_w, need_b):
        return self._conv_backward(dy, x, b_matrix, need_x, need_w, need_b)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}"

"""Learned feedback synapses: B is an ``nn.Parameter`` whose change is computed in the synapse's
own backward pass, from local signals, and returned to autograd as B's gradient (``plasticity``),
so it lands in ``B.grad`` and any optimizer, LR schedule and DDP update it like W.

* ``LearnedFeedback``: any weighted sum of Kunin et al.'s primitives (``plastic.rules``), e.g.
  Information Alignment ``{amp, null, decay}``, Symmetric ``{self, decay}``, Activation
  ``{amp, sparse}``, or the weight mirror (Akrout et al. 2019): ``{amp, decay}`` driven by noise.
* ``KolenPollack`` (Kolen & Pollack 1994; Akrout et al. 2019, eq. 6): B receives exactly W's update
  (and, through the optimizer, the same decay), so B - W^T decays to zero.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings

import torch
from torch import nn

from .errors import SpecError, suggest
from .feedback import (FeedbackSynapse, _redraw, _state_of, is_nhwc, random_like,
                       randn_like_logical)
from .rules import COMPOSITES, Signals, fused_grad, is_local, parse_rule, primitive_value
from .synapses import autocast_off, is_plasticity_paused, stored_weight

__all__ = ["LearnedFeedback", "KolenPollack", "sleep_step", "rule_scale", "DRIVES"]

DRIVES = ("data", "noise", "sleep")
AVERAGES = ("batch", "positions")
_ACTIVITY = ("amp", "null", "sparse")  # primitives that read activity (sums over positions)


def _storage_order(x: torch.Tensor) -> torch.Tensor:
    """A view of x whose dimensions follow its memory order: NHWC for a channels_last tensor
    (reductions over the batch of a channels_last tensor are ~10x slower on CPU when read as
    NCHW), x itself otherwise."""
    if is_nhwc(x):
        return x.permute(0, 2, 3, 1)
    return x


def _batch_centred(x: torch.Tensor) -> torch.Tensor:
    """x minus its batch mean, in x's memory format."""
    v = _storage_order(x)
    c = v - v.mean(0, keepdim=True)
    return c.permute(0, 3, 1, 2) if v is not x else c


#: training passes of a sleep-driven feedback synapse with no sleep step before it warns
SLEEPLESS_WARNING = 1000


class LearnedFeedback(FeedbackSynapse):
    """B learned by the rule ΔB = -Σ_k c_k ∂R_k/∂B (Kunin et al. 2020, Table 1).

    rule: a composite name (``information``, ``symmetric``, ``activation``) or a mapping of
        primitives to coefficients, e.g. ``{"amp": 2e-3, "null": 1e-3, "decay": 1e-3}``.
    drive: ``"data"`` applies the rule to the activity of every training batch, in its backward
        pass; ``"noise"`` (the concurrent weight mirror) applies it to white-noise input of the
        same shape, in the same backward pass; ``"sleep"`` only in ``sleep_step`` calls.
    noise: std of Gaussian noise added to every update (Kunin et al.'s robustness experiment).
    sigma: std of the driving noise for ``drive="noise"`` / sleep.
    average: ``"batch"`` (Kunin et al.'s code: activity terms are averaged over the batch and
        summed over a conv layer's output positions) or ``"positions"`` (averaged over batch and
        output positions, so a conv layer's Amp/Null/Sparse have the scale of a dense layer's and
        one coefficient suits every layer of a CNN; identical for dense layers).
    normalize_input: rescale each sample's pre activity to unit norm before the rule reads it,
        x̂ = x/||x||, ŷ = W x̂ = y/||x|| (Kunin et al.'s code, ``normalize_input``, without its
        centring), so the activity terms' stiffness is bounded by ||W||² whatever the layer's
        activity; off by default.
    center: ``"batch"`` subtracts the batch mean of x before the rule reads it (then y = W x is
        centred too): the rule sees the activity's covariance, not its second moment (Kunin et
        al.'s code centres the Amp input, ``batch_center_backward_input``).  Behind batch norm
        the mean of y is discarded by the forward pass anyway; off by default.
    normalize: route the error through B rescaled to its initial norm (a local, scalar gain),
        so that the rule sets only B's direction.  The rules fix B's scale only up to their
        coefficients and the layer's activity (e.g. Amp + Decay gives B ∝ W Σ_x), and in a deep
        net that scale multiplies every earlier layer's error; off by default.
    every, subsample: cheaper, approximate variants (off by default and reported separately):
        apply the rule only on every ``every``-th backward pass (one ``loss.backward()`` counts
        once, however many times it passes through the synapse), or to a ``subsample`` fraction
        of each batch (rows evenly spaced over it: in a circuit simulated in time, whose steps
        are folded into the batch, every step contributes).
    """

    plastic = True

    def __init__(self, forward_weight: torch.Tensor, rule, *, generator=None, name: str | None = None,
                 drive: str = "data", noise: float = 0.0, sigma: float = 1.0, every: int = 1,
                 subsample: float = 1.0, average: str = "batch", normalize: bool = False,
                 normalize_input: bool = False, center: str | None = None):
        super().__init__()
        self.rule = parse_rule(rule)
        if not self.rule:
            raise SpecError("a learned feedback rule needs at least one non-zero primitive")
        if forward_weight.is_floating_point():
            top = torch.finfo(forward_weight.dtype).max
            big = {k: c for k, c in self.rule.items() if abs(c) > top}
            if big:  # finite in float64 (parse_rule checks), infinite in B's dtype
                raise SpecError(f"feedback rule coefficient(s) {big} overflow "
                                f"{forward_weight.dtype} (largest {top:g}): B.grad would be inf")
        if drive not in DRIVES:
            raise SpecError(f"unknown drive {drive!r}; known: {', '.join(DRIVES)}")
        if average not in AVERAGES:
            raise SpecError(f"unknown average {average!r}; known: {', '.join(AVERAGES)}")
        self.average = average
        self.kind = name or (rule if isinstance(rule, str) else "learned")
        self.local = is_local(self.rule)
        for option, value in (("normalize", normalize), ("normalize_input", normalize_input)):
            if not isinstance(value, bool):
                raise SpecError(f"feedback option {option} must be true or false, got {value!r}")
        for option, value in (("noise", noise), ("sigma", sigma), ("subsample", subsample)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"feedback option {option} must be a number, got {value!r}")
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise SpecError(f"feedback option every must be a positive integer, got {every!r}")
        if not 0 < float(subsample) <= 1:
            raise SpecError(f"feedback option subsample must be in (0, 1], got {subsample!r}")
        if not (math.isfinite(noise) and math.isfinite(sigma)) or not (
                float(noise) >= 0 and float(sigma) > 0):
            raise SpecError(f"feedback options noise must be >= 0 and sigma > 0 (standard "
                            f"deviations), got noise={noise!r}, sigma={sigma!r}")
        if drive == "data" and float(sigma) != 1.0:
            raise SpecError(f"feedback option sigma (the driving noise's std, {sigma!r}) needs "
                            "drive = 'noise' or 'sleep'; a data-driven rule reads no noise")
        if drive == "sleep" and (every != 1 or float(subsample) != 1.0):
            raise SpecError("feedback options every and subsample apply to the rule in the "
                            "training pass; a sleep-driven rule learns only in sleep phases (set "
                            "their frequency and size with [sleep] every and batch_size)")
        self.drive, self.noise, self.sigma = drive, float(noise), float(sigma)
        self.every, self.subsample = every, float(subsample)
        # backward passes seen, on W's device (a CPU buffer beside a GPU W: DDP over NCCL
        # cannot broadcast it, and reading it on the GPU was a copy)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long,
                                                    device=forward_weight.device))
        # the same count on the host, which `every` reads without waiting for the device; read
        # again from the buffer when something else wrote it (a load, DDP's broadcast)
        self._count, self._seen = 0, self.updates._version
        self._drawn_from = _state_of(generator)  # for reset_parameters
        self.weight = nn.Parameter(random_like(forward_weight, generator))
        self.normalize, self.normalize_input = bool(normalize), bool(normalize_input)
        if center not in (None, "batch"):
            raise SpecError(f"feedback option center must be 'batch', got {center!r}")
        self.center = center
        self.register_buffer("initial_norm", self.weight.detach().norm().clone())
        self.pre_shape: tuple | None = None  # the pre population's shape, seen on forward
        self._pass = None  # the backward pass ``updates`` last counted (``every``)
        self._wake_without_sleep = 0  # a diagnostic: sleep-driven B that never sleeps stays random

    def reset_parameters(self):
        """Redraw B exactly as it was drawn, with its norm and the pass count (torch's
        ``to_empty`` + ``reset_parameters`` idiom for a model built on the meta device)."""
        _redraw(self.weight, self._drawn_from)
        with torch.no_grad():
            self.initial_norm.copy_(self.weight.norm())
            self.updates.zero_()

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_count" not in self.__dict__:  # a whole model pickled before the host count
            self._count, self._seen = 0, None

    @property
    def reads_post(self) -> bool:
        """Amp and Null read the wake activity's y = W x; Sparse, Decay and Self do not, nor does
        a noise- or sleep-driven rule."""
        return self.drive == "data" and any(k in ("amp", "null") for k in self.rule)

    def matrix(self, forward_weight):
        b = self.weight.detach()
        if self.normalize:
            return b * (self.initial_norm / b.norm().clamp_min(1e-30))
        return b

    def signals(self, synapse, x, y, delta) -> Signals:
        return Signals(x, y, delta, self.weight.detach(),
                       None if self.local else synapse.weight.detach(), synapse.operator())

    def activity_scale(self, y) -> float:
        """The factor on this layer's activity terms: 1/#output positions if averaged over
        positions, else 1.  Positions are a conv layer's output pixels, or the middle dimensions
        of a dense layer's (batch, ..., features) input."""
        if self.average != "positions" or y.dim() <= 2:
            return 1.0
        return self.weight.shape[0] / y[0].numel()

    def scaled_rule(self, y) -> dict[str, float]:
        """The rule's coefficients for this layer (activity terms times ``activity_scale``)."""
        a = self.activity_scale(y)
        if a == 1.0:
            return self.rule
        return {k: c * a if k in _ACTIVITY else c for k, c in self.rule.items()}

    def prepare(self, x, y):
        """The activity the rule reads: (x, y = W x) after the ``center`` and ``normalize_input``
        options.  Both ``grad`` and ``values`` read it, so the recorded primitive values are those
        of the objective being minimised."""
        fresh = self.center == "batch"  # x and y are then new tensors, free to rescale in place
        if fresh and x.shape[0] == 1 and not getattr(self, "_warned_single", False):
            self._warned_single = True
            warnings.warn(f"{self.kind} feedback: center = 'batch' on a batch of one sample "
                          "leaves no activity (x minus its batch mean is 0); the activity "
                          "terms do nothing on such batches", stacklevel=2)
        if fresh:
            x = _batch_centred(x)
            y = None if y is None else _batch_centred(y)
        if self.normalize_input:
            tiny = max(1e-12, torch.finfo(x.dtype).tiny)  # 1e-12 is 0 in float16: 0 * inf
            inv = _storage_order(x).reshape(x.shape[0], -1).norm(dim=1).clamp_min(tiny).reciprocal()
            ix = inv.view(-1, *([1] * (x.dim() - 1)))
            x = x.mul_(ix) if fresh else x * ix
            if y is not None:
                iy = inv.view(-1, *([1] * (y.dim() - 1)))
                y = y.mul_(iy) if fresh else y * iy
        return x, y

    def grad(self, synapse, x, y, delta=None) -> torch.Tensor:
        x, y = self.prepare(x, y)
        # the output's shape: y's, or the error's (the same) for a rule that does not read y
        g = fused_grad(self.scaled_rule(y if y is not None else delta),
                       self.signals(synapse, x, y, delta))
        if self.noise:
            g = g + self.noise * randn_like_logical(g)
        return g

    def learned_weight(self):
        """B learns in the backward pass unless it learns only in sleep phases."""
        return None if self.drive == "sleep" else self.weight

    def plasticity(self, synapse, x, y, delta, dw):
        if not x.shape[0]:  # no samples: no change (every batch-mean term would be 0/0)
            return None
        if self.drive == "sleep":
            self._wake_without_sleep += 1
            if self._wake_without_sleep == SLEEPLESS_WARNING:
                warnings.warn(f"{self.kind} feedback learns only in sleep phases, and "
                              f"{SLEEPLESS_WARNING} training passes have gone by without one: "
                              "B is still random. Call plastic.learned.sleep_step(model) "
                              "between steps (or set [sleep] every in a protocol).",
                              stacklevel=2)
            return None
        task = _backward_pass()
        if task is None or task != self._pass:  # a synapse used twice in one pass counts once
            self._pass = task
            # read only where `every` needs it (a read waits for a GPU: under DDP's per-forward
            # buffer broadcast it would be every pass)
            if self.every > 1 and self._seen != self.updates._version \
                    and not self.updates.is_meta:
                self._count = int(self.updates)  # written by another: a load, DDP's broadcast
            self.updates += 1
            self._count += 1
            if self.every > 1:
                self._seen = self.updates._version
        if self.every > 1 and self._count % self.every:
            # a zero change, not None: B.grad is then 0 as DDP's reducer makes it, so momentum
            # and weight decay move B alike on one process and on many
            return torch.zeros_like(self.weight)
        if self.subsample < 1:
            # k rows evenly spaced over the batch: in a time-stepped circuit (steps folded into
            # the batch, step major) every step contributes, not only the first, nearly silent
            # ones; a view when they are every m-th row
            n = x.shape[0]
            k = max(1, math.ceil(self.subsample * n))
            if n % k == 0:
                x, delta = x[::n // k], delta[::n // k]
                y = None if y is None else y[::n // k]
            else:
                rows = torch.arange(k, device=x.device) * n // k
                x, delta = x.index_select(0, rows), delta.index_select(0, rows)
                y = None if y is None else y.index_select(0, rows)
        if self.drive == "noise":
            x = randn_like_logical(x).mul_(self.sigma)
            y, delta = synapse.operator().forward(x, synapse.weight.detach()), None
        g = self.grad(synapse, x, y, delta)
        return g.mul_(_rule_scale) if _rule_scale != 1.0 else g

    def values(self, synapse, x, y) -> dict[str, float]:
        """Each primitive's R on the activity the rule reads (``prepare``), for the metrics."""
        x, y = self.prepare(x, y)
        s = Signals(x, y, None, self.weight.detach(), synapse.weight.detach(), synapse.operator())
        a = self.activity_scale(y)
        return {k: primitive_value(k, s) * (a if k in _ACTIVITY else 1.0) for k in self.rule}

    def extra_repr(self):
        avg = f", average={self.average!r}" if self.average != "batch" else ""
        avg += ", normalize=True" if self.normalize else ""
        avg += ", normalize_input=True" if self.normalize_input else ""
        avg += f", center={self.center!r}" if self.center else ""
        return f"kind={self.kind!r}, rule={self.rule}, drive={self.drive!r}{avg}, local={self.local}"


class KolenPollack(FeedbackSynapse):
    """B.grad = W.grad: B and W^T receive the same update (Kolen & Pollack 1994), and the same
    weight decay from the optimizer, so their difference decays geometrically."""

    kind = "kolen-pollack"
    plastic = True

    reads_post = False  # B's change is W's: it needs neither activity

    def __init__(self, forward_weight: torch.Tensor, *, generator=None):
        super().__init__()
        self._drawn_from = _state_of(generator)  # for reset_parameters
        self.weight = nn.Parameter(random_like(forward_weight, generator))

    def reset_parameters(self):
        """Redraw B exactly as it was drawn (the meta-device idiom, as for fa)."""
        _redraw(self.weight, self._drawn_from)

    def matrix(self, forward_weight):
        return self.weight.detach()

    def plasticity(self, synapse, x, y, delta, dw):
        # W's own update, copied (dw is also W's gradient: the two .grad must not share storage);
        # a frozen W (dw None) gets none, so neither does B
        if dw is None:
            return None
        stored = stored_weight(synapse)
        if stored is None:
            raise SpecError(f"kolen-pollack at {synapse.name or type(synapse).__name__}: W "
                            "is computed from a parametrization, so W's update is not "
                            "dL/dW; use a plain W (or pruning, whose mask B follows)")
        mask = stored[1]
        return dw.clone() if mask is None else dw * mask  # a pruned W's: what weight_orig gets


@torch.no_grad()
def sleep_step(model: nn.Module, batch_size: int = 32, generator=None) -> int:
    """One sleep step: every learned feedback synapse with ``drive="sleep"`` applies its
    rule to white noise at its pre population, x ~ N(0, sigma²), y = W x (the weight mirror of
    Akrout et al. 2019).  Writes into ``B.grad``; call ``optimizer.step()`` after.  Under
    torch.distributed, every process draws its own noise and the updates are averaged over
    processes, so replicas stay identical (B takes no part in the wake pass: wrap the model in
    DDP with ``find_unused_parameters=True``).  Returns the number of feedback weights updated
    (layers that share a W share one, which sleeps once)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"sleep_step: batch_size must be a positive integer, got {batch_size!r}")
    if is_plasticity_paused():  # nothing is written into B.grad there
        return 0
    # a frozen B (requires_grad False) does not learn in sleep, as it does not in the wake pass
    sleepers = [(n, s) for n, s in sleep_driven(model) if s.feedback.weight.requires_grad]
    # one sleep update per B: layers that share a W share its B (convert), which dreams once
    seen: set[int] = set()
    sleepers = [(n, s) for n, s in sleepers
                if not (id(s.feedback) in seen or seen.add(id(s.feedback)))]
    with contextlib.ExitStack() as stack:  # the rule runs at B's precision, autocast or not
        for dev in {s.weight.device.type for _, s in sleepers}:
            stack.enter_context(autocast_off(dev))
        for _, syn in sleepers:
            fb = syn.feedback
            if fb.pre_shape is None:
                raise SpecError(f"sleep_step: synapse {syn.name!r} has not seen an input yet; "
                                "run one forward pass first")
            # drawn where the generator is, else on W's device (a draw on the host was a copy)
            where = generator.device if generator is not None else syn.weight.device
            x = torch.randn((batch_size, *fb.pre_shape), generator=generator,
                            dtype=syn.weight.dtype, device=where)
            x = x.to(syn.weight.device).mul_(fb.sigma)
            y = syn.operator().forward(x, syn.weight.detach())
            fb._wake_without_sleep = 0
            g = fb.grad(syn, x, y)
            mean_over_processes([g])  # each process dreams its own noise; replicas take the mean
            fb.accumulate(fb.weight, g)
    return len(sleepers)


_rule_scale = 1.0


@contextlib.contextmanager
def rule_scale(scale: float):
    """Multiply the change of B that learned rules write in backward passes inside by ``scale``.
    A rule's ΔB does not scale with the loss (its primitives read activity, not the error), but
    what is done to W's gradient through the loss is done to B.grad too: under
    ``torch.amp.GradScaler`` use ``rule_scale(scaler.get_scale())`` around
    ``scaler.scale(loss).backward()`` (unscaling divides B.grad by it), and when k micro-batches
    each back-propagate ``loss / k``, ``rule_scale(1 / k)``.  Kolen-Pollack's ΔB is W's
    update, already scaled, and is left alone; so is ``sleep_step``'s (no loss is involved:
    step the optimizer after a sleep step plainly, not through the GradScaler)."""
    global _rule_scale
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise SpecError(f"rule_scale must be a finite number > 0, got {scale!r}")
    previous, _rule_scale = _rule_scale, _rule_scale * scale
    try:
        yield
    finally:
        _rule_scale = previous


def _backward_pass():
    """An id of the backward pass running now (autograd's graph task), or None outside one or
    where torch does not say."""
    f = getattr(torch._C, "_current_graph_task_id", None)
    task = f() if f is not None else -1
    return None if task == -1 else task


def sleep_driven(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, synapse) of every synapse whose feedback learns only in sleep phases."""
    from .convert import synapses
    return [(n, s) for n, s in synapses(model)
            if isinstance(s.feedback, LearnedFeedback) and s.feedback.drive == "sleep"]


def mean_over_processes(tensors) -> None:
    """Under torch.distributed (more than one process), replace each tensor in place by its
    mean over the processes; otherwise leave them.  For updates that no autograd pass carries
    to DDP's all-reduce (sleep phases, online learning)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return
    world = torch.distributed.get_world_size()
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():  # one all-reduce per dtype, not one per tensor
        flat = torch._utils._flatten_dense_tensors(group)
        torch.distributed.all_reduce(flat)
        flat /= world
        for t, mean in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
            t.copy_(mean)


def make_learned(kind, forward_weight, generator=None, **options):
    """A learned feedback synapse from a kind name or a rule mapping."""
    known = [p for p in inspect.signature(LearnedFeedback.__init__).parameters
             if p not in ("self", "forward_weight", "rule", "generator", "name")]
    for k in options:
        if k not in known and not (k == "rule" and kind in ("mirror", "weight-mirror")):
            raise SpecError(f"unknown feedback option {k!r}{suggest(k, known)}; "
                            f"known: {', '.join(known)}")
    if kind in ("kolen-pollack", "kp"):
        if options:
            raise SpecError(f"kolen-pollack takes no feedback options (B receives W's update "
                            f"and decay), got {', '.join(sorted(options))}")
        return KolenPollack(forward_weight, generator=generator)
    if kind in ("mirror", "weight-mirror"):
        rule = options.pop("rule", {"amp": 0.1, "decay": 0.1})
        # averaged over positions: on white noise (Σ = σ²I per patch) Amp + Decay then settles
        # at B = (c_amp/c_decay) σ² W on conv layers too, instead of a factor #positions larger
        options.setdefault("average", "positions")
        return LearnedFeedback(forward_weight, rule, generator=generator, name="mirror",
                               drive=options.pop("drive", "sleep"), **options)
    if isinstance(kind, str) and kind in COMPOSITES:
        return LearnedFeedback(forward_weight, kind, generator=generator, **options)
    if isinstance(kind, dict):
        return LearnedFeedback(forward_weight, kind, generator=generator, **options)
    raise SpecError(f"unknown learned feedback {kind!r}")

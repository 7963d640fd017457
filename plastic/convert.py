"""Convert any ``torch.nn.Module`` into a plastic circuit: every Linear / Conv2d becomes a plastic
synapse with the same weights and its own feedback synapse of the chosen kind.  One model
definition therefore serves every rule."""
from __future__ import annotations

import copy
import fnmatch
import warnings
import zlib
from typing import Iterator, Mapping

import torch
from torch import nn

from .errors import SpecError
from .feedback import (FEEDBACK_KINDS, DirectFeedbackHub, check_meant_as_rule, is_learned,
                       is_rule, make_feedback)
from .synapses import Conv2d, Dense, Synapse, _check_padding_mode, _conv_padding

__all__ = ["convert", "synapses", "resolve_kind"]


def synapses(module: nn.Module) -> Iterator[tuple[str, Synapse]]:
    """(name, synapse) for every plastic synapse of a circuit, in module order."""
    for name, m in module.named_modules():
        if isinstance(m, Synapse):
            yield name, m


def resolve_kind(name: str, feedback):
    """The feedback kind of the synapse called ``name``.  ``feedback`` is one kind (or one rule
    of primitives, e.g. ``{"amp": 1, "decay": 1}``) for every synapse, or a mapping from module
    names or fnmatch patterns to kinds: an exact name wins, then the first pattern that matches,
    in the order given (use ``"*"`` for the rest)."""
    check_meant_as_rule("feedback", feedback)
    if isinstance(feedback, str) or is_rule(feedback):
        kind = feedback
    elif not isinstance(feedback, Mapping):
        raise SpecError(f"feedback must be a kind, a rule or a mapping of synapses to kinds, "
                        f"got {type(feedback).__name__}")
    else:
        bad = [k for k in feedback if not isinstance(k, str)]
        if bad:
            raise SpecError(f"feedback mapping keys must be synapse names or patterns (strings), "
                            f"got {bad}")
        if name in feedback:
            kind = feedback[name]
        else:
            for pattern, k in feedback.items():
                if fnmatch.fnmatchcase(name, pattern):
                    kind = k
                    break
            else:
                raise SpecError(f"no feedback kind given for synapse {name!r} "
                                f"(patterns: {list(feedback)}); add a '*' entry")
    check_meant_as_rule(f"feedback for synapse {name!r}", kind)
    if is_rule(kind):
        from .rules import parse_rule
        parse_rule(kind)  # validates
        return kind
    kind = str(kind).lower()
    if kind not in FEEDBACK_KINDS:
        raise SpecError(f"unknown feedback kind {kind!r} for synapse {name!r}; "
                        f"known: {', '.join(sorted(FEEDBACK_KINDS))}")
    return kind


# layers whose backward pass multiplies the error by their weights, but which plastic has no
# synapse for: converted circuits would pass their error by exact backprop (weight transport)
_UNCONVERTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Bilinear, nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


def _inside_unconverted(module: nn.Module):
    """A test for module names inside a layer convert leaves as it is (``_UNCONVERTED``)."""
    prefixes = tuple(f"{n}." if n else "" for n, m in module.named_modules()
                     if isinstance(m, _UNCONVERTED))  # "": the whole model is such a layer
    return lambda name: bool(prefixes) and name.startswith(prefixes)


def _seed_for(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def circuit_name(model: nn.Module, name: str) -> str:
    """A synapse's name within its circuit: a circuit simulated in time (``TimeStepped``) holds
    it as ``circuit.NAME``, and its random draws (feedback weights, masks) are keyed by NAME, so
    the rate and the spiking version of one circuit get the same ones."""
    from .simulator import TimeStepped
    return name.removeprefix("circuit.") if isinstance(model, TimeStepped) else name


def convert(module: nn.Module, feedback: str | Mapping[str, str] = "transpose", *,
            output: str | None = None, seed: int = 0, inplace: bool = False,
            options: dict | None = None) -> nn.Module:
    """Return ``module`` with every ``nn.Linear`` / ``nn.Conv2d`` (and every plastic synapse
    already there) given a feedback synapse of the chosen kind.

    feedback: a kind (``transpose``/``bp``, ``fa``, ``usf``, ``brsf``, ``frsf``, ``dfa``) or a
        mapping ``{name or pattern: kind}``, e.g. ``{"fc": "bp", "*": "usf"}`` (Xiao et al. 2018).
    output: the name of the output synapse, whose error direct feedback (dfa) broadcasts;
        by default the last synapse in module order.
    seed: seeds the random feedback weights (each synapse from its own stream, keyed by name),
        independently of the global RNG, so W's initialisation is the same for every rule.
    options: for learned feedback, e.g. ``{"drive": "noise", "noise": 0.1, "every": 4}``
        (see ``plastic.learned.LearnedFeedback``).
    """
    if not isinstance(module, nn.Module):
        raise SpecError(f"convert needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"convert: seed must be an integer, got {seed!r}")
    # what cannot be converted is refused before the copy (which some of it breaks)
    layers = (nn.Linear, nn.Conv2d, Synapse)
    kept = _inside_unconverted(module)
    for n, m in module.named_modules():
        if isinstance(m, layers) and not kept(n):
            _check_convertible(n or "(root)", m)
    root = module if inplace else copy.deepcopy(module)
    # the Linear inside an attention layer (its out_proj) is not called by it: it stays as it is
    targets = [(n, m) for n, m in root.named_modules()
               if isinstance(m, layers) and n != "" and not kept(n)]
    if isinstance(root, layers):
        targets.insert(0, ("", root))
    if not targets:
        raise SpecError("convert: the module has no Linear or Conv2d layer to make plastic")
    # a module used at several places (a tied layer) becomes one synapse at all of them
    places: dict[int, list[str]] = {}
    for n, m in root.named_modules(remove_duplicate=False):
        if n and isinstance(m, (nn.Linear, nn.Conv2d, Synapse)) and not kept(n):
            places.setdefault(id(m), []).append(n)
    exact = [f"{n or '(root)'} ({type(m).__name__})" for n, m in root.named_modules()
             if isinstance(m, _UNCONVERTED)]
    if exact:
        warnings.warn(f"convert: {', '.join(exact)} carry weights that plastic has no feedback "
                      "synapse for (it converts Linear and Conv2d); their error still passes by "
                      "exact backprop, whatever the feedback kind", stacklevel=2)
    # a feedback table names synapses as the circuit does (a time-stepped circuit's "1", not
    # "circuit.1"), as the results do
    cnames = {n: circuit_name(module, n) for n, _ in targets}
    kinds = {n: resolve_kind(cnames[n], feedback) for n, _ in targets}
    names = [n for n, _ in targets]
    if isinstance(feedback, Mapping) and not is_rule(feedback):
        shown = list(cnames.values())
        unused = [k for k in feedback
                  if k not in shown and not any(fnmatch.fnmatchcase(n, k) for n in shown)]
        if unused:  # a misspelt synapse name would otherwise leave that synapse on '*'
            raise SpecError(f"feedback entries {unused} match no synapse; synapses: {shown}")
        # a pattern that matches only synapses named exactly is a harmless fallback ('*')
        shadowed = [k for k in feedback if k not in shown and not any(
            _deciding_pattern(n, feedback) == k for n in shown) and any(
            fnmatch.fnmatchcase(n, k) and n not in feedback for n in shown)]
        if shadowed:  # a pattern after "*" matches synapses that "*" has already taken
            raise SpecError(f"feedback entries {shadowed} apply to no synapse: an earlier pattern "
                            "takes every synapse they match (patterns apply in order; put "
                            "'*' last)")
    if options and not any(is_learned(k) for k in kinds.values()):
        raise SpecError(f"feedback options {sorted(options)} apply to learned feedback only; "
                        "no synapse here learns its feedback")
    if output is None:
        output = names[-1]
    elif output not in names and output in cnames.values():
        output = next(n for n, c in cnames.items() if c == output)
    elif output not in names:
        raise SpecError(f"convert: output synapse {output!r} not found; synapses: {names}")
    hub = None
    if any(k == "dfa" for k in kinds.values()):
        hub = DirectFeedbackHub()
        out_m = dict(targets)[output]
        if isinstance(out_m, (nn.Linear, Dense)):
            hub.n_outputs = out_m.out_features
            hub.output_name = circuit_name(module, output)
        else:
            raise SpecError("dfa: the output synapse must be dense (Linear)")
    # every feedback synapse first, so a refusal (a bad option) leaves an in-place module as it
    # was, not converted up to the synapse refused
    feedbacks = {}
    learned_of: dict[int, str] = {}  # a shared W's learned feedback: one B for all its modules
    for name, m in targets:
        first = learned_of.setdefault(id(m.weight), name) if is_learned(kinds[name]) else name
        if first != name and _same_kind(kinds[first], kinds[name]):
            # two modules sharing W (tied by assignment) share its learned B, so B learns
            # from W's whole update (Kolen-Pollack's B.grad was each module's share alone)
            feedbacks[name] = feedbacks[first]
            continue
        s = _seed_for(seed, circuit_name(module, name))
        try:
            feedbacks[name] = make_feedback(
                kinds[name], m.weight, generator=torch.Generator().manual_seed(s), hub=hub,
                seed=s, options=dict(options) if options and is_learned(kinds[name]) else None)
        except SpecError as e:
            raise SpecError(f"convert: {cnames[name] or '(root)'}: {e}") from None
    new_root = None
    for name, m in targets:
        if isinstance(m, Synapse):
            syn = m.set_feedback(feedbacks[name])
        elif isinstance(m, nn.Linear):
            syn = Dense.from_module(m, feedbacks[name])
        else:
            syn = Conv2d.from_module(m, feedbacks[name])
        syn.name, syn.is_output, syn.hub = name, name == output, hub
        if name == "":
            new_root = syn
        elif syn is not m:
            for place in places.get(id(m), [name]):
                parent_name, _, attr = place.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, attr, syn)
    return new_root if new_root is not None else root


def _same_kind(a, b) -> bool:
    """Two feedback specs of one kind (names in any spelling, or equal rules)."""
    from .feedback import canonical_kind
    return (canonical_kind(a) == canonical_kind(b)) if isinstance(a, str) and isinstance(b, str) \
        else a == b


def _deciding_pattern(name: str, feedback: Mapping) -> str | None:
    """The entry of ``feedback`` that gives synapse ``name`` its kind (``resolve_kind``)."""
    if name in feedback:
        return name
    return next((p for p in feedback if fnmatch.fnmatchcase(name, p)), None)


def _check_convertible(name: str, m: nn.Module) -> None:
    """What convert cannot carry over is an error or a warning, not silently lost."""
    from torch.nn.utils import parametrize
    if isinstance(m, Synapse):
        return
    if isinstance(getattr(m, "weight", None), nn.parameter.UninitializedParameter):
        raise SpecError(f"convert: {name} ({type(m).__name__}) is lazy and has no weights yet; "
                        "run one forward pass before converting")
    hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
    norms = [type(h).__name__ for h in hooks
             if type(h).__name__ in ("WeightNorm", "SpectralNorm") or hasattr(h, "compute_mask")]
    if parametrize.is_parametrized(m) or norms:
        raise SpecError(f"convert: {name} ({type(m).__name__}) has a weight parametrization "
                        f"({', '.join(norms) or 'torch.nn.utils.parametrize'}: weight_norm, "
                        "spectral_norm, pruning, ...) that its plastic synapse would drop; "
                        "remove it (prune.remove), or apply it to the converted synapse")
    base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
    own = sorted({k for k, _ in m.named_parameters(recurse=False)} - {"weight", "bias"}
                 | {k for k, _ in m.named_buffers(recurse=False)})
    # nn.Conv2d.forward calls _conv_forward, the method a weight-standardised conv overrides
    own_forward = type(m).forward is not base.forward or (
        base is nn.Conv2d and type(m)._conv_forward is not nn.Conv2d._conv_forward)
    if own_forward or own:
        raise SpecError(f"convert: {name} is a {type(m).__name__}, a {base.__name__} with "
                        + ("its own forward" if own_forward
                           else f"its own parameters or buffers ({', '.join(own)})")
                        + f"; its plastic synapse would compute a plain {base.__name__}'s "
                        "output, so it is not converted (use a plain layer, or plastic's "
                        "synapses and a feedback synapse of your own)")
    if m.weight.is_complex():  # the routed error and dW would lack torch's conjugates
        raise SpecError(f"convert: {name} ({type(m).__name__}) has complex weights; plastic's "
                        "synapses are real")
    if base is nn.Conv2d:  # refused here, before the copy, not halfway through the swap
        try:
            _check_padding_mode(m.padding_mode)
            _conv_padding(m.padding, m.kernel_size, m.stride, m.dilation)
        except SpecError as e:
            raise SpecError(f"convert: {name}: {e}") from None
    if hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        warnings.warn(f"convert: the hooks registered on {name} ({type(m).__name__}) are not "
                      "carried over to its plastic synapse; register them on the converted "
                      "model", stacklevel=3)

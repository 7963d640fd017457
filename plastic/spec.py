"""Protocol and circuit specs (TOML): loading, ``--set`` overrides, defaults and validation.

A protocol names the data, the circuit, the optimizer and schedule, the seeds, and its arms: the
learning rules to compare on one circuit with the same initial weights and data order.  Every key
is checked against the schema below, so a typo is an error, never a silently ignored setting.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import SpecError, suggest

ROOT = Path(__file__).resolve().parent.parent
CIRCUITS_DIR = ROOT / "circuits"
PROTOCOLS_DIR = ROOT / "protocols"

ANY = object()
NUM = (int, float)

#: the protocol schema: key -> (type, default).  Nested dicts are tables.
PROTOCOL_SCHEMA: dict[str, Any] = {
    "name": (str, "protocol"),
    "description": (str, ""),
    "data": (str, "mnist-sample"),
    "train_limit": (int, 0),
    "test_limit": (int, 0),
    "circuit": (ANY, "mlp"),
    "seeds": (list, [0]),
    "epochs": (int, 1),
    "batch_size": (int, 128),
    "test_batch_size": (int, 1000),
    "probe_size": (int, 1000),
    "device": (str, "cpu"),
    "threads": (int, 0),
    # "channels_last" stores conv weights (and so activity) as NHWC: faster convs on CPU (oneDNN)
    # and on tensor-core GPUs; numerically the same rules, up to float rounding
    "memory_format": (str, "contiguous"),
    "feedback": (ANY, "transpose"),
    "optimizer": {
        "name": (str, "sgd"),
        "lr": (NUM, 0.05),
        "momentum": (NUM, 0.9),
        "nesterov": (bool, True),
        "weight_decay": (NUM, 0.0),
    },
    "schedule": {
        "name": (str, "onecycle"),
        "pct_start": (NUM, 0.25),
        "div_factor": (NUM, 25.0),
        "final_div_factor": (NUM, 1e3),
    },
    "loss": {
        "label_smoothing": (NUM, 0.0),
    },
    "sleep": {  # sleep phases for noise-driven feedback learning (weight mirror)
        "every": (int, 0),       # wake batches between sleep phases; 0: no sleep phases
        "batches": (int, 1),     # noise batches per sleep phase
        "batch_size": (int, 64),
    },
    "augment": {
        "shift": (int, 0),
        "flip": (bool, False),
    },
    "time": {  # time-stepped simulation (circuits with spiking populations)
        "steps": (int, 25),
        "dt": (NUM, 1e-3),
        "encoder": (str, "constant"),  # constant current, poisson or latency
        "input_scale": (NUM, 0.0),     # current of one input spike / unit input; 0: the encoder's
        "f_max": (NUM, 100.0),         # Poisson: rate at intensity 1 (Hz)
    },
    "record": {  # recorders: a fixed probe of test samples, at every epoch's end
        "samples": (int, 0),      # 0: record nothing
        "every": (int, 1),        # keep every k-th time step
        "voltages": (bool, True),
        "weights": (bool, False),
    },
    "arms": (dict, {}),
}

#: an arm's training settings, which a conversion arm (convert_from) does not read
TRAINING_SETTINGS = ("lr", "weight_decay", "feedback", "feedback_options", "learning")
ARM_KEYS = {"feedback": ANY, "feedback_options": dict, "lr": NUM, "weight_decay": NUM,
            "output": str, "description": str, "population": str, "convert_from": str,
            "learning": str}
LEARNING = ("backprop", "online")  # how a spiking arm's error reaches its synapses in time

CIRCUIT_SCHEMA: dict[str, Any] = {
    "name": (str, ""),
    "description": (str, ""),
    "kind": (str, "mlp"),
    "input_shape": (list, []),
    "outputs": (int, 0),
    "population": (str, "relu"),
    "hidden": (list, [1000]),
    "channels": (list, [32, 64, 128]),
    "blocks": (list, [1, 1, 1]),  # resnet: basic blocks per stage (channels gives the widths)
    "batch_norm": (bool, True),
    "output_scale": (NUM, 1.0),
    "stem": (str, "cifar"),
    # resnet kinds: "A" (zero-padded identity) or "B" (1x1-conv projection) where the shape
    # changes; "" is the kind's own: A for resnet20 (He et al. 2016, Sec. 4.2), B otherwise
    "shortcut": (str, ""),
    "units_per_class": (int, 1),  # population-coded readout: each output read from k units
    # biological constraints (plastic.constraints); time-stepped circuits only for delay
    "excitatory": (NUM, 0.0),     # Dale's law: fraction of excitatory neurons (0: unconstrained)
    "connectivity": (NUM, 1.0),   # density of a fixed random sparse connectivity mask
    "delay": (int, 0),            # synaptic delay, whole steps, of every synapse after the first
    # parameters of spiking populations (fields of plastic.spiking's parameter tuples, e.g.
    # alpha (surrogate sharpness), tau_mem_inv, v_th); rate populations ignore it
    "population_params": (dict, {}),
}
CIRCUIT_KINDS = ("mlp", "convnet", "resnet", "resnet18", "resnet20")
# the keys each kind reads beyond the ones every kind reads; a key that the kind would ignore,
# given with a value other than its default, is an error rather than a silently different circuit
_EVERY_KIND = {"name", "description", "kind", "input_shape", "outputs", "population",
               "output_scale", "units_per_class", "excitatory", "connectivity", "delay",
               "population_params"}
CIRCUIT_KIND_KEYS = {"mlp": {"hidden"}, "convnet": {"channels", "batch_norm"},
                     "resnet": {"channels", "blocks", "stem", "shortcut"},
                     "resnet18": {"stem", "shortcut"}, "resnet20": {"shortcut"}}
OPTIMIZERS = ("sgd", "adam", "adamw")
MEMORY_FORMATS = ("contiguous", "channels_last")
SCHEDULES = ("constant", "onecycle", "cosine")


# numeric settings outside their range: one-line errors here, not tracebacks from torch later
_RANGES = [
    ("train_limit", lambda v: v >= 0, ">= 0 (0: all)"),
    ("test_limit", lambda v: v >= 0, ">= 0 (0: all)"),
    ("probe_size", lambda v: v >= 0, ">= 0 (0: no update angles or rule values)"),
    ("threads", lambda v: 0 <= v <= 4096, "in [0, 4096] (0: torch's default)"),
    ("optimizer.lr", lambda v: v >= 0, ">= 0"),
    ("optimizer.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("schedule.pct_start", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("schedule.div_factor", lambda v: v > 0, "> 0"),
    ("schedule.final_div_factor", lambda v: v > 0, "> 0"),
    ("loss.label_smoothing", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("sleep.every", lambda v: v >= 0, ">= 0 (0: no sleep phases)"),
    ("sleep.batches", lambda v: v >= 1, ">= 1"),
    ("sleep.batch_size", lambda v: v >= 1, ">= 1"),
    ("augment.shift", lambda v: v >= 0, ">= 0"),
    ("record.samples", lambda v: v >= 0, ">= 0"),
    ("record.every", lambda v: v >= 1, ">= 1"),
    ("time.f_max", lambda v: v > 0, "> 0 (Hz)"),
    ("time.input_scale", lambda v: v >= 0, ">= 0 (0: the encoder's default)"),
]


# the optimizer and schedule settings each name reads (weight_decay and lr: every optimizer)
_READ_BY = {"optimizer": {"sgd": {"momentum", "nesterov"}, "adam": set(), "adamw": set()},
            "schedule": {"onecycle": {"pct_start", "div_factor", "final_div_factor"},
                         "constant": set(), "cosine": set()}}


def _warn_unread(spec: dict) -> None:
    """A setting that the chosen optimizer or schedule does not read, given with a value other
    than its default, is reported rather than silently ignored (a warning, not an error, so that
    ``--set schedule.name=cosine`` still works on a protocol that tunes the one-cycle warm-up)."""
    for table, by_name in _READ_BY.items():
        name = spec[table]["name"]
        read = by_name[name]
        unread = [f"{table}.{k} = {spec[table][k]!r}" for k in sorted(set().union(*by_name.values()))
                  if k not in read and spec[table][k] != PROTOCOL_SCHEMA[table][k][1]]
        if unread:
            warnings.warn(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read by "
                          f"the {name!r} {table}, so {'it has' if len(unread) == 1 else 'they have'}"
                          " no effect", UserWarning, stacklevel=2)


def _warn_unreached(spec: dict, sets: list[str]) -> None:
    """``--set optimizer.lr=...`` does not reach the arms that set their own lr (nor
    weight_decay theirs): said, since it reads as if it set every arm's."""
    arms = spec["arms"] if isinstance(spec["arms"], dict) else {}
    for key in ("lr", "weight_decay"):
        given = any(k.strip() == f"optimizer.{key}" or (k.strip() == "optimizer" and isinstance(
            parse_value(v.strip()), dict) and key in parse_value(v.strip()))
            for k, _, v in (s.partition("=") for s in sets))
        own = [n for n, a in arms.items() if isinstance(a, dict) and key in a]
        if given and own:
            warnings.warn(f"--set optimizer.{key} does not reach arm(s) {', '.join(own)}, which "
                          f"set their own (--set arms.NAME.{key}=...)", UserWarning, stacklevel=3)


def _check_device(name: str) -> None:
    """The device must exist here: a one-line error before anything is written, not torch's
    assertion at the first .to(device)."""
    import torch
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SpecError(f"device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") \
            from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise SpecError(f"device {name!r} is not available on this machine ({n} CUDA "
                            f"device(s) visible to torch {torch.__version__}); use device=\"cpu\"")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SpecError(f"device {name!r} is not available on this machine; use device=\"cpu\"")
    elif dev.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: a traceback after epoch 0
        raise SpecError(f"device {name!r}: plastic runs on cpu, cuda or mps")


def _get(spec: dict, dotted: str):
    for key in dotted.split("."):
        spec = spec[key]
    return spec


NOT_A_CHECKOUT = ("plastic's protocols/, circuits/ and data/ folders are not beside the installed "
                  "package (a non-editable install); install from a checkout with "
                  "'pip install -e .'")


def read_toml(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.exists():
        if path.parent in (PROTOCOLS_DIR, CIRCUITS_DIR) and not path.parent.is_dir():
            raise SpecError(f"{what} file not found: {path}; {NOT_A_CHECKOUT}, or name a "
                            f"{what} file")
        raise SpecError(f"{what} file not found: {path}")
    if not path.is_file():
        raise SpecError(f"{path} is a directory, not a {what} file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file") from None


def parse_value(text: str):
    """A --set value: any TOML value (numbers, booleans, arrays, quoted strings), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def arm_population(spec: dict, arm: dict) -> str:
    """The population an arm runs: its own, else lif for a conversion arm, else the circuit's."""
    if arm.get("population"):
        return str(arm["population"]).lower()
    return "lif" if arm.get("convert_from") else str(spec["circuit"]["population"]).lower()


def _spiking(spec: dict) -> bool:
    """Whether the circuit or any arm has a spiking population (is simulated in time)."""
    from .spiking import SPIKING_KINDS
    arms = [a for a in (spec.get("arms") or {}).values() if isinstance(a, dict)]
    pops = [str(spec["circuit"]["population"]).lower()] + [arm_population(spec, a) for a in arms]
    return any(p in SPIKING_KINDS for p in pops)


def implicit_arm(feedback) -> str:
    """The name of the one arm of a protocol without arms: its feedback kind (bp for backprop,
    whatever the spelling), or "arm" for a rule given as a table."""
    from .feedback import canonical_kind
    if not isinstance(feedback, str):
        return "arm"
    return "bp" if canonical_kind(feedback) == "transpose" else feedback.lower()


def apply_sets(spec: dict, sets: list[str]) -> dict:
    """Apply ``key=value`` overrides; dotted keys reach into tables (``optimizer.lr=0.1``)."""
    spec = copy.deepcopy(spec)
    on_arms = [i for i in sets or [] if i.partition("=")[0].strip().split(".")[0] == "arms"]
    if on_arms and not spec.get("arms"):
        # the implicit arm (named by the top-level feedback, as the other --set leave it) made
        # explicit: arms.NAME.lr reaches it, and a new arm is added beside it, not instead
        rest = apply_sets(spec, [i for i in sets if i not in on_arms])
        spec["arms"] = {implicit_arm(rest.get("feedback", PROTOCOL_SCHEMA["feedback"][1])): {}}
    existing = set(spec["arms"]) if isinstance(spec.get("arms"), dict) else set()
    new_arms: dict[str, list[str]] = {}  # a new arm's keys, and the --set key that began it
    typed: dict[str, str] = {}
    for item in sets or []:
        if "=" not in item:
            split = " (the rest of a value split by the shell at a space? quote the whole " \
                "item: --set 'KEY=[a, b]')" if item.rstrip().endswith(("]", "}")) else ""
            raise SpecError(f"--set expects key=value, got {item!r}{split}")
        key, _, value = item.partition("=")
        text = value.strip()
        if text[:1] in ("[", "{") and isinstance(parse_value(text), str):
            # not TOML, though it opens like an array or table: cut short (the shell split it
            # at a space), or closed but malformed; one that only starts with a bracket,
            # "[draft] run", is a string
            if text.count("[") > text.count("]") or text.count("{") > text.count("}"):
                raise SpecError(f"--set {item!r}: {text!r} is an array or table cut short; if "
                                "the shell split it at a space, quote the whole item: "
                                f"--set '{key.strip()}={text} ...'")
            if text[-1] == {"[": "]", "{": "}"}[text[0]]:
                raise SpecError(f"--set {item!r}: {text!r} is not a valid TOML array or table "
                                "(commas between items, strings in quotes)")
        parts = key.strip().split(".")
        if not all(parts):
            raise SpecError(f"--set: bad key {key!r}")
        v = parse_value(value.strip())
        if parts[0] == "arms":  # the arms this item adds, and the settings it gives them
            given = {parts[1]: [parts[2]]} if len(parts) >= 3 else \
                {parts[1]: list(v) if isinstance(v, dict) else []} if len(parts) == 2 else \
                {n: list(t) if isinstance(t, dict) else [] for n, t in v.items()} \
                if isinstance(v, dict) else {}
            for n, keys in given.items():
                if n not in existing:
                    new_arms.setdefault(n, []).extend(keys)
                    typed.setdefault(n, key.strip())
        d = spec
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise SpecError(f"--set {key}: {p!r} is not a table")
        # a table given to a table of settings (optimizer={lr=0.3}, arms.fa={lr=0.1}) sets
        # those settings, as their dotted keys would: replacing it dropped the others (fa
        # trained backprop, mnist lost its weight decay); a rule, a circuit, options replace
        settings = (len(parts) == 1 and isinstance(PROTOCOL_SCHEMA.get(parts[0]), dict)) or (
            len(parts) == 2 and parts[0] == "arms")
        if settings and isinstance(v, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]] = {**d[parts[-1]], **v}
        elif parts == ["arms"] and isinstance(v, dict) and isinstance(d.get("arms"), dict):
            old = d["arms"]  # arms={fa={lr=0.1}}: each arm's table set as arms.fa={...} would
            d["arms"] = {**old, **{n: {**old[n], **t} if isinstance(old.get(n), dict)
                                   and isinstance(t, dict) else t for n, t in v.items()}}
        else:
            d[parts[-1]] = v
    for name, keys in new_arms.items():
        # a misspelt arm name would otherwise add an arm, and leave the intended one unchanged
        if "feedback" not in keys and "convert_from" not in keys:
            raise SpecError(f"--set {typed[name]}: the protocol has no arm {name!r}"
                            f"{suggest(name, existing) if existing else ''}; a new arm needs "
                            f"its feedback too (--set arms.{name}.feedback=...)")
    return spec


def _check_type(where, value, typ):
    if typ is ANY:
        return
    if typ is NUM:
        ok = isinstance(value, NUM) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise SpecError(f"{where} must be a finite number, got {value!r}")
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    if not ok:
        names = {NUM: "a number", int: "an integer", str: "a string", bool: "true or false",
                 list: "a list", dict: "a table"}
        name = names[typ] if typ in names else getattr(typ, "__name__", str(typ))
        raise SpecError(f"{where} must be {name}, got {value!r}")


def _fill(spec: dict, schema: dict, where: str) -> dict:
    out = {}
    for key in spec:
        if key not in schema:
            raise SpecError(f"unknown key {where}{key!r}{suggest(key, schema)}")
    for key, sub in schema.items():
        if isinstance(sub, dict):
            v = spec.get(key, {})
            if not isinstance(v, dict):
                raise SpecError(f"{where}{key} must be a table")
            out[key] = _fill(v, sub, f"{where}{key}.")
        else:
            typ, default = sub
            if key in spec:
                _check_type(f"{where}{key}", spec[key], typ)
                out[key] = copy.deepcopy(spec[key])
            else:
                out[key] = copy.deepcopy(default)
    return out


def _circuit_table(circuit: str) -> dict:
    p = Path(circuit)
    if p.suffix != ".toml":
        p = CIRCUITS_DIR / f"{circuit}.toml"
        if not CIRCUITS_DIR.is_dir():
            raise SpecError(f"circuit {circuit!r}: {NOT_A_CHECKOUT}, or give the circuit as a "
                            "table or a file")
        if not p.exists():
            known = sorted(q.stem for q in CIRCUITS_DIR.glob("*.toml"))
            raise SpecError(f"unknown circuit {circuit!r}; known: {', '.join(known)}")
    raw = read_toml(p, "circuit")
    raw.setdefault("name", p.stem)
    return raw


def resolve_circuit(circuit) -> dict:
    """A circuit spec: an inline table, a name in circuits/, or a path to a TOML file."""
    if isinstance(circuit, str):
        raw = _circuit_table(circuit)
    elif isinstance(circuit, dict):
        raw = circuit
    else:
        raise SpecError(f"circuit must be a name, a path or a table, got {circuit!r}")
    c = _fill(raw, CIRCUIT_SCHEMA, "circuit.")
    if c["kind"] not in CIRCUIT_KINDS:
        raise SpecError(f"unknown circuit kind {c['kind']!r}; known: {', '.join(CIRCUIT_KINDS)}")
    own = CIRCUIT_KIND_KEYS[c["kind"]]
    ignored = [k for k in CIRCUIT_SCHEMA
               if k not in _EVERY_KIND | own and c[k] != CIRCUIT_SCHEMA[k][1]]
    if ignored:
        shown = sorted(own | {"output_scale", "units_per_class"})
        raise SpecError(f"circuit kind {c['kind']!r} has no setting {', '.join(ignored)}; it reads "
                        f"{', '.join(shown)} and the population and constraint settings")
    for key in ("hidden", "channels", "blocks", "input_shape"):  # true is an int to Python
        if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in c[key]):
            raise SpecError(f"circuit.{key} must be a list of positive integers, got {c[key]}")
    c["population"] = c["population"].lower()  # as it is read: LIF and lif are one circuit
    if c["units_per_class"] < 1:
        raise SpecError(f"circuit.units_per_class must be at least 1, got {c['units_per_class']}")
    if not c["output_scale"] > 0:  # 0 would zero the logits, and nothing would learn
        raise SpecError(f"circuit.output_scale must be > 0, got {c['output_scale']}")
    if "shortcut" in own:  # recorded as the circuit it builds, not as "the kind's own"
        if c["shortcut"] not in ("", "A", "B"):
            raise SpecError(f"circuit.shortcut must be \"A\" (zero padding) or \"B\" (1x1-conv "
                            f"projection), got {c['shortcut']!r}")
        c["shortcut"] = c["shortcut"] or ("A" if c["kind"] == "resnet20" else "B")
    if c["kind"] == "resnet" and not c["channels"]:
        raise SpecError("circuit.channels of a resnet must list at least one stage")
    if c["kind"] == "resnet" and len(c["blocks"]) != len(c["channels"]):
        raise SpecError(f"circuit.blocks ({c['blocks']}) needs one entry per stage of "
                        f"circuit.channels ({c['channels']})")
    return c


def resolve_protocol(raw: dict, sets: list[str] | None = None, warn: bool = True) -> dict:
    """Defaults, overrides and validation: the fully resolved spec recorded with the results.
    ``warn``: report settings that have no effect (off when a recorded spec is re-read)."""

    raw, sets = dict(raw), list(sets or [])
    # a whole circuit (circuit=NAME or a table) first, then its settings (circuit.KEY=...) on
    # it, in whichever order they were given: a named circuit is read into a table for them
    whole = [s for s in sets if s.split("=", 1)[0].strip() == "circuit"]
    sets = [s for s in sets if s not in whole]
    raw = apply_sets(raw, whole) if whole else raw
    if any(s.split("=", 1)[0].strip().startswith("circuit.") for s in sets) \
            and isinstance(raw.get("circuit", PROTOCOL_SCHEMA["circuit"][1]), str):
        raw["circuit"] = _circuit_table(raw.get("circuit", PROTOCOL_SCHEMA["circuit"][1]))
    spec = _fill(apply_sets(raw, sets), PROTOCOL_SCHEMA, "")
    spec["circuit"] = resolve_circuit(spec["circuit"])
    if not spec["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool)
                                    and 0 <= s < 2**63 for s in spec["seeds"]):
        raise SpecError(f"seeds must be a non-empty list of integers in [0, 2^63), got "
                        f"{spec['seeds']}")
    if len(set(spec["seeds"])) != len(spec["seeds"]):
        raise SpecError(f"seeds lists a seed twice: {spec['seeds']}")
    for key in ("epochs", "batch_size", "test_batch_size"):
        if spec[key] < 1:
            raise SpecError(f"{key} must be at least 1, got {spec[key]}")
    # names of things are read as lower case, as populations are ("SGD", "Poisson")
    for table, key in ((spec, "memory_format"), (spec["optimizer"], "name"),
                       (spec["schedule"], "name"), (spec["time"], "encoder")):
        if isinstance(table.get(key), str):
            table[key] = table[key].lower()
    if spec["memory_format"] not in MEMORY_FORMATS:
        raise SpecError(f"unknown memory_format {spec['memory_format']!r}; known: "
                        f"{', '.join(MEMORY_FORMATS)}")
    _check_device(spec["device"])
    if spec["optimizer"]["name"] not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {spec['optimizer']['name']!r}; known: {', '.join(OPTIMIZERS)}")
    if spec["time"]["steps"] < 1 or spec["time"]["dt"] <= 0:
        raise SpecError(f"time.steps must be >= 1 and time.dt > 0, got {spec['time']}")
    if spec["time"]["encoder"] == "poisson" and spec["time"]["f_max"] * spec["time"]["dt"] > 1:
        raise SpecError(f"time.f_max · time.dt is the spike probability per step and must be "
                        f"<= 1, got {spec['time']['f_max']} Hz · {spec['time']['dt']} s (above 1 "
                        "every input rate saturates at 1/dt)")
    c = spec["circuit"]
    if not 0 <= c["excitatory"] <= 1 or not 0 < c["connectivity"] <= 1 or c["delay"] < 0:
        raise SpecError("circuit.excitatory must be in [0, 1], circuit.connectivity in (0, 1] and "
                        f"circuit.delay >= 0; got {c['excitatory']}, {c['connectivity']}, {c['delay']}")
    if spec["schedule"]["name"] not in SCHEDULES:
        raise SpecError(f"unknown schedule {spec['schedule']['name']!r}; known: {', '.join(SCHEDULES)}")
    for where, ok, what in _RANGES:
        value = _get(spec, where)
        if not ok(value):
            raise SpecError(f"{where} must be {what}, got {value!r}")
    every, steps = spec["record"]["every"], spec["time"]["steps"]
    if spec["record"]["samples"] and steps > 1 and every >= steps and _spiking(spec):
        # only step 0, before any input has arrived, would be kept (rate circuits ignore it)
        raise SpecError(f"record.every = {every} keeps every {every}th of {steps} time steps: "
                        "only the first; take record.every < time.steps")
    if warn:
        _warn_unread(spec)
        _warn_unreached(spec, sets)
    _check_feedback("feedback", spec["feedback"])
    # no arms: one arm of the top-level feedback (bp by default)
    default = spec["feedback"]
    # named by the kind, whatever its spelling: "backprop" and "transpose" are both arm bp (a
    # resume under the other spelling started a second arm of the same experiment)
    arms = spec["arms"] or {implicit_arm(default): {}}
    if (spec["arms"] and default != PROTOCOL_SCHEMA["feedback"][1] and warn
            and all(isinstance(a, dict) and "feedback" in a for a in arms.values())):
        warnings.warn(f"feedback = {spec['feedback']!r} is not read: every arm sets its own "
                      "(set arms.NAME.feedback)", UserWarning, stacklevel=2)
    resolved = {}
    for name, arm in arms.items():
        if not name.strip() or name in (".", "..") or "/" in name or "\x00" in name:
            # the results file keeps each arm in an HDF5 group of its name
            raise SpecError(f"arm name {name!r} cannot name a group of the results file: use a "
                            "name with a visible character, without '/' or NUL (and not '.' or "
                            "'..')")
        if not isinstance(arm, dict):
            raise SpecError(f"arms.{name} must be a table")
        for key in arm:
            if key not in ARM_KEYS:
                raise SpecError(f"unknown key arms.{name}.{key!r}{suggest(key, ARM_KEYS)}")
            _check_type(f"arms.{name}.{key}", arm[key], ARM_KEYS[key])
        a = {"feedback": arm.get("feedback", spec["feedback"]),
             "lr": arm.get("lr", spec["optimizer"]["lr"]),
             "weight_decay": arm.get("weight_decay", spec["optimizer"]["weight_decay"]),
             "output": arm.get("output", ""),
             "feedback_options": arm.get("feedback_options", {}),
             "description": arm.get("description", ""),
             "population": arm.get("population", "").lower(),
             "convert_from": arm.get("convert_from", ""),
             "learning": arm.get("learning", "backprop")}
        for key in ("lr", "weight_decay"):
            if a[key] < 0:
                raise SpecError(f"arms.{name}.{key} must be >= 0, got {a[key]!r}")
            if a[key] > 3.4028234663852886e38:  # beyond float32: torch's overflow error
                raise SpecError(f"arms.{name}.{key} must be a float32 number, got {a[key]!r}")
        if a["learning"] not in LEARNING:
            raise SpecError(f"arms.{name}.learning must be one of {', '.join(LEARNING)}, "
                            f"got {a['learning']!r}")
        if a["convert_from"]:
            if a["convert_from"] not in arms:
                raise SpecError(f"arms.{name}.convert_from names unknown arm {a['convert_from']!r}")
            if list(arms).index(a["convert_from"]) >= list(arms).index(name):
                raise SpecError(f"arms.{name}.convert_from must name an earlier arm")
            source = arms[a["convert_from"]]
            if source.get("convert_from"):  # a converted arm trains nothing, writes no weights
                raise SpecError(f"arms.{name}.convert_from names {a['convert_from']!r}, itself a "
                                "converted arm; name the rate arm it converts")
            # a trained arm's settings, and their defaults: given otherwise, no effect, silently
            unread = dict(zip(TRAINING_SETTINGS, (
                spec["optimizer"]["lr"], spec["optimizer"]["weight_decay"], spec["feedback"], {},
                "backprop")))
            from .feedback import canonical_kind

            def kind(f):  # bp, backprop and transpose are one kind
                return canonical_kind(f) if isinstance(f, str) else f
            trained = [k for k in unread if k in arm and arm[k] != unread[k] and not (
                k == "feedback" and kind(arm[k]) in (kind(unread[k]),
                                                     kind(source.get("feedback", unread[k]))))]
            if trained:
                raise SpecError(f"arms.{name} runs the weights trained by arm "
                                f"{a['convert_from']!r} and trains nothing: it does not read "
                                f"{', '.join(trained)} (leave {'it' if len(trained) == 1 else 'them'}"
                                " out)")
        _check_feedback(f"arms.{name}.feedback", a["feedback"])
        resolved[name] = a
    spec["arms"] = resolved
    return spec


def _check_feedback(where: str, fb) -> None:
    """A feedback setting is a kind, a rule, or a table of synapse patterns to those."""
    from .feedback import FEEDBACK_KINDS, check_meant_as_rule, is_rule
    from .rules import parse_rule
    check_meant_as_rule(where, fb)
    kinds = [fb] if isinstance(fb, str) or is_rule(fb) else list(fb.values()) \
        if isinstance(fb, dict) else None
    for synapse, k in (fb.items() if isinstance(fb, dict) and not is_rule(fb) else ()):
        check_meant_as_rule(f"{where}.{synapse}", k)
    if kinds is None:
        raise SpecError(f"{where} must be a kind, a rule or a table of kinds")
    for k in kinds:
        if is_rule(k):
            try:
                parse_rule(k)
            except SpecError as e:
                raise SpecError(f"{where}: {e}") from None
        elif not isinstance(k, str) or k.lower() not in FEEDBACK_KINDS:
            raise SpecError(f"unknown rule {k!r} in {where}; known: "
                            f"{', '.join(sorted(FEEDBACK_KINDS))}")


def load_protocol(path: str | Path | None, sets: list[str] | None = None) -> dict:
    if path is None:
        path = PROTOCOLS_DIR / "quickstart.toml"
    p = Path(path)
    # a bare name is a built-in protocol unless a file of that name is here (a directory of
    # that name, e.g. a run's --out, is not a protocol); NAME.toml too, if no such file is here
    builtin = PROTOCOLS_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    bare = len(p.parts) == 1
    if bare and not p.is_file() and (p.suffix != ".toml" or not p.exists()) and builtin.exists():
        p = builtin
    elif not p.exists() and p.suffix != ".toml" and not PROTOCOLS_DIR.is_dir():
        raise SpecError(f"protocol {str(path)!r}: {NOT_A_CHECKOUT}, or name a protocol file")
    elif bare and not p.exists():
        known = sorted(q.stem for q in PROTOCOLS_DIR.glob("*.toml"))
        stem = p.stem if p.suffix == ".toml" else p.name
        raise SpecError(f"unknown protocol {str(path)!r}{suggest(stem, known)}; built in: "
                        f"{', '.join(known)} (or give the path of a protocol file)")
    raw = read_toml(p, "protocol")
    raw.setdefault("name", p.stem)
    # a circuit or data file named by a relative path is the one beside the protocol file if
    # there is one there (recorded as an absolute path, so a resume from another working
    # directory names the same file), else the one from the working directory (which --set
    # values are relative to)
    for key, suffixes in (("circuit", (".toml",)), ("data", (".h5", ".hdf5"))):
        v = raw.get(key)
        if (isinstance(v, str) and Path(v).suffix in suffixes and not Path(v).is_absolute()
                and (p.parent / v).is_file()):
            raw[key] = str((p.parent / v).resolve())
    return resolve_protocol(raw, sets)

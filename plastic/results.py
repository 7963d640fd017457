"""Results: one HDF5 file per run, figures, and the summary table.

Layout of ``DIR/results.h5``::

    attrs:  spec (JSON, fully resolved), seed (the first), seeds (JSON), versions (JSON),
            machine (JSON: cpu, cores, torch_threads, cpu_capability, cuda devices),
            resumed_on (JSON list of other machines, if a resume ran on one), command, created
    /arms/<arm>/             attrs: feedback (a kind name, or JSON for a rule or a per-synapse
                             table), feedback_options (JSON), lr, weight_decay, population,
                             learning, synapses (JSON), done_seeds (JSON), diverged_seeds
                             (JSON {seed: message}, if one diverged); a converted arm has
                             convert_from instead of the training ones, and each seed's
                             calibration in its row (conversion_gain, conversion_lambda/<l>)
    /arms/<arm>/metrics/     1-D float64 datasets of equal length, one row per (seed, epoch):
        seed, epoch, train_loss, test_loss, test_accuracy, lr, wall_time,
        angle/<synapse>         angle between feedback B and W^T (degrees)
        update_angle/<synapse>  angle between the rule's and backprop's hidden-layer update dL/dW
        signal_angle/<synapse>  angle between the rule's and backprop's error signal delta arriving
                                at the synapse's post population (Lillicrap et al. 2016)
        norm_ratio/<synapse>    ||B|| / ||W||
        rule/<primitive>/<synapse>  each learned-feedback primitive's value R on the probe batch
        firing_rate, synaptic_ops, decision_steps   inference statistics on the test set
    /arms/<arm>/recordings/seed<S>/epoch<E>/<population>/{spikes,voltages,rates}
                             what the protocol's [record] table asks for, on a fixed probe of
                             test samples: spikes (uint8, T' x samples x neurons...), voltages
                             (float32, same shape), rates (per neuron, mean over steps and
                             samples); /weights/<synapse> when record.weights is true
Epoch 0 is the untrained circuit.  Rows are written (and flushed) at the end of every epoch, so an
interrupted run keeps every finished epoch.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import ResultsError


def machine() -> dict:
    """The hardware a run computes on: float rounding in the CPU's kernels differs between CPUs
    (the same code and seed moved a 16-epoch CIFAR-10 arm by up to 0.9 points on another one),
    so a run is bit-reproducible on the machine it names."""
    import os

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    m = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        m["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    if torch.cuda.is_available():
        m["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return m


def versions() -> dict:
    import h5py
    import matplotlib
    import torch

    from . import __version__
    v = {"plastic": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "h5py": h5py.__version__, "matplotlib": matplotlib.__version__}
    from importlib.metadata import PackageNotFoundError, version
    try:
        v["norse"] = version("norse")
    except PackageNotFoundError:
        pass
    return v


def results_path(d: str | Path) -> Path:
    """A run's results file: ``d`` itself when it names an HDF5 file (.h5 or .hdf5), else
    ``d/results.h5``."""
    d = Path(d)
    # a run directory named x.hdf5 (one could be, before .hdf5 files were read) stays one
    return d if d.suffix in (".h5", ".hdf5") and not d.is_dir() else d / "results.h5"


def check_run_dir(out: Path) -> None:
    """A run's ``--out`` is a directory (the run writes DIR/results.h5 and its figures there):
    an existing file, or a name of an HDF5 file, is refused."""
    out = Path(out)
    if out.is_file() or (out.suffix in (".h5", ".hdf5") and not out.is_dir()):
        raise ResultsError(f"--out takes a directory (the run writes DIR/results.h5 and its "
                           f"figures there), not a file: {out}")


EXECUTION_KEYS = ("device", "threads")  # where a run executes, not what it computes


def _resolved(spec: dict, like: dict | None = None) -> dict:
    """``spec`` resolved again, so keys added to the schema since it was written take their
    defaults; where it executes is taken from ``like`` (or the CPU), so a spec recorded on a GPU
    resolves here too."""
    from .errors import SpecError
    from .spec import TRAINING_SETTINGS, resolve_protocol

    recorded = spec
    try:
        spec = {**spec, **({k: like[k] for k in EXECUTION_KEYS if k in like} if like
                           else {"device": "cpu"})}
        circuit = spec.get("circuit")
        if isinstance(circuit, dict) and circuit.get("kind") == "resnet20" \
                and "shortcut" not in circuit:  # recorded before resnet20 took option A
            spec["circuit"] = {**circuit, "shortcut": "B"}
        if isinstance(spec.get("arms"), dict):  # a conversion arm's training settings, which
            # it never read, recorded before they were refused: as the defaults they now take
            spec["arms"] = {n: {k: v for k, v in a.items() if k not in TRAINING_SETTINGS}
                            if isinstance(a, dict) and a.get("convert_from") else a
                            for n, a in spec["arms"].items()}
        return json.loads(json.dumps(resolve_protocol(spec, warn=False)))
    except SpecError:  # as recorded
        return json.loads(json.dumps(recorded))


def _canonical_feedback(fb):
    """A feedback setting with kind names in one spelling (``bp``, ``backprop`` and ``BP`` are
    ``transpose``), so a resumed arm is compared by what it computes, not how it was written."""
    from .feedback import canonical_kind, is_rule

    if isinstance(fb, str):
        return canonical_kind(fb)
    if isinstance(fb, dict) and not is_rule(fb):  # a table of synapse patterns to settings
        return {k: _canonical_feedback(v) for k, v in fb.items()}
    return fb


def _unread_settings(a: dict, b: dict) -> list[str]:
    """Dotted optimizer and schedule settings that neither spec's chosen optimizer or schedule
    reads (pct_start under a constant schedule): they do not make two experiments differ (a
    table given by --set kept the protocol's, recorded before as the defaults)."""
    from .spec import _READ_BY
    out = []
    for table, by_name in _READ_BY.items():
        ta, tb = a.get(table), b.get(table)
        if not (isinstance(ta, dict) and isinstance(tb, dict)):
            continue
        names = {ta.get("name"), tb.get("name")}
        if not names <= set(by_name):
            continue
        read = set().union(*(by_name[n] for n in names))
        out += [f"{table}.{k}" for k in set().union(*by_name.values()) - read]
    return out


def _differences(a: dict, b: dict, ignore=()) -> list[str]:
    """The dotted keys where two specs differ, arms, where they execute and ``ignore`` (dotted
    keys) aside."""
    skip = {"arms", *EXECUTION_KEYS, *ignore, *_unread_settings(a, b)}

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if f"{prefix}{k}" not in skip:
                    u, v = x.get(k), y.get(k)
                    if k == "feedback":
                        u, v = _canonical_feedback(u), _canonical_feedback(v)
                    yield from walk(u, v, f"{prefix}{k}.")
        elif x != y:
            yield prefix[:-1]
    return list(walk(a, b, ""))


def _spec_differences(old: dict, new: dict, ignore=()) -> list[str]:
    """The keys (dotted, arms excepted) where a recorded spec and a new, resolved one differ."""
    return _differences(_resolved(old, like=new), json.loads(json.dumps(new)), ignore)


class ResultsWriter:
    """Appends metric rows to ``DIR/results.h5``; every append is flushed to disk."""

    def __init__(self, out_dir: Path, spec: dict, resume: bool = False):
        import h5py

        self.dir = Path(out_dir)
        check_run_dir(self.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResultsError(f"cannot write results to {self.dir}: "
                               f"{e.strerror or e} ({e.filename})") from None
        self.path = results_path(self.dir)
        if resume and self.path.exists():
            with warnings.catch_warnings():  # a half-written row is reported below
                warnings.simplefilter("ignore")
                read(self.path)  # a damaged file: a one-line error before anything is written
            self.h5 = _open(self.path, "a")
            old = json.loads(self.h5.attrs["spec"])
            merged = dict(old)
            merged["arms"] = {**old.get("arms", {}), **spec["arms"]}
            # where the run executes is not part of the experiment: a run started on a GPU can
            # be resumed on a CPU, or with other threads; the spec records the latest
            merged.update({k: spec[k] for k in EXECUTION_KEYS if k in spec})
            # more seeds of the same experiment join the same file
            merged["seeds"] = list(dict.fromkeys([*old.get("seeds", []), *spec["seeds"]]))
            differ = _spec_differences(old, spec, ignore=("seeds",))
            # an arm recorded there must be the same arm (arms not yet there may join)
            was = _resolved(old, like=spec).get("arms", {})
            # both through _resolved: a conversion arm's unread settings compared as on either side
            now = _resolved(spec, like=spec).get("arms", {})
            differ += [f"arms.{a}.{k}" for a in sorted(set(was) & set(now))
                       for k in _differences(was[a], now[a], ignore=("description",))]
            if differ:
                self.h5.close()
                raise ResultsError(f"{self.path}: cannot resume, the spec differs from the one "
                                   f"recorded there ({', '.join(differ)}); use another --out")
            self.h5.attrs.update(spec=json.dumps(merged), seeds=json.dumps(merged["seeds"]))
            here = machine()
            if "machine" in self.h5.attrs and json.loads(self.h5.attrs["machine"]) != here:
                resumed = json.loads(self.h5.attrs.get("resumed_on", "[]"))
                if here not in resumed:  # the machines a resumed run also computed on
                    self.h5.attrs["resumed_on"] = json.dumps(resumed + [here])
            self._drop_half_written_rows()
        else:
            self.h5 = h5py.File(self.path, "w")
            self.h5.attrs.update(spec=json.dumps(spec), seeds=json.dumps(spec["seeds"]),
                                 seed=int(spec["seeds"][0]),
                                 versions=json.dumps(versions()), machine=json.dumps(machine()),
                                 command=" ".join(sys.argv),
                                 created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.h5.require_group("arms")
        self.h5.flush()

    def _drop_half_written_rows(self):
        """A run killed between the resizes of one row (SIGKILL, out of memory) leaves some
        metric datasets a row longer than others: cut them back to the complete rows before
        resuming (that epoch has no checkpoint, so it is trained again), with a warning.  A
        ``drop_rows`` cut between its two steps is completed first."""
        for arm, g in self.h5["arms"].items():
            if _SWAP in g:
                if "metrics" in g:  # the old columns are whole: the drop is redone on resume
                    del g[_SWAP]
                else:
                    g.move(_SWAP, "metrics")
            stored = dict(_datasets(g["metrics"])) if "metrics" in g else {}
            n = _complete_rows(stored)
            if any(len(ds) != n for ds in stored.values()):
                warnings.warn(f"{self.path}: arm {arm!r} has a half-written last row (the run "
                              f"was killed while writing it); dropping it and resuming from "
                              f"its {n} complete rows", stacklevel=2)
            for ds in stored.values():
                if len(ds) != n:
                    ds.resize((n,))

    def arm_group(self, arm: str, attrs: dict):
        g = self.h5["arms"].require_group(arm)
        for k, v in attrs.items():
            g.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        g.require_group("metrics")
        return g

    def done_seeds(self, arm: str) -> list[int]:
        g = self.h5["arms"].get(arm)
        return json.loads(g.attrs.get("done_seeds", "[]")) if g is not None else []

    def mark_done(self, arm: str, seed: int):
        g = self.h5["arms"][arm]
        done = sorted(set(self.done_seeds(arm)) | {int(seed)})
        g.attrs["done_seeds"] = json.dumps(done)
        self._set_diverged(g, seed, None)  # finished by a resume
        self.h5.flush()

    def mark_diverged(self, arm: str, seed: int, why: str):
        """Record that ``seed`` of ``arm`` stopped on a divergence: its rows end at its last
        finished epoch, and the table counts it as diverged, not as a seed still running."""
        g = self.h5["arms"].get(arm)
        if g is not None:  # an arm that diverged before its group was written has no rows
            self._set_diverged(g, seed, why)
            self.h5.flush()

    @staticmethod
    def _set_diverged(g, seed: int, why):
        diverged = json.loads(g.attrs.get("diverged_seeds", "{}"))
        if why is None and str(int(seed)) not in diverged:
            return
        diverged.pop(str(int(seed)), None)
        if why is not None:
            diverged[str(int(seed))] = why
        g.attrs["diverged_seeds"] = json.dumps(diverged)

    def set_in_rows(self, arm: str, seed: int, values: dict) -> None:
        """Set metric columns in every row of ``seed`` (new columns are NaN elsewhere)."""
        m = self.h5["arms"][arm]["metrics"]
        rows = np.flatnonzero(m["seed"][()] == seed) if "seed" in m else []
        n = len(m["seed"]) if "seed" in m else 0
        for key, value in values.items():
            if key not in m:
                m.create_dataset(key, shape=(n,), maxshape=(None,), dtype="f8",
                                 fillvalue=np.nan, chunks=(256,))
            for r in rows:
                m[key][r] = float(value)
        self.h5.flush()

    def has_row(self, arm: str, seed: int, epoch: int) -> bool:
        """Whether the file holds the row of (arm, seed, epoch)."""
        g = self.h5["arms"].get(arm)
        if g is None or "seed" not in g["metrics"]:
            return False
        m = g["metrics"]
        return bool(((m["seed"][:] == seed) & (m["epoch"][:] == epoch)).any())

    def drop_rows(self, arm: str, seed: int, from_epoch: int = 0):
        """Remove rows of (arm, seed) with epoch >= from_epoch (restarting a partial run); a
        seed (re)started is no longer one that diverged."""
        g = self.h5["arms"].get(arm)
        if g is not None:
            self._set_diverged(g, seed, None)
        if g is None or "seed" not in g["metrics"]:
            return
        m = g["metrics"]
        seeds, epochs = m["seed"][:], m["epoch"][:]
        keep = ~((seeds == seed) & (epochs >= from_epoch))
        if keep.all():
            return
        # the kept rows go to a new group that then replaces the old one: a run killed (or
        # interrupted) part-way leaves either the old columns or the new ones, never a mix
        # (on resume, ``_drop_half_written_rows`` completes a swap cut between its two steps)
        if _SWAP in g:
            del g[_SWAP]
        new = g.create_group(_SWAP)
        for name, ds in _datasets(m):
            data = ds[:len(keep)][keep]
            new.create_dataset(name, data=data, maxshape=(None,), dtype="f8",
                               fillvalue=np.nan, chunks=(256,))
        self.h5.flush()
        del g["metrics"]
        g.move(_SWAP, "metrics")
        self.h5.flush()

    def append(self, arm: str, row: dict):
        m = self.h5["arms"][arm]["metrics"]
        n = len(m["seed"]) if "seed" in m else 0
        existing = dict(_datasets(m))
        for key in set(existing) | set(row):
            if key not in existing:
                ds = m.create_dataset(key, shape=(n,), maxshape=(None,), dtype="f8",
                                      fillvalue=np.nan, chunks=(256,))
                existing[key] = ds
            ds = existing[key]
            ds.resize((n + 1,))
            ds[n] = float(row.get(key, math.nan))
        self.h5.flush()

    def write_recording(self, arm: str, seed: int, epoch: int, data: dict):
        """Store {"<population>/spikes": array, ...} under recordings/seed<S>/epoch<E>."""
        g = self.h5["arms"][arm].require_group("recordings").require_group(f"seed{int(seed)}")
        name = f"epoch{int(epoch)}"
        if name in g:
            del g[name]
        e = g.create_group(name)
        for key, arr in data.items():
            arr = np.asarray(arr)
            e.create_dataset(key, data=arr, compression="gzip" if arr.size > 4096 else None)
        self.h5.flush()

    def close(self):
        try:
            self.h5.close()
        except Exception:
            pass


#: the group ``drop_rows`` writes the kept rows to before it replaces ``metrics`` with it
_SWAP = "metrics.compacted"


def _datasets(group, prefix=""):
    import h5py
    for k, v in group.items():
        if isinstance(v, h5py.Dataset):
            yield prefix + k, v
        elif isinstance(v, h5py.Group):
            yield from _datasets(v, prefix + k + "/")
        else:  # a dangling link (h5py gives None): the file is damaged
            raise ValueError(f"{group.name}/{k} is a broken link")


def _metrics_group(g):
    """An arm's metrics group, or the compacted one a ``drop_rows`` cut between its two steps
    left in its place."""
    m = g.get("metrics")
    return m if m is not None else g.get(_SWAP)


def _open(path: Path, mode="r"):
    import h5py
    path = Path(path)
    if not path.exists():
        if path.parent.is_file():  # DIR/results.h5 of a DIR that is a file of another kind
            raise ResultsError(f"{path.parent} is neither a run directory nor a results file "
                               "(.h5 or .hdf5)")
        raise ResultsError(f"no results file at {path}")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if "unable to lock" not in str(e).lower():
            raise ResultsError(f"{path}: not a readable HDF5 results file "
                               f"({str(e).split(';')[0]})") from None
        if mode != "r":
            raise ResultsError(f"{path} is open in another process (is a run still writing "
                               "it?); wait for it to finish, or choose another --out") from None
    # a run is writing it: read without the lock, as of its last flushed epoch
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise ResultsError(f"{path}: a run is writing it and it could not be read just now "
                           f"({str(e).split(';')[0]}); try again") from None


def read_recordings(path: str | Path, arm: str, seed: int | None = None) -> dict:
    """{epoch: {"<population>/<what>": array}} of one arm (its first seed unless given)."""
    path = results_path(path)
    with _open(path) as h:
        try:
            g = h["arms"].get(arm)
            if g is None:
                raise ResultsError(f"{path}: no arm {arm!r}; arms: {', '.join(h['arms'])}")
            rec = g.get("recordings")
            if rec is None or not len(rec):
                return {}
            recorded = sorted(int(k[4:]) for k in rec)  # seed2 before seed10
            if seed is None:  # the protocol's first seed that has a recording
                order = [int(v) for v in json.loads(h.attrs.get("seeds", "[]"))]
                seed = next((v for v in order if v in recorded), recorded[0])
            elif seed not in recorded:
                raise ResultsError(f"{path}: arm {arm!r} has no recording of seed {seed}; "
                                   f"recorded seeds: {', '.join(map(str, recorded))}")
            s = rec[f"seed{seed}"]
            return {int(e[5:]): {k: ds[:] for k, ds in _datasets(s[e])} for e in s}
        except (KeyError, ValueError, TypeError, OSError, RuntimeError, AttributeError) as e:
            raise ResultsError(f"{path}: its recordings of arm {arm!r} are damaged ({e})") \
                from None


def _complete_rows(stored: dict) -> int | None:
    """The number of rows every metric dataset ({name: dataset}) has: fewer than the longest only
    if the run was killed (SIGKILL, out of memory) between the datasets' resizes of one row.
    None: no datasets.  0 when the seed or epoch column is missing beside columns of at most one
    row: the run was killed during an arm's first row, whose columns are created one by one."""
    if stored and ("seed" not in stored or "epoch" not in stored) \
            and max(len(ds) for ds in stored.values()) <= 1:
        return 0
    return min((len(ds) for ds in stored.values()), default=None)


def read(path: str | Path) -> dict:
    """{'spec', 'versions', 'arms': {arm: {'attrs', 'metrics': {key: array}}}} from a results file.
    A row that a killed run left half-written is dropped, with a warning; a file damaged
    otherwise is a ``ResultsError`` naming what is wrong."""
    import h5py
    path = results_path(path)
    with _open(path) as h:
        try:
            if "spec" not in h.attrs and "name" in h.attrs and "train" in h:
                raise ResultsError(f"{path}: not a plastic results file (it holds the data set "
                                   f"{str(h.attrs['name'])!r}); a run's file is DIR/results.h5")
            if "spec" not in h.attrs or "arms" not in h:
                raise ValueError(f"it has no {'spec' if 'spec' not in h.attrs else 'arms group'}")
            out = {"path": str(path), "spec": json.loads(h.attrs["spec"]),
                   "versions": json.loads(h.attrs.get("versions", "{}")),
                   "machine": json.loads(h.attrs.get("machine", "{}")),  # {} in older files
                   "arms": {}}
            if not isinstance(out["spec"], dict):
                raise ValueError("its spec is not a table")
            for arm, g in h["arms"].items():
                if not isinstance(g, h5py.Group) or not isinstance(_metrics_group(g), h5py.Group):
                    raise ValueError(f"arm {arm!r} has no metrics group")
                attrs = {k: (json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v)
                         for k, v in g.attrs.items()}
                stored = dict(_datasets(_metrics_group(g)))
                n = _complete_rows(stored)
                # no complete row (killed during the arm's first row): the arm has no rows
                metrics = {k: ds[:n] for k, ds in stored.items()} if n else {}
                if any(len(ds) != n for ds in stored.values()):
                    warnings.warn(f"{path}: arm {arm!r} has a half-written last row (the run was "
                                  f"killed while writing it); reading its {n} complete rows",
                                  stacklevel=2)
                if metrics and ("seed" not in metrics or "epoch" not in metrics):
                    raise ValueError(f"arm {arm!r} has no {'seed' if 'seed' not in metrics else 'epoch'} column")
                bad = [k for k, v in metrics.items() if not np.issubdtype(v.dtype, np.number)]
                if bad:
                    raise ValueError(f"arm {arm!r}: column {bad[0]!r} is not numeric")
                out["arms"][arm] = {"attrs": attrs, "metrics": metrics}
        except (KeyError, ValueError, TypeError, OSError, RuntimeError, AttributeError) as e:
            raise ResultsError(f"{path}: not a plastic results file, or a damaged one ({e})") \
                from None
    return out


def _seed_slices(metrics: dict) -> dict[int, dict]:
    """{seed: {key: that seed's rows}}."""
    if "seed" not in metrics or not len(metrics["seed"]):
        return {}
    return {int(s): {k: np.asarray(v)[metrics["seed"] == s] for k, v in metrics.items()}
            for s in np.unique(metrics["seed"])}


def _final(rows: dict) -> dict:
    """{key: value at the last epoch} of one seed's rows."""
    last = np.argmax(rows["epoch"])
    return {k: float(v[last]) for k, v in rows.items()}


def _over_training(rows: dict) -> dict:
    """{key: mean over the trained epochs (1, 2, ...), NaN ignored} of one seed's rows: epoch 0
    is the untrained circuit."""
    trained = rows["epoch"] >= 1
    return {k: _nanmean(v[trained]) for k, v in rows.items()}


def final_rows(metrics: dict) -> dict[int, dict]:
    """{seed: {key: value at the last epoch}} of the seeds that reached the arm's furthest epoch:
    a seed still behind (interrupted in a later seed) is not pooled with finished ones."""
    return {s: _final(rows) for s, rows in _furthest(_seed_slices(metrics)).items()}


def _furthest(slices: dict[int, dict]) -> dict[int, dict]:
    """The seeds' rows, of the seeds whose last epoch is the furthest any of them reached."""
    last = {s: int(np.max(r["epoch"])) for s, r in slices.items()}
    top = max(last.values(), default=0)
    return {s: r for s, r in slices.items() if last[s] == top}


def _pooled(slices: dict[int, dict]) -> list[dict]:
    """The rows of the seeds a table and its figures pool, in seed order: those that reached the
    furthest epoch (a seed still behind is in progress)."""
    pooled = _furthest(slices)
    return [pooled[s] for s in sorted(pooled)]


def _pooled_seeds(slices: dict[int, dict], diverged) -> list[dict]:
    """The rows of the seeds a table and its figures pool: those of the seeds that did not
    diverge (``diverged``: their numbers) as ``_pooled`` takes them; a diverged seed is not one
    still running, and its last epoch is no final accuracy.  If every seed diverged, each one's
    rows, to the last epoch it finished."""
    kept = {s: r for s, r in slices.items() if s not in diverged}
    return _pooled(kept) if kept else [slices[s] for s in sorted(slices)]


def _concat(slices: list[dict]) -> dict:
    """Metric tables one after the other; a key one of them lacks is NaN in its rows."""
    keys = sorted({k for m in slices for k in m})
    n = [len(m.get("epoch", [])) for m in slices]
    return {k: np.concatenate([np.asarray(m[k], dtype=float) if k in m else np.full(c, np.nan)
                               for m, c in zip(slices, n)]) if slices else np.array([])
            for k in keys}


#: inference statistics recorded per epoch (train.evaluate): spikes per neuron per step (a rate
#: population's mean activity), synaptic operations per inference, steps to decision
INFERENCE_STATS = ("firing_rate", "synaptic_ops", "decision_steps")


def _nanmean(values):
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def _pm(values, scale=1.0, digits=2):
    v = np.asarray(values, dtype=float) * scale
    v = v[~np.isnan(v)]
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _ordered_arms(r: dict) -> list[tuple[str, dict]]:
    """A results file's arms in the protocol's order (unknown ones last)."""
    order = list(r["spec"].get("arms", {}))
    return sorted(r["arms"].items(),
                  key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def _arm_differs(a, b) -> bool:
    """Whether two arms' settings are different experiments (their descriptions and the
    spelling of a kind's name aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return bool(_differences(a, b, ignore=("description",)))
    return _canonical_feedback(a) != _canonical_feedback(b)


#: what two results files may differ in and still pool an arm's seeds
_NOT_THE_EXPERIMENT = ("seeds", "name", "description", "circuit.name", "circuit.description")


def summary(results: list[dict]) -> list[dict]:
    """One row per arm.  Files that ran an arm under the same spec (a protocol run in parts, or
    one seed per file) pool its seeds; a seed in several files is taken from the one where it
    got furthest (finished before unfinished at the same epoch; the later file at a tie).  An arm run
    under different specs (another data set, other epochs, another rule under the same name)
    gets one row per spec, named ``arm [directory]``, with the keys that differ from the first
    such row in ``row["differs"]`` and that row's name in ``row["differs_from"]``: a table never
    shows one experiment's figures under another's name."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        spec = _resolved(r["spec"])
        for arm, a in _ordered_arms(r):
            slices = _seed_slices(a["metrics"])
            if not slices:
                continue
            arm_spec = spec.get("arms", {}).get(arm, a["attrs"].get("feedback"))

            def differs(g):
                return (_differences(g["spec"], spec, _NOT_THE_EXPERIMENT)
                        + ([f"arms.{arm}"] if _arm_differs(g["arm_spec"], arm_spec) else []))
            gs = groups.setdefault(arm, [])
            g = next((g for g in gs if not differs(g)), None)
            if g is None:
                g = {"spec": spec, "arm_spec": arm_spec, "seeds": {}, "done": {}, "reached": {},
                     "diverged": {}, "planned": set(), "paths": [], "differs": differs(gs[0]) if gs else []}
                gs.append(g)
            # a seed's rows and its completion come from the same file: the one where the seed
            # got furthest (an interrupted re-run in a later file does not hide a finished one)
            finished = set(a["attrs"].get("done_seeds", []))
            diverged = a["attrs"].get("diverged_seeds") or {}
            for s, rows in slices.items():
                got = (int(np.max(rows["epoch"])), s in finished)
                if s not in g["seeds"] or got >= g["reached"][s]:
                    g["seeds"][s], g["done"][s], g["reached"][s] = rows, s in finished, got
                    g["diverged"][s] = None if s in finished else diverged.get(str(s))
            for s, why in diverged.items():  # stopped before a row (a diverged source's arm)
                if str(s).isdigit() and int(s) not in g["seeds"]:
                    g["diverged"].setdefault(int(s), why)
            g["planned"] |= {int(s) for s in spec.get("seeds", []) if isinstance(s, int)}
            g["attrs"], g["paths"] = a["attrs"], g["paths"] + [r["path"]]
    rows = []
    for arm, gs in groups.items():
        labels = _labels([g["paths"] for g in gs])
        names = [arm if len(gs) == 1 else f"{arm} [{label}]" for label in labels]
        for g, name in zip(gs, names):
            rows.append({**_row(name, g), "differs_from": names[0] if g["differs"] else ""})
    return rows


def _labels(groups: list[list[str]]) -> list[str]:
    """Short names for groups of results files: their directories, or whole paths where those
    clash."""
    names = [", ".join(Path(p).parent.name or str(p) for p in ps) for ps in groups]
    return names if len(set(names)) == len(names) else [", ".join(ps) for ps in groups]


def _row(name: str, g: dict) -> dict:
    diverged = {s: why for s, why in g["diverged"].items() if why}
    rows = _pooled_seeds(g["seeds"], diverged)
    per_seed = [_final(r) for r in rows]
    a = g["attrs"]
    ua = [_nanmean([v for k, v in f.items() if k.startswith("update_angle/")]) for f in per_seed]
    wa = [_nanmean([v for k, v in f.items() if k.startswith("angle/")]) for f in per_seed]
    fb = a.get("feedback", "")
    return {
        "arm": name, "feedback": fb if isinstance(fb, str) else json.dumps(fb),
        "lr": a.get("lr", float("nan")),
        "seeds": len(per_seed), "epochs": int(max(f["epoch"] for f in per_seed)),
        "test_accuracy": [f["test_accuracy"] for f in per_seed],
        "update_angle": ua, "weight_angle": wa,
        "wall_time": [f.get("wall_time", np.nan) for f in per_seed],
        "population": str(a.get("population", "")).lower(),  # as typed, in older files
        "synapses": list(a.get("synapses", [])),
        "convert_from": a.get("convert_from", ""),
        "learning": a.get("learning", "backprop"),
        **{k: [f.get(k, np.nan) for f in per_seed] for k in INFERENCE_STATS},
        "done": sum(g["done"].values()), "diverged": diverged,
        "all_diverged": bool(diverged) and set(diverged) >= set(g["seeds"]),
        "planned": len(g["planned"] | set(g["seeds"]) | set(diverged)),  # started or not
        "differs": g["differs"],
        "final": per_seed, "over_training": [_over_training(r) for r in rows],
        "metrics": _concat(rows),
    }


def _seeds_cell(r: dict) -> str:
    """The seeds pooled; ``done/planned`` while any seed of the spec is unfinished or unstarted,
    with the number that diverged."""
    cell = f"{r['done']}/{r['planned']}" if r["done"] < r["planned"] else str(r["seeds"])
    return cell + (f" ({len(r['diverged'])} diverged)" if r.get("diverged") else "")


def _has_stats(rows) -> bool:
    """Whether the rows come from a rate-vs-spiking comparison (a spiking or converted arm)."""
    from .spiking import SPIKING_KINDS
    return any(r.get("convert_from") or str(r.get("population", "")).lower() in SPIKING_KINDS
               for r in rows)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The arms' final figures.  When an arm is spiking, the table adds the population and the
    inference statistics: mean firing rate, synaptic operations per inference, steps to
    decision."""
    stats = _has_stats(rows)
    head = ["arm", "feedback", "lr", "seeds", "epochs", "test acc (%)", "update angle (°)",
            "B–Wᵀ angle (°)", "time (s)"]
    if stats:
        head[1:1] = ["population"]
        head += ["firing rate", "synaptic ops", "steps to decision"]
    body = []
    for r in rows:
        b = [r["arm"], r["feedback"], f"{r['lr']:g}" if math.isfinite(r["lr"]) else "-",
             _seeds_cell(r),
             str(r["epochs"]), _pm(r["test_accuracy"], 100), _pm(r["update_angle"], 1, 1),
             _pm(r["weight_angle"], 1, 1), _pm(r["wall_time"], 1, 0)]
        if stats:
            pop = r.get("population", "")
            if r.get("convert_from"):
                pop = f"{pop} (from {r['convert_from']})"
            elif r.get("learning") == "online":
                pop = f"{pop}, online"
            b[1:1] = [pop]
            ops = np.asarray(r.get("synaptic_ops", [np.nan]), dtype=float)
            b += [_pm(r.get("firing_rate", [np.nan]), 1, 3),
                  f"{np.nanmean(ops):.4g}" if np.any(~np.isnan(ops)) else "-",
                  _pm(r.get("decision_steps", [np.nan]), 1, 1)]
        body.append(b)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] +
                     [fmt.format(*b) for b in body])


#: the per-synapse columns of ``format_layers``: (title, metric prefix, final or over training)
LAYER_COLUMNS = (("B–Wᵀ angle (°), final", "angle/", "final"),
                 ("‖B‖/‖W‖, final", "norm_ratio/", "final"),
                 ("update angle (°), final", "update_angle/", "final"),
                 ("error δ angle (°), final", "signal_angle/", "final"),
                 ("error δ angle (°), mean over training", "signal_angle/", "over_training"))


def format_layers(rows: list[dict], markdown: bool = False) -> str:
    """Per synapse, in circuit order: each arm's angles and norm ratio at the end (mean over
    seeds), the delivered error's angle to backprop's averaged over the trained epochs, the
    figure that groups the CIFAR-10 rules by cost, and each learned rule's primitives' values
    at the end.  Cells read "a / b / c" over the synapses
    named in the heading ("-" where an arm has no such value)."""
    def cell(r, prefix, when, names, fmt):
        vals = [_nanmean([f.get(prefix + n, np.nan) for f in r[when]]) for n in names]
        return " / ".join("-" if math.isnan(v) else format(v, fmt) for v in vals)
    head, cols = ["arm", "test acc (%)"], []
    order = _circuit_order(r.get("synapses", []) for r in rows)
    # and each learned-feedback primitive's value R on the probe batch (Kunin et al.'s terms)
    primitives = sorted({k.split("/")[1] for r in rows for f in r["final"] for k in f
                         if k.startswith("rule/") and k.count("/") >= 2})
    for title, prefix, when in LAYER_COLUMNS + tuple(
            (f"{p} R, final", f"rule/{p}/", "final") for p in primitives):
        names = sorted({k[len(prefix):] for r in rows for f in r[when] for k in f
                        if k.startswith(prefix)}, key=order)
        if names:
            head.append(f"{title}: {' / '.join(names)}")
            cols.append((prefix, when, names, ".2f" if prefix == "norm_ratio/" else
                         ".3g" if prefix.startswith("rule/") else ".1f"))
    if not cols:
        return "no per-synapse angles were recorded"
    body = [[r["arm"], _pm(r["test_accuracy"], 100)] +
            [cell(r, *c) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    # one block per column: the headings are too long for one line of text
    out = []
    for j in range(2, len(head)):
        w = max((len(b[0]) for b in body), default=3)
        out.append(head[j])
        out += [f"  {b[0]:<{w}}  {b[1]:>7}  {b[j]}" for b in body]
    return "\n".join(out)


def _circuit_order(synapse_lists):
    """Sort key for synapse names: their place in the circuit (the arms' recorded synapse lists,
    in module order), then, for names in none of them, numbered names by number.  A ResNet's
    names sorted as text put the readout "fc" second."""
    rank: dict[str, int] = {}
    for names in synapse_lists:
        for n in names:
            rank.setdefault(n, len(rank))
    return lambda name: (0, rank[name], []) if name in rank else (1, 0, _natural(name))


def _natural(name: str) -> list:
    """Sort key that orders numbered synapses by number: "2" < "13", "conv2" < "conv10"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _per_epoch(m: dict, key: str, *reduce):
    """Epochs and, for each NaN-aware reduction over the seeds' values of ``key`` at an epoch,
    its curve."""
    ep = np.unique(m["epoch"])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        at = [m[key][m["epoch"] == e] for e in ep]
        return (ep, *(np.array([f(v) for v in at]) for f in reduce))


def _mean_curve(m: dict, key: str):
    """Epochs and the metric ``key`` averaged over seeds at each (NaN-aware)."""
    return _per_epoch(m, key, np.nanmean)


def _seed_range(m: dict, key: str):
    """The lowest and highest value of ``key`` over seeds at each epoch (``_mean_curve``'s)."""
    return _per_epoch(m, key, np.nanmin, np.nanmax)[1:]


def _n_seeds(m: dict) -> int:
    return len(np.unique(m["seed"])) if "seed" in m and len(m["seed"]) else 1


def _arm_styles(names) -> dict:
    """A colour and line style per arm: matplotlib's ten colours, then the same colours dashed,
    dotted, ... (an 11th arm took the first arm's colour)."""
    return {a: (f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]) for i, a in enumerate(names)}


def _synapse_colours(names: list, plt) -> dict:
    """One colour per synapse: matplotlib's ten for up to ten, else a colour map running from
    the first synapse to the last (a ResNet's 20 repeated colours)."""
    if len(names) <= 10:
        return {s: f"C{i}" for i, s in enumerate(names)}
    cmap = plt.get_cmap("viridis")
    return {s: cmap(0.92 * i / (len(names) - 1)) for i, s in enumerate(names)}


def _epoch_axis(ax, epochs) -> None:
    """Integer epochs on the x axis (a one-epoch run had ticks at 0.95 ... 1.05)."""
    from matplotlib.ticker import MaxNLocator
    epochs = sorted({int(e) for e in epochs})
    if 0 < len(epochs) <= 3:
        ax.set_xticks(epochs)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plain_log(ax) -> None:
    """Log-scale y ticks as plain numbers (20, 30, 0.9), not 2×10¹, on the ticks matplotlib's
    log formatter would label."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""
    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _legend_beside(fig, handles, labels, title: str) -> None:
    """One legend for the figure, right of the panels, in as many columns as it needs to stay
    within their height (a legend in a panel hid its curves)."""
    if not labels:
        return
    rows = max(6, int(fig.get_size_inches()[1] * 4))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title=title, title_fontsize=8, ncol=math.ceil(len(labels) / rows), frameon=False)


#: arms per row of panels in angles.png (the CIFAR-10 protocol's eight); more arms wrap onto
#: further rows
ANGLE_COLUMNS = 8


def _angle_figure(arms: dict, path: Path, plt, title: str = "") -> bool:
    """angles.png: per arm, one panel per angle recorded (update, delivered error, B to Wᵀ)
    over epochs, one colour per synapse, means over the pooled seeds.  Arms with no angle
    recorded (a converted arm) are named in the title instead of getting empty panels.
    False when no arm recorded an angle."""
    # one row per angle the arms recorded: the update's, the delivered error's (signal_angle,
    # the one that ranks the CIFAR-10 rules by cost) and B's to Wᵀ
    prefixes = [(p, t) for p, t in (("update_angle/", "update ∠ to BP"),
                                    ("signal_angle/", "error δ ∠ to BP's"),
                                    ("angle/", "∠(B, Wᵀ)"))
                if any(k.startswith(p) for a in arms.values() for k in a["metrics"])]
    if not prefixes:
        return False
    keys = tuple(p for p, _ in prefixes)
    shown = {arm: a for arm, a in arms.items()
             if any(k.startswith(keys) and not np.all(np.isnan(v))
                    for k, v in a["metrics"].items())}
    left_out = [arm for arm in arms if arm not in shown]
    if not shown:  # all NaN
        return False
    # one colour per synapse in every panel, synapses in circuit order ("2" before "13")
    order = _circuit_order(a.get("synapses") or a.get("attrs", {}).get("synapses", [])
                           for a in arms.values())
    names = sorted({k.split("/", 1)[1] for a in shown.values() for k in a["metrics"]
                    if k.startswith(keys)}, key=order)
    colour = _synapse_colours(names, plt)
    n = len(shown)
    cols, chunks = min(n, ANGLE_COLUMNS), math.ceil(n / ANGLE_COLUMNS)
    fig, axes = plt.subplots(len(prefixes) * chunks, cols, squeeze=False, sharey="row",
                             figsize=(3.2 * cols, 2.75 * len(prefixes) * chunks))
    seeds = sorted({_n_seeds(a["metrics"]) for a in shown.values()})
    for i, (prefix, what) in enumerate(prefixes):
        for c in range(chunks):
            top = 100.0  # angles run to 180°: an update or error against backprop's is not clipped
            row = axes[c * len(prefixes) + i]
            for j, (arm, a) in enumerate(list(shown.items())[c * cols:(c + 1) * cols]):
                m, axx = a["metrics"], row[j]
                for s in names:
                    if prefix + s not in m:
                        continue
                    ep, v = _mean_curve(m, prefix + s)
                    if not np.all(np.isnan(v)):
                        axx.plot(ep, v, marker=".", ms=3, color=colour[s], label=s)
                        top = max(top, min(180.0, float(np.nanmax(v)) + 5))
                axx.axhline(90, color="gray", lw=0.5, ls="--")
                _epoch_axis(axx, m["epoch"])
                axx.set_title(f"{arm}: {what}", fontsize=9)
                if i == len(prefixes) - 1:
                    axx.set_xlabel("epoch")
                if j == 0:
                    axx.set_ylabel("degrees")
            for axx in row[n - c * cols:] if c == chunks - 1 else ():
                axx.set_visible(False)  # the last row's panels beyond the last arm
            row[0].set_ylim(0, top)  # sharey: the whole row
    handles = {}
    for axx in axes.flat:
        for h, lab in zip(*axx.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    _legend_beside(fig, [handles[s] for s in names if s in handles],
                   [s for s in names if s in handles], "synapse")
    what = "means over " + " or ".join(map(str, seeds)) + " seeds" if seeds != [1] else ""
    note = f"no angle recorded: {', '.join(left_out)}" if left_out else ""
    lines = [t for t in (" | ".join(x for x in (title, what) if x), note) if t]
    fig.suptitle("\n".join(lines), fontsize=10)
    # room for the title above the first row's panel titles (tight_layout leaves none)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.22 * (len(lines) + 0.5) / fig.get_size_inches()[1]))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def experiments(specs: list[dict]) -> list[str]:
    """"protocol: circuit on data" of each different experiment among ``specs``, in order.
    Specs that differ only where ``summary`` still pools seeds (seeds, names, descriptions,
    arms) are one experiment; two experiments of one title are told apart by a number."""
    seen = []  # (resolved spec, title)
    for spec in specs:
        r = _resolved(spec)
        if any(not _differences(r, o, _NOT_THE_EXPERIMENT) for o, _ in seen):
            continue
        circuit = spec.get("circuit", {})
        circuit = circuit if isinstance(circuit, dict) else {"name": circuit}
        seen.append((r, f"{spec.get('name', '')}: {circuit.get('name') or circuit.get('kind', '')}"
                        f" on {spec.get('data', '')}"))
    titles = [t for _, t in seen]
    return [t if titles.count(t) == 1 else f"{t} (#{titles[:i + 1].count(t)})"
            for i, t in enumerate(titles)]


def _draw(arms: dict, specs: list[dict], out_dir: Path, prefix: str = "") -> list[Path]:
    """learning_curves.png and angles.png of ``arms`` ({name: {"metrics": ...}}) in ``out_dir``
    (their names after ``prefix``), titled by the experiments ``specs`` ran.  Curves are means
    over an arm's pooled seeds, with the band from the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    styles, epochs = _arm_styles(arms), set()
    for arm, a in arms.items():
        m = a["metrics"]
        if "epoch" not in m or not len(m["epoch"]):
            continue
        ep, acc = _mean_curve(m, "test_accuracy")
        sel = ep > 0
        epochs |= set(ep[sel].tolist())
        last = final_rows(m)
        final = np.mean([f["test_accuracy"] for f in last.values()])  # as in the table
        trained = max(int(f["epoch"]) for f in last.values())
        k = _n_seeds(m)
        label = (f"{arm} ({100 * final:.2f}%" + (f", {k} seeds)" if k > 1 else ")") if trained
                 else f"{arm} (no epoch trained; {100 * final:.2f}% untrained)")
        c, ls = styles[arm]
        ax[0].plot(ep[sel], 100 * (1 - acc[sel]), marker=".", color=c, ls=ls, label=label)
        ep2, loss = _mean_curve(m, "train_loss")
        ax[1].plot(ep2[sel], loss[sel], marker=".", color=c, ls=ls, label=arm)
        if k > 1:  # the spread of the seeds behind the mean
            lo, hi = _seed_range(m, "test_accuracy")
            ax[0].fill_between(ep[sel], 100 * (1 - hi[sel]), 100 * (1 - lo[sel]), color=c,
                               alpha=0.15, lw=0)
            lo, hi = _seed_range(m, "train_loss")
            ax[1].fill_between(ep2[sel], lo[sel], hi[sel], color=c, alpha=0.15, lw=0)
    ax[0].set(xlabel="epoch", ylabel="test error (%)", yscale="log", title="test error")
    ax[1].set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    for a in ax:
        _epoch_axis(a, epochs)
        _plain_log(a)
    seeds = sorted({_n_seeds(a["metrics"]) for a in arms.values() if len(a["metrics"].get(
        "epoch", []))})
    _legend_beside(fig, *ax[0].get_legend_handles_labels(), "final test accuracy"
                   + ("\n(mean of the seeds;\nband: lowest to highest)" if seeds != [1] else ""))
    title = " | ".join(experiments(specs))
    fig.suptitle(title)
    fig.tight_layout()
    files.append(out_dir / f"{prefix}learning_curves.png")
    fig.savefig(files[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    if _angle_figure(arms, out_dir / f"{prefix}angles.png", plt, title):
        files.append(out_dir / f"{prefix}angles.png")
    return files


@contextlib.contextmanager
def _writing_figures(out_dir: Path):
    """A one-line error for figures that cannot be written (a run one may read, not write)."""
    try:
        yield
    except OSError as e:
        raise ResultsError(f"cannot write figures to {out_dir}: {e.strerror or e}") from None


def combined_figures(paths: list, out_dir: str | Path) -> list[Path]:
    """learning_curves.png and angles.png of several results files in one, their arms named and
    their seeds pooled as in ``plastic report`` (a protocol run in parts, or one seed per file).
    The title names each different experiment (protocol, circuit, data) among the files."""
    rs = [read(results_path(p)) for p in paths]
    arms = {row["arm"]: {"metrics": row["metrics"], "synapses": row["synapses"]}
            for row in summary(rs)}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ResultsError(f"cannot write figures to {out_dir}: it is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultsError(f"cannot write figures to {out_dir}: {e.strerror}") from None
    # beside a run's own figures (a reported one's, or any other run's: its figures were
    # overwritten), the combined ones take a prefix of their own
    beside = [p for p in out_dir.iterdir() if p.suffix in (".h5", ".hdf5") and p.is_file()]
    own = bool(beside)
    if any(p.stem == "combined" for p in beside):  # its own figures are combined_...
        raise ResultsError(f"--out {out_dir} holds combined.h5, whose figures would take the "
                           "combined figures' names; choose another --out")
    with _writing_figures(out_dir):
        return _draw(arms, [r["spec"] for r in rs], out_dir,
                     "combined_" if own else "") if arms else []


def figures(path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """learning_curves.png and angles.png from a results file (beside it; a file not named
    results.h5 prefixes them with its name, so two files in one directory keep their own)."""
    r = read(path)
    out_dir = Path(out_dir) if out_dir else results_path(path).parent
    name = results_path(path).name
    prefix = "" if name == "results.h5" else f"{Path(name).stem}_"
    if not r["arms"]:
        return []
    # each arm's seeds as the table pools them (a seed still behind would pull the curve's
    # later epochs toward fewer seeds)
    arms = {arm: {"metrics": _concat(_pooled_seeds(
                      _seed_slices(a["metrics"]),
                      {int(s) for s in a["attrs"].get("diverged_seeds") or {}})),
                  "attrs": a["attrs"]}
            for arm, a in _ordered_arms(r)}
    spec = r["spec"]
    from .plots import recording_figures
    t, rec = spec.get("time", {}), spec.get("record", {})
    circuit = spec.get("circuit")
    params = circuit.get("population_params", {}) if isinstance(circuit, dict) else {}
    with _writing_figures(out_dir):
        files = _draw(arms, [spec], out_dir, prefix)
        for arm in arms:
            files += recording_figures(read_recordings(path, arm), out_dir, arm,
                                       t.get("dt", 1e-3), rec.get("every", 1),
                                       float(params.get("v_th", 1.0)), steps=t.get("steps"),
                                       prefix=prefix)
    return files

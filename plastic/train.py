"""Running a protocol: every arm trains the same circuit (same initial W, same data order, same
optimizer and schedule) with its own feedback rule, and metrics go to the results file per epoch."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import models
from .convert import circuit_name, convert, synapses
from .errors import ResultsError, SpecError
from .learned import LearnedFeedback, sleep_driven, sleep_step
from .metrics import hidden_angles, norm_ratios, rule_values, weight_angles
from .results import ResultsWriter, results_path
from .results import read as read_results
from .simulator import SYNAPSES, TimeStepped, calibrate_conversion, inference_stats, spiking_version
from .spec import arm_population
from .spiking import SPIKING_KINDS, LIFPopulation

__all__ = ["build_circuit", "run_protocol", "evaluate"]


def build_circuit(circuit: dict, input_shape, n_classes: int, population: str | None = None,
                  time: dict | None = None, ds=None, seed: int = 0) -> nn.Module:
    """A plain torch model from a resolved circuit spec, checked against the data's shape.
    ``population`` overrides the circuit's population.  A circuit with spiking populations
    comes back wrapped in ``TimeStepped`` (``time``: steps, dt, encoder); the same spec with a
    rate population gives the rate network.  The circuit's delays are applied; its constraints
    (Dale's law, sparse connectivity) are not: they act on the converted circuit
    (``plastic.apply_circuit_constraints``, as ``run_protocol`` does)."""
    shape = tuple(circuit["input_shape"]) or tuple(input_shape)
    if tuple(shape) != tuple(input_shape):
        raise SpecError(f"circuit {circuit['name'] or circuit['kind']!r} expects input "
                        f"{list(shape)} but the data set gives {list(input_shape)}")
    outputs = circuit["outputs"] or n_classes
    if outputs != n_classes:
        raise SpecError(f"circuit has {outputs} outputs but the data set has {n_classes} classes")
    kind, pop = circuit["kind"], population or circuit["population"]
    spiking = pop.lower() in SPIKING_KINDS
    if spiking and kind not in ("mlp", "convnet"):
        raise SpecError(f"spiking population {pop!r}: time-stepped simulation supports the "
                        f"sequential circuits mlp and convnet, not {kind!r}")
    if circuit.get("delay", 0) and not spiking:
        raise SpecError("circuit.delay needs a time-stepped (spiking) population")
    # the kind's own shortcut unless the circuit names one
    shortcut = {"shortcut": circuit["shortcut"]} if circuit.get("shortcut") else {}
    if kind == "mlp":
        model = models.mlp(int(torch.tensor(shape).prod()), circuit["hidden"], outputs, pop,
                           circuit["output_scale"], circuit["units_per_class"])
    elif kind == "convnet":
        if shape[1] != shape[2] or shape[1] % (2 ** len(circuit["channels"])):
            raise SpecError(f"convnet needs square inputs divisible by 2^{len(circuit['channels'])}, "
                            f"got {list(shape)}")
        model = models.convnet(shape[0], circuit["channels"], outputs, pop, circuit["batch_norm"],
                               shape[1], circuit["output_scale"], circuit["units_per_class"])
    elif kind == "resnet":
        model = models.ResNet(circuit["blocks"], circuit["channels"], outputs, shape[0],
                              circuit["stem"], pop, circuit["output_scale"], circuit["units_per_class"],
                              **shortcut)
    elif kind == "resnet18":
        model = models.resnet18(outputs, shape[0], circuit["stem"], pop, circuit["output_scale"],
                                circuit["units_per_class"], **shortcut)
    elif kind == "resnet20":
        model = models.resnet20(outputs, shape[0], pop, circuit["output_scale"],
                                circuit["units_per_class"], **shortcut)
    else:
        raise SpecError(f"unknown circuit kind {kind!r}")
    if spiking:
        t = time or {"steps": 25, "dt": 1e-3, "encoder": "constant"}
        # checked at the run's dt (TimeStepped sets it too): at the default dt a valid τ was
        # refused, or warned of, for a dt/τ the run never has
        _set_population_params(model, circuit.get("population_params") or {}, t["dt"])
        delay = circuit.get("delay", 0)
        names = [str(i) for i, m in enumerate(model) if isinstance(m, SYNAPSES)]
        mean = std = None
        if ds is not None:
            mean, std = ds.mean, ds.std
        model = TimeStepped(model, t["steps"], t["dt"], t["encoder"], _encoder_options(t),
                            delays={n: delay for n in names[1:]} if delay else None,
                            input_mean=mean, input_std=std)
    return model


def _set_population_params(model: nn.Module, params: dict, dt: float | None = None) -> None:
    """circuit.population_params on every spiking population of ``model``, checked at step
    ``dt`` (seconds; the populations' own if None)."""
    for m in model.modules():
        if isinstance(m, LIFPopulation) and dt is not None:
            m.dt = float(dt)
        if isinstance(m, LIFPopulation) and params:
            unknown = sorted(set(params) - set(m.p._fields))
            if unknown:
                raise SpecError(f"circuit.population_params: {unknown} are not parameters of "
                                f"{m.kind!r} populations ({', '.join(m.p._fields)})")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in params.values()):
                raise SpecError(f"circuit.population_params must be numbers, got {params}")
            m.p = m.p._replace(**{k: torch.as_tensor(float(v)) for k, v in params.items()})
            m.check()


def _encoder_options(t: dict) -> dict:
    """TimeStepped's encoder options from a protocol's [time] table (input_scale 0: the
    encoder's default)."""
    opts = {"f_max": t.get("f_max", 100.0)} if t.get("encoder") == "poisson" else {}
    if t.get("input_scale"):
        opts["scale"] = t["input_scale"]
    return opts


def _constrain(model, circuit, seed):
    """Dale's law and sparse connectivity from the circuit spec, on the converted circuit."""
    exc, conn = circuit.get("excitatory", 0.0), circuit.get("connectivity", 1.0)
    if not exc and conn >= 1.0:
        return None
    from .constraints import apply_circuit_constraints
    return apply_circuit_constraints(model, exc or None, conn if conn < 1.0 else None, seed)


def _own_random_stream(fn):
    """Run ``fn(model, ...)`` on a fork of the random stream: a measurement that draws (a Poisson
    encoder's spikes) leaves training's draws as they were, so the size of the test set or a
    recording does not change the trained weights."""
    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        from .metrics import _cuda_devices
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            return fn(model, *args, **kwargs)
    return wrapped


@_own_random_stream
@torch.no_grad()
def evaluate(model, ds, batch_size, device, label_smoothing=0.0, stats=False):
    """(accuracy, loss) on the test set; with ``stats`` also a dict of inference statistics:
    mean firing rate, synaptic operations per inference and steps to decision."""
    model.eval()
    # summed on the device and read once (a read per batch waits for a GPU); float64, so the sum
    # of the batches' float32 losses is what it was on the host
    n, device = 0, torch.device(device)
    loss = torch.zeros((), dtype=torch.float64, device=_sums_on(device))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    acc_stats = {"firing_rate": 0.0, "synaptic_ops": 0.0, "decision_steps": 0.0}
    for x, y in ds.batches("test", batch_size, device=device):
        if stats:
            out, st = inference_stats(model, x)
            for k in acc_stats:
                acc_stats[k] += st[k] * len(y)
        else:
            out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum",
                                label_smoothing=label_smoothing).to(loss.device).double()
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    model.train()
    correct, loss = correct.item(), loss.item()
    if stats:
        return correct / n, loss / n, {k: v / n for k, v in acc_stats.items()}
    return correct / n, loss / n


@_own_random_stream
@torch.no_grad()
def recording(model, x, rec: dict) -> dict:
    """What the [record] table asks for on the probe x: per population spikes (uint8), voltages
    and per-neuron rates (spiking circuits) or per-neuron mean activity (rate circuits); the
    synapses' weights if ``rec["weights"]``."""
    data = {}
    was = model.training
    model.eval()
    try:
        if isinstance(model, TimeStepped):
            what = ("spikes", "voltages") if rec["voltages"] else ("spikes",)
            _, r = model.run(x, record=what, every=1)
            # named as in the circuit ("2", not "circuit.2"), as the rate version's are
            for name, z in r.spikes.items():
                name = circuit_name(model, name)
                data[f"{name}/rates"] = z.float().mean((0, 1)).cpu().numpy()
                data[f"{name}/spikes"] = z[::rec["every"]].to(torch.uint8).cpu().numpy()
            for name, v in r.voltages.items():
                data[f"{circuit_name(model, name)}/voltages"] = \
                    v[::rec["every"]].float().cpu().numpy()
        else:
            from .populations import RatePopulation
            pops = [(n, m) for n, m in model.named_modules() if isinstance(m, RatePopulation)]
            hooks = [m.register_forward_hook(
                lambda mod, i, o, n=n: data.__setitem__(f"{n}/rates", o.float().mean(0).cpu().numpy()))
                for n, m in pops]
            try:
                model(x)
            finally:
                for h in hooks:
                    h.remove()
        if rec["weights"]:
            for n, syn in synapses(model):
                data[f"weights/{circuit_name(model, n)}"] = \
                    syn.weight.detach().float().cpu().numpy()
    finally:
        model.train(was)
    return data


def _optimizer(spec, arm, model):
    o = spec["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    if o["name"] == "sgd":
        return torch.optim.SGD(params, lr=arm["lr"], momentum=o["momentum"],
                               nesterov=o["nesterov"] and o["momentum"] > 0,
                               weight_decay=arm["weight_decay"])
    cls = torch.optim.Adam if o["name"] == "adam" else torch.optim.AdamW
    return cls(params, lr=arm["lr"], weight_decay=arm["weight_decay"])


def _schedule(spec, opt, steps_per_epoch, lr):
    s, total = spec["schedule"], spec["epochs"] * steps_per_epoch
    if s["name"] == "onecycle":
        if s["pct_start"] * total <= 1:
            # a warm-up of one step or less is no warm-up (torch divides by zero at exactly
            # one), and torch's cycle without one starts a step into its annealing: a run of
            # one step trained at the final lr, lr/(div·final_div).  So, as in a short smoke
            # run: cosine annealing from lr, the first step at lr, the last at the final lr.
            low = 1.0 / (s["div_factor"] * s["final_div_factor"])
            span = max(total - 1, 1)
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: low + (1 - low) * (1 + math.cos(math.pi * min(t, span) / span)) / 2)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=s["pct_start"],
            div_factor=s["div_factor"], final_div_factor=s["final_div_factor"],
            cycle_momentum=False)
    if s["name"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class _Progress:
    """A tqdm bar on a terminal; one line per epoch otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None

    def start(self, total, desc):
        if self.tty:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss, steps: int = 1):
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self):
        """Take the bar off the terminal (an interrupt or an error leaves it mid-line)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def epoch(self, msg):
        self.close()
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, a batch scheduler's stop) inside this block are
    held until the block ends, then take effect: the end-of-epoch writes (the results row, the
    recording, the checkpoint) happen all or not at all, so an interrupted run's results file and
    checkpoint always agree.  A signal that the process ignores or handles itself is left as it
    is.  (SIGKILL cannot be held; a row it cuts in half is dropped when the file is read.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    held = [sig for sig, h in defaults.items() if signal.getsignal(sig) is h]
    caught = []
    for sig in held:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig in held:
            signal.signal(sig, defaults[sig])
    if signal.SIGTERM in caught:
        os.kill(os.getpid(), signal.SIGTERM)  # terminate as the signal would have
    if caught:
        raise KeyboardInterrupt


def _checkpoint_path(out_dir: Path, arm: str, seed: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{arm}-seed{seed}.pt"


def run_arm(spec, arm_name, arm, seed, ds, writer: ResultsWriter, out_dir: Path,
            progress: _Progress, resume: bool = False):
    device = torch.device(spec["device"])
    if arm.get("convert_from"):
        return run_conversion(spec, arm_name, arm, seed, ds, writer, out_dir, progress)
    torch.manual_seed(seed)
    model = _model(spec, arm, seed, ds).to(device)
    # draw lazily-shaped feedback (direct feedback of conv layers) before anything copies the
    # model: a forward pass that would route errors, in eval mode, never back-propagated
    with torch.enable_grad():
        model.eval()
        model(ds.normalize(ds.train_x[:2]).to(device))
        model.train()
    if spec["memory_format"] == "channels_last":
        model = model.to(memory_format=torch.channels_last)  # 4-D weights and B: NHWC
    opt = _optimizer(spec, arm, model)
    if getattr(model, "_constraints", None):
        from .constraints import attach
        attach(opt, model)
    online = arm.get("learning") == "online"
    if online:
        from .eligibility import online_step, online_update_angles
    steps = math.ceil(len(ds.train_x) / spec["batch_size"])
    sched = _schedule(spec, opt, steps, arm["lr"])
    smoothing = spec["loss"]["label_smoothing"]
    loss_fn = lambda out, y: F.cross_entropy(out, y, label_smoothing=smoothing)
    probe_x = ds.normalize(ds.train_x[:spec["probe_size"]]).to(device)
    probe_y = ds.train_y[:spec["probe_size"]].long().to(device)
    rec_x = ds.normalize(ds.test_x[:spec["record"]["samples"]]).to(device)
    writer.arm_group(arm_name, {"feedback": arm["feedback"], "lr": arm["lr"],
                                "population": arm.get("population") or spec["circuit"]["population"],
                                "learning": arm.get("learning", "backprop"),
                                "feedback_options": arm.get("feedback_options", {}),
                                "weight_decay": arm["weight_decay"],
                                "synapses": [circuit_name(model, n) for n, _ in synapses(model)]})
    gen = torch.Generator().manual_seed(seed)
    sleep, step = spec["sleep"], 0
    sleepers = sleep["every"] > 0 and bool(sleep_driven(model))
    start_epoch, wall = 1, 0.0
    ckpt = _checkpoint_path(out_dir, arm_name, seed)
    state = None
    if resume and ckpt.exists():
        try:
            # on the CPU: the random states must stay CPU ByteTensors (moved to a GPU they were
            # refused); load_state_dict moves the rest to the model's and optimizer's device
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated or overwritten: a one-line error, not a traceback
            raise ResultsError(f"{ckpt}: a damaged checkpoint ({str(e).splitlines()[0][:200]}); "
                               f"delete it to train [{arm_name} seed {seed}] again from its "
                               "start") from None
        if not writer.has_row(arm_name, seed, state["epoch"]):  # not this file's run
            warnings.warn(f"{ckpt} is at epoch {state['epoch']}, but {writer.path} has no row "
                          f"of it; [{arm_name} seed {seed}] starts from epoch 0")
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)  # a GPU's Poisson draws
        start_epoch, wall = state["epoch"] + 1, state["wall_time"]
        step = state["epoch"] * steps  # the sleep phases keep their place in the schedule
        writer.drop_rows(arm_name, seed, from_epoch=start_epoch)
        progress.epoch(f"[{arm_name} seed {seed}] resumed after epoch {state['epoch']}")
    else:
        writer.drop_rows(arm_name, seed, from_epoch=0)

    def measure(epoch, train_loss, wall_time):
        """The epoch's metrics row (and recording), computed but not yet written."""
        acc, test_loss, st = evaluate(model, ds, spec["test_batch_size"], device, stats=True)
        # the epoch's last steps diverged (a spiking circuit's bounded spikes keep the loss
        # finite: logits a million apart are a divergence too)
        if epoch and not (math.isfinite(test_loss) and test_loss < DIVERGED_LOSS):
            raise FloatingPointError(
                f"arm {arm_name!r}: test loss became {test_loss:g} after epoch {epoch}; lower "
                f"its lr (now {arm['lr']})")
        row = {"seed": seed, "epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
               "test_accuracy": acc, "lr": opt.param_groups[0]["lr"], "wall_time": wall_time}
        row.update(st)
        # synapses named as in the circuit ("1", not the time-stepped "circuit.1"), so a rate
        # arm and a spiking arm of one circuit share their columns
        cn = lambda k: circuit_name(model, k)  # noqa: E731
        row.update({f"angle/{cn(k)}": v for k, v in weight_angles(model).items()})
        row.update({f"norm_ratio/{cn(k)}": v for k, v in norm_ratios(model).items()})
        update, signal_angles = {}, {}
        if len(probe_x) and online:  # the update e-prop applies, against BPTT's
            update = online_update_angles(model, loss_fn, probe_x, probe_y, smoothing)
        elif len(probe_x):  # probe_size = 0: no probe metrics
            row.update({f"rule/{k.split('/')[0]}/{cn(k.split('/', 1)[1])}": v
                        for k, v in rule_values(model, probe_x).items()})
            update, signal_angles = hidden_angles(model, loss_fn, probe_x, probe_y)
        row.update({f"update_angle/{cn(k)}": v for k, v in update.items()})
        row.update({f"signal_angle/{cn(k)}": v for k, v in signal_angles.items()})
        rec = recording(model, rec_x, spec["record"]) if spec["record"]["samples"] > 0 else None
        return row, rec

    def write(epoch, row, rec):
        writer.append(arm_name, row)
        if rec is not None:
            writer.write_recording(arm_name, seed, epoch, rec)

    if start_epoch == 1:
        row, rec = measure(0, math.nan, 0.0)
        with _deferred_interrupt():
            write(0, row, rec)
        progress.epoch(f"[{arm_name} seed {seed}] epoch 0: test acc {100 * row['test_accuracy']:.2f}%")
    for epoch in range(start_epoch, spec["epochs"] + 1):
        t0 = time.perf_counter()
        progress.start(steps, f"{arm_name} s{seed} e{epoch}/{spec['epochs']}")
        # the epoch's loss summed on the device (in float64: the sum of the steps' float32 losses
        # is exact as it was on the host), read every SYNC_EVERY steps on a GPU and at every
        # step on the CPU, where reading costs nothing
        total_t, n, unread = torch.zeros((), dtype=torch.float64, device=_sums_on(device)), 0, 0
        every = _loss_reads_every(device)
        model.train()
        for i, (x, y) in enumerate(ds.batches("train", spec["batch_size"], shuffle=True, generator=gen,
                                              shift=spec["augment"]["shift"],
                                              flip=spec["augment"]["flip"], device=device)):
            opt.zero_grad(set_to_none=True)
            if online:  # eligibility traces, step by step; no graph through time
                loss = online_step(model, x, y, smoothing, return_loss=True)[1]
            else:
                loss = loss_fn(model(x), y)
                loss.backward()
            try:
                opt.step()
            except RuntimeError as e:  # Adam's first step is 10 lr: beyond float32
                if "without overflow" not in str(e):
                    raise
                raise FloatingPointError(f"arm {arm_name!r}: the optimizer step overflowed in "
                                         f"epoch {epoch}; lower its lr (now {arm['lr']})") from None
            step += 1
            if sleepers and step % sleep["every"] == 0:
                for _ in range(sleep["batches"]):  # noise-driven feedback learning
                    opt.zero_grad(set_to_none=True)
                    sleep_step(model, sleep["batch_size"])
                    opt.step()
            sched.step()
            total_t += loss.detach().to(total_t.device).double() * len(y)
            n, unread = n + len(y), unread + 1
            if unread < every and i + 1 < steps:
                continue
            lv, total = loss.item(), total_t.item()
            if not (math.isfinite(lv) and math.isfinite(total)):
                learned = any(isinstance(s.feedback, LearnedFeedback) for _, s in synapses(model))
                raise FloatingPointError(
                    f"arm {arm_name!r}: training loss became {lv if not math.isfinite(lv) else total}"
                    f" in epoch {epoch}; lower its lr (now {arm['lr']})" + (
                        " or its feedback rule's coefficients, which the lr multiplies"
                        if learned else ""))
            progress.update(lv, unread)
            unread = 0
        wall += time.perf_counter() - t0
        row, rec = measure(epoch, total / n, wall)
        with _deferred_interrupt():  # the row and the checkpoint of this epoch, or neither
            write(epoch, row, rec)
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "schedule": sched.state_dict(), "generator": gen.get_state(),
                          "rng": torch.get_rng_state(), "epoch": epoch, "wall_time": wall,
                          "cuda_rng": torch.cuda.get_rng_state(device)
                          if device.type == "cuda" else None}, ckpt)
        ua = [v for k, v in row.items() if k.startswith("update_angle/") and v == v]  # not NaN
        angle_txt = f", update angle {sum(ua) / len(ua):.1f}°" if ua else ""
        progress.epoch(f"[{arm_name} seed {seed}] epoch {epoch}/{spec['epochs']}: "
                       f"loss {row['train_loss']:.4f}, test acc {100 * row['test_accuracy']:.2f}%"
                       f"{angle_txt} ({wall:.0f} s)")
    _save_weights(model, out_dir, arm_name, seed)
    writer.mark_done(arm_name, seed)
    ckpt.unlink(missing_ok=True)
    try:  # and the folder with the last arm's
        ckpt.parent.rmdir()
    except OSError:  # another arm's checkpoint is in it (or it was never made)
        pass
    return model


#: training steps between two reads of the loss on a GPU (a read waits for the device)
SYNC_EVERY = 25


def _loss_reads_every(device: torch.device) -> int:
    """Steps between two reads of the training loss (for the progress bar and the divergence
    check): every step where the sums are on the CPU, where a read costs nothing."""
    return 1 if _sums_on(device).type == "cpu" else SYNC_EVERY


def _sums_on(device: torch.device) -> torch.device:
    """Where a run's float64 sums of losses live: on the device, except on MPS, which has no
    float64 (there each step's loss is read and summed on the CPU)."""
    return torch.device("cpu") if device.type == "mps" else device

#: a test loss above this (logits a million apart) is a divergence, also when it is finite
DIVERGED_LOSS = 1e6


def _model(spec, arm, seed, ds) -> nn.Module:
    """The arm's circuit: built (with the arm's population), converted to its feedback kind,
    constrained as the circuit spec says."""
    model = build_circuit(spec["circuit"], ds.input_shape, ds.n_classes, arm.get("population"),
                          spec["time"], ds, seed)
    model = convert(model, arm["feedback"], seed=seed, output=arm["output"] or None,
                    options=arm.get("feedback_options") or None)
    model._constraints = _constrain(model, spec["circuit"], seed)
    if arm.get("learning") == "online":  # checked here, so before any arm runs
        from .eligibility import check_online
        check_online(model)
    sleepers = [n for n, _ in sleep_driven(model)]
    if sleepers and spec["sleep"]["every"] <= 0:
        raise SpecError(f"the feedback of synapse(s) {sleepers} learns only in sleep phases, but "
                        "sleep.every = 0 gives none, so it would never learn; set sleep.every "
                        "(wake batches between sleep phases, e.g. 1)")
    return model


def _weights_path(out_dir: Path, arm: str, seed: int) -> Path:
    return Path(out_dir) / "weights" / f"{arm}-seed{seed}.pt"


def _save_weights(model, out_dir, arm, seed):
    """The trained circuit's state (for conversion arms and later analysis), written atomically."""
    _save_atomic(model.state_dict(), _weights_path(out_dir, arm, seed))


def _save_atomic(obj, path: Path):
    """torch.save to a temporary file, then renamed over ``path``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)


def _rate_source(spec, arm) -> dict:
    """The arm a conversion arm converts, which must be a rate arm."""
    src = arm["convert_from"]
    if arm_population(spec, spec["arms"][src]) in SPIKING_KINDS:
        raise SpecError(f"convert_from must name a rate arm; {src!r} is spiking")
    return spec["arms"][src]


def _converted(spec, arm, rate: nn.Module, ds) -> nn.Module:
    """The spiking circuit of a conversion arm's population, with the rate circuit's weights."""
    t = spec["time"]
    snn = spiking_version(rate, arm_population(spec, arm), t["steps"], t["dt"],
                          encoder=t["encoder"], encoder_options=_encoder_options(t),
                          input_mean=ds.mean, input_std=ds.std)
    _set_population_params(snn, spec["circuit"]["population_params"])
    return snn


def _recorded_seeds(out_dir, arm: str) -> set[int]:
    """The seeds of ``arm`` that the results file in ``out_dir`` records as finished."""
    path = results_path(out_dir)
    if not path.is_file():
        return set()
    with warnings.catch_warnings():  # a half-written row: ResultsWriter says so when it opens it
        warnings.simplefilter("ignore")
        arms = read_results(path)["arms"]  # a damaged file: its one-line error
    return set(arms[arm]["attrs"].get("done_seeds", [])) if arm in arms else set()


def run_conversion(spec, arm_name, arm, seed, ds, writer, out_dir, progress):
    """An arm that trains nothing: the trained weights of arm ``convert_from`` run as the spiking
    circuit of this arm's population, after data-based weight normalisation
    (``simulator.calibrate_conversion`` on 1000 training samples)."""
    device = torch.device(spec["device"])
    src = arm["convert_from"]
    path = _weights_path(out_dir, src, seed)
    if not path.exists():
        raise SpecError(f"arm {arm_name!r} converts the weights of arm {src!r}, but {path} does "
                        f"not exist; run arm {src!r} first (into the same --out)")
    try:
        src_arm = _rate_source(spec, arm)
    except SpecError as e:
        raise SpecError(f"arm {arm_name!r}: {e}") from None
    rate = _model(spec, src_arm, seed, ds).to(device)
    try:
        rate.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except (RuntimeError, OSError, EOFError, TypeError, KeyError,
            pickle.UnpicklingError) as e:  # damaged, or another circuit's
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # load_state_dict's first line is a heading ("Error(s) in loading ..."): the detail
        detail = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else
                  lines[0] if lines else type(e).__name__)[:160]
        raise SpecError(f"arm {arm_name!r}: the weights of arm {src!r} in {path} do not load "
                        f"into its circuit ({detail})") from None
    kind = arm_population(spec, arm)
    snn = _converted(spec, arm, rate, ds).to(device)
    x = ds.normalize(ds.train_x[:1000]).to(device)
    cal = calibrate_conversion(snn, rate, x, ds.train_y[:1000].long().to(device))
    g = writer.arm_group(arm_name, {"feedback": src_arm["feedback"], "lr": float("nan"),
                                    "convert_from": src, "population": kind,
                                    "synapses": [circuit_name(snn, n) for n, _ in synapses(snn)]})
    if "conversion_gain" in g.attrs:  # a file before 335a316: one seed's, into its row
        done = writer.done_seeds(arm_name)
        if len(done) == 1:
            raw = g.attrs.get("conversion_lambdas", "[]")
            lambdas = json.loads(raw) if isinstance(raw, str) else list(raw)
            writer.set_in_rows(arm_name, done[0], {
                "conversion_gain": float(g.attrs["conversion_gain"]),
                **{f"conversion_lambda/{l + 1}": float(v) for l, v in enumerate(lambdas)}})
        for stale in ("conversion_gain", "conversion_lambdas"):
            if stale in g.attrs:
                del g.attrs[stale]
    writer.drop_rows(arm_name, seed, from_epoch=0)
    acc, test_loss, st = evaluate(snn, ds, spec["test_batch_size"], device, stats=True)
    row = {"seed": seed, "epoch": spec["epochs"], "train_loss": math.nan, "test_loss": test_loss,
           "test_accuracy": acc, "lr": math.nan, "wall_time": 0.0,
           "conversion_gain": cal["gain"]}  # each seed its own calibration, in its row
    row.update({f"conversion_lambda/{l + 1}": v for l, v in enumerate(cal["lambdas"])})
    row.update(st)
    writer.append(arm_name, row)
    if spec["record"]["samples"] > 0:
        rec_x = ds.normalize(ds.test_x[:spec["record"]["samples"]]).to(device)
        writer.write_recording(arm_name, seed, spec["epochs"], recording(snn, rec_x, spec["record"]))
    progress.epoch(f"[{arm_name} seed {seed}] {src} converted to {kind} (gain {cal['gain']:g}): "
                   f"test acc {100 * acc:.2f}%, {st['firing_rate']:.3f} spikes/neuron/step, "
                   f"{st['synaptic_ops']:.3g} synaptic ops, {st['decision_steps']:.1f} steps to decision")
    writer.mark_done(arm_name, seed)
    return snn


def run_protocol(spec: dict, out_dir: Path, arms: list[str] | None = None, resume: bool = False,
                 progress: bool = True) -> Path:
    """Run (the chosen arms of) a resolved protocol spec into ``out_dir/results.h5``."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    names = list(spec["arms"])
    if arms:
        unknown = [a for a in arms if a not in spec["arms"]]
        if unknown:
            raise SpecError(f"unknown arm(s) {unknown}; the protocol has {names}")
        names = [a for a in names if a in arms]
    if resume and not results_path(out_dir).exists():  # a misspelt --out is not a resume
        warnings.warn(f"--resume: there is no results file at {results_path(out_dir)}; "
                      "starting a new run", UserWarning, stacklevel=2)
    ds = data_mod.load(spec["data"], spec["train_limit"] or None, spec["test_limit"] or None)
    shift, (h, w) = spec["augment"]["shift"], ds.input_shape[-2:]
    if shift >= min(h, w):  # crops of padding only: training on blank images
        raise SpecError(f"augment.shift {shift} is not smaller than the {h}x{w} images")
    steps = spec["epochs"] * math.ceil(len(ds.train_x) / spec["batch_size"])
    for i, a in enumerate(names):  # validate every arm, built as run_arm builds it, before
        arm = spec["arms"][a]        # writing anything
        src = arm.get("convert_from")
        try:
            if src:  # the conversion of the source arm's circuit, with this arm's population
                _converted(spec, arm, _model(spec, _rate_source(spec, arm), spec["seeds"][0], ds),
                           ds)
            else:
                model = _model(spec, arm, spec["seeds"][0], ds)
                sleepers = [n for n, _ in sleep_driven(model)]
                if sleepers and spec["sleep"]["every"] > steps:
                    raise SpecError(f"sleep.every = {spec['sleep']['every']} wake batches, but the "
                                    f"run has {steps}: the feedback of synapse(s) {sleepers}, "
                                    "which learns only in sleep phases, would never learn")
        except SpecError as e:
            raise SpecError(f"arm {a!r}: {e}") from None
        recorded = _recorded_seeds(out_dir, src) if src and resume else set()
        missing = [s for s in spec["seeds"] if s not in recorded
                   or not _weights_path(out_dir, src, s).exists()] \
            if src and src not in names[:i] else []
        if missing:  # the weights it converts are neither recorded there nor trained here
            # (weights left by a run whose results file is gone, or is overwritten by this
            # run, were converted as if they were this spec's)
            again = " with --resume" if results_path(out_dir).exists() else ""
            raise SpecError(
                f"arm {a!r} converts the weights of arm {src!r}, which {out_dir} does not hold "
                f"(seed {', '.join(map(str, missing))}); run arm {src!r} first into the same "
                f"--out{again}, or both together (--arms {src},{a})")
    run_spec = dict(spec)
    # with the arms whose weights a conversion arm reads, so a resume compares them too (a
    # changed arms.SRC.lr was ignored while its recorded weights were converted)
    sources = {spec["arms"][a].get("convert_from") for a in names} - {"", None}
    run_spec["arms"] = {a: spec["arms"][a] for a in spec["arms"] if a in names or a in sources}
    writer = ResultsWriter(out_dir, run_spec, resume=resume)
    prog = _Progress(progress)
    prog.epoch(f"plastic: protocol {spec['name']!r} on {spec['data']} ({len(names)} arms x "
               f"{len(spec['seeds'])} seeds, {spec['epochs']} epochs) -> {writer.path}")
    diverged, stopped = [], set()
    try:
        for seed in spec["seeds"]:
            for a in names:
                if resume and seed in writer.done_seeds(a):
                    prog.epoch(f"[{a} seed {seed}] already complete, skipped")
                    continue
                src = spec["arms"][a].get("convert_from")
                if (src, seed) in stopped:  # its weights were never saved
                    why = f"arm {a!r}: not run for seed {seed}, as arm {src!r} diverged"
                    prog.epoch(f"[{a} seed {seed}] {why}")
                    writer.mark_diverged(a, seed, why)  # if another seed of it has rows
                    diverged.append(why)
                    continue
                try:
                    run_arm(spec, a, spec["arms"][a], seed, ds, writer, Path(out_dir), prog, resume)
                except FloatingPointError as e:  # one arm's divergence does not stop the others
                    prog.epoch(f"[{a} seed {seed}] stopped: {e}")
                    writer.mark_diverged(a, seed, str(e))
                    diverged.append(str(e))
                    stopped.add((a, seed))
                except ValueError as e:  # batch norm's, of a batch of one sample at 1x1
                    if "Expected more than 1 value per channel" not in str(e):
                        raise
                    raise SpecError(f"arm {a!r}: a batch of one sample reaches a batch norm "
                                    f"whose input is 1x1 ({str(e)[:120]}); choose batch_size, "
                                    "train_limit and probe_size so that no batch holds a "
                                    "single sample") from None
    finally:
        prog.close()
        writer.close()
    if diverged:
        raise FloatingPointError("; ".join(diverged) + f" (the other arms are in {writer.path})")
    return writer.path

"""Figures of time-stepped circuits: spike rasters, voltage traces, firing-rate histograms, from
the recordings in a results file (``results.read_recordings``) or from a ``Recording``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["raster", "voltage_traces", "rate_histograms", "recording_figures"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _populations(rec: dict, what: str) -> list[str]:
    """The recorded populations, in circuit order ("2" before "10")."""
    from .results import _natural
    return sorted((k[: -len(what) - 1] for k in rec if k.endswith("/" + what)), key=_natural)


def raster(ax, spikes: np.ndarray, sample: int = 0, dt_ms: float = 1.0, every: int = 1,
           max_neurons: int = 200, color="k", steps: int | None = None):
    """Spike raster of one sample: spikes (T', samples, neurons...) -> dots at (time, neuron),
    over the ``steps`` simulated (by default the recorded steps times ``every``)."""
    full = np.asarray(spikes)[:, sample].reshape(spikes.shape[0], -1)
    z = full[:, :max_neurons]
    t, n = np.nonzero(z)
    ax.scatter(t * every * dt_ms, n, s=2, marker="|", color=color, linewidths=0.8)
    shown = "neuron" if z.shape[1] == full.shape[1] else \
        f"neuron (the first {z.shape[1]} of {full.shape[1]})"  # a subset says so
    span = z.shape[0] * every if steps is None else steps
    ax.set(xlim=(0, span * dt_ms), ylim=(-1, z.shape[1]), xlabel="time (ms)", ylabel=shown)
    return ax


def voltage_traces(ax, voltages: np.ndarray, sample: int = 0, neurons: int = 5,
                   dt_ms: float = 1.0, every: int = 1, v_th: float | None = 1.0):
    """Voltage of the first ``neurons`` neurons of one sample over time."""
    v = np.asarray(voltages)[:, sample].reshape(voltages.shape[0], -1)[:, :neurons]
    t = np.arange(v.shape[0]) * every * dt_ms
    for j in range(v.shape[1]):
        ax.plot(t, v[:, j], lw=0.8)
    if v_th is not None:
        ax.axhline(v_th, color="gray", ls="--", lw=0.6)
    ax.set(xlabel="time (ms)", ylabel="v (after reset)")
    return ax


def rate_histograms(ax, rates: np.ndarray, dt: float = 1e-3, label=None, spiking=True,
                    bins=40):
    """Histogram of per-neuron firing rates (Hz for spiking populations, a.u. for rate ones).
    ``bins``: a number, or the edges (in those units) shared by histograms drawn together."""
    r = np.asarray(rates).reshape(-1) / (dt if spiking else 1.0)
    ax.hist(r, bins=bins, alpha=0.6, label=label)
    ax.set(xlabel="firing rate (Hz)" if spiking else "activity (a.u.)", ylabel="neurons")
    return ax


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recording_figures(recordings: dict, out_dir: str | Path, arm: str, dt: float = 1e-3,
                      every: int = 1, v_th: float = 1.0, steps: int | None = None,
                      prefix: str = "") -> list[Path]:
    """raster_<arm>.png (first recorded epoch vs last: before/after learning; one column for
    a single recording, as a converted arm's), voltages_<arm>.png (with the threshold ``v_th``
    drawn) and rates_<arm>.png, from {epoch: {key: array}}, over the ``steps`` simulated; the
    file names after ``prefix``.  Returns the files written."""
    plt = _plt()
    out_dir = Path(out_dir)
    if not recordings:
        return []
    first, last = min(recordings), max(recordings)
    epochs = (first, last) if first != last else (last,)
    files = []
    pops = _populations(recordings[last], "spikes")
    if pops:
        fig, axes = plt.subplots(len(pops), len(epochs), figsize=(5 * len(epochs), 2.6 * len(pops)),
                                 squeeze=False)
        for i, p in enumerate(pops):
            for j, e in enumerate(epochs):
                if f"{p}/spikes" in recordings[e]:
                    raster(axes[i][j], recordings[e][f"{p}/spikes"], dt_ms=dt * 1e3, every=every,
                           steps=steps)
                axes[i][j].set_title(f"{arm}: {p}, epoch {e}", fontsize=9)
        files.append(_save(fig, out_dir / f"{prefix}raster_{arm}.png"))
    vpops = _populations(recordings[last], "voltages")
    if vpops:
        fig, axes = plt.subplots(1, len(vpops), figsize=(5 * len(vpops), 3), squeeze=False)
        for i, p in enumerate(vpops):
            voltage_traces(axes[0][i], recordings[last][f"{p}/voltages"], dt_ms=dt * 1e3,
                           every=every, v_th=v_th)
            if steps is not None:
                axes[0][i].set_xlim(0, steps * dt * 1e3)
            axes[0][i].set_title(f"{arm}: {p}, epoch {last}", fontsize=9)
        files.append(_save(fig, out_dir / f"{prefix}voltages_{arm}.png"))
    rpops = _populations(recordings[last], "rates")
    if rpops:
        fig, axes = plt.subplots(1, len(rpops), figsize=(5 * len(rpops), 3), squeeze=False)
        for i, p in enumerate(rpops):
            drawn = [e for e in epochs if f"{p}/rates" in recordings[e]]
            # the epochs' histograms on the same bins (each its own 40: bars of other widths)
            scale = dt if pops else 1.0
            r = np.concatenate([np.asarray(recordings[e][f"{p}/rates"], dtype=float).reshape(-1)
                                / scale for e in drawn])
            r = r[np.isfinite(r)]
            edges = np.histogram_bin_edges(r, bins=40) if r.size else 40
            for e in drawn:
                rate_histograms(axes[0][i], recordings[e][f"{p}/rates"], dt, f"epoch {e}",
                                spiking=bool(pops), bins=edges)
            axes[0][i].set_title(f"{arm}: {p}", fontsize=9)
            axes[0][i].legend(fontsize=7)
        files.append(_save(fig, out_dir / f"{prefix}rates_{arm}.png"))
    return files

"""Fast paths: the fused LIF sequence (bit-identical to the step loop, adjoint gradients) and
event-driven propagation (equal to the dense product), plus the benchmark's smoke run."""
import importlib.util
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import plastic
from plastic import propagation
from plastic.propagation import crossover_density, propagate
from plastic.spiking import (SPIKING_KINDS, LIFBoxParameters, LIFParameters, LIFPopulation,
                             LIFState, lif_sequence, lif_step)

PARAMS = {
    "lif": [LIFParameters(),
            LIFParameters(tau_mem_inv=torch.as_tensor(50.0), v_th=torch.as_tensor(0.5),
                          v_reset=torch.as_tensor(-0.1), v_leak=torch.as_tensor(0.05)),
            LIFParameters(v_leak=0.05, v_th=0.7,  # numbers and a per-neuron time constant
                          tau_mem_inv=torch.linspace(20.0, 120.0, 64))],
    "lif_box": [LIFBoxParameters(),
                LIFBoxParameters(v_reset=torch.as_tensor(-0.2), v_leak=torch.as_tensor(0.1))],
}
CASES = [(kind, k) for kind in PARAMS for k in range(len(PARAMS[kind]))]


def _loop(kind, x, state, p, dt=1e-3):
    step = SPIKING_KINDS[kind][0]
    zs, vs = [], []
    for t in range(x.shape[0]):
        z, state = step(x[t], state, p, dt)
        zs.append(z)
        vs.append(state.v)
    return torch.stack(zs), state, torch.stack(vs)


def _rest(kind, shape, p):
    v = torch.zeros(shape) + torch.as_tensor(p.v_leak)
    return LIFState(v, torch.zeros(shape)) if kind == "lif" else SPIKING_KINDS[kind][2](v)


@pytest.mark.parametrize("kind,k", CASES)
def test_lif_sequence_bit_identical_to_step_loop_over_1000_steps(kind, k):
    p = PARAMS[kind][k]
    g = torch.Generator().manual_seed(k)
    x = torch.rand(1000, 8, 64, generator=g) * (0.6 if kind == "lif" else 2.5)
    z_ref, s_ref, v_ref = _loop(kind, x, _rest(kind, (8, 64), p), p)
    z, s, v = lif_sequence(x, None, p, kind=kind, record_voltage=True)
    assert torch.equal(z, z_ref) and torch.equal(v, v_ref)
    assert all(torch.equal(a, b) for a, b in zip(s, s_ref))
    assert 0.01 < float(z.mean()) < 0.3  # spikes and resets are exercised
    z2, s2 = lif_sequence(x, None, p, kind=kind)  # without the trace; and in place (out=)
    buf = x.clone()
    with torch.no_grad():
        z3, s3 = lif_sequence(buf, None, p, kind=kind, out=buf)
    assert torch.equal(z2, z_ref) and torch.equal(z3, z_ref) and z3.data_ptr() == buf.data_ptr()
    assert torch.equal(s2.v, s_ref.v) and torch.equal(s3.v, s_ref.v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,k", CASES)
def test_lif_sequence_bit_identical_to_step_loop_in_half_precision(kind, k, dtype):
    """The fused loop multiplied by the coefficient on the right, the step function on the
    left; on CPU (0-d float32) * bf16 and bf16 * (0-d float32) round differently, so 578 of
    8704 spikes differed in bfloat16 (also under autocast)."""
    p = PARAMS[kind][k]
    g = torch.Generator().manual_seed(k)
    x = (torch.rand(200, 8, 64, generator=g) * (0.6 if kind == "lif" else 2.5)).to(dtype)
    rest = _rest(kind, (8, 64), p)
    # per-neuron parameters in the input's dtype, as a population takes them (a float32 one
    # would promote the step function's state)
    p = type(p)(*(v.to(dtype) if torch.is_tensor(v) and v.dim() else v for v in p))
    z_ref, s_ref, v_ref = _loop(kind, x, type(rest)(*(t.to(dtype) for t in rest)), p)
    z, s, v = lif_sequence(x, None, p, kind=kind, record_voltage=True)
    assert z.dtype == dtype and 0.01 < float(z.float().mean()) < 0.3
    assert torch.equal(z, z_ref) and torch.equal(v, v_ref)
    assert all(torch.equal(a, b) for a, b in zip(s, s_ref))


def test_lif_sequence_identical_to_norse():
    lif = pytest.importorskip("norse.torch.functional.lif")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1000, 4, 128, generator=g) * 0.6
    s = lif.LIFFeedForwardState(torch.zeros(4, 128), torch.zeros(4, 128))
    zs = []
    for t in range(1000):
        z, s = lif.lif_feed_forward_step(x[t], s, lif.LIFParameters())
        zs.append(z)
    z_ours, s_ours = lif_sequence(x)
    assert torch.equal(z_ours, torch.stack(zs)) and torch.equal(s_ours.v, s.v)
    assert torch.equal(s_ours.i, s.i)


def _grads(kind, p, fn, x, state, w):
    """Gradients of a loss on the spikes, the final state and the voltage trace."""
    z, s, v = fn(x, state)
    loss = (z * w["z"]).sum() + (s.v * w["v"]).sum() + (v * w["trace"]).sum()
    if kind == "lif":
        loss = loss + (s.i * w["i"]).sum()
    return torch.autograd.grad(loss, [x, *state])


@pytest.mark.parametrize("kind,k", CASES)
@pytest.mark.parametrize("terms", ["all", "spikes", "final_v"])
def test_lif_sequence_gradients_match_autograd_through_steps(kind, k, terms):
    p = PARAMS[kind][k]
    g = torch.Generator().manual_seed(10 + k)
    T, shape = 80, (3, 64)
    x = (torch.rand(T, *shape, generator=g) * (0.6 if kind == "lif" else 2.5)).requires_grad_()
    # a per-neuron (broadcast) initial voltage and a full initial current
    state = SPIKING_KINDS[kind][2](*[(torch.rand(64 if f == "v" else shape, generator=g) * 0.5)
                                     .requires_grad_() for f in SPIKING_KINDS[kind][2]._fields])
    keep = {"all": {"z", "v", "trace", "i"}, "spikes": {"z"}, "final_v": {"v"}}[terms]
    w = {"z": torch.randn(T, *shape, generator=g), "v": torch.randn(shape, generator=g),
         "trace": torch.randn(T, *shape, generator=g), "i": torch.randn(shape, generator=g)}
    w = {key: val if key in keep else torch.zeros_like(val) for key, val in w.items()}
    ours = _grads(kind, p, lambda a, b: lif_sequence(a, b, p, kind=kind, record_voltage=True),
                  x, state, w)
    ref = _grads(kind, p, lambda a, b: _loop(kind, a, b, p), x, state, w)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0
    if terms == "final_v":  # only through the dynamics and the resets (spikes' surrogate)
        assert ours[0][:T // 2].abs().sum() > 0


def test_population_uses_the_fused_sequence_and_falls_back_for_trained_parameters():
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(60, 2, 32, generator=g) * 0.6).requires_grad_()
    pop = LIFPopulation()
    with mock.patch("plastic.spiking._LIFSequence.apply",
                    wraps=plastic.spiking._LIFSequence.apply) as fused:
        z, s = pop(x)
    assert fused.call_count == 1 and isinstance(s, LIFState)
    (gx,) = torch.autograd.grad(z.sum() + s.v.sum(), x)
    z_ref, s_ref, _ = _loop("lif", x, _rest("lif", (2, 32), pop.p), pop.p)
    (gx_ref,) = torch.autograd.grad(z_ref.sum() + s_ref.v.sum(), x)
    assert torch.equal(z, z_ref) and torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    # a trained time constant: autograd through the steps, with its gradient
    tau = torch.tensor(100.0, requires_grad=True)
    p = LIFParameters(tau_mem_inv=tau)
    z, s = lif_sequence(x, None, p)
    (g_tau,) = torch.autograd.grad(z.sum() + s.v.sum(), tau)
    assert torch.isfinite(g_tau) and float(g_tau) != 0
    assert torch.equal(z, _loop("lif", x, _rest("lif", (2, 32), p), p)[0])
    ad = LIFPopulation(kind="adaptive_lif")  # not fused: the step loop
    assert ad(x.detach())[0].shape == x.shape


def test_lif_sequence_errors():
    x = torch.rand(5, 2, 3)
    with pytest.raises(plastic.SpecError, match="unknown spiking population"):
        lif_sequence(x, kind="izhikevich")
    with pytest.raises(plastic.SpecError, match="lif_sequence runs"):
        lif_sequence(x, kind="adaptive_lif")
    with pytest.raises(plastic.SpecError, match="T >= 1"):
        lif_sequence(torch.rand(0, 2, 3))
    with pytest.raises(plastic.SpecError, match="does not broadcast"):
        lif_sequence(x, LIFState(torch.zeros(4), torch.zeros(2, 3)))
    with pytest.raises(plastic.SpecError, match="parameter tau_mem_inv"):
        lif_sequence(x, None, LIFParameters(tau_mem_inv=torch.ones(7)))
    with pytest.raises(plastic.SpecError, match="out="):
        lif_sequence(x.requires_grad_(), out=torch.empty(5, 2, 3))


def _dyadic(shape, g, scale=300):
    return torch.randint(-scale, scale + 1, shape, generator=g).float() / 2 ** 8


@pytest.mark.parametrize("lead", [(3200,), (40, 16)])
def test_propagate_event_equals_dense(lead):
    g = torch.Generator().manual_seed(5)
    w, b = _dyadic((300, 200), g), _dyadic((300,), g)
    s = (torch.rand(*lead, 200, generator=g) < 0.03).float()
    dense, event = propagate(s, w, b, mode="dense"), propagate(s, w, b, mode="event")
    assert event.shape == (*lead, 300) and torch.equal(dense, event)  # dyadic: exact sums
    assert torch.equal(propagate(s, w, None, mode="event"), F.linear(s, w))
    wr, br = torch.randn(300, 200, generator=g), torch.randn(300, generator=g)
    assert torch.allclose(propagate(s, wr, br, mode="event"), F.linear(s, wr, br),
                          rtol=1e-5, atol=1e-5)
    graded = s * torch.rand(s.shape, generator=g)  # graded values enter as weights
    assert torch.allclose(propagate(graded, wr, br, mode="event"), F.linear(graded, wr, br),
                          rtol=1e-5, atol=1e-5)
    empty = propagate(torch.zeros(4, 200), w, b, mode="event")
    assert torch.equal(empty, b.expand(4, 300))


def test_propagate_auto_chooses_by_density():
    g = torch.Generator().manual_seed(6)
    w = _dyadic((1000, 784), g)
    m = 3200
    d_star = crossover_density(m, 784, 1000)
    assert 0.05 < d_star < 0.09  # wide layer: event-driven below ~6-7% spikes
    assert crossover_density(m, 1000, 10) < 0 and crossover_density(32, 784, 1000) < 0
    with mock.patch.object(propagation, "_event", wraps=propagation._event) as event:
        for density, expect in [(0.01, 1), (0.3, 0), (d_star * 1.3, 0)]:
            event.reset_mock()
            s = (torch.rand(m, 784, generator=g) < density).float()
            out = propagate(s, w)
            assert event.call_count == expect, density
            assert torch.equal(out, F.linear(s, w))
        s = (torch.rand(m, 784, generator=g) < 0.02).float()
        event.reset_mock()
        propagate(s, w, threshold=0.01)  # a fixed threshold below the density: dense
        propagate(s, w[:10])  # a 10-way readout: dense whatever the density
        assert event.call_count == 0
        propagate(s, w, threshold=0.05)
        assert event.call_count == 1
        event.reset_mock()
        wg = w.clone().requires_grad_()
        y = propagate(s, wg)  # under autograd: dense, differentiable
        assert event.call_count == 0 and y.requires_grad
    with pytest.raises(plastic.SpecError, match="unknown propagation mode"):
        propagate(s, w, mode="sparse")
    with pytest.raises(plastic.SpecError, match="spikes"):
        propagate(s[:, :10], w)
    with pytest.raises(plastic.SpecError, match="weight must be a matrix"):
        propagate(s, w[0])
    with pytest.raises(plastic.SpecError, match="bias"):
        propagate(s, w, torch.zeros(3))


def test_benchmark_quick_run_reports_identical_spikes():
    pytest.importorskip("norse")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "spiking.py"
    spec = importlib.util.spec_from_file_location("bench_spiking", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            bench.main(["--quick", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    for key in ["identical_spikes", "a.speedup_vs_norse", "b.speedup_vs_norse",
                "a.median_ms_ours", "a.median_ms_norse", "b.median_ms_ours", "b.median_ms_norse",
                "a.n", "a.batch", "a.T", "b.batch", "b.T", "a.firing_rate", "b.hidden_rate"]:
        assert key in out, key
    assert out["identical_spikes"] is True and out["b.dyadic_weights"] is True
    assert out["a.speedup_vs_norse"] > 0 and out["b.speedup_vs_norse"] > 0
    assert out["a.grad_rel_diff_vs_norse_alpha1"] < 1e-4
    assert 0.005 < out["b.hidden_rate"] < 0.05 and out["b.predicted_propagation_modes"][0] == "event"
    # a workload that is not there ran nothing and reported identical spikes; 0 rounds were 2
    for bad in (["--workloads", "c"], ["--workloads", "a, c"], ["--rounds", "0"],
                ["--threads", "0"]):
        with pytest.raises(SystemExit), redirect_stderr(io.StringIO()):
            bench.main(["--quick", *bad])


def test_propagate_edge_cases_agree_with_the_dense_product():
    """No inputs (a Dense(0, n)) was a reshape error in event and auto modes; forward-mode AD and
    torch.func.jvp took the event path and failed; a bias of another dtype was cast silently on
    the event path but refused on the dense one."""
    import torch.autograd.forward_ad as fwAD
    from plastic.propagation import propagate
    w0 = torch.randn(5, 0)
    for mode in ("event", "auto"):
        assert torch.equal(propagate(torch.zeros(4, 0), w0, torch.ones(5), mode=mode),
                           torch.ones(4, 5))
    torch.manual_seed(0)
    w, s = torch.randn(300, 400), (torch.rand(800, 400) < 0.01).float()
    t = torch.randn_like(s)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(propagate(fwAD.make_dual(s, t), w)).tangent
    assert torch.allclose(tangent, t @ w.T, atol=1e-5)
    assert torch.allclose(torch.func.jvp(lambda x: propagate(x, w), (s,), (t,))[1], t @ w.T,
                          atol=1e-5)
    for mode in ("dense", "event"):
        with pytest.raises(plastic.SpecError, match="weight's dtype"):
            propagate(s, w, torch.zeros(300, dtype=torch.float64), mode=mode)
        with pytest.raises(plastic.SpecError, match="bias must be a tensor"):
            propagate(s, w, [0.0] * 300, mode=mode)


def test_auto_propagation_off_the_cpu_takes_the_dense_product():
    """Counting the spikes waits for the device, and the crossover is a CPU measurement: off the
    CPU, auto is the dense product (the meta device, which has no values, stands in)."""
    spikes = (torch.rand(256, 784) < 0.005).float()  # sparse enough for events on the CPU
    w = torch.randn(1000, 784)
    assert 0.005 < crossover_density(256, 784, 1000)
    out = propagate(spikes.to("meta"), w.to("meta"), mode="auto")
    assert out.is_meta and out.shape == (256, 1000)
    assert torch.allclose(propagate(spikes, w, mode="auto"), spikes @ w.T, atol=1e-5)


def test_encoders_can_skip_their_range_check_and_draw_where_the_generator_is():
    from plastic import encoders
    from plastic.errors import SpecError
    x = torch.rand(4, 10)
    with pytest.raises(SpecError, match=r"intensities in \[0, 1\]"):
        encoders.poisson(x + 1, 5)
    encoders.poisson(x.clamp(0, 1), 5, check=False)  # clamped by the caller: no host read
    a = encoders.poisson(x, 5, generator=torch.Generator().manual_seed(3))
    b = encoders.poisson(x, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    z = encoders.poisson(x.to("meta"), 5, check=False)  # drawn on the input's device
    assert z.is_meta and z.shape == (5, 4, 10)

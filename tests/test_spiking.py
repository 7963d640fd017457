"""LIF populations: the dynamics are norse's, bit for bit."""
import pytest
import torch

from plastic.spiking import LIFParameters, LIFPopulation, LIFState, lif_step, superspike


def test_lif_spikes_and_voltages_identical_to_norse_over_1000_steps():
    lif = pytest.importorskip("norse.torch.functional.lif")
    g = torch.Generator().manual_seed(0)
    n, steps = 256, 1000
    drive = torch.rand(steps, 8, n, generator=g) * 0.6  # a few spikes per neuron per 100 steps
    for params in [dict(), dict(tau_mem_inv=torch.as_tensor(50.0), v_th=torch.as_tensor(0.5),
                                v_reset=torch.as_tensor(-0.1), v_leak=torch.as_tensor(0.05))]:
        ours_p, norse_p = LIFParameters(**params), lif.LIFParameters(**params)
        s_ours = LIFState(torch.zeros(8, n) + ours_p.v_leak, torch.zeros(8, n))
        s_norse = lif.LIFFeedForwardState(torch.zeros(8, n) + norse_p.v_leak, torch.zeros(8, n))
        spikes = 0
        for t in range(steps):
            z_o, s_ours = lif_step(drive[t], s_ours, ours_p)
            z_n, s_norse = lif.lif_feed_forward_step(drive[t], s_norse, norse_p)
            assert torch.equal(z_o, z_n) and torch.equal(s_ours.v, s_norse.v)
            assert torch.equal(s_ours.i, s_norse.i)
            spikes += int(z_o.sum())
        assert 0.01 < spikes / (steps * 8 * n) < 0.3  # the test exercises spiking and resets


def test_population_module_and_surrogate_gradient():
    pop = LIFPopulation()
    x = torch.full((50, 3, 4), 0.3, requires_grad=True)
    z, state = pop(x)
    assert z.shape == (50, 3, 4) and set(z.unique().tolist()) <= {0.0, 1.0} and z.sum() > 0
    z.sum().backward()
    assert x.grad.abs().sum() > 0  # the surrogate lets gradient through the spikes
    v = torch.tensor([-0.5, 0.0, 0.01, 0.5], requires_grad=True)
    out = superspike(v, 100.0)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    out.sum().backward()
    assert torch.allclose(v.grad, 1 / (100 * v.detach().abs() + 1) ** 2)
    assert "tau_mem=0.01" in repr(pop)


@pytest.mark.parametrize("kind", ["lif_box", "adaptive_lif"])
def test_box_and_adaptive_lif_identical_to_norse(kind):
    pytest.importorskip("norse")
    from norse.torch.functional import lif_box, lsnn
    from plastic.spiking import (AdaptiveLIFState, LIFBoxState, adaptive_lif_step,
                                 lif_box_step)
    g = torch.Generator().manual_seed(1)
    drive = torch.rand(1000, 4, 128, generator=g) * (2.5 if kind == "lif_box" else 0.6)
    pop = LIFPopulation(kind=kind)
    s_ours = pop.initial_state(drive[0])
    if kind == "lif_box":
        s_norse = lif_box.LIFBoxFeedForwardState(torch.zeros(4, 128))
        step_n = lambda x, s: lif_box.lif_box_feed_forward_step(x, s)
    else:
        s_norse = lsnn.LSNNFeedForwardState(torch.zeros(4, 128), torch.zeros(4, 128),
                                            torch.ones(4, 128))
        step_n = lambda x, s: lsnn.lsnn_feed_forward_step(x, s, lsnn.LSNNParameters())
    spikes = 0
    for t in range(1000):
        z_o, s_ours = pop.step(drive[t], s_ours)
        z_n, s_norse = step_n(drive[t], s_norse)
        assert torch.equal(z_o, z_n) and torch.equal(s_ours.v, s_norse.v)
        spikes += int(z_o.sum())
    assert spikes > 100
    if kind == "adaptive_lif":
        assert torch.equal(s_ours.b, s_norse.b) and float(s_ours.b.mean()) > 1.0  # adapted
    assert f"kind={kind!r}" in repr(pop)


def test_encoders_rates_latency_and_errors():
    import plastic
    from plastic import encoders
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    g = torch.Generator().manual_seed(0)
    s = encoders.poisson(x, 4000, f_max=100.0, dt=1e-3, generator=g)
    rate = s.mean(0) / 1e-3  # Hz
    assert s.shape == (4000, 1, 4) and rate[0, 0] == 0
    assert torch.allclose(rate[0, 1:], torch.tensor([25.0, 50.0, 100.0]), rtol=0.2)
    c = encoders.constant_current(x, 10, scale=2.0)
    assert c.shape == (10, 1, 4) and torch.equal(c[7], 2 * x)
    lat = encoders.latency(x, 11)
    assert lat.sum(0).tolist() == [[0.0, 1.0, 1.0, 1.0]]  # one spike each, none for 0
    assert lat[:, 0, 3].argmax() == 0 and lat[:, 0, 2].argmax() == 5 and lat[:, 0, 1].argmax() == 8
    with pytest.raises(plastic.SpecError, match="intensities in"):
        encoders.poisson(x * 3, 10)
    with pytest.raises(plastic.SpecError, match="positive integer"):
        encoders.latency(x, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encoders_are_exact_in_half_precision(dtype):
    """The spike probability and the spike time were computed in the input's dtype: a rate of
    0.02 per step fired at 0.0395 in bfloat16, and a latency past the last step was an index
    error (bfloat16, T = 300)."""
    from plastic import encoders
    x = torch.full((20000,), 2.0 ** -6)  # 0.0156, exact in every dtype
    p = [float(encoders.poisson(x.to(d), 50, f_max=1000.0, dt=1e-3,
                                generator=torch.Generator().manual_seed(0)).float().mean())
         for d in (torch.float32, dtype)]
    assert p[0] == p[1] and abs(p[1] - 2.0 ** -6) < 0.001
    assert encoders.poisson(x.to(dtype), 2).dtype == dtype
    v = torch.rand(1000).to(dtype)
    for steps in (11, 300, 4000):
        lat = encoders.latency(v, steps)
        exact = encoders.latency(v.float(), steps)  # the same intensities, in float32
        assert lat.dtype == dtype and torch.equal(lat.float(), exact)


def test_encoders_refuse_what_they_cannot_encode():
    """NaN passed the range check (no spikes, or a bare index error); f_max·dt > 1 saturated
    every rate at 1/dt silently; a list or steps=True were bare errors.  Integer and boolean
    data are intensities as floats."""
    import plastic
    from plastic import encoders
    for bad, match in (((torch.tensor([0.5, float("nan")]), 5), "NaN"),
                       (([0.5, 0.2], 5), "tensor of intensities"),
                       ((torch.tensor([0.5]), True), "positive integer")):
        for enc in (encoders.poisson, encoders.latency, encoders.constant_current):
            with pytest.raises(plastic.SpecError, match=match):
                enc(*bad)
    for f_max, dt in ((2000.0, 1e-3), (-100.0, 1e-3), (100.0, -1e-3)):
        with pytest.raises(plastic.SpecError, match="f_max·dt must be in"):
            encoders.poisson(torch.tensor([0.5]), 5, f_max=f_max, dt=dt)
    b = torch.tensor([True, False, True])
    assert torch.equal(encoders.latency(b, 5)[0], torch.tensor([1.0, 0.0, 1.0]))
    assert encoders.poisson(b, 5, f_max=1000.0).sum(0).tolist() == [5.0, 0.0, 5.0]
    with pytest.raises(plastic.SpecError, match="intensities in"):
        encoders.poisson(torch.tensor([0, 255], dtype=torch.uint8), 5)
    from plastic.spec import resolve_protocol
    with pytest.raises(plastic.SpecError, match="time.f_max · time.dt"):
        resolve_protocol({"time": {"encoder": "poisson", "f_max": 2000.0}})


def test_population_parameters_follow_the_input_s_device():
    """They live in a NamedTuple, which .to() does not reach: a per-neuron v_th stayed on the
    CPU (a device error on a GPU).  They are moved to the input's device once; to_empty (the
    meta-device idiom) leaves them alone."""
    pop = LIFPopulation(LIFParameters(v_th=torch.full((3,), 0.5)))
    assert pop._params_on(torch.empty(2, 3, device="meta")).v_th.device.type == "meta"
    pop = LIFPopulation(LIFParameters(v_th=torch.full((3,), 0.5))).double().to_empty(device="cpu")
    assert torch.equal(pop.p.v_th, torch.full((3,), 0.5))
    z, _ = pop(torch.ones(4, 2, 3, dtype=torch.float64))
    assert z.dtype == torch.float64 and z.sum() > 0


def test_population_parameters_take_the_input_s_dtype():
    """bf16 circuits: per-neuron parameters stayed float32, and so did the spikes."""
    from plastic.spiking import AdaptiveLIFParameters
    pop = LIFPopulation(AdaptiveLIFParameters(v_th=torch.full((3,), 0.5)), kind="adaptive_lif")
    z, state = pop(torch.ones(4, 2, 3, dtype=torch.bfloat16))
    assert z.dtype == torch.bfloat16 and state.b.dtype == torch.bfloat16


def test_a_low_precision_input_does_not_round_a_later_run_s_parameters():
    """The cast copy was written back: one bf16 input rounded tau_mem_inv 81.30 -> 81.5 for
    every later float32 run."""
    p = LIFParameters(tau_mem_inv=torch.as_tensor(1 / 0.0123), v_th=torch.full((3,), 0.3))
    pop = LIFPopulation(p)
    x = torch.rand(20, 2, 3) * 3
    first = pop(x)[0]
    pop(x.bfloat16())
    assert torch.equal(pop.p.tau_mem_inv, p.tau_mem_inv) and torch.equal(pop(x)[0], first)


def test_per_neuron_parameters_trained_or_changed_in_place_are_seen_in_another_dtype():
    """The parameters' copy in the input's dtype was cached by the NamedTuple alone: in float64
    (or on a GPU) an optimizer step or an in-place change of v_th went unseen, and gradients
    were taken against stale values."""
    torch.manual_seed(0)
    v_th = torch.full((8,), 1.0, requires_grad=True)
    pop = LIFPopulation(LIFParameters(v_th=v_th))
    x = torch.rand(20, 4, 8, dtype=torch.float64) * 3
    opt = torch.optim.SGD([v_th], lr=1.0)
    rates = []
    for _ in range(3):
        opt.zero_grad()
        z, _ = pop(x)
        (-z.sum()).backward()  # more spikes: lower thresholds
        assert v_th.grad is not None and v_th.grad.abs().sum() > 0
        opt.step()
        rates.append(float(z.detach().mean()))
    assert rates[2] > rates[0]
    with torch.no_grad():
        pop(x)  # cached without grad ...
        v_th.fill_(100.0)  # ... then changed in place
        assert pop(x)[0].sum() == 0
    # a parameter cached while frozen and then unfrozen gets its gradient (the review)
    frozen = torch.full((8,), 0.5)
    pop = LIFPopulation(LIFParameters(v_th=frozen))
    pop(x)
    frozen.requires_grad_(True)
    (-pop(x)[0].sum()).backward()
    assert frozen.grad is not None and frozen.grad.abs().sum() > 0


def test_a_per_neuron_population_prints_and_a_bad_surrogate_is_refused():
    from plastic.errors import SpecError
    pop = LIFPopulation(LIFParameters(v_th=torch.linspace(0.5, 1.5, 8)))
    assert "v_th=0.5..1.5 (per neuron)" in repr(pop)
    for alpha in (-100.0, 0.0, float("nan")):
        with pytest.raises(SpecError, match="alpha must be a finite number > 0"):
            LIFPopulation(LIFParameters(alpha=torch.as_tensor(alpha)))
    with pytest.raises(SpecError, match="v_th must be finite"):
        LIFPopulation(LIFParameters(v_th=torch.as_tensor(float("nan"))))
    from plastic.spiking import AdaptiveLIFParameters
    # these passed, and every state became NaN without a spike
    for name in ("v_leak", "v_reset"):
        with pytest.raises(SpecError, match=f"'lif' population: {name} must be finite"):
            LIFPopulation(LIFParameters(**{name: torch.tensor([0.0, float("nan")])}))
    with pytest.raises(SpecError, match="'adaptive_lif' population: beta must be finite"):
        LIFPopulation(AdaptiveLIFParameters(beta=float("inf")), kind="adaptive_lif")
    # another kind's parameters with every field this kind reads: adaptation silently dropped
    with pytest.raises(SpecError, match="another kind's \\(AdaptiveLIFParameters\\)"):
        LIFPopulation(AdaptiveLIFParameters(beta=torch.as_tensor(50.0)), kind="lif")
    with pytest.raises(SpecError, match="another kind's \\(LIFParameters\\)"):
        LIFPopulation(LIFParameters(), kind="lif_box")


def test_spikes_are_not_written_into_an_expanded_view():
    """out= may be the currents themselves; an expanded view (a constant current) wrote every
    step's spikes into the one shared row: 0 spikes where there are 73."""
    from plastic.errors import SpecError
    from plastic.spiking import lif_sequence
    c = (torch.rand(3, 8) * 3).expand(10, 3, 8)
    with torch.no_grad(), pytest.raises(SpecError, match="must not overlap itself"):
        lif_sequence(c, out=c)
    own = c.contiguous()
    with torch.no_grad():
        ref, _ = lif_sequence(c)
        z, _ = lif_sequence(own, out=own)
    assert ref.sum() > 0 and torch.equal(z, ref)
    # buffers of their own, strided or beside the currents in one storage, are fine
    with torch.no_grad():
        strided = torch.zeros(10, 3, 16)[..., ::2]
        assert torch.equal(lif_sequence(c.contiguous(), out=strided)[0], ref)
        big = torch.cat([c, torch.zeros_like(c)])
        assert torch.equal(lif_sequence(big[:10], out=big[10:])[0], ref)
        with pytest.raises(SpecError, match="must not overlap"):
            lif_sequence(big[:10], out=big[5:15])


def test_adaptive_lif_needs_more_steps_than_populations():
    """norse's LSNN step adds the input after the step, so each adaptive population delays it a
    step: with T at most their number the output did not depend on the input, and training ran
    without a gradient to the hidden weights."""
    from plastic import models
    from plastic.errors import SpecError
    from plastic.simulator import TimeStepped
    with pytest.raises(SpecError, match="1 adaptive_lif population.*take more than 1 steps"):
        TimeStepped(models.mlp(20, [16], 3, "adaptive_lif"), 1)
    TimeStepped(models.mlp(20, [16], 3, "adaptive_lif"), 2)
    # a synaptic delay adds its steps (the review: T 2 with a delay of 1 passed, and the output
    # equalled that of a zero input); so for plain LIF delays that add up to T or more
    with pytest.raises(SpecError, match=r"after 2 step\(s\).*take more than 2 steps"):
        TimeStepped(models.mlp(20, [16], 3, "adaptive_lif"), 2, delays={"3": 1})
    with pytest.raises(SpecError, match=r"after 4 step\(s\) \(0 adaptive"):
        TimeStepped(models.mlp(20, [16, 16], 3, "lif"), 4, delays={"3": 2, "5": 2})


def test_the_float64_adjoint_agrees_with_autograd_through_the_steps_with_float32_parameters():
    """The adjoint's synaptic decay was rounded to float32 (0.800000012 against the forward's
    0.79999999702): float64 gradients differed from autograd's by 1e-7."""
    from plastic.spiking import lif_sequence
    torch.manual_seed(0)
    x = (torch.rand(30, 4, 16, dtype=torch.float64) * 4).requires_grad_()
    z, _ = lif_sequence(x)
    (g,) = torch.autograd.grad((z * torch.linspace(0, 1, 16, dtype=torch.float64)).sum(), x)
    state, zs = None, []
    for t in range(30):
        zt, state = lif_step(x[t], state or LIFState(torch.zeros_like(x[0]), torch.zeros_like(x[0])))
        zs.append(zt)
    (ref,) = torch.autograd.grad((torch.stack(zs) * torch.linspace(0, 1, 16,
                                                                   dtype=torch.float64)).sum(), x)
    assert torch.equal(z, torch.stack(zs)) and z.sum() > 0
    assert float((g - ref).abs().max() / ref.abs().max()) < 1e-12


def test_a_step_that_overshoots_is_warned_of():
    """1 < dt/τ < 2 does not diverge, but the state flips sign each step: (i, v) went (−0.6,
    0.8), (0.36, −0.32), ... after a positive pulse."""
    with pytest.warns(UserWarning, match="dt/τ up to 1.6 > 1: the Euler step overshoots"):
        LIFPopulation(dt=8e-3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LIFPopulation(dt=1e-3)


def test_the_adaptive_population_refuses_what_the_fused_ones_refuse():
    """adaptive_lif runs its step function in a loop, which skipped lif_sequence's checks:
    tracebacks from torch for T = 0 or a per-neuron v_th of the wrong width, and integer
    currents accepted; lif_sequence with another kind's parameters raised AttributeError."""
    from plastic.errors import SpecError
    from plastic.spiking import AdaptiveLIFParameters, LIFBoxParameters, lif_sequence
    pop = LIFPopulation(kind="adaptive_lif")
    with pytest.raises(SpecError, match="T >= 1"):
        pop(torch.zeros(0, 2, 8))
    with pytest.raises(SpecError, match="must be floating point"):
        pop(torch.zeros(5, 2, 8, dtype=torch.long))
    wide = LIFPopulation(AdaptiveLIFParameters(v_th=torch.ones(7)), kind="adaptive_lif")
    with pytest.raises(SpecError, match=r"parameter v_th of shape \(7,\) does not broadcast"):
        wide(torch.zeros(5, 2, 8))
    with pytest.raises(SpecError, match="'lif' parameters need tau_syn_inv"):
        lif_sequence(torch.zeros(5, 2, 8), None, LIFBoxParameters(), kind="lif")
    assert pop(torch.rand(5, 2, 8) * 3)[0].shape == (5, 2, 8)


def test_a_population_builds_and_runs_on_the_meta_device():
    """Its checks read parameter values, which the meta device does not have (Tensor.item()
    cannot be called on meta tensors): a model built under torch.device('meta') failed."""
    with torch.device("meta"):
        pop = LIFPopulation(None, 1e-3, "lif")
        z, _ = pop(torch.randn(5, 3, 8))
        per_neuron = LIFPopulation(LIFParameters(tau_mem_inv=torch.full((8,), 100.0)), 1e-3)
    assert z.is_meta and z.shape == (5, 3, 8)
    assert "meta" in repr(per_neuron)
    # values are still checked where they exist
    with pytest.raises(Exception, match="dt/τ"):
        LIFPopulation(LIFParameters(tau_mem_inv=torch.full((8,), 3000.0)), 1e-3)


def test_a_per_neuron_numpy_parameter_runs_the_fused_sequence():
    """v_leak as a numpy array (per neuron) worked, then failed in the meta-device change."""
    import numpy as np
    from plastic.spiking import lif_sequence
    p = LIFParameters(v_leak=np.zeros(3))
    z, _ = lif_sequence(torch.ones(4, 2, 3) * 2, None, p)
    assert z.shape == (4, 2, 3)


@pytest.mark.parametrize("kind", ["lif", "lif_box", "adaptive_lif"])
def test_every_per_neuron_numpy_parameter_is_taken_as_a_tensor(kind):
    """check() accepted NumPy values for every field, but the time constants (and most of the
    adaptive neuron's fields) failed in the step with a bare TypeError, and an adaptive v_reset
    turned the output into float64."""
    import numpy as np
    from plastic.spiking import SPIKING_KINDS
    values = dict(tau_syn_inv=[150., 200., 250.], tau_mem_inv=[90., 100., 110.],
                  v_leak=[0., .05, .1], v_th=[.3, .4, .5], v_reset=[0., -.1, -.2],
                  alpha=[50., 100., 200.], beta=[1., 1.8, 2.], tau_adapt_inv=[1e-3, 2e-3, 3e-3])
    P = type(SPIKING_KINDS[kind][1])
    x = torch.rand(50, 2, 3, generator=torch.Generator().manual_seed(0)) * 0.8
    for name in P._fields:
        ref = LIFPopulation(P(**{name: torch.tensor(values[name])}), kind=kind)
        pop = LIFPopulation(P(**{name: np.array(values[name])}), kind=kind)
        for grad in (False, True):
            xs = [x.clone().requires_grad_(grad) for _ in range(2)]
            (z, s), (z_ref, s_ref) = pop(xs[0]), ref(xs[1])
            assert z.dtype == torch.float32 and s.v.dtype == torch.float32, name
            assert torch.equal(z, z_ref) and torch.equal(s.v, s_ref.v), name
            if grad:
                (z.sum() + s.v.sum()).backward()
                (z_ref.sum() + s_ref.v.sum()).backward()
                assert torch.equal(xs[0].grad, xs[1].grad), name

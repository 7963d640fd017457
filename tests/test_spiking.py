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

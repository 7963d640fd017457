import pytest
import torch

import plastic
from plastic.populations import RateParameters, RatePopulation, RateState, rate_step


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "identity"])
def test_rate_population_relaxes_to_steady_state(name):
    pop = RatePopulation(name, RateParameters(tau=5e-3, dt=1e-3))
    current = torch.randn(4, 7)
    state = None
    for _ in range(200):
        r, state = pop.step(current, state)
    assert torch.allclose(r, pop(current), atol=1e-6)


def test_rate_step_is_euler_and_pure():
    p = RateParameters(tau=10e-3, dt=1e-3)
    s = RateState(torch.zeros(3))
    i = torch.tensor([1.0, -1.0, 0.5])
    r, s2 = rate_step(i, s, p, torch.tanh)
    assert torch.allclose(r, 0.1 * torch.tanh(i))
    assert torch.equal(s.r, torch.zeros(3))  # the old state is untouched


def test_unknown_activation_is_spec_error():
    with pytest.raises(plastic.SpecError, match="unknown activation"):
        RatePopulation("swishy")


def test_unknown_population_names_spiking_and_rate_kinds():
    from plastic.models import make_population
    with pytest.raises(plastic.SpecError, match=r"unknown population 'lifx'; spiking: lif, "
                                                r"lif_box, adaptive_lif; rate \(activations\): elu"):
        make_population("lifx")


def test_circuits_refuse_what_would_not_run_or_not_learn():
    """A spiking population in a ResNet (not sequential, so never simulated in time), blocks and
    widths of different lengths, output_scale 0 (zero logits), rate dynamics outside the Euler
    step's stability; and an identity population pickles like the others."""
    import io

    from plastic import models
    from plastic.errors import SpecError
    from plastic.populations import RateParameters, RateState, rate_step
    from plastic.spec import resolve_circuit
    with pytest.raises(SpecError, match="takes a rate population, not 'lif'"):
        models.resnet20(population="lif")
    with pytest.raises(SpecError, match="needs one entry per stage"):
        models.ResNet((2, 2, 2), (16, 32), 10, 3, "cifar")
    with pytest.raises(SpecError, match="output_scale must be > 0"):
        resolve_circuit({"kind": "mlp", "output_scale": 0})
    r = RateState(torch.zeros(3))
    for bad in (RateParameters(tau=0.0), RateParameters(tau=1e-3, dt=5e-3)):
        with pytest.raises(SpecError, match="0 < dt < 2 tau"):
            rate_step(torch.ones(3), r, bad)
    torch.save(plastic.convert(models.mlp(4, [3], 2, "identity"), "fa"), io.BytesIO())


def test_rate_parameters_are_checked_when_the_population_is_made():
    """A dict or tuple p failed at the first step (AttributeError); a per-neuron tau tensor was
    an ambiguous-truth-value error; bad dynamics only showed at the first step."""
    for bad in ({"tau": 1e-2}, (1e-2, 1e-3)):
        with pytest.raises(plastic.SpecError, match="must be a RateParameters"):
            RatePopulation("relu", bad)
    with pytest.raises(plastic.SpecError, match="0 < dt < 2 tau"):
        RatePopulation("relu", RateParameters(tau=1e-3, dt=5e-3))
    with pytest.raises(plastic.SpecError, match="0 < dt < 2 tau"):
        RatePopulation("relu", RateParameters(tau=torch.tensor([1e-2, 1e-4]), dt=1e-3))
    tau = torch.tensor([1e-2, 2e-3, 5e-3])
    pop = RatePopulation("tanh", RateParameters(tau=tau, dt=1e-3))
    i = torch.tensor([[1.0, -1.0, 0.5]])
    r, _ = pop.step(i)
    assert torch.allclose(r, (1e-3 / tau) * torch.tanh(i))

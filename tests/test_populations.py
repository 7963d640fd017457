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

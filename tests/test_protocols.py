"""Every protocol shipped in protocols/ resolves, and each of its arms builds its circuit and
feedback and takes one training step on made-up data of the protocol's shape.  A typo in an arm
(an unknown option, a rule that cannot be attached to a conv synapse) fails here, not an hour
into `plastic run`."""
import math

import pytest
import torch
import torch.nn.functional as F

from plastic.convert import synapses
from plastic.data import Dataset
from plastic.learned import LearnedFeedback
from plastic.spec import PROTOCOLS_DIR, load_protocol
from plastic.train import _model

PROTOCOLS = sorted(p.stem for p in PROTOCOLS_DIR.glob("*.toml"))


def _made_up(data: str) -> Dataset:
    shape = (3, 32, 32) if "cifar" in data else (1, 28, 28)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16,) + shape, dtype=torch.uint8, generator=g)
    y = torch.arange(16) % 10
    c = shape[0]
    return Dataset(data, x, y, x, y, torch.full((c,), 0.5), torch.full((c,), 0.25),
                   [str(i) for i in range(10)])


def test_every_protocol_is_listed():
    assert {"quickstart", "cifar10", "information_variants"} <= set(PROTOCOLS)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_every_arm_of_a_shipped_protocol_builds_and_steps(name):
    spec = load_protocol(name)
    ds = _made_up(spec["data"])
    x, y = ds.normalize(ds.train_x[:8]), ds.train_y[:8].long()
    for arm_name, arm in spec["arms"].items():
        if arm.get("convert_from"):
            continue  # built from another arm's trained weights
        torch.manual_seed(0)
        model = _model(spec, arm, 0, ds)
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert math.isfinite(loss.item()), f"{name}.{arm_name}: loss {loss.item()}"
        for syn_name, syn in synapses(model):
            assert syn.weight.grad is not None and torch.isfinite(syn.weight.grad).all(), \
                f"{name}.{arm_name}: synapse {syn_name} got no finite weight gradient"
            fb = syn.feedback
            if isinstance(fb, LearnedFeedback) and fb.drive != "sleep":
                assert fb.weight.grad is not None and torch.isfinite(fb.weight.grad).all(), \
                    f"{name}.{arm_name}: learned feedback of {syn_name} wrote no finite B.grad"


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 100])
def test_onecycle_schedule_runs_through_short_runs(steps):
    """A smoke run of a few steps (4 steps at pct_start 0.25 made torch divide by zero) goes
    through the whole schedule, peaks at the arm's lr and ends far below it."""
    from plastic.train import _schedule
    spec = load_protocol("cifar10")
    spec["epochs"] = 1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = _schedule(spec, opt, steps, 0.2)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(math.isfinite(v) for v in lrs)
    assert max(lrs) <= 0.2 + 1e-12
    if steps <= 4:  # no warm-up: the first step at the arm's lr (one step trained at 2e-6)
        assert lrs[0] == pytest.approx(0.2)
    if steps >= 2:
        assert max(lrs) > 0.1 and lrs[-1] < 0.01


@pytest.mark.parametrize("order", ["name first", "settings first"])
def test_a_named_circuit_and_its_settings_in_either_order(order):
    """--set circuit=NAME circuit.KEY=... applies the setting to the named circuit whichever
    comes first (one order dropped it silently, the other was an error)."""
    sets = ["circuit=mlp-small", "circuit.hidden=[16]"]
    spec = load_protocol("quickstart", sets if order == "name first" else sets[::-1])
    assert spec["circuit"]["name"] == "mlp-small" and spec["circuit"]["hidden"] == [16]


def test_seeds_beyond_64_bits_are_refused():
    from plastic.errors import SpecError
    with pytest.raises(SpecError, match=r"seeds must be a non-empty list of integers in \[0, 2\^63\)"):
        load_protocol("quickstart", ["seeds=[99999999999999999999]"])

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


def test_a_table_given_to_settings_sets_them_and_a_new_arm_needs_its_feedback():
    """--set arms.fa={lr=0.1} replaced the arm: 'fa' trained backprop; optimizer={lr=0.3}
    dropped mnist's weight decay; arms.usff={lr=0.1} (a misspelt arm) added a backprop arm."""
    from plastic.errors import SpecError
    fa = load_protocol("quickstart", ["arms.fa={lr=0.1}"])["arms"]["fa"]
    assert fa["feedback"] == "fa" and fa["lr"] == 0.1
    opt = load_protocol("mnist", ["optimizer={lr=0.3}"])["optimizer"]
    assert opt["lr"] == 0.3 and opt["weight_decay"] == 1e-4
    with pytest.raises(SpecError, match=r"no arm 'usff' \(did you mean 'usf'\?\); a new arm "
                                        r"needs its feedback too"):
        load_protocol("quickstart", ["arms.usff={lr=0.1}"])
    new = load_protocol("quickstart", ['arms.new={feedback="usf", lr=0.2}'])["arms"]["new"]
    assert new["feedback"] == "usf" and new["lr"] == 0.2
    # an arm begun by a dotted key and given a table, or arms given as a table: merged too
    dfa2 = load_protocol("quickstart", ["arms.dfa2.feedback=dfa", "arms.dfa2={lr=0.1}"])
    assert dfa2["arms"]["dfa2"]["feedback"] == "dfa" and dfa2["arms"]["dfa2"]["lr"] == 0.1
    arms = load_protocol("quickstart", ["arms={fa={lr=0.1}}"])["arms"]
    assert arms["fa"]["feedback"] == "fa" and arms["fa"]["lr"] == 0.1 and "bp" in arms
    with pytest.raises(SpecError, match=r"--set arms: the protocol has no arm 'zz'"):
        load_protocol("quickstart", ["arms={zz={lr=0.1}}"])
    snn = load_protocol("rate_vs_spiking", ['arms.snn={convert_from="rate-bp", population="lif"}'])
    assert snn["arms"]["snn"]["convert_from"] == "rate-bp"  # a conversion arm needs no feedback
    # a rule given as a table replaces the rule (merged, {amp=1, decay=1} would keep null)
    info = load_protocol("cifar10", ["arms.information.feedback={amp=1,decay=1}"])
    assert info["arms"]["information"]["feedback"] == {"amp": 1, "decay": 1}


def test_bad_shapes_threads_and_protocol_names_are_one_line_errors():
    from plastic.errors import SpecError
    for bad in ("circuit.hidden=[true]", "circuit.input_shape=[1.0,28,28]",
                "circuit.input_shape=[true,28,28]"):  # a traceback, or a silent bool
        with pytest.raises(SpecError, match="must be a list of positive integers"):
            load_protocol("quickstart", [bad])
    with pytest.raises(SpecError, match=r"threads must be in \[0, 4096\]"):
        load_protocol("quickstart", ["threads=99999999999"])  # torch's OverflowError
    with pytest.raises(SpecError, match=r"unknown protocol 'mnisst' \(did you mean 'mnist'\?\); "
                                        r"built in: cifar10, "):
        load_protocol("mnisst")
    assert load_protocol("mnist.toml")["name"] == "mnist"  # the built-in one, by its file name
    # a population is read in any case, so it is recorded in one: LIF and lif are one circuit
    spec = load_protocol("rate_vs_spiking", ["circuit.population=ReLU",
                                             "arms.lif-bptt.population=LIF"])
    assert spec["circuit"]["population"] == "relu"
    assert spec["arms"]["lif-bptt"]["population"] == "lif"


def test_settings_that_would_have_no_effect_are_said():
    """A conversion arm ignored lr, feedback and learning (rc 0, identical rows); --set
    optimizer.lr did not reach the arms with their own lr, silently; a value split by the shell
    was reported as an unrelated key, or taken as a string."""
    from plastic.errors import SpecError
    for bad, what in (("arms.converted.lr=0.3", "lr"), ('arms.converted.feedback="usf"', "feedback"),
                      ('arms.converted.learning="online"', "learning")):
        with pytest.raises(SpecError, match=f"arms.converted runs the weights trained by arm "
                                            f"'rate-bp' and trains nothing: it does not read "
                                            f"{what}"):
            load_protocol("rate_vs_spiking", [bad])
    spec = load_protocol("rate_vs_spiking", ['arms.c2.convert_from="rate-bp"'])  # no feedback
    assert spec["arms"]["c2"]["convert_from"] == "rate-bp"
    for same in ("bp", "backprop", "transpose"):  # the source's kind, in any spelling: accepted
        load_protocol("rate_vs_spiking", ['arms.c2.convert_from="rate-bp"',
                                          f'arms.c2.feedback="{same}"'])
    with pytest.warns(UserWarning, match=r"--set optimizer.lr does not reach arm\(s\) fa, frsf, "
                                         r"dfa, which set their own"):
        load_protocol("mnist", ["optimizer.lr=0.01"])
    with pytest.raises(SpecError, match=r"'\[0,' is an array or table cut short; if the shell "
                                        r"split it at a space, quote the whole item: --set "
                                        r"'seeds=\[0, \.\.\.'"):
        load_protocol("quickstart", ["seeds=[0,", "1]"])
    with pytest.raises(SpecError, match=r"got '1\]' \(the rest of a value split by the shell"):
        load_protocol("quickstart", ["1]"])
    spec = load_protocol("quickstart", ["description=[draft] run"])  # a string, as before
    assert spec["description"] == "[draft] run"
    with pytest.raises(SpecError, match=r"'\[0 1\]' is not a valid TOML array or table"):
        load_protocol("quickstart", ["seeds=[0 1]"])
    with pytest.raises(SpecError, match="description must be a string"):  # valid TOML: typed
        load_protocol("quickstart", ['description=["[x"]'])


def test_settings_the_chosen_optimizer_or_schedule_does_not_read_do_not_split_experiments():
    """--set schedule={name="constant"} kept the protocol's pct_start once tables merged, and
    a run started before (recorded with the default) could not be resumed."""
    from plastic.results import _differences
    a = load_protocol("quickstart", ['schedule={name="constant"}', "schedule.pct_start=0.2"])
    b = load_protocol("quickstart", ['schedule={name="constant"}'])
    assert _differences(a, b) == []
    c = load_protocol("quickstart", ["schedule.pct_start=0.3"])
    d = load_protocol("quickstart")
    assert _differences(c, d) == ["schedule.pct_start"]  # read by the one-cycle schedule
    e = load_protocol("quickstart", ['optimizer={name="adam"}', "optimizer.momentum=0.5"])
    f = load_protocol("quickstart", ['optimizer={name="adam"}'])
    assert _differences(e, f) == []

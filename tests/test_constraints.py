"""Dale's law and sparse connectivity hold through training, for dense and conv synapses, and
with every kind of feedback synapse; learning is not frozen by them."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import plastic
from plastic.constraints import (Dale, SparseMask, apply_circuit_constraints, attach, constrain,
                                 constraints_of, dale_signs, enforce, random_mask)
from plastic.errors import SpecError
from plastic.populations import RatePopulation


@pytest.fixture(autouse=True)
def _one_thread():
    """These circuits are tiny: one thread is many times faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _task(n=512, k=10, seed=0):
    """Ten separable Gaussian clusters in 64 dimensions, shown as 1x8x8 images."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, 64, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = means[y] + 0.7 * torch.randn(n, 64, generator=g)
    return x.view(n, 1, 8, 8), y


def _mlp(feedback="fa"):
    torch.manual_seed(0)
    return plastic.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), RatePopulation("relu"),
                                         nn.Linear(32, 10)), feedback=feedback)


def _convnet(feedback="fa"):
    torch.manual_seed(0)
    return plastic.convert(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), RatePopulation("relu"),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), RatePopulation("relu"),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10)), feedback=feedback)


def _train(model, steps=120, lr=0.05, opt="sgd"):
    """Train with momentum and weight decay; (loss before, loss after, optimizer)."""
    x, y = _task()
    if opt == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    else:
        optim = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    attach(optim, model)
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        optim.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        optim.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    return before, after, optim


def _dale_everywhere(model, generator=None):
    for _, syn in plastic.synapses(model):
        n = syn.in_features if isinstance(syn, plastic.Dense) else syn.in_channels
        constrain(syn, Dale(dale_signs(n, 0.75, generator)))


def _pre_signs(syn, dale):
    """The sign of every weight's pre neuron, built element by element (independently of
    Dale.weight_signs), in the weight's shape."""
    w = syn.weight
    s = torch.empty(w.shape[:2])
    for o in range(w.shape[0]):
        for j in range(w.shape[1]):
            if isinstance(syn, plastic.Dense):
                pre = j
            else:
                per_group_out = syn.out_channels // syn.groups
                pre = (o // per_group_out) * (syn.in_channels // syn.groups) + j
            s[o, j] = dale.signs[pre]
    return s.view(*s.shape, *([1] * (w.dim() - 2))).expand_as(w)


def _assert_dale(w, signs):
    assert (w[signs > 0] >= 0).all()
    assert (w[signs < 0] <= 0).all()


@pytest.mark.parametrize("arch,feedback", [("mlp", "fa"), ("mlp", "transpose"),
                                           ("mlp", "kolen-pollack"), ("conv", "fa"),
                                           ("conv", "kolen-pollack")])
def test_dale_signs_hold_after_training_and_loss_falls(arch, feedback):
    model = (_mlp if arch == "mlp" else _convnet)(feedback)
    _dale_everywhere(model, torch.Generator().manual_seed(3))  # random E/I placement
    before, after, _ = _train(model)
    assert after < 0.4 * before, (before, after)
    for name, syn in plastic.synapses(model):
        (dale,) = constraints_of(syn)
        signs = _pre_signs(syn, dale)
        _assert_dale(syn.weight.detach(), signs)
        assert 0 < dale.n_excitatory <= dale.signs.numel()
        if feedback == "kolen-pollack":  # B receives W's (projected) update, so obeys it too
            b = syn.feedback.weight.detach()
            assert torch.isfinite(b).all()
            _assert_dale(b, signs)


def test_learning_moves_weights_under_dale():
    model = _mlp("fa")
    _dale_everywhere(model)
    w0 = {n: s.weight.detach().clone() for n, s in plastic.synapses(model)}
    before, after, _ = _train(model)
    assert after < 0.4 * before
    for name, syn in plastic.synapses(model):
        w = syn.weight.detach()
        (dale,) = constraints_of(syn)
        change = (w - w0[name]).norm() / w0[name].norm()
        assert change > 0.1, (name, float(change))
        # many synapses stay alive, out of excitatory and of inhibitory neurons alike
        # (here 52-79 %; the readout's excitatory ones are the most often held at zero)
        exc, inh = dale.signs > 0, dale.signs < 0
        assert (w[:, exc] > 0).float().mean() > 0.3, name
        assert (w[:, inh] < 0).float().mean() > 0.3, name
        # and some were held at zero: the projection did act
        assert (w == 0).any(), name


def test_dale_attach_makes_weights_sign_consistent():
    torch.manual_seed(0)
    syn = plastic.Dense(6, 3)
    w0 = syn.weight.detach().clone()
    signs = torch.tensor([1, 1, 1, 1, -1, -1])
    constrain(syn, Dale(signs))
    assert torch.equal(syn.weight.detach(), signs.float() * w0.abs())
    with torch.no_grad():
        syn.weight[0, 0] = -0.5  # excitatory, wrong sign
        syn.weight[1, 5] = 0.25  # inhibitory, wrong sign
    enforce(syn)
    assert syn.weight[0, 0] == 0 and syn.weight[1, 5] == 0
    assert dale_signs(10, 0.8).tolist() == [1.0] * 8 + [-1.0] * 2
    r = dale_signs(10, 0.8, torch.Generator().manual_seed(0))
    assert int((r > 0).sum()) == 8 and torch.equal(
        r, dale_signs(10, 0.8, torch.Generator().manual_seed(0)))
    assert torch.equal(Dale(torch.tensor([True, False])).signs, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("arch,feedback,opt", [("mlp", "fa", "sgd"),
                                               ("mlp", "kolen-pollack", "sgd"),
                                               ("mlp", "transpose", "adam"), ("conv", "fa", "sgd")])
def test_sparse_zero_pattern_unchanged_after_training(arch, feedback, opt):
    model = (_mlp if arch == "mlp" else _convnet)(feedback)
    masks = {}
    for i, (name, syn) in enumerate(plastic.synapses(model)):
        m = random_mask(syn.weight.shape, 0.5, torch.Generator().manual_seed(i))
        constrain(syn, SparseMask(m))
        masks[name] = m
        assert (syn.weight.detach() != 0).eq(m).all()  # zero at attach
    before, after, optim = _train(model, opt=opt)
    assert after < 0.4 * before, (before, after)
    for name, syn in plastic.synapses(model):
        m = masks[name]
        (sm,) = constraints_of(syn)
        fan_in = m[0].numel()  # k = round(0.5 fan_in) synapses per post neuron
        assert sm.density == int(fan_in * 0.5 + 0.5) / fan_in  # 0.5, or 5/9 for a 1x3x3 kernel
        assert abs(sm.density - 0.5) <= 0.5 / fan_in + 1e-12
        w = syn.weight.detach()
        assert torch.equal(w != 0, m), name  # the exact zero pattern
        # the gradient was masked before each step: no optimizer state on absent synapses
        state = optim.state[syn.weight]
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state:
                assert (state[key][~m] == 0).all(), (name, key)
        if feedback == "kolen-pollack":
            b = syn.feedback.weight.detach()
            assert torch.isfinite(b).all() and (b[~m] == 0).all()


def test_random_mask_density_and_fixed_in_degree():
    m = random_mask((32, 64), 0.25, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (32, 64)
    assert (m.sum(1) == 16).all() and SparseMask(m).density == 0.25
    c = random_mask((8, 4, 3, 3), 0.1, torch.Generator().manual_seed(0))  # 36 inputs: 4 each
    assert (c.view(8, -1).sum(1) == 4).all()
    assert torch.equal(m, random_mask((32, 64), 0.25, torch.Generator().manual_seed(0)))
    assert not torch.equal(m, random_mask((32, 64), 0.25, torch.Generator().manual_seed(1)))
    assert random_mask((3, 5), 1.0).all()


def test_state_dict_round_trip_keeps_constraint_buffers():
    a = _mlp("fa")
    apply_circuit_constraints(a, 0.8, 0.5, seed=1)
    _train(a, steps=5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()))
    keys = [k for k in sd if ".constraints." in k]
    assert sorted(keys) == ["1.constraints.0.mask", "3.constraints.0.signs",
                            "3.constraints.1.mask"]

    b = _mlp("fa")
    apply_circuit_constraints(b, 0.5, 0.25, seed=2)  # other signs, other masks
    b.load_state_dict(sd)
    for (_, sa), (_, sb) in zip(plastic.synapses(a), plastic.synapses(b)):
        for ca, cb in zip(constraints_of(sa), constraints_of(sb)):
            for (na, ta), (nb, tb) in zip(ca.named_buffers(), cb.named_buffers()):
                assert na == nb and torch.equal(ta, tb)
        assert torch.equal(sa.weight, sb.weight)
    assert constraints_of(b[3])[1].density == 0.5 and constraints_of(b[3])[0].n_excitatory == 26
    x, _ = _task(8)
    assert torch.equal(a(x), b(x))
    # an unconstrained circuit does not silently drop them
    with pytest.raises(RuntimeError, match="constraints"):
        _mlp("fa").load_state_dict(sd)


def test_buffers_follow_dtype_and_repr_shows_constraints():
    model = _mlp("transpose")
    apply_circuit_constraints(model, 0.8, 0.5, seed=0)
    text = repr(model)
    assert "Dale(n=32, excitatory=26, inhibitory=6)" in text
    assert "SparseMask(shape=(32, 64), density=0.5)" in text
    model = model.double()
    dale, mask = constraints_of(model[3])
    assert dale.signs.dtype == torch.float64 and mask.mask.dtype == torch.bool
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(opt, model)
    x, y = _task(16)
    F.cross_entropy(model(x.double()), y).backward()
    opt.step()
    w = model[3].weight.detach()
    assert (w[:, :26] >= 0).all() and (w[:, 26:] <= 0).all() and (w[~mask.mask] == 0).all()


def test_attach_handle_removes_hooks():
    model = _mlp("fa")
    constrain(model[3], Dale(dale_signs(32, 0.5)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(opt, model)
    handle.remove()
    with torch.no_grad():
        model[3].weight[0, 0] = -1.0  # excitatory pre neuron
    opt.step()  # no gradients: only the (removed) hook could have changed it
    assert model[3].weight[0, 0] == -1.0
    assert enforce(model) == 1 and model[3].weight[0, 0] == 0


def test_apply_circuit_constraints_summary_and_determinism():
    model = _convnet("fa")
    summary = apply_circuit_constraints(model, 0.8, 0.5, seed=7)
    assert summary == {
        # reads the raw input: no Dale; 9 possible inputs per post neuron, round(4.5) = 5 kept
        "0": {"n_pre": 1, "excitatory": None, "density": 5 / 9},
        "2": {"n_pre": 4, "excitatory": 3, "density": 0.5},
        "5": {"n_pre": 128, "excitatory": 102, "density": 0.5},
    }
    assert [type(c).__name__ for c in constraints_of(model[0])] == ["SparseMask"]
    again = _convnet("fa")
    apply_circuit_constraints(again, 0.8, 0.5, seed=7)
    other = _convnet("fa")
    apply_circuit_constraints(other, 0.8, 0.5, seed=8)
    for n in ("0", "2", "5"):
        m = constraints_of(model.get_submodule(n))[-1].mask
        assert torch.equal(m, constraints_of(again.get_submodule(n))[-1].mask)
    assert not torch.equal(constraints_of(model[5])[-1].mask, constraints_of(other[5])[-1].mask)
    plain = _mlp("fa")
    assert apply_circuit_constraints(plain, None, None, seed=0)["3"] == {
        "n_pre": 32, "excitatory": None, "density": 1.0}
    assert not constraints_of(plain[3])


def test_bad_specs_raise_spec_error():
    model = _convnet("fa")
    dense, conv = model[5], model[2]
    with pytest.raises(SpecError, match=r"5 signs given but the pre population has 128 neurons "
                                        r"\(in_features\)"):
        constrain(dense, Dale(dale_signs(5)))
    with pytest.raises(SpecError, match=r"8 signs given .* 4 neurons \(in_channels\)"):
        constrain(conv, Dale(dale_signs(8)))
    with pytest.raises(SpecError, match=r"\+1 \(excitatory\) or -1 \(inhibitory\)"):
        Dale(torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(SpecError, match="1-D"):
        Dale(torch.ones(2, 2))
    with pytest.raises(SpecError, match=r"mask shape \(10, 64\) does not match the weight's "
                                        r"shape \(10, 128\)"):
        constrain(dense, SparseMask(torch.ones(10, 64, dtype=torch.bool)))
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(SpecError, match=r"density \(connectivity\) must be a number in \(0, 1\]"):
            random_mask((4, 4), bad)
    with pytest.raises(SpecError, match="no connections"):
        SparseMask(torch.zeros(4, 4))
    with pytest.raises(SpecError, match="only 0 and 1"):
        SparseMask(torch.full((4, 4), 0.5))
    with pytest.raises(SpecError, match="excitatory fraction must be a number in"):
        dale_signs(10, 1.2)
    with pytest.raises(SpecError, match="Dense or Conv2d synapse"):
        constrain(nn.Linear(3, 2), Dale(dale_signs(3)))
    constrain(dense, Dale(dale_signs(128)))
    with pytest.raises(SpecError, match="already obeys Dale's law"):
        constrain(dense, Dale(dale_signs(128)))
    with pytest.raises(SpecError, match="excitatory fraction must be a number in"):
        apply_circuit_constraints(_mlp(), 1.5, None, seed=0)
    with pytest.raises(SpecError, match="density"):
        apply_circuit_constraints(_mlp(), None, 0.0, seed=0)
    assert not constraints_of(conv)  # a failed constrain leaves the synapse as it was


def test_a_resnet_with_dales_law_warns_that_its_skip_connections_are_unconstrained():
    import warnings

    from plastic import models
    net = plastic.convert(models.ResNet((1,), (8,), 10, 3, "cifar"), "fa")
    with pytest.warns(UserWarning, match="identity skip connections"):
        apply_circuit_constraints(net, 0.8, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_circuit_constraints(plastic.convert(models.mlp(8, [6], 3, "relu"), "fa"), 0.8, None)


def test_dale_keeps_a_batch_norm_gain_from_flipping_the_synapses_signs():
    """conv -> BN: the effective weight is W γ/σ, so a negative γ turned every synapse onto that
    neuron the other sign (16 of 16 gains went negative in 2 epochs on MNIST; folded into W for
    conversion, 910 of 1152 weights had the wrong sign)."""
    from plastic import models
    torch.manual_seed(0)
    net = plastic.convert(models.convnet(1, (4, 6), 3, "relu", True, 8), "fa")
    apply_circuit_constraints(net, 0.5, None)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    attach(opt, net)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        for bn in bns:
            bn.weight.grad = torch.ones_like(bn.weight)  # pushes every γ below zero
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert bool((bns[1].weight >= 0).all())  # after the Dale-constrained second conv
    assert bool((bns[0].weight < 0).any())  # the first conv reads the raw input: free
    assert [k for k in net.state_dict() if "constraints" in k and "norm" in k] == []


def test_rate_and_spiking_versions_of_a_circuit_draw_the_same_masks_and_feedback():
    """The time-stepped circuit names its synapses circuit.N: they were seeded apart (mask
    overlap 0.50 at density 0.5, chance)."""
    from plastic.simulator import TimeStepped
    from plastic.spiking import LIFPopulation

    def build(spiking):
        torch.manual_seed(0)
        seq = nn.Sequential(plastic.Dense(6, 8), LIFPopulation() if spiking else RatePopulation(),
                            plastic.Dense(8, 3))
        net = plastic.convert(TimeStepped(seq, steps=3) if spiking else seq, "fa", seed=4)
        apply_circuit_constraints(net, None, 0.5, seed=4)
        return [s for _, s in plastic.synapses(net)]
    for r, s in zip(build(False), build(True)):
        assert torch.equal(r.weight, s.weight) and torch.equal(r.feedback.weight, s.feedback.weight)


def test_dale_on_populations_whose_rates_go_negative_warns():
    with pytest.warns(UserWarning, match="'tanh' populations: their rates go negative"):
        apply_circuit_constraints(plastic.convert(plastic.models.mlp(8, [6], 3, "tanh"), "fa"),
                                  0.8, None)
    # a converted torch model's own activations too (they passed without a word)
    for act, name in ((nn.Tanh(), "Tanh"), (nn.Hardswish(), "Hardswish"),
                      (nn.Threshold(0.0, -1.0), "Threshold"), (nn.Threshold(-1.0, 0.0),
                                                                "Threshold")):
        with pytest.warns(UserWarning, match=f"'{name}' populations: their rates go negative"):
            apply_circuit_constraints(plastic.convert(nn.Sequential(
                nn.Linear(8, 6), act, nn.Linear(6, 3)), "fa"), 0.8, None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a threshold to 0 keeps rates non-negative
        for act in (nn.Threshold(0.1, 0.0), nn.ReLU6(), nn.Hardtanh(0.0, 1.0)):
            apply_circuit_constraints(plastic.convert(nn.Sequential(
                nn.Linear(8, 6), act, nn.Linear(6, 3)), "fa"), 0.8, None)


def test_numpy_scalars_are_numbers_and_a_wrapped_circuit_draws_its_own_masks():
    """np.float32(0.5) was refused as out of (0, 1]; a DataParallel-wrapped circuit named its
    synapses module.N and drew other masks than the circuit itself."""
    import numpy as np
    assert random_mask((4, 4), np.float32(0.5)).sum() == 8
    assert int((dale_signs(np.int64(10), np.float32(0.8)) > 0).sum()) == 8
    with pytest.raises(SpecError, match="must be a number in"):
        random_mask((4, 4), "0.5")

    def masks(wrap):
        torch.manual_seed(0)
        net = plastic.convert(plastic.models.mlp(8, [6], 3, "relu"), "fa", seed=0)
        apply_circuit_constraints(wrap(net), 0.8, 0.5, seed=0)
        return [c.mask for _, s in plastic.synapses(net) for c in constraints_of(s)
                if isinstance(c, SparseMask)]
    plain, wrapped = masks(lambda n: n), masks(nn.DataParallel)
    assert len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(plain, wrapped))


@pytest.mark.parametrize("spiking", [False, True])
def test_synaptic_operations_count_only_the_synapses_a_sparse_mask_leaves(spiking):
    """Each active input causes as many events as it has synapses: at connectivity 0.2 the count
    was that of the full circuit (6.42e4 against 1.30e4 present)."""
    from plastic.simulator import TimeStepped, inference_stats, synaptic_events
    from plastic.spiking import LIFPopulation
    torch.manual_seed(0)
    seq = nn.Sequential(plastic.Dense(64, 100), LIFPopulation() if spiking else
                        RatePopulation("relu"), plastic.Dense(100, 10))
    net = plastic.convert(TimeStepped(seq, steps=4) if spiking else seq, "fa", seed=0)
    apply_circuit_constraints(net, None, 0.2, seed=0)
    x = torch.rand(8, 64) * (8 if spiking else 1)
    _, stats = inference_stats(net, x)
    first, second = [s for _, s in plastic.synapses(net)]
    m1, m2 = (next(c.mask for c in constraints_of(s) if isinstance(c, SparseMask))
              for s in (first, second))
    with torch.no_grad():
        if spiking:  # the hidden spikes of every step, (T, B, 100)
            hidden = net.run(x, record=("spikes",))[1].spikes["circuit.1"]
        else:
            hidden = net[1](net[0](x))
    expected = (float(((x != 0).float() @ m1.sum(0).float()).sum()) * (4 if spiking else 1)
                + float(((hidden != 0).float() @ m2.sum(0).float()).sum())) / 8
    assert stats["synaptic_ops"] == pytest.approx(expected, rel=1e-6)
    assert stats["synaptic_ops"] < 0.3 * (64 * 100 * (4 if spiking else 1) + 100 * 10 * 4)
    # a grouped, strided conv: each input channel counts the synapses of its own group
    conv = plastic.convert(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, groups=2)), "fa")
    apply_circuit_constraints(conv, None, 0.5, seed=0)
    mask = constraints_of(conv[0])[0].mask
    xc = (torch.rand(2, 4, 8, 8) > 0.5).float()
    per_channel = torch.cat([mask[:3].sum((0, 2, 3)), mask[3:].sum((0, 2, 3))]).float()
    assert synaptic_events(conv[0], xc) == pytest.approx(
        float((xc.sum((0, 2, 3)) * per_channel).sum()) / 4)


def test_the_batch_norm_gain_constraint_comes_last_so_older_state_dicts_load():
    """Inserted before the mask, it renumbered 'constraints.1.mask' of earlier checkpoints."""
    from plastic import models
    from plastic.constraints import NonNegativeGain
    net = plastic.convert(models.convnet(1, (4, 6), 3, "relu", True, 8), "fa")
    apply_circuit_constraints(net, 0.5, 0.5)
    syn = dict(plastic.synapses(net))["4"]
    assert [type(c) for c in syn.constraints] == [Dale, SparseMask, NonNegativeGain]


def test_constraints_on_the_meta_device_are_one_line_errors():
    """Built under torch.device("meta") they were a bare 'Tensor.item() cannot be called on meta
    tensors'; bound to a meta synapse, to_empty filled their signs with leftover memory (weights
    of 5e34 after enforce, no error)."""
    with torch.device("meta"):
        with pytest.raises(SpecError, match="Dale on the meta device"):
            Dale(dale_signs(4))
        with pytest.raises(SpecError, match="SparseMask on the meta device"):
            SparseMask(torch.ones(3, 4, dtype=torch.bool))
        syn = plastic.Dense(4, 3)
    with pytest.raises(SpecError, match="after the circuit is materialised"):
        constrain(syn, Dale(dale_signs(4)))
    with torch.device("meta"):
        net = plastic.convert(plastic.models.mlp(4, [3], 2, "relu"), "fa")
    with pytest.raises(SpecError, match="meta device"):
        apply_circuit_constraints(net, 0.5, 0.5)


def test_a_pruned_synapse_keeps_its_constraints_and_a_parametrized_one_is_refused():
    """The projections acted on the pruned synapse's computed W, a temporary copy: its stored
    weight_orig broke Dale's law, silently (6 sign violations after 5 steps); so did a
    parametrized W; attach() and enforce() on something that is not a module were bare errors."""
    from torch.nn.utils import parametrize, prune
    from plastic.constraints import dale_signs, enforce
    torch.manual_seed(0)
    net = plastic.convert(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)), "fa")
    prune.random_unstructured(net[2], "weight", 0.4)
    constrain(net[2], Dale(dale_signs(5, 0.6)))
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    attach(opt, net)
    signs = net[2].constraints[0].signs
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
        opt.step()
    w = net[2].weight_orig * net[2].weight_mask
    assert ((w * signs) >= 0).all() and ((net[2].weight_orig * signs) >= 0).all()
    other = plastic.convert(nn.Sequential(nn.Linear(8, 5)), "fa")

    class Twice(nn.Module):
        def forward(self, w):
            return 2 * w
    parametrize.register_parametrization(other[0], "weight", Twice())
    with pytest.raises(SpecError, match="its W is not a parameter but computed"):
        constrain(other[0], Dale(dale_signs(8, 0.5)))
    assert constraints_of(other[0]) == []  # refused before anything was attached
    enforce(other)
    two = plastic.convert(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)), "fa")
    parametrize.register_parametrization(two[2], "weight", Twice())
    with pytest.raises(SpecError, match="synapse '2'"):
        apply_circuit_constraints(two, 0.8, 0.5)
    assert not any(constraints_of(s) for _, s in plastic.synapses(two))  # none half-applied
    for call in (lambda: attach(torch.optim.SGD(net.parameters(), lr=0.1), [net]),
                 lambda: enforce(None)):
        with pytest.raises(SpecError, match="needs a torch.nn.Module"):
            call()

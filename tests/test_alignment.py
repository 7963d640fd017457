"""Alignment on real MNIST data (the embedded sample of real digits)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import plastic
from plastic import data, models


def test_fa_hidden_update_angle_below_60_within_one_epoch():
    """784-256-10 tanh, SGD: one epoch of the 6000 real digits (94 steps of 64)."""
    ds = data.load("mnist-sample")
    torch.manual_seed(0)
    net = plastic.convert(models.mlp(784, [256], 10, "tanh"), "fa", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    probe_x = ds.normalize(ds.train_x[:1000])
    probe_y = ds.train_y[:1000].long()
    first = plastic.update_angles(net, F.cross_entropy, probe_x, probe_y)
    assert all(a > 80 for a in first.values()), first  # random B: no alignment yet
    g = torch.Generator().manual_seed(0)
    for x, y in ds.batches("train", 64, shuffle=True, generator=g):  # one epoch
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    update, signal = plastic.hidden_angles(net, F.cross_entropy, probe_x, probe_y)
    assert set(update) == {"1"}
    assert 20 < update["1"] < 60, update  # aligned, yet not backprop (measured 56.5°)
    assert 20 < signal["1"] < 60, signal
    # B is fixed and random: it is W that comes to align with B^T (Lillicrap et al. 2016)
    assert plastic.weight_angles(net)["3"] < 80
    assert plastic.weight_angles(net)["1"] > 85  # a B the error never reaches stays unaligned


def test_angle_spans_0_to_180_degrees():
    a = torch.randn(50, dtype=torch.float64)
    assert plastic.angle(a, a) < 1e-6
    assert abs(plastic.angle(a, -a) - 180) < 1e-6
    b = torch.randn(50, dtype=torch.float64)
    b = b - (b @ a) / (a @ a) * a
    assert abs(plastic.angle(a, b) - 90) < 1e-6


def test_transpose_update_angle_is_zero_and_usf_is_small():
    ds = data.load("mnist-sample")
    x, y = ds.normalize(ds.train_x[:256]), ds.train_y[:256].long()
    plain = models.mlp(784, [64, 64], 10, "tanh")
    bp = plastic.update_angles(plastic.convert(plain, "transpose"), F.cross_entropy, x, y)
    assert max(bp.values()) < 1e-3
    usf = plastic.update_angles(plastic.convert(plain, "usf"), F.cross_entropy, x, y)
    assert max(usf.values()) < 60


def test_update_angles_leave_grads_and_batchnorm_stats_untouched():
    net = plastic.convert(models.convnet(1, (4, 8), 10, "relu", True, 28), "fa")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plastic.update_angles(net, F.cross_entropy, x, y)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("kind", ["information", "symmetric", "kolen-pollack", "activation"])
def test_measuring_a_circuit_never_trains_its_feedback(kind):
    """update_angles between backward() and step() leaves every .grad as backward left it:
    the probe batch must not reach B.grad through the rule's plasticity."""
    net = plastic.convert(models.convnet(1, (4, 8), 10, "relu", True, 28), kind)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(net(x), y).backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert any("feedback" in n for n in before)
    plastic.update_angles(net, F.cross_entropy, torch.randn(16, 1, 28, 28),
                          torch.randint(0, 10, (16,)))
    after = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    with plastic.plasticity_paused():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
    assert all(p.grad is None for n, p in net.named_parameters() if "feedback" in n)
    assert all(p.grad is not None for n, p in net.named_parameters() if "feedback" not in n)


def test_angles_of_a_circuit_with_a_synapse_the_forward_pass_does_not_use():
    """An auxiliary head that the loss does not read has no angles (NaN); the others do (it was
    a KeyError)."""
    class WithHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.out = torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)
            self.aux = torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.out(torch.relu(self.body(x)))

    torch.manual_seed(0)
    m = plastic.convert(WithHead(), "information", output="out")
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
    update, signal = plastic.hidden_angles(m, F.cross_entropy, x, y)
    assert update["body"] > 1 and signal["body"] > 1
    assert update["aux"] != update["aux"] and signal["aux"] != signal["aux"]  # NaN
    assert set(plastic.metrics.rule_values(m, x)) == {f"{k}/{n}" for k in ("amp", "null", "decay")
                                                      for n in ("body", "out")}


def test_angles_of_a_circuit_with_a_frozen_synapse():
    """A frozen synapse (fine-tuning) has no update angle (NaN); it was a bare autograd error."""
    torch.manual_seed(0)
    m = plastic.convert(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(),
                                            torch.nn.Linear(6, 5), torch.nn.Tanh(),
                                            torch.nn.Linear(5, 3)), "fa")
    m[0].weight.requires_grad_(False)
    update, signal = plastic.hidden_angles(m, F.cross_entropy, torch.randn(4, 8),
                                           torch.randint(0, 3, (4,)))
    assert update["0"] != update["0"] and 1 < update["2"] < 179
    assert 1 < signal["0"] < 179


def test_the_error_angle_of_a_reused_synapse_covers_every_use():
    """A synapse used twice in one pass (tied weights, a recurrence unrolled by hand) was
    compared on its last use only (97.8° where both uses give 94.5°)."""
    from plastic.metrics import backprop
    from plastic.synapses import plasticity_paused

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rec = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(16, 3)

        skip_first = False

        def forward(self, x):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.skip_first):
                h = torch.tanh(self.rec(torch.tanh(self.inp(x))))
            return self.out(torch.tanh(self.rec(h)))
    torch.manual_seed(0)
    net = plastic.convert(Twice(), "fa", seed=0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

    def errors(exact, skip_first=False):
        outs = []
        h = net.rec.register_forward_hook(lambda m, i, o: outs.append(o))
        net.skip_first = skip_first
        with backprop(net) if exact else contextlib.nullcontext(), plasticity_paused():
            loss = F.cross_entropy(net(x), y)
            outs = outs[1:] if skip_first else outs
            g = torch.autograd.grad(loss, outs)
        net.skip_first = False
        h.remove()
        return torch.cat([e.reshape(-1) for e in g])
    both = plastic.angle(errors(False), errors(True))
    assert plastic.hidden_angles(net, F.cross_entropy, x, y)[1]["rec"] == pytest.approx(both,
                                                                                       abs=1e-6)
    # a use that gets no error (under no_grad) counts as zero error, not as a NaN angle
    second_only = errors(False, skip_first=True), errors(True, skip_first=True)
    net.skip_first = True
    assert plastic.hidden_angles(net, F.cross_entropy, x, y)[1]["rec"] == pytest.approx(
        plastic.angle(*second_only), abs=1e-6)


def test_weight_angles_leave_out_hidden_dfa_and_keep_the_random_stream():
    """A hidden DFA matrix shaped like W (width = classes) has no W^T to compare with; brsf's B,
    redrawn for every batch, is drawn without moving the training's random stream, so two
    measurements agree."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                              torch.nn.Tanh(), torch.nn.Linear(4, 4))
    m = plastic.convert(net, "dfa")
    m(torch.randn(2, 6, requires_grad=True))  # a pass that routes errors draws each B
    assert m[0].feedback.weight.shape == m[0].weight.shape
    assert set(plastic.metrics.weight_angles(m)) == set(plastic.metrics.norm_ratios(m)) == {"4"}
    m = plastic.convert(net, "brsf")
    torch.manual_seed(1)
    first = plastic.metrics.weight_angles(m)
    assert plastic.metrics.norm_ratios(m)
    drawn = torch.randn(3)
    torch.manual_seed(1)
    assert torch.equal(torch.randn(3), drawn)  # the stream did not move
    torch.manual_seed(1)
    assert plastic.metrics.weight_angles(m) == first


def test_angles_of_a_circuit_built_by_hand_leave_out_its_output():
    """Only convert marks the output synapse; by hand it is the last one (it was reported,
    at 0°, pulling any mean down)."""
    net = torch.nn.Sequential(plastic.Dense(6, 5, feedback="fa"), torch.nn.Tanh(),
                              plastic.Dense(5, 3, feedback="fa"))
    update = plastic.update_angles(net, F.cross_entropy, torch.randn(8, 6),
                                   torch.randint(0, 3, (8,)))
    assert list(update) == ["0"]


def test_measuring_an_unconverted_model_is_an_error():
    """weight_angles and update_angles on a plain torch model returned {} silently."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    for measure in (lambda: plastic.weight_angles(net), lambda: plastic.metrics.norm_ratios(net),
                    lambda: plastic.update_angles(net, F.cross_entropy, x, y),
                    lambda: plastic.metrics.rule_values(net, x)):
        with pytest.raises(plastic.SpecError, match="no plastic synapse to measure; convert it"):
            measure()


def test_the_error_angle_is_the_synapse_output_s_under_an_in_place_activation():
    """The hook kept the synapse's output, which ReLU(inplace=True) then rewrote: the error
    taken was the activation's output's, without f' (89.70 degrees against 92.61)."""
    from torch import nn

    def net(inplace):
        torch.manual_seed(0)
        return plastic.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=inplace),
                                             nn.Conv2d(8, 8, 3), nn.ReLU(inplace=inplace),
                                             nn.Flatten(), nn.Linear(8 * 4 * 4, 10)),
                               "fa", seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    plain = plastic.metrics.hidden_angles(net(False), F.cross_entropy, x, y)
    inplace = plastic.metrics.hidden_angles(net(True), F.cross_entropy, x, y)
    assert plain == inplace and all(70 < v < 110 for v in plain[1].values())


def test_the_update_angle_is_that_of_the_updates_training_applies_under_sparse_connectivity():
    """attach() masks W.grad of absent synapses before each step; the angle counted the
    unmasked entries too (88.73 degrees reported where the applied updates are 84.77 apart)."""
    from plastic.constraints import apply_circuit_constraints, constraints_of
    torch.manual_seed(0)
    net = plastic.convert(models.mlp(40, [64, 64], 10, "tanh"), "fa", seed=0)
    apply_circuit_constraints(net, None, 0.1, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 40, generator=g), torch.randint(0, 10, (32,), generator=g)
    got = plastic.update_angles(net, F.cross_entropy, x, y)

    def grads(bp):
        net.zero_grad()
        with (plastic.metrics.backprop(net) if bp else contextlib.nullcontext()), \
                plastic.plasticity_paused():
            F.cross_entropy(net(x), y).backward()
        out = {}
        for name, s in plastic.synapses(net):
            gw = s.weight.grad.clone()
            for c in constraints_of(s):
                c.mask_grad_weight_(s, gw)
            out[name] = gw
        return out
    rule, bp = grads(False), grads(True)
    for name, v in got.items():
        assert v == pytest.approx(plastic.metrics.angle(rule[name], bp[name]), abs=1e-6)


@pytest.mark.parametrize("measure", ["update_angles", "rule_values"])
def test_measuring_between_forward_and_backward_leaves_the_pending_backward(measure):
    """The measurement restored batch norm's running statistics in place, which the pending
    backward of the forward pass before it had saved: autograd's 'modified by an inplace
    operation' error. The gradients now equal those of the unmeasured step."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = []
    for measured in (False, True):
        torch.manual_seed(1)
        net = plastic.convert(torch.nn.Sequential(
            torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
            torch.nn.Linear(4, 3)), "information")
        loss = F.cross_entropy(net(x), y)
        if measured:
            args = (F.cross_entropy, x, y) if measure == "update_angles" else (x,)
            getattr(plastic.metrics, measure)(net, *args)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))

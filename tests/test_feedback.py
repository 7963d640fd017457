"""Each feedback kind delivers exactly its definition, for dense and conv synapses."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

import plastic
from plastic.errors import SpecError

KINDS = ["transpose", "fa", "usf", "brsf", "frsf", "dfa"]


def _mlp(seed=0, dims=(12, 9, 7, 5)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def test_transpose_reproduces_autograd_mlp_and_resnet():
    x = torch.randn(16, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    plain = _mlp()
    conv = plastic.convert(plain, "transpose")
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(conv(x), y).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), conv.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), n

    torch.manual_seed(1)
    plain = plastic.models.resnet18(10, stem="cifar").double()
    conv = plastic.convert(plain, "transpose")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(conv(x), y).backward()
    n_checked = 0
    for (n, p), (_, q) in zip(plain.named_parameters(), conv.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), n
        n_checked += 1
    assert n_checked > 40


def _expected_b(kind, syn, seed_for_brsf=None):
    w = syn.weight.detach()
    if kind == "transpose":
        return w
    if kind == "fa":
        return syn.feedback.weight
    if kind == "usf":
        return torch.sign(w) * w.pow(2).mean().sqrt()
    if kind == "frsf":
        return syn.feedback.magnitude * torch.sign(w) * w.pow(2).mean().sqrt()
    if kind == "brsf":
        torch.manual_seed(seed_for_brsf)
        return torch.randn_like(w).abs() * torch.sign(w) * w.pow(2).mean().sqrt()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["transpose", "fa", "usf", "brsf", "frsf"])
def test_dense_layerwise_kinds(kind):
    """W1.grad = ((delta2 @ B2) ⊙ f'(a1))^T x with B2 the kind's feedback of synapse 2."""
    net = plastic.convert(_mlp(dims=(12, 9, 5)), {"2": kind, "*": "transpose"}, seed=3)
    x = torch.randn(8, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    a1 = net[0](x)
    h = torch.tanh(a1)
    out = net[2](h)
    loss = F.cross_entropy(out, y)
    delta2 = torch.autograd.grad(loss, out, retain_graph=True)[0]
    if kind == "brsf":
        torch.manual_seed(123)
    loss.backward()
    b2 = _expected_b(kind, net[2], 123)
    delta1 = (delta2 @ b2) * (1 - h.detach() ** 2)
    assert torch.allclose(net[0].weight.grad, delta1.t() @ x, atol=1e-10)
    assert torch.allclose(net[0].bias.grad, delta1.sum(0), atol=1e-10)
    # the synapse's own weight update is delta x^T whatever its feedback
    assert torch.allclose(net[2].weight.grad, delta2.t() @ h.detach(), atol=1e-10)
    if kind in ("usf", "brsf", "frsf"):  # sign symmetry: W's signs, whatever the magnitudes
        assert torch.equal(torch.sign(b2), torch.sign(net[2].weight.detach()))
    if kind == "frsf":
        assert (net[2].feedback.magnitude >= 0).all()
    if kind in ("fa", "frsf"):  # fixed: the same B on the next batch
        assert torch.allclose(net[2].feedback.matrix(net[2].weight), b2, rtol=1e-12, atol=0)
    if kind == "brsf":  # redrawn on every pass, with W's signs
        again = net[2].feedback.matrix(net[2].weight)
        assert not torch.equal(again, b2)
        assert torch.equal(torch.sign(again), torch.sign(b2))


def test_dense_dfa_is_output_error_projection():
    """Nøkland 2016: delta_l = (B_l e) ⊙ f'(a_l) with e the output error, for every hidden layer."""
    net = plastic.convert(_mlp(dims=(12, 9, 7, 5)), "dfa", seed=0)
    x = torch.randn(8, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    a1 = net[0](x); h1 = torch.tanh(a1)
    a2 = net[2](h1); h2 = torch.tanh(a2)
    out = net[4](h2)
    loss = F.cross_entropy(out, y)
    e = torch.autograd.grad(loss, out, retain_graph=True)[0]
    loss.backward()
    b2, b3 = net[2].feedback.weight, net[4].feedback.weight  # project onto h1, h2
    assert b2.shape == (5, 9) and b3.shape == (5, 7)
    d2 = (e @ b3) * (1 - h2.detach() ** 2)
    d1 = (e @ b2) * (1 - h1.detach() ** 2)
    assert torch.allclose(net[2].weight.grad, d2.t() @ h1.detach(), atol=1e-10)
    assert torch.allclose(net[0].weight.grad, d1.t() @ x, atol=1e-10)
    assert torch.allclose(net[4].weight.grad, e.t() @ h2.detach(), atol=1e-10)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h1 = torch.tanh(self.conv1(x))
        h2 = torch.tanh(self.conv2(h1))
        return self.fc(h2.flatten(1))


@pytest.mark.parametrize("kind", ["transpose", "fa", "usf", "brsf", "frsf"])
def test_conv_layerwise_kinds(kind):
    torch.manual_seed(0)
    net = plastic.convert(_ConvNet().double(), {"conv2": kind, "*": "transpose"}, seed=5)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    h1 = torch.tanh(net.conv1(x))
    a2 = net.conv2(h1)
    loss = F.cross_entropy(net.fc(torch.tanh(a2).flatten(1)), y)
    delta2 = torch.autograd.grad(loss, a2, retain_graph=True)[0]
    if kind == "brsf":
        torch.manual_seed(7)
    loss.backward()
    b2 = _expected_b(kind, net.conv2, 7)
    dh1 = conv2d_input(h1.shape, b2, delta2, stride=2, padding=1)
    delta1 = dh1 * (1 - h1.detach() ** 2)
    expected = conv2d_weight(x, net.conv1.weight.shape, delta1, padding=1)
    assert torch.allclose(net.conv1.weight.grad, expected, atol=1e-10)
    assert torch.allclose(net.conv2.weight.grad,
                          conv2d_weight(h1.detach(), net.conv2.weight.shape, delta2, stride=2, padding=1),
                          atol=1e-10)


def test_conv_dfa_is_output_error_projection():
    torch.manual_seed(0)
    net = plastic.convert(_ConvNet().double(), "dfa", seed=1)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    h1 = torch.tanh(net.conv1(x))
    h2 = torch.tanh(net.conv2(h1))
    out = net.fc(h2.flatten(1))
    loss = F.cross_entropy(out, y)
    e = torch.autograd.grad(loss, out, retain_graph=True)[0]
    loss.backward()
    b_conv2 = net.conv2.feedback.weight  # (n_out, 4, 8, 8): projects e onto conv2's pre population
    assert b_conv2.shape == (5, 4, 8, 8)
    delta1 = (e @ b_conv2.flatten(1)).view_as(h1) * (1 - h1.detach() ** 2)
    assert torch.allclose(net.conv1.weight.grad,
                          conv2d_weight(x, net.conv1.weight.shape, delta1, padding=1), atol=1e-10)
    b_fc = net.fc.feedback.weight
    delta2 = (e @ b_fc).view_as(h2) * (1 - h2.detach() ** 2)
    assert torch.allclose(net.conv2.weight.grad,
                          conv2d_weight(h1.detach(), net.conv2.weight.shape, delta2, stride=2, padding=1),
                          atol=1e-10)


def test_fixed_feedback_are_buffers_and_weights_copied():
    plain = _mlp()
    for kind in KINDS:
        net = plastic.convert(plain, kind, seed=0)
        names = {n for n, _ in net.named_parameters()}
        assert names == {n for n, _ in plain.named_parameters()}, kind  # no feedback parameters
        for (_, p), (_, q) in zip(plain.named_parameters(), net.named_parameters()):
            assert torch.equal(p, q)
    fa = plastic.convert(plain, "fa", seed=0)
    assert "0.feedback.weight" in dict(fa.named_buffers())


def test_feedback_is_reproducible_from_seed_and_independent_of_global_rng():
    plain = _mlp()
    torch.manual_seed(1)
    a = plastic.convert(plain, "fa", seed=4)
    torch.manual_seed(2)
    b = plastic.convert(plain, "fa", seed=4)
    c = plastic.convert(plain, "fa", seed=5)
    assert torch.equal(a[2].feedback.weight, b[2].feedback.weight)
    assert not torch.equal(a[2].feedback.weight, c[2].feedback.weight)


def test_dfa_state_dict_roundtrip():
    plain = _ConvNet()
    a = plastic.convert(plain, "dfa", seed=1)
    a(torch.randn(1, 3, 8, 8))
    b = plastic.convert(plain, "dfa", seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.conv2.feedback.weight, b.conv2.feedback.weight)


def test_dfa_state_dict_into_a_double_model_keeps_its_dtype():
    a = plastic.convert(_mlp(dims=(6, 5, 3)).float(), "dfa", seed=1)
    a(torch.randn(2, 6))  # B materialised in float32
    b = plastic.convert(_mlp(dims=(6, 5, 3)).float(), "dfa", seed=2).double()
    b.load_state_dict(a.state_dict())
    assert b[0].feedback.weight.dtype == torch.float64
    assert torch.equal(b[0].feedback.weight, a[0].feedback.weight.double())


def _dfa_grads(m, batches, how):
    """W0's gradient from the (x, y) batches: one backward each ("apart"), the forward passes in
    turn and one backward ("together"), or layer by layer over all batches ("interleaved")."""
    m.zero_grad()
    if how == "apart":
        for x, y in batches:
            F.cross_entropy(m(x), y).backward()
    elif how == "together":
        sum(F.cross_entropy(m(x), y) for x, y in batches).backward()
    else:
        hs = [x for x, _ in batches]
        for layer in m:
            hs = [layer(h) for h in hs]
        sum(F.cross_entropy(h, y) for h, (_, y) in zip(hs, batches)).backward()
    return m[0].weight.grad.clone()


def test_dfa_pairs_each_forward_pass_with_its_own_output_error():
    torch.manual_seed(0)
    m = plastic.convert(_mlp(dims=(6, 12, 8, 5)), "dfa", seed=0)
    batches = [(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 5, (4,)))
               for _ in range(2)]
    ref = _dfa_grads(m, batches, "apart")
    assert torch.allclose(_dfa_grads(m, batches, "together"), ref, atol=1e-12)
    assert torch.allclose(_dfa_grads(m, batches, "interleaved"), ref, atol=1e-12)


def test_dfa_without_this_pass_s_output_error_is_an_error_not_a_stale_one():
    torch.manual_seed(0)
    m = plastic.convert(_mlp(dims=(6, 12, 8, 5)), "dfa", seed=0)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 5, (4,))
    F.cross_entropy(m(x), y).backward()  # an ordinary step leaves its error behind
    with pytest.raises(RuntimeError, match="no output error for this forward pass"):
        m[:3](torch.randn(4, 6, dtype=torch.float64)).pow(2).sum().backward()  # a loss on a hidden layer only
    # the output synapse run twice after the hidden ones ran once: which error is whose?
    m = plastic.convert(_mlp(dims=(6, 12, 8, 5)), "dfa", seed=0)
    h = m[:4](x)
    with pytest.raises(RuntimeError, match="ambiguous"):
        (m[4](h).sum() + m[4](h * 2).sum()).backward()


def test_sign_symmetry_leaves_absent_synapses_without_feedback_and_keeps_the_norm():
    from plastic.constraints import SparseMask, constrain, random_mask
    for kind in ("usf", "brsf", "frsf"):
        syn = plastic.Dense(40, 30, feedback=kind)
        constrain(syn, SparseMask(random_mask(syn.weight.shape, 0.1,
                                              torch.Generator().manual_seed(0))))
        absent = syn.weight.detach() == 0
        assert absent.float().mean() > 0.8
        b = syn.feedback.matrix(syn.weight)
        assert torch.count_nonzero(b[absent]) == 0, kind
        assert torch.equal(torch.sign(b), torch.sign(syn.weight.detach())), kind
        ratio = float(b.norm() / syn.weight.detach().norm())
        assert abs(ratio - 1) < (1e-5 if kind == "usf" else 0.2), kind


def test_conv2d_refuses_channels_not_divisible_by_groups():
    with pytest.raises(SpecError, match="divisible by groups"):
        plastic.Conv2d(5, 4, 3, groups=2)


def test_usf_scale_matches_norm():
    syn = plastic.Dense(30, 20, feedback="usf")
    b = syn.feedback.matrix(syn.weight)
    assert torch.allclose(b.norm(), syn.weight.norm(), rtol=1e-5)
    assert plastic.angle(b, syn.weight) < 40


class _LearnedFeedback(plastic.FeedbackSynapse):
    """A learned feedback synapse for the test: B is a Parameter, ΔB = δ^T x (Kolen-Pollack's
    form of the W update), written into B.grad in the synapse's backward pass."""
    kind = "test-learned"
    plastic = True

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros_like(w))

    def matrix(self, forward_weight):
        return self.weight.detach()

    def plasticity(self, synapse, x, y, delta, dw):
        self.accumulate(self.weight, delta.t() @ x)


def test_learned_feedback_receives_grad_and_optimizer_updates_it():
    syn = plastic.Dense(6, 4, feedback="fa")
    syn.set_feedback(_LearnedFeedback(syn.weight))
    assert "feedback.weight" in dict(syn.named_parameters())
    opt = torch.optim.SGD(syn.parameters(), lr=0.1)
    x = torch.randn(5, 6, requires_grad=True)
    y = syn(x)
    y.sum().backward()
    assert torch.allclose(syn.feedback.weight.grad, syn.weight.grad)  # same δ x^T
    assert torch.allclose(x.grad, torch.zeros_like(x))  # B was zero: no error reaches x
    opt.step()
    assert plastic.angle(syn.feedback.weight, -syn.weight.grad) < 1e-3  # B = -lr * grad


@pytest.mark.parametrize("kind,options", [
    ("transpose", {}), ("fa", {}), ("usf", {}), ("dfa", {}), ("kolen-pollack", {}),
    ({"self": 2.5, "decay": 2.5}, {}),
    ({"amp": 0.3, "sparse": 0.3}, {"normalize_input": True, "normalize": True}),
    ({"amp": 0.025, "null": 0.025, "decay": 0.0025},
     {"normalize_input": True, "normalize": True, "center": "batch"}),
    ("mirror", {}), ("brsf", {}), ("frsf", {}), ({"amp": 0.1, "decay": 0.1}, {"drive": "noise"}),
    ("information", {"noise": 0.01}),
], ids=["bp", "fa", "usf", "dfa", "kp", "symmetric", "activation", "information", "mirror",
        "brsf", "frsf", "noise-driven", "update-noise"])
def test_channels_last_gives_the_same_training_steps(kind, options):
    """memory_format = "channels_last" (NHWC weights, B and activity) changes only float rounding:
    after three SGD steps (and sleep steps for the mirror) every W and B agrees with the
    contiguous run.  Random draws during training (brsf's B, noise-driven activity, update
    noise) are the same draws in both layouts (randn_like filled NHWC in memory order: 0.16 off)."""
    import copy
    from plastic.learned import sleep_step
    from plastic.models import convnet
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    a = plastic.convert(convnet(3, [4, 8], 10, "relu", True, 16), kind, options=options).double()
    a(x[:2].double().requires_grad_())  # draw lazily-shaped feedback (dfa), then convert it
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in b.parameters())
    for net in (a, b):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        torch.manual_seed(2)  # the same stream for the draws in training
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(x.double()), y).backward()
            opt.step()
            if kind == "mirror":
                opt.zero_grad()
                sleep_step(net, 8, generator=g)
                opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), n


def test_rule_activity_keeps_the_channels_last_layout():
    """``prepare`` (batch centring, per-sample normalisation) reads a channels_last activity in its
    own memory order and returns it channels_last, with the same values as on NCHW."""
    from plastic.learned import LearnedFeedback
    torch.manual_seed(0)
    x, w = torch.randn(8, 4, 6, 6), torch.randn(5, 4, 3, 3)
    y = F.conv2d(x, w)
    fb = LearnedFeedback(w, "information", normalize_input=True, center="batch")
    xa, ya = fb.prepare(x, y)
    cl = torch.channels_last
    xb, yb = fb.prepare(x.contiguous(memory_format=cl), y.contiguous(memory_format=cl))
    assert xb.is_contiguous(memory_format=cl) and yb.is_contiguous(memory_format=cl)
    assert torch.allclose(xa, xb, atol=1e-6) and torch.allclose(ya, yb, atol=1e-6)
    xc = x - x.mean(0, keepdim=True)
    assert torch.allclose(xa, xc / xc.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-6)


def test_autocast_backprop_equals_torch_and_every_kind_trains():
    """Mixed precision (torch.autocast, bf16 on the CPU): the plastic circuit's backprop gives
    exactly torch's own autocast gradients, and every kind, learned ones included, gives finite
    gradients in each parameter's own dtype."""
    from plastic import models
    torch.manual_seed(0)
    base = models.convnet(3, [8, 16], 10, "relu", True, 16)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    def grads(net):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    ref = grads(copy.deepcopy(base))
    bp = grads(plastic.convert(base, "transpose"))
    assert ref.keys() == bp.keys() and all(torch.equal(ref[n], bp[n]) for n in ref)
    for kind in ("fa", "usf", "dfa", "information", "symmetric", "kolen-pollack", "activation"):
        net = plastic.convert(base, kind)
        g = grads(net)
        params = dict(net.named_parameters())
        assert all(g[n].dtype == params[n].dtype and torch.isfinite(g[n]).all() for n in g), kind
        if kind in ("information", "symmetric", "kolen-pollack", "activation"):
            assert sum("feedback" in n for n in g) == 3, kind  # every synapse's B learned


def test_a_frozen_learned_feedback_synapse_does_not_learn():
    """B.requires_grad_(False) freezes a learned B, as it would any torch parameter."""
    syn = plastic.Dense(6, 4, feedback="information")
    syn.feedback.weight.requires_grad_(False)
    syn(torch.randn(5, 6, requires_grad=True)).sum().backward()
    assert syn.feedback.weight.grad is None and syn.weight.grad is not None
    syn.feedback.weight.requires_grad_(True)
    syn(torch.randn(5, 6, requires_grad=True)).sum().backward()
    assert syn.feedback.weight.grad is not None


def test_dfa_by_hand_through_time_and_under_reentrant_checkpointing():
    """A pass without an output error of its own takes the latest one of a later pass (a loss
    on the last step of a circuit stepped by hand), or, recomputed inside the backward pass
    (reentrant checkpointing), the latest one: both were refused after pairing passes."""
    from torch.utils.checkpoint import checkpoint
    from plastic.spiking import LIFPopulation
    torch.manual_seed(0)
    m = plastic.convert(nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)), "dfa")
    p1, p2 = LIFPopulation(), LIFPopulation()
    x, y = torch.randn(5, 4) * 3, torch.randint(0, 3, (5,))
    s1 = s2 = None
    for _ in range(10):
        z1, s1 = p1.step(m[0](x), s1)
        z2, s2 = p2.step(m[1](z1), s2)
        out = m[2](z2)
    F.cross_entropy(out, y).backward()
    assert m[0].weight.grad.norm() > 0 and m[1].weight.grad.norm() > 0
    net = plastic.convert(_mlp(dims=(6, 12, 8, 5)), "dfa", seed=0)
    xb, yb = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 5, (4,))
    F.cross_entropy(net(xb), yb).backward()
    ref = net[0].weight.grad.clone()
    net.zero_grad()
    # reentrant checkpointing needs an input that requires grad
    F.cross_entropy(net[4](checkpoint(net[:4], xb.requires_grad_(), use_reentrant=True)),
                    yb).backward()
    assert torch.allclose(net[0].weight.grad, ref, atol=1e-12)


def test_a_wrong_input_draws_no_dfa_weight_and_another_kind_s_checkpoint_is_refused():
    net = plastic.convert(_mlp(dims=(6, 12, 5)).float(), "dfa", seed=0)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        net(torch.randn(3, 7))
    net(torch.randn(3, 6))  # B was drawn from the wrong shape, and every input then failed
    fa = plastic.convert(_mlp(dims=(6, 12, 5)).float(), "fa", seed=0)
    with pytest.raises(RuntimeError, match="size mismatch for 0.feedback.weight"):
        plastic.convert(_mlp(dims=(6, 12, 5)).float(), "dfa", seed=0).load_state_dict(
            fa.state_dict())


def test_reset_parameters_redraws_each_b_from_its_own_draw():
    """One generator shared by two synapses: the second B was redrawn as the first's."""
    g = torch.Generator().manual_seed(0)
    a, b = plastic.Dense(4, 5, feedback="fa", generator=g), plastic.Dense(4, 5, feedback="fa",
                                                                          generator=g)
    before = b.feedback.weight.clone()
    b.feedback.reset_parameters()
    assert torch.equal(b.feedback.weight, before)
    assert not torch.equal(a.feedback.weight, before)


def test_fixed_random_feedback_is_redrawn_by_reset_parameters_after_the_meta_device():
    """torch's idiom: build on the meta device, to_empty, reset_parameters; B was left NaN."""
    ref = plastic.convert(_mlp(dims=(6, 12, 5)).float(), "fa", seed=3)
    for kind, buf in (("fa", "weight"), ("frsf", "magnitude")):
        with torch.device("meta"):
            net = plastic.convert(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)),
                                  kind, seed=3)
        net = net.to_empty(device="cpu")
        for mod in net.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        b = getattr(net[0].feedback, buf)
        assert torch.isfinite(b).all()
        if kind == "fa":
            assert torch.equal(b, ref[0].feedback.weight)


def test_learned_feedback_is_redrawn_by_reset_parameters_after_the_meta_device():
    """Learned rules, the mirror and Kolen-Pollack had no reset_parameters: after to_empty, B
    was whatever memory held (0, or 2.8e30 for the mirror) and the rules' norms with it."""
    opts = {"information": {"normalize": True}, "mirror": {}, "kolen-pollack": {}}
    for kind, options in opts.items():
        def build():
            return plastic.convert(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)),
                                   kind, seed=3, options=options or None)
        ref = build()
        with torch.device("meta"):
            net = build()
        net = net.to_empty(device="cpu")
        for mod in net.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        for a, b in zip(net.state_dict().items(), ref.state_dict().items()):
            if "feedback" in a[0]:
                assert torch.equal(a[1], b[1]), (kind, a[0])


def test_synapse_inputs_a_spiking_tuple_and_torch_s_padding_mode():
    from plastic.spiking import LIFPopulation
    net = nn.Sequential(plastic.Dense(4, 6), LIFPopulation(), plastic.Dense(6, 3))
    with pytest.raises(SpecError, match="TimeStepped"):
        net(torch.randn(5, 4))
    assert plastic.Conv2d(3, 4, 3, padding_mode="zeros").weight.shape == (4, 3, 3, 3)
    with pytest.raises(SpecError, match="padding_mode='reflect' is not supported"):
        plastic.Conv2d(3, 4, 3, padding_mode="reflect")


def test_dfa_never_takes_an_earlier_step_s_error_after_checkpointing_and_loads_a_lazy_state():
    from torch.utils.checkpoint import checkpoint
    for reentrant in (True, False):
        net = plastic.convert(_mlp(dims=(6, 12, 8, 5)), "dfa", seed=0)
        x, y = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randint(0, 5, (4,))
        F.cross_entropy(net[4](checkpoint(net[:4], x, use_reentrant=reentrant)), y).backward()
        with pytest.raises(RuntimeError, match="no output error for this forward pass"):
            checkpoint(net[:4], x + 3, use_reentrant=reentrant).sum().backward()
        with pytest.raises(RuntimeError, match="no output error for this forward pass"):
            net[:4](x + 3).sum().backward()  # a plain pass after a recomputed one
    fresh = plastic.convert(_mlp(dims=(6, 12, 5)), "dfa", seed=0).state_dict()
    used = plastic.convert(_mlp(dims=(6, 12, 5)), "dfa", seed=0)
    used(torch.randn(2, 6, dtype=torch.float64))
    used.load_state_dict(fresh)  # saved before its first forward: lazy again
    assert used[0].feedback.weight.numel() == 0


def test_dfa_under_checkpoints_that_hold_the_output_and_an_empty_batch():
    """Non-reentrant checkpointing is exact; under reentrant checkpointing an output inside the
    checkpoint is refused, loudly (a recomputed pass loses its identity, and two interleaved
    passes were silently mispaired when it was allowed); an empty batch could not be
    projected."""
    from torch.utils.checkpoint import checkpoint
    net = plastic.convert(_mlp(dims=(6, 8, 8, 3)), "dfa", seed=1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (4,))
    F.cross_entropy(net(x), y).backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    h = checkpoint(lambda t: net[1](net[0](t)), x, use_reentrant=False)
    out = checkpoint(lambda t: net[4](net[3](net[2](t))), h, use_reentrant=False)
    F.cross_entropy(out, y).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(ref, net.parameters()))
    h = checkpoint(lambda t: net[1](net[0](t)), x, use_reentrant=True)
    out = checkpoint(lambda t: net[4](net[3](net[2](t))), h, use_reentrant=True)
    with pytest.raises(RuntimeError, match="no output error for this forward pass"):
        F.cross_entropy(out, y).backward()
    net(torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)).sum().backward()


def test_a_dfa_synapse_s_shape_error_names_the_batch_it_got():
    """The first input of a DFA synapse is checked before B takes its shape; torch's error named
    a batch of 1 (the check ran on x[:1]) when the batch was 4."""
    net = plastic.convert(torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Tanh(),
                                              torch.nn.Linear(5, 3)), "dfa")
    with pytest.raises(RuntimeError, match=r"\(4x100 and 10x5\)"):
        net(torch.randn(4, 100))


def test_a_coefficient_beyond_the_weights_dtype_is_a_one_line_error():
    """{"decay": 1e39} passed the float64 finiteness check and gave an infinite B.grad in
    float32, with no word."""
    with pytest.raises(SpecError, match=r"overflow torch.float32 \(largest 3.40282e\+38\)"):
        plastic.Dense(5, 3).set_feedback({"decay": 1e39})
    s = plastic.Dense(5, 3, dtype=torch.float64).set_feedback({"decay": 1e39})
    s(torch.randn(2, 5, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert torch.isfinite(s.feedback.weight.grad).all()


def test_sign_symmetry_in_half_precision_routes_the_error():
    """The scale counted W's nonzero entries in W's dtype: above 65504 in float16 that count was
    inf, so usf, brsf and frsf routed no error at all (B = 0)."""
    for kind in ("usf", "brsf", "frsf"):
        syn = plastic.Dense(300, 300, feedback=kind, generator=torch.Generator().manual_seed(0))
        syn = syn.half()
        b16 = syn.feedback.matrix(syn.weight).float()
        ref = copy.deepcopy(syn).float()
        if kind == "brsf":  # a fresh |R| each time: ||B|| = ||W|| in expectation
            assert abs(b16.norm() / ref.weight.norm() - 1) < 0.02
        else:  # the float32 B of the same weights, to half precision
            assert torch.allclose(b16, ref.feedback.matrix(ref.weight), rtol=4e-3, atol=1e-5)
        x = torch.randn(4, 300, dtype=torch.float16, requires_grad=True)
        syn(x).float().sum().backward()
        assert x.grad.abs().max() > 0.1, kind


def test_dfa_draws_b_only_where_an_error_is_routed():
    """B was drawn by any forward pass: an evaluation at another input size was refused as a
    changed shape, a first pass in inference mode left an inference tensor that no checkpoint
    could be loaded into, and a first layer held a B (for an ImageNet stem 10 x 150528) that
    routes an error to the image, which needs none."""
    class GAP(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.conv1, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv1(torch.relu(self.conv0(x)))).mean((2, 3)))
    torch.manual_seed(0)
    net = plastic.convert(GAP(), "dfa", seed=1)
    with torch.inference_mode():
        net(torch.randn(2, 3, 8, 8))
    F.cross_entropy(net(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    assert net.conv0.feedback.weight.numel() == 0  # the image needs no error
    assert net.conv1.feedback.weight.shape == (5, 4, 6, 6)
    assert not net.conv1.feedback.weight.is_inference()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(SpecError, match=r"pre population shape changed from \(4, 6, 6\) to "
                                        r"\(4, 14, 14\)"):
        net(torch.randn(2, 3, 16, 16))  # training at another size is still refused
    net.load_state_dict(net.state_dict())
    # drawn in the layout of its input: the channels_last projection, the same values
    cl = plastic.convert(GAP(), "dfa", seed=1).to(memory_format=torch.channels_last)
    cl(torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    b = cl.conv1.feedback.weight
    assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    assert torch.equal(b, net.conv1.feedback.weight)


def test_dfa_feedback_is_redrawn_by_reset_parameters_after_the_meta_device():
    """DirectRandom had no reset_parameters (B after to_empty was whatever memory held, 2e37),
    and a forward pass under torch.device('meta') failed at B's fan-in (Tensor.item())."""
    def build():
        torch.manual_seed(0)
        return plastic.convert(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
                               "dfa", seed=3)
    ref = build()
    ref(torch.randn(2, 6)).sum().backward()
    cpu = build()
    with torch.device("meta"):
        net = build()
        net(torch.randn(2, 6)).sum().backward()  # draws B's shape, on the meta device
        cpu(torch.randn(2, 6, device="cpu")).sum().backward()  # a CPU circuit in the context
    assert torch.equal(cpu[2].feedback.weight, ref[2].feedback.weight)
    assert net[2].feedback.weight.is_meta and net[2].feedback.weight.shape == (3, 8)
    net = net.to_empty(device="cpu")
    for mod in net.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    assert torch.equal(net[2].feedback.weight, ref[2].feedback.weight)


def test_dfa_of_a_layer_without_units_and_the_message_names_the_output_synapse():
    net = plastic.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 0)), "dfa")
    x = torch.randn(2, 4, requires_grad=True)
    net(x).sum().backward()  # B was reshaped to (0, -1): an error
    assert torch.equal(x.grad, torch.zeros(2, 4))

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.body = nn.Linear(8, 3), nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))
    net = plastic.convert(HeadFirst(), "dfa")
    with pytest.raises(RuntimeError, match=r"computed from the output synapse 'body' \(by "
                                           r"default the last synapse registered; choose "
                                           r"another with convert\(\.\.\., output=name\)"):
        net(torch.randn(2, 4, requires_grad=True)).sum().backward()
    net = plastic.convert(HeadFirst(), "dfa", output="head")
    x = torch.randn(2, 4, requires_grad=True)
    net(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_functional_call_routes_through_the_b_it_was_given():
    """torch.func.functional_call swaps tensors in for the forward pass only: the backward
    routed the error through the module's own B (fa and information with B := W were 87° and
    75° from backprop), and Kolen-Pollack's B, a plain tensor there, got no gradient."""
    from torch.func import functional_call
    torch.manual_seed(0)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    ref = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    F.cross_entropy(ref(x), y).backward()
    for kind in ("fa", "information", "kolen-pollack"):
        net = plastic.convert(copy.deepcopy(ref), kind)
        state = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                 for k, v in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()}
        state["2.feedback.weight"] = state["2.weight"].detach().clone().requires_grad_()
        F.cross_entropy(functional_call(net, state, (x,)), y).backward()
        assert plastic.angle(state["0.weight"].grad, ref[0].weight.grad) < 1e-3, kind
        if kind == "kolen-pollack":  # B's gradient is W's
            assert torch.allclose(state["2.feedback.weight"].grad, state["2.weight"].grad)
        assert net[2].feedback.weight.grad is None  # the module's own B took nothing


def test_every_feedback_buffer_follows_the_weights_device_and_dtype():
    """convert() of a model already on a device left the learned rules' `updates` counter and
    DFA's lazy B on the CPU (in float32): NCCL cannot broadcast them, and a checkpoint's B was
    loaded onto the CPU, beside a GPU error.  The meta device stands in for the GPU here."""
    with torch.device("meta"):
        for kind in ("information", "mirror", "kolen-pollack", "dfa", "fa", "frsf"):
            net = plastic.convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(),
                                                nn.Linear(3, 2)).double(), kind)
            for name, b in [*net.named_buffers(), *net.named_parameters()]:
                assert b.is_meta, (kind, name)
                if b.is_floating_point():
                    assert b.dtype == torch.float64, (kind, name)
    g = torch.Generator().manual_seed(0)  # the state a B was drawn from keeps its device
    from plastic.feedback import _generator, _state_of
    drawn = _state_of(g)
    assert drawn[0] == "cpu" and torch.equal(_generator(drawn).get_state(), g.get_state())
    assert torch.equal(_generator(drawn[1]).get_state(), g.get_state())  # an older pickle's


def test_set_feedback_between_forward_and_backward_routes_through_the_forward_s():
    """The backward put the forward's feedback tensors into whatever feedback the synapse had
    by then, and left them there: a fa synapse kept a stale Kolen-Pollack B (trained by the
    optimizer) and a transpose one an unexpected 'feedback.weight' key."""
    torch.manual_seed(0)
    d = plastic.Dense(4, 3, feedback="kolen-pollack")
    x = torch.randn(5, 4, requires_grad=True)
    b = d.feedback.weight.detach().clone()
    out = d(x)
    d.set_feedback("fa")
    fa_b = d.feedback.weight.clone()
    out.sum().backward()
    assert torch.allclose(x.grad, torch.ones(5, 3) @ b)  # the forward's B
    assert set(d.feedback._parameters) == set() and torch.equal(d.feedback.weight, fa_b)
    assert set(d.state_dict()) == {"weight", "bias", "feedback.weight"}
    assert len(list(d.parameters())) == 2


def test_reconverting_between_forward_and_backward_keeps_the_forward_s_hub():
    """The backward read the synapse's hub anew: converting to dfa between a fa forward and its
    backward was a TypeError (no pass recorded), and back from dfa 'no hub'."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    for first, then in (("fa", "dfa"), ("dfa", "fa")):
        m = plastic.convert(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), first,
                            seed=1)
        ref = copy.deepcopy(m)
        ref(x.requires_grad_(False)).sum().backward()
        out = m(x)
        plastic.convert(m, then, seed=1, inplace=True)
        out.sum().backward()
        assert torch.allclose(m[0].weight.grad, ref[0].weight.grad), (first, then)

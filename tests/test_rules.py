"""Kunin et al.'s primitives: ΔB equals the autograd gradient of R; locality; alignment."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import plastic
from plastic import rules
from plastic.learned import KolenPollack, LearnedFeedback, sleep_step



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _dense():
    syn = plastic.Dense(7, 5, feedback="fa").double()
    x = torch.randn(11, 7)
    return syn, x


def _dense_seq():
    """A dense synapse read position by position: x is (batch, positions, features), as a
    torch.nn.Linear takes it; activity terms sum over positions, as a conv layer's do."""
    syn = plastic.Dense(7, 5, feedback="fa").double()
    x = torch.randn(11, 4, 7)
    return syn, x


def _conv(stride=1, groups=1, dilation=1):
    syn = plastic.Conv2d(3 * groups, 4 * groups, 3, stride=stride, padding=1, dilation=dilation,
                         groups=groups, feedback="fa").double()
    x = torch.randn(6, 3 * groups, 8, 8)
    return syn, x


CONVS = [_conv, lambda: _conv(2), lambda: _conv(groups=2, dilation=2)]
CONV_IDS = ["conv", "conv-s2", "conv-grouped-dilated"]
IDS = ["dense", "dense-seq", *CONV_IDS]


def _reference_R(name, syn, x, B):
    """R(B) written with differentiable torch ops, for autograd."""
    W = syn.weight.detach()
    n = x.shape[0]
    if isinstance(syn, plastic.Conv2d):
        st, pad, dil, gr = syn.stride, syn.padding, syn.dilation, syn.groups
        fwd = lambda inp, k: F.conv2d(inp, k, None, st, pad, dil, gr)
        y = fwd(x, W)
        out_pad = x.shape[-1] - ((y.shape[-1] - 1) * st[0] - 2 * pad[0] + dil[0] * 2 + 1)
        back = lambda g, k: F.conv_transpose2d(g, k, None, st, pad, out_pad, gr, dil)
    else:
        fwd = lambda inp, k: inp @ k.t()
        y = fwd(x, W)
        back = lambda g, k: g @ k
    return {
        "decay": lambda: 0.5 * B.pow(2).sum(),
        "amp": lambda: -(fwd(x, B) * y).sum() / n,       # -<Bᵀx, Wx>
        "null": lambda: 0.5 * back(y, B).pow(2).sum() / n,  # ½||B W x||²
        "sparse": lambda: 0.5 * fwd(x, B).pow(2).sum() / n,  # ½||Bᵀ x||²
        "self": lambda: -(B * W).sum(),                   # -tr(B W)
    }[name]()


def _signals(syn, x, B, with_w=True):
    y = syn.operator().forward(x, syn.weight.detach())
    return rules.Signals(x, y, None, B, syn.weight.detach() if with_w else None, syn.operator())


@pytest.mark.parametrize("make", [_dense, _dense_seq, *CONVS], ids=IDS)
@pytest.mark.parametrize("name", list(rules.PRIMITIVES))
def test_primitive_grad_equals_autograd(make, name):
    syn, x = make()
    B = torch.randn_like(syn.weight, requires_grad=True)
    (ref,) = torch.autograd.grad(_reference_R(name, syn, x, B), B)
    got = rules.primitive_grad(name, _signals(syn, x, B.detach()))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    value = rules.primitive_value(name, _signals(syn, x, B.detach()))
    ref_value = float(_reference_R(name, syn, x, B).detach())
    assert abs(value - ref_value) < 1e-6 * max(1, abs(value))


@pytest.mark.parametrize("make", [_dense, _conv], ids=["dense", "conv"])
@pytest.mark.parametrize("rule", [*rules.COMPOSITES, {"amp": 2e-3, "null": 1e-3, "decay": 1e-3},
                                  {"amp": 1.0, "null": 0.5, "sparse": 0.3, "self": 0.2, "decay": 0.1},
                                  {"null": 1.0}, {"amp": 1.0}])
def test_fused_grad_is_the_weighted_sum(make, rule):
    syn, x = make()
    B = torch.randn_like(syn.weight)
    r = rules.parse_rule(rule)
    s = _signals(syn, x, B)
    expected = sum(c * rules.primitive_grad(k, s) for k, c in r.items())
    assert torch.allclose(rules.fused_grad(r, s), expected, atol=1e-10)


@pytest.mark.parametrize("make", [_dense, _dense_seq, *CONVS], ids=IDS)
def test_average_over_positions_is_the_gradient_of_the_position_mean(make):
    """average="positions": activity terms averaged over batch and output positions."""
    syn, x = make()
    rule = {"amp": 1.0, "null": 0.5, "sparse": 0.3, "self": 0.2, "decay": 0.1}
    fb = LearnedFeedback(syn.weight, rule, average="positions")
    B = fb.weight.detach().clone().requires_grad_()
    y = syn.operator().forward(x, syn.weight.detach())
    p = y[0].numel() // syn.weight.shape[0]  # output positions per sample
    R = sum(c * _reference_R(k, syn, x, B) / (p if k in ("amp", "null", "sparse") else 1)
            for k, c in rule.items())
    (ref,) = torch.autograd.grad(R, B)
    assert torch.allclose(fb.grad(syn, x, y), ref, atol=1e-8)
    if p > 1:
        fb.average = "batch"  # Kunin et al.'s code: summed over positions, differs by p
        assert not torch.allclose(fb.grad(syn, x, y), ref)
    with pytest.raises(plastic.SpecError, match="average"):
        LearnedFeedback(syn.weight, rule, average="space")


def test_locality_is_declared_and_enforced():
    assert {k for k, p in rules.PRIMITIVES.items() if p.local} == {"decay", "amp", "null"}
    syn, x = _dense()
    B = torch.randn_like(syn.weight)
    for name, p in rules.PRIMITIVES.items():
        if p.local:  # a local primitive computes the same without W
            assert torch.equal(rules.primitive_grad(name, _signals(syn, x, B, with_w=False)),
                               rules.primitive_grad(name, _signals(syn, x, B)))
    with pytest.raises(plastic.SpecError, match="non-local"):
        rules.primitive_grad("self", _signals(syn, x, B, with_w=False))
    # a learned feedback synapse with a local rule is never handed W
    seen = []
    fb = LearnedFeedback(syn.weight, {"amp": 1.0, "null": 1.0, "decay": 1.0})
    orig = fb.signals
    fb.signals = lambda *a: seen.append(orig(*a)) or seen[-1]
    syn.set_feedback(fb)
    syn(torch.randn(4, 7, requires_grad=True)).sum().backward()
    assert fb.local and seen and all(s.W is None for s in seen)
    assert LearnedFeedback(syn.weight, "symmetric").local is False
    assert LearnedFeedback(syn.weight, "activation").local is False


def test_learned_feedback_writes_its_rule_into_grad_in_backward():
    syn, x = _conv()
    fb = LearnedFeedback(syn.weight, "information")
    syn.set_feedback(fb)
    y = syn(x.requires_grad_())
    y.pow(2).sum().backward()
    s = _signals(syn, x.detach(), fb.weight.detach())
    expected = rules.fused_grad(rules.COMPOSITES["information"], s)
    assert torch.allclose(fb.weight.grad, expected, atol=1e-10)


def test_weight_mirror_aligns_B_with_W_on_white_noise():
    torch.manual_seed(0)
    syn = plastic.Dense(30, 20, feedback="fa")
    fb = LearnedFeedback(syn.weight, {"amp": 1.0, "decay": 1.0}, drive="sleep")
    syn.set_feedback(fb)
    syn(torch.randn(2, 30))  # the pre population's shape
    opt = torch.optim.SGD([fb.weight], lr=0.05)
    start = plastic.weight_angles(syn)[""]
    for _ in range(200):
        opt.zero_grad()
        sleep_step(syn, batch_size=64)
        opt.step()
    end = plastic.weight_angles(syn)[""]
    assert start > 80 and end < 10, (start, end)


def test_symmetric_alignment_makes_B_proportional_to_W():
    torch.manual_seed(0)
    net = plastic.convert(torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(),
                                              torch.nn.Linear(30, 5)), "fa")
    for _, syn in plastic.synapses(net):
        syn.set_feedback(LearnedFeedback(syn.weight, {"self": 1.0, "decay": 1.0}))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(150):
        x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    angles = plastic.weight_angles(net)
    assert all(a < 5 for a in angles.values()), angles


def test_information_alignment_settles_at_the_ridge_decoder_of_its_input():
    """Amp + Null + Decay on data: B -> (W Σ_x Wᵀ + c_decay I)⁻¹ W Σ_x (B stored W-shaped), the
    fixed point derived in the README.  Behind anisotropic activity it stays far from W, which
    is why the local rule cannot reach B ∝ W on data (protocols/information_variants.toml)."""
    torch.manual_seed(0)
    n_in, n_out, decay = 24, 6, 0.05
    syn = plastic.Dense(n_in, n_out, bias=False, feedback="fa").double()
    fb = LearnedFeedback(syn.weight, {"amp": 1.0, "null": 1.0, "decay": decay})
    syn.set_feedback(fb)
    q, _ = torch.linalg.qr(torch.randn(n_in, n_in, dtype=torch.float64))
    x = torch.randn(512, n_in, dtype=torch.float64) * torch.logspace(-1, 0.5, n_in,
                                                                     dtype=torch.float64) @ q.T
    opt = torch.optim.SGD([fb.weight], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        syn(x).sum().backward()
        opt.step()
    W, cov = syn.weight.detach(), x.T @ x / len(x)
    ridge = torch.linalg.solve(W @ cov @ W.T + decay * torch.eye(n_out, dtype=torch.float64), W @ cov)
    assert plastic.metrics.angle(fb.weight.detach(), ridge) < 0.1
    assert plastic.metrics.angle(ridge, W) > 45


def test_kolen_pollack_B_converges_to_W():
    torch.manual_seed(0)
    syn = plastic.Dense(20, 10, feedback="fa")
    syn.set_feedback(KolenPollack(syn.weight))
    opt = torch.optim.SGD(syn.parameters(), lr=0.1, weight_decay=0.2)
    d0 = (syn.feedback.weight - syn.weight).norm()
    target = torch.randn(10, 20)
    for _ in range(300):  # B - W shrinks by (1 - lr * weight_decay) per step
        opt.zero_grad()
        x = torch.randn(16, 20)
        (syn(x) - x @ target.t()).pow(2).mean().backward()
        opt.step()
    assert torch.allclose(syn.feedback.weight.grad, syn.weight.grad)
    assert (syn.feedback.weight - syn.weight).norm() < 0.01 * d0
    assert plastic.weight_angles(syn)[""] < 2


def test_convert_and_protocol_accept_learned_kinds_and_rule_tables():
    net = plastic.convert(plastic.models.mlp(20, [16], 4),
                          {"3": "kolen-pollack", "*": {"amp": 2e-3, "null": 1e-3, "decay": 1e-3}})
    fbs = [s.feedback for _, s in plastic.synapses(net)]
    assert isinstance(fbs[0], LearnedFeedback) and fbs[0].rule == {"amp": 2e-3, "null": 1e-3, "decay": 1e-3}
    assert isinstance(fbs[1], KolenPollack)
    assert {n for n, _ in net.named_parameters()} >= {"1.feedback.weight", "3.feedback.weight"}
    for kind in ("information", "symmetric", "activation", "mirror"):
        net = plastic.convert(plastic.models.mlp(20, [16], 4), kind)
        assert all(isinstance(s.feedback, LearnedFeedback) for _, s in plastic.synapses(net))
    from plastic.spec import resolve_protocol
    spec = resolve_protocol({"arms": {"info": {"feedback": {"amp": 1.0, "null": 1.0}},
                                      "kp": {"feedback": "kolen-pollack"}}})
    assert spec["arms"]["info"]["feedback"] == {"amp": 1.0, "null": 1.0}
    with pytest.raises(plastic.SpecError, match="unknown primitive 'ampp'"):
        resolve_protocol({"arms": {"x": {"feedback": {"amp": 1.0, "ampp": 1.0}}}})


@pytest.mark.parametrize("feedback, options, message", [
    ({"ampp": 1.0}, None, "feedback: unknown primitive 'ampp' (did you mean 'amp'?)"),
    ({"amp": "x"}, None, "feedback: coefficient of 'amp' must be a finite number, got 'x'"),
    ({"amp": float("nan"), "decay": 1.0}, None, "coefficient of 'amp' must be a finite number"),
    ({"1": {"nul": 1.0}, "*": "fa"}, None, "feedback for synapse '1': unknown primitive 'nul'"),
    (["fa"], None, "feedback must be a kind, a rule or a mapping of synapses to kinds, got list"),
    ("information", {"normalise": True}, "unknown feedback option 'normalise' (did you mean "
                                         "'normalize'?); known: drive, noise"),
    ("information", {"normalize_input": "false"}, "normalize_input must be true or false"),
    ("information", {"noise": "0.1"}, "feedback option noise must be a number, got '0.1'"),
    ("information", {"every": True}, "every must be a positive integer, got True"),
])
def test_convert_says_what_is_wrong_with_a_rule_or_its_options(feedback, options, message):
    """The Python API gives the same one-line errors as a protocol: a misspelt primitive is not
    read as a table of synapses, a NaN coefficient (which would fill B with NaN) and a string
    where a switch belongs ("false" is truthy) are refused."""
    with pytest.raises(plastic.SpecError) as e:
        plastic.convert(plastic.models.mlp(7, [5], 3), feedback, options=options)
    assert message in str(e.value)


def test_feedback_options_every_subsample_noise_and_errors():
    syn, x = _dense()
    fb = LearnedFeedback(syn.weight, {"amp": 1.0}, every=2)
    syn.set_feedback(fb)
    for i in range(3):
        syn(x.requires_grad_()).sum().backward()
    s = _signals(syn, x.detach(), fb.weight.detach())
    assert int(fb.updates) == 3  # passes 2 only: one update
    assert torch.allclose(fb.weight.grad, rules.primitive_grad("amp", s))
    fb2 = LearnedFeedback(syn.weight, {"amp": 1.0}, subsample=0.5)
    syn.set_feedback(fb2)
    syn(x).sum().backward()
    half = _signals(syn, x.detach()[torch.arange(6) * 11 // 6], fb2.weight.detach())  # even
    assert torch.allclose(fb2.weight.grad, rules.primitive_grad("amp", half))
    net = plastic.convert(plastic.models.mlp(7, [5], 3), "information", options={"noise": 0.5})
    assert all(s.feedback.noise == 0.5 for _, s in plastic.synapses(net))
    with pytest.raises(plastic.SpecError, match="kolen-pollack takes no feedback options"):
        plastic.convert(plastic.models.mlp(7, [5], 3), "kolen-pollack", options={"noise": 1.0})
    with pytest.raises(plastic.SpecError, match="subsample"):
        LearnedFeedback(syn.weight, {"amp": 1.0}, subsample=0)
    for bad in ({"noise": -0.1}, {"sigma": -1.0}, {"sigma": 0.0}):
        with pytest.raises(plastic.SpecError, match="noise must be >= 0 and sigma > 0"):
            LearnedFeedback(syn.weight, {"amp": 1.0}, **bad)
    with pytest.raises(plastic.SpecError, match="apply to learned feedback only"):
        plastic.Dense(3, 2).set_feedback("fa", options={"noise": 1.0})
    with pytest.raises(plastic.SpecError, match="apply to learned feedback only"):
        plastic.convert(plastic.models.mlp(7, [5], 3), "fa", options={"every": 2})


def test_update_noise_and_the_driving_noise_have_their_stds():
    """noise: Gaussian noise of that std on every ΔB.  drive = "noise" and sleep phases: Amp
    reads white noise of std sigma, not the data, so ΔB -> -sigma² W."""
    torch.manual_seed(0)
    syn = plastic.Dense(30, 20, feedback="fa").double()
    x = torch.randn(16, 30)
    y = syn.operator().forward(x, syn.weight.detach())
    fb = LearnedFeedback(syn.weight, {"amp": 1.0}, noise=0.5)
    clean = rules.fused_grad({"amp": 1.0}, _signals(syn, x, fb.weight.detach()))
    assert abs(float((fb.grad(syn, x, y) - clean).std()) - 0.5) < 0.05
    want = -4.0 * syn.weight.detach()
    syn.set_feedback(LearnedFeedback(syn.weight, {"amp": 1.0}, drive="noise", sigma=2.0))
    syn((torch.randn(20000, 30) * 0.1 + 3.0).requires_grad_()).sum().backward()  # not N(0, 4I)
    assert plastic.angle(syn.feedback.weight.grad, want) < 5
    assert abs(float(syn.feedback.weight.grad.norm() / want.norm()) - 1) < 0.1
    syn.set_feedback(LearnedFeedback(syn.weight, {"amp": 1.0}, drive="sleep", sigma=2.0))
    syn(torch.randn(2, 30))
    sleep_step(syn, batch_size=20000)
    assert plastic.angle(syn.feedback.weight.grad, want) < 5
    assert abs(float(syn.feedback.weight.grad.norm() / want.norm()) - 1) < 0.1


def test_options_a_drive_does_not_read_are_refused():
    """sigma sets the driving noise, so a data-driven rule refuses it; every and subsample act
    in the training pass, where a sleep-driven rule does not learn, so the mirror refuses them
    (each used to be accepted and silently ignored)."""
    w = torch.randn(5, 7)
    with pytest.raises(plastic.SpecError, match="sigma .* needs drive = 'noise' or 'sleep'"):
        LearnedFeedback(w, {"amp": 1.0}, sigma=2.0)
    assert LearnedFeedback(w, {"amp": 1.0}, drive="noise", sigma=2.0).sigma == 2.0
    for bad in ({"every": 1000}, {"subsample": 0.5}):
        with pytest.raises(plastic.SpecError, match=r"sleep-driven rule learns only in sleep"):
            plastic.convert(plastic.models.mlp(7, [5], 3), "mirror", options=bad)


@pytest.mark.parametrize("make", [_dense, _conv], ids=["dense", "conv"])
def test_one_sample_without_a_batch_dimension_is_a_batch_of_one(make):
    """torch.nn takes one sample without its batch dimension: so does a synapse, and the rule's
    batch average is then over that one sample (a dense layer's ΔB was divided by its number of
    features, and a conv layer's backward failed)."""
    syn, x = make()
    syn.set_feedback(LearnedFeedback(syn.weight, {"amp": 1.0, "null": 0.5}))
    one = x[:1].clone().requires_grad_()
    syn(one).sum().backward()
    want_b, want_x = syn.feedback.weight.grad.clone(), one.grad.clone()
    syn.feedback.weight.grad = None
    single = x[0].clone().requires_grad_()
    out = syn(single)
    assert out.shape == syn(x[:1])[0].shape
    out.sum().backward()
    assert torch.allclose(syn.feedback.weight.grad, want_b)
    assert torch.allclose(single.grad, want_x[0])


@pytest.mark.parametrize("kind", ["symmetric", "kolen-pollack", "mirror", {"sparse": 1.0, "decay": 1.0}])
def test_a_rule_that_does_not_read_the_output_tolerates_an_in_place_activation(kind):
    """As in torchvision's VGG, Linear -> ReLU(inplace=True): only a rule that reads y = W x
    (Amp, Null) keeps the synapse's output for its backward pass.  The others train, and
    Information Alignment says which synapse and what to change instead of autograd's message
    about an internal function's output."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(inplace=True),
                                   torch.nn.Linear(5, 3))
    x = torch.randn(11, 7)
    m = plastic.convert(net(), kind)
    m(x).sum().backward()
    assert m[0].feedback.weight.grad is not None or kind == "mirror"
    m = plastic.convert(net(), "information")
    with pytest.raises(RuntimeError, match=r"synapse 0: its input or output was modified by an "
                                           r"in-place operation .*information rule reads"):
        m(x).sum().backward()
    m = plastic.convert(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(),
                                            torch.nn.Linear(5, 3)), "information")
    m(x).sum().backward()  # out of place: fine
    assert m[0].feedback.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [_dense, _conv], ids=["dense", "conv"])
def test_normalize_input_and_normalized_routing(make):
    """normalize_input: the rule reads x/||x|| and W x/||x||; normalize: the error is routed
    through B rescaled to its initial norm, whatever the rule does to ||B||."""
    syn, x = make()
    rule = {"amp": 1.0, "null": 0.5, "decay": 0.1}
    fb = LearnedFeedback(syn.weight, rule, normalize_input=True, normalize=True)
    y = syn.operator().forward(x, syn.weight.detach())
    xn = x / x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
    yn = syn.operator().forward(xn, syn.weight.detach())
    expected = rules.fused_grad(rule, _signals(syn, xn, fb.weight.detach()))
    assert torch.allclose(fb.grad(syn, x, y), expected, atol=1e-10)
    n0 = float(fb.weight.detach().norm())
    with torch.no_grad():
        fb.weight.mul_(7.0)
    B = fb.matrix(syn.weight)
    assert abs(float(B.norm()) - n0) < 1e-9 * n0
    assert plastic.metrics.angle(B, fb.weight.detach()) < 1e-5
    assert torch.allclose(yn, y / x.flatten(1).norm(dim=1).view(-1, *[1] * (y.dim() - 1)))


@pytest.mark.parametrize("make", [_dense, _conv], ids=["dense", "conv"])
def test_batch_centred_activity(make):
    """center="batch": the rule reads x - E_batch[x] and W (x - E_batch[x]), so a constant
    offset added to every sample's activity does not change ΔB."""
    syn, x = make()
    rule = {"amp": 1.0, "null": 0.5, "decay": 0.1}
    fb = LearnedFeedback(syn.weight, rule, center="batch")
    op = syn.operator()
    xc = x - x.mean(0, keepdim=True)
    expected = rules.fused_grad(rule, _signals(syn, xc, fb.weight.detach()))
    assert torch.allclose(fb.grad(syn, x, op.forward(x, syn.weight.detach())), expected, atol=1e-10)
    shifted = x + 3.0
    g = fb.grad(syn, shifted, op.forward(shifted, syn.weight.detach()))
    assert torch.allclose(g, expected, atol=1e-9)
    with pytest.raises(plastic.SpecError, match="center must be"):
        LearnedFeedback(syn.weight, rule, center="sample")
    # a batch of one has no activity left after centring: the activity terms vanish, with a
    # warning (once), and only Decay acts
    one = x[:1]
    with pytest.warns(UserWarning, match="batch of one sample"):
        g = fb.grad(syn, one, op.forward(one, syn.weight.detach()))
    assert torch.allclose(g, rules.fused_grad({"decay": 0.1}, _signals(syn, one, fb.weight.detach())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fb.grad(syn, one, op.forward(one, syn.weight.detach()))


@pytest.mark.parametrize("make", [_dense, _conv], ids=["dense", "conv"])
def test_recorded_values_are_the_minimised_objective(make):
    """values() reads the same prepared activity as grad() (center, normalize_input, positions):
    the directional derivative of Σ_k c_k R_k, from the recorded values, equals <ΔB, d>."""
    syn, x = make()
    x = x.abs() + 0.5  # a non-zero mean, so centring matters
    rule = {"amp": 1.0, "null": 0.5, "decay": 0.1, "sparse": 0.3}
    fb = LearnedFeedback(syn.weight, rule, center="batch", normalize_input=True, average="positions")
    y = syn.operator().forward(x, syn.weight.detach())
    g = fb.grad(syn, x, y)

    def objective(B):
        with torch.no_grad():
            fb.weight.copy_(B)
        return sum(rule[k] * v for k, v in fb.values(syn, x, y).items())

    B0, d, eps = fb.weight.detach().clone(), torch.randn_like(g), 1e-3
    slope = (objective(B0 + eps * d) - objective(B0 - eps * d)) / (2 * eps)
    assert slope == pytest.approx(float((g * d).sum().detach()), rel=1e-6)


def test_a_dense_synapse_learns_from_a_sequence_of_positions():
    """A converted Linear fed (batch, positions, features), bias and all: B.grad is the rule's
    gradient on W x (the bias taken off along the feature dimension).  Direct feedback, which
    needs one error per sample, says so."""
    syn = plastic.Dense(7, 5, feedback={"amp": 1.0, "null": 0.5, "decay": 0.1})
    x = torch.randn(11, 4, 7, requires_grad=True)
    syn(x).pow(2).sum().backward()
    fb = syn.feedback
    y = syn.operator().forward(x.detach(), syn.weight.detach())
    assert torch.allclose(fb.weight.grad, fb.grad(syn, x.detach(), y), atol=1e-10)
    net = plastic.convert(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(),
                                              torch.nn.Linear(5, 3)), "dfa")
    with pytest.raises(plastic.SpecError, match="one sample per row"):
        net(torch.randn(2, 4, 7)).sum().backward()


def test_a_weight_mirror_that_never_sleeps_warns(monkeypatch):
    """Sleep-driven feedback that sees training passes but no sleep step stays random: after
    SLEEPLESS_WARNING passes it says so, once; a sleep step resets the count."""
    import warnings
    from plastic import learned
    monkeypatch.setattr(learned, "SLEEPLESS_WARNING", 20)
    SLEEPLESS_WARNING = 20
    net = plastic.convert(plastic.models.mlp(7, [5], 3), "mirror")
    x = torch.randn(4, 7)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(SLEEPLESS_WARNING - 1):
            net(x).sum().backward()
        sleep_step(net, 8)
        for _ in range(SLEEPLESS_WARNING - 1):
            net(x).sum().backward()
        assert not w
        for _ in range(2):
            net(x).sum().backward()
    assert len(w) == 2  # one per synapse, once
    assert "learns only in sleep phases" in str(w[0].message)


@pytest.mark.parametrize("rule", [{"sparse": 1.0}, {"decay": 1.0}, "symmetric"])
def test_average_over_positions_for_rules_that_do_not_read_the_output(rule):
    """y is None for these (it was an AttributeError); the output's shape comes from the error."""
    syn, x = _conv()
    for average in ("positions", "batch"):
        fb = LearnedFeedback(syn.weight, rule, average=average)
        syn.set_feedback(fb)
        syn(x.requires_grad_()).sum().backward()
        y = syn.operator().forward(x.detach(), syn.weight.detach())
        assert torch.allclose(fb.weight.grad, fb.grad(syn, x.detach(), y, torch.ones_like(y)))


def test_every_counts_backward_passes_not_uses_of_a_shared_synapse():
    """A synapse used twice per step with every = 2 learned from its first use on every step
    and never from its second; it learns from both on every second step."""
    syn, x = _dense()
    x1, x2 = x[:5], x[5:]
    fb = LearnedFeedback(syn.weight, {"amp": 1.0}, every=2)
    syn.set_feedback(fb)
    both = (rules.primitive_grad("amp", _signals(syn, x1, fb.weight.detach()))
            + rules.primitive_grad("amp", _signals(syn, x2, fb.weight.detach())))
    for step in range(4):
        fb.weight.grad = None
        (syn(x1).sum() + syn(x2).sum()).backward()
        expected = both if step % 2 else torch.zeros_like(both)
        assert torch.allclose(fb.weight.grad, expected), step
    assert int(fb.updates) == 4


@pytest.mark.parametrize("reentrant", [False, True])
def test_every_under_activation_checkpointing(reentrant):
    """Non-reentrant checkpointing counts one loss.backward() once.  Reentrant checkpointing
    runs a backward per segment, and each counts (the README's stated limit): a fix that took
    forwards run inside a backward for recomputations miscounted hooks that run the model."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    syn = plastic.Dense(5, 5, feedback="fa").double()  # used twice: square
    fb = LearnedFeedback(syn.weight, {"amp": 1.0}, every=2)
    syn.set_feedback(fb)
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    for step in range(2):
        fb.weight.grad = None
        h = checkpoint(syn, x, use_reentrant=reentrant)
        checkpoint(syn, torch.tanh(h), use_reentrant=reentrant).sum().backward()
        assert int(fb.updates) == (2 * (step + 1) if reentrant else step + 1)
        if not reentrant:
            assert (fb.weight.grad.abs().sum() > 0) == bool(step % 2), step


def test_subsample_takes_rows_evenly_so_every_time_step_contributes():
    """Rows of a time-stepped circuit's activity are (step, sample), step major: the first half
    of the rows were the first half of the steps."""
    syn = plastic.Dense(7, 5, feedback="fa").double()
    steps, batch = 6, 4
    x = torch.randn(steps * batch, 7)
    fb = LearnedFeedback(syn.weight, {"amp": 1.0}, subsample=0.5)
    syn.set_feedback(fb)
    syn(x.requires_grad_()).sum().backward()
    rows = x.detach().reshape(steps, batch, 7)[:, ::2].reshape(-1, 7)  # samples 0, 2, all steps
    assert torch.allclose(fb.weight.grad,
                          rules.primitive_grad("amp", _signals(syn, rows, fb.weight.detach())))


def test_normalize_input_of_a_silent_sample_in_float16_stays_finite():
    syn = plastic.Dense(7, 5).half()
    syn.set_feedback(LearnedFeedback(syn.weight, "information", normalize_input=True))
    x = torch.randn(4, 7, dtype=torch.float16)
    x[0] = 0  # 1e-12, the clamp of its norm, is 0 in float16: 0 * inf
    syn(x.requires_grad_()).sum().backward()
    assert torch.isfinite(syn.feedback.weight.grad).all()


def test_infinite_noise_and_sigma_are_refused():
    syn, _ = _dense()
    for bad in ({"noise": float("inf")}, {"sigma": float("inf"), "drive": "noise"},
                {"noise": float("nan")}):
        with pytest.raises(plastic.SpecError, match="noise must be >= 0 and sigma > 0"):
            LearnedFeedback(syn.weight, {"amp": 1.0}, **bad)


def test_sleep_leaves_a_frozen_B_and_checks_its_batch_size_and_ignores_autocast():
    net = plastic.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(),
                                              torch.nn.Linear(12, 2)), "mirror").float()
    net(torch.randn(1, 2, 4, 4, dtype=torch.float32))
    frozen = net[0].feedback.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the rule runs at B's precision
        assert sleep_step(net, 4) == 1
    assert frozen.grad is None and net[2].feedback.weight.grad.dtype == torch.float32
    for bad in (0, -1, 2.5, True):
        with pytest.raises(plastic.SpecError, match="batch_size must be a positive integer"):
            sleep_step(net, bad)


def test_kolen_pollack_gives_B_no_update_when_W_is_frozen():
    syn, x = _dense()
    syn.set_feedback(KolenPollack(syn.weight))
    syn.weight.requires_grad_(False)
    syn(x.requires_grad_()).sum().backward()
    assert syn.weight.grad is None and syn.feedback.weight.grad is None


def test_rule_values_of_shared_unbatched_and_in_place_activity():
    """The sum over a shared synapse's uses (only the last was reported), one sample as a
    batch of one (R was divided by its features), the output before an in-place ReLU (Amp read
    relu(Wx + b) - b), and the random stream left as it was."""
    from plastic.metrics import rule_values
    syn, x = _dense()
    syn.set_feedback(LearnedFeedback(syn.weight, {"amp": 1.0, "null": 0.5}))
    R = lambda v: syn.feedback.values(syn, v, syn.operator().forward(v, syn.weight.detach()))

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d = syn

        def forward(self, v):
            return self.d(v[:5]).sum() + self.d(v[5:]).sum()
    got = rule_values(Twice(), x)
    for k in ("amp", "null"):
        assert got[f"{k}/d"] == pytest.approx(R(x[:5])[k] + R(x[5:])[k], rel=1e-12)
    one = rule_values(torch.nn.Sequential(syn), x[0])
    assert one["amp/0"] == pytest.approx(R(x[:1])["amp"], rel=1e-12)
    inplace = rule_values(torch.nn.Sequential(syn, torch.nn.ReLU(inplace=True)), x)
    assert inplace["amp/0"] == pytest.approx(R(x)["amp"], rel=1e-12)
    drop = torch.nn.Sequential(torch.nn.Dropout(0.5), syn)
    torch.manual_seed(3)
    rule_values(drop, x)
    drawn = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(2), drawn)


def test_a_feedback_weight_of_the_wrong_shape_is_refused():
    with pytest.raises(plastic.SpecError, match="stored in W's layout"):
        plastic.Dense(4, 3).set_feedback(KolenPollack(torch.zeros(5, 4)))


def test_subsample_of_an_uneven_fraction_still_reads_every_step():
    syn = plastic.Dense(3, 2, feedback="fa").double()
    steps, batch = 25, 32
    fb = LearnedFeedback(syn.weight, {"amp": 1.0}, subsample=0.6)
    seen = []
    fb.grad = lambda synapse, x, y, delta=None: (seen.append(x), torch.zeros(2, 3))[1]
    x = torch.arange(steps * batch, dtype=torch.float64).repeat(3, 1).t().contiguous()
    fb.plasticity(syn, x, None, torch.zeros(steps * batch, 2), None)
    step_of_row = seen[0][:, 0].long() // batch
    counts = torch.bincount(step_of_row, minlength=steps)
    assert len(seen[0]) == 480 and counts.min() >= 19  # it read steps 0-14 only


def _information_net(seed=0, conv=False):
    torch.manual_seed(seed)
    layers = ([torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
               torch.nn.Linear(3 * 4 * 4, 2)] if conv else
              [torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)])
    return plastic.convert(torch.nn.Sequential(*layers), "information", seed=seed)


def test_rule_scale_gives_b_the_step_a_scaled_loss_gives_w():
    """A rule's ΔB does not follow the loss: under GradScaler (loss·S, then .grad/S) B's step was
    divided by S (65536), and with k micro-batches of loss/k B got k times its step."""
    from plastic.learned import rule_scale
    x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
    one = _information_net()
    F.cross_entropy(one(x), y).backward()
    acc = _information_net()
    with rule_scale(1 / 2):
        for part in (slice(0, 4), slice(4, 8)):
            (F.cross_entropy(acc(x[part]), y[part]) / 2).backward()
    for a, b in zip(plastic.synapses(one), plastic.synapses(acc)):
        ga, gb = a[1].feedback.weight.grad, b[1].feedback.weight.grad
        assert gb.norm() / ga.norm() == pytest.approx(1.0, rel=0.35)  # not 2
    scaled = _information_net()
    with rule_scale(1024.0):
        (F.cross_entropy(scaled(x), y) * 1024.0).backward()
    for a, b in zip(plastic.synapses(one), plastic.synapses(scaled)):
        assert torch.allclose(b[1].feedback.weight.grad / 1024.0, a[1].feedback.weight.grad,
                              rtol=1e-5, atol=1e-9)
    with pytest.raises(plastic.SpecError, match="rule_scale must be"):
        with rule_scale(0.0):
            pass


def test_learned_rules_on_an_empty_batch_inside_autocast_and_pruned():
    """An empty batch made B.grad NaN (0/0 batch means) or a bare ValueError with subsample; a
    backward() inside autocast crashed a conv rule's own passes; Kolen-Pollack copied the
    unmasked dL/dW of a pruned synapse into B, which drifted from W where W is 0; a huge int
    coefficient was a bare OverflowError; sleep_step wrote B.grad inside plasticity_paused()."""
    from torch.nn.utils import prune
    net = _information_net()
    x = torch.randn(0, 5, requires_grad=True)
    net(x).sum().backward()
    assert all(s.feedback.weight.grad is None or torch.isfinite(s.feedback.weight.grad).all()
               for _, s in plastic.synapses(net))
    sub = plastic.convert(torch.nn.Sequential(torch.nn.Linear(5, 2)), "information",
                          options={"subsample": 0.5})
    sub(torch.randn(0, 5, requires_grad=True)).sum().backward()
    conv = plastic.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1)),
                           "activation").float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(torch.randn(4, 2, 4, 4, dtype=torch.float32))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
    assert conv[0].feedback.weight.grad.dtype == torch.float32
    kp = plastic.convert(torch.nn.Sequential(torch.nn.Linear(5, 4)), "kolen-pollack")
    prune.random_unstructured(kp[0], "weight", 0.5)
    kp(torch.randn(8, 5)).sum().backward()
    assert torch.equal(kp[0].feedback.weight.grad, kp[0].weight_orig.grad)
    with pytest.raises(plastic.SpecError, match="finite number"):
        plastic.convert(torch.nn.Linear(3, 2), {"amp": 10 ** 400})
    mirror = plastic.convert(torch.nn.Sequential(torch.nn.Linear(5, 4)), "mirror")
    mirror(torch.randn(2, 5))
    with plastic.plasticity_paused():
        assert sleep_step(mirror) == 0
    assert mirror[0].feedback.weight.grad is None


def test_a_learned_rule_backpropagates_on_the_meta_device():
    """The rule ran inside torch.autocast("meta", enabled=False), which torch refuses."""
    with torch.device("meta"):
        net = plastic.convert(torch.nn.Sequential(torch.nn.Linear(5, 4)), "information")
        x = torch.randn(3, 5, requires_grad=True)
    net(x).sum().backward()
    assert x.grad.is_meta


def test_a_shared_sleep_driven_b_dreams_once_and_a_resumed_count_keeps_every_s_place():
    """Two layers sharing a W share one mirror B, and sleep_step updated it once per layer
    (B.grad twice the decay); the count that `every` reads lives on the host, restored with
    the buffer by load_state_dict."""
    from plastic.learned import sleep_step
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6),
                            torch.nn.Tanh(), torch.nn.Linear(6, 3))
    m[2].weight = m[0].weight
    net = plastic.convert(m, "mirror", options={"rule": {"decay": 1.0}})
    net(torch.randn(2, 6))
    assert sleep_step(net, 8) == 2  # two Bs, not three synapses
    for i in (0, 4):
        b = net[i].feedback.weight
        assert torch.allclose(b.grad, b.detach()), i  # ΔB of decay alone is B, once
    info = plastic.convert(torch.nn.Sequential(torch.nn.Linear(6, 3)), "information",
                           options={"every": 4})
    state = info.state_dict()
    state["0.feedback.updates"] = torch.tensor(3)
    fresh = plastic.convert(torch.nn.Sequential(torch.nn.Linear(6, 3)), "information",
                            options={"every": 4})
    fresh.load_state_dict(state)
    fresh(torch.randn(4, 6)).sum().backward()  # the 4th pass: the rule runs
    assert fresh[0].feedback.weight.grad.abs().sum() > 0 and int(fresh[0].feedback.updates) == 4


def test_the_host_count_follows_any_write_to_the_buffer_and_an_older_pickle():
    """The count `every` reads lives on the host; a write to the buffer by anything else (DDP's
    broadcast from process 0 after a load there, a fill_) left it behind, and a whole model
    pickled before it existed failed in its first backward."""
    def grads(net):
        net.zero_grad()
        net(torch.randn(4, 6)).sum().backward()
        return net[0].feedback.weight.grad.abs().sum() > 0
    net = plastic.convert(torch.nn.Sequential(torch.nn.Linear(6, 3)), "information",
                          options={"every": 2})
    fb = net[0].feedback
    assert not grads(net)  # pass 1 of 2: a zero change
    with torch.no_grad():
        fb.updates.fill_(7)  # as DDP's broadcast writes it
    assert grads(net) and int(fb.updates) == 8  # pass 8: the rule runs
    assert not grads(net)
    state = dict(fb.__dict__)
    del state["_count"], state["_seen"]
    old = type(fb).__new__(type(fb))
    old.__setstate__(state)  # as torch.load of an older pickle
    net[0].feedback = old
    assert grads(net) and int(old.updates) == 10

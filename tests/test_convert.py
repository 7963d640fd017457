import pytest
import torch
import torch.nn.functional as F
from torch import nn

import plastic
from plastic import models
from plastic.synapses import Conv2d, Dense
from plastic.errors import SpecError


def test_convert_resnet18_every_conv_has_chosen_kind():
    torch.manual_seed(0)
    plain = models.resnet18(10, stem="imagenet")
    net = plastic.convert(plain, {"fc": "transpose", "*": "usf"}, seed=0)
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, Conv2d)]
    assert len(convs) == 20  # 1 stem + 16 block convs + 3 shortcut convs
    assert not any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert all(m.feedback.kind == "usf" for _, m in convs)
    assert net.fc.feedback.kind == "transpose" and isinstance(net.fc, Dense)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 20
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in convs)
    # weights are copies of the plain model's
    assert torch.equal(net.conv1.weight, plain.conv1.weight)
    assert net.conv1.weight.data_ptr() != plain.conv1.weight.data_ptr()


@pytest.mark.parametrize("kind", ["fa", "brsf", "frsf", "dfa"])
def test_convert_resnet18_runs_for_every_kind(kind):
    net = plastic.convert(models.resnet18(10, stem="cifar"), kind)
    out = net(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    kinds = {m.feedback.kind for _, m in plastic.synapses(net)}
    assert kinds == {kind}
    assert net.layers[3].conv2.weight.grad.abs().sum() > 0


def test_pattern_mapping_and_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    conv = plastic.convert(net, {"4": "bp", "*": "fa"})
    assert [m.feedback.kind for _, m in plastic.synapses(conv)] == ["fa", "fa", "transpose"]
    with pytest.raises(plastic.SpecError, match="unknown feedback kind 'nope'"):
        plastic.convert(net, "nope")
    with pytest.raises(plastic.SpecError, match="no feedback kind given"):
        plastic.convert(net, {"0": "fa"})
    with pytest.raises(plastic.SpecError, match=r"entries \['5', 'fc\*'\] match no synapse"):
        plastic.convert(net, {"5": "bp", "fc*": "bp", "*": "fa"})  # "4" misspelt: not ignored
    with pytest.raises(plastic.SpecError, match="output synapse"):
        plastic.convert(net, "dfa", output="missing")
    with pytest.raises(plastic.SpecError, match="no Linear or Conv2d"):
        plastic.convert(nn.ReLU(), "fa")


def test_convert_is_idempotent_on_plastic_synapses():
    net = plastic.convert(models.mlp(784, [32], 10), "fa")
    again = plastic.convert(net, "usf")
    assert [m.feedback.kind for _, m in plastic.synapses(again)] == ["usf", "usf"]
    assert [m.feedback.kind for _, m in plastic.synapses(net)] == ["fa", "fa"]


def test_repr_names_feedback():
    syn = plastic.Conv2d(3, 8, 3, padding=1, feedback="frsf")
    text = repr(syn)
    assert "kernel_size=(3, 3)" in text and "frsf" in text


def test_convert_torchvision_resnet18_where_installed():
    tv = pytest.importorskip("torchvision")
    net = plastic.convert(tv.models.resnet18(num_classes=10), {"fc": "bp", "*": "fa"})
    convs = [m for _, m in plastic.synapses(net) if isinstance(m, Conv2d)]
    assert len(convs) == 20 and all(m.feedback.kind == "fa" for m in convs)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(m.weight.grad is not None for m in convs)


def test_resnet20_shape_and_convert():
    """He et al. 2016 Sec. 4.2 (and BioTorch's resnet20, whose errors the README quotes): option
    A shortcuts, 0.27M weights, 19 convs and one dense synapse; it was option B (2 projection
    convs more, which carry error through random or sign-based B under fa or usf)."""
    net = plastic.convert(models.resnet20(10), "usf")
    convs = [m for _, m in plastic.synapses(net) if isinstance(m, Conv2d)]
    assert len(convs) == 19  # 1 + 18 block convs; the shortcuts have no weights
    assert sum(p.numel() for p in net.parameters()) == 269_722
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    x = torch.randn(2, 16, 8, 8)
    short = models.ZeroPadShortcut(16, 32, 2)(x)  # the subsampled identity, zero channels around
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2]) and not short[:, :8].any()
    b = plastic.convert(models.resnet20(10, shortcut="B"), "usf")
    assert sum(isinstance(m, Conv2d) for _, m in plastic.synapses(b)) == 21
    from plastic.spec import resolve_circuit
    from plastic.train import build_circuit
    spec = build_circuit(resolve_circuit({"kind": "resnet20", "shortcut": "B"}), (3, 32, 32), 10)
    assert sum(p.numel() for p in spec.parameters()) == 272_474
    with pytest.raises(SpecError, match="unknown ResNet shortcut 'C'"):
        models.resnet20(shortcut="C")
    with pytest.raises(SpecError, match="shortcut"):  # convnet does not read it
        resolve_circuit({"kind": "convnet", "shortcut": "A"})


def test_convnet_output_scale_from_a_circuit_spec():
    from plastic.spec import resolve_circuit
    from plastic.train import build_circuit
    torch.manual_seed(0)
    c = resolve_circuit({"kind": "convnet", "channels": [4, 8], "output_scale": 0.25})
    net = build_circuit(c, (3, 32, 32), 10)
    assert isinstance(net[-1], models.Scale) and net[-1].scale == 0.25
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), 0.25 * net[:-1](x))
    assert not isinstance(build_circuit(resolve_circuit({"kind": "convnet", "channels": [4, 8]}),
                                        (3, 32, 32), 10)[-1], models.Scale)


def test_population_coded_readout():
    """units_per_class = k: the readout synapse has k units per output, y_c = Σ_j u_cj / √k, so
    a backprop step moves the outputs as much as a one-unit readout's; every kind takes it."""
    from plastic.spec import resolve_circuit
    from plastic.train import build_circuit
    torch.manual_seed(0)
    net = build_circuit(resolve_circuit({"kind": "convnet", "channels": [4, 8], "output_scale": 0.25,
                                         "units_per_class": 6}), (3, 32, 32), 10)
    readout, code, scale = net[-3:]
    assert readout.out_features == 60 and code.units_per_class == 6 and scale.scale == 0.25
    x = torch.randn(5, 3, 32, 32)
    u = net[:-2](x)
    assert torch.allclose(net(x), 0.25 * u.view(5, 10, 6).sum(-1) / 6 ** 0.5)
    for kind in ("mlp", "resnet", "resnet20"):
        c = resolve_circuit({"kind": kind, "channels": [4, 8], "blocks": [1, 1], "units_per_class": 3}
                            if kind == "resnet" else {"kind": kind, "units_per_class": 3})
        net = plastic.convert(build_circuit(c, (3, 32, 32), 10), "information")
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert [m for _, m in plastic.synapses(net)][-1].out_features == 30
    with pytest.raises(plastic.SpecError, match="units_per_class must be at least 1"):
        resolve_circuit({"kind": "mlp", "units_per_class": 0})


def test_a_setting_the_circuit_kind_does_not_read_is_an_error():
    """Not a silently different circuit: resnet20 has fixed widths, an mlp no batch norm."""
    from plastic.spec import resolve_circuit
    for table, key in [({"kind": "resnet20", "channels": [8, 16]}, "channels"),
                       ({"kind": "resnet20", "stem": "imagenet"}, "stem"),
                       ({"kind": "mlp", "batch_norm": False}, "batch_norm"),
                       ({"kind": "convnet", "hidden": [10]}, "hidden"),
                       ({"kind": "resnet", "batch_norm": False}, "batch_norm")]:
        with pytest.raises(plastic.SpecError, match=f"kind '{table['kind']}' has no setting {key}"):
            resolve_circuit(table)
    # every kind reads the logit scale
    from plastic.train import build_circuit
    net = build_circuit(resolve_circuit({"kind": "resnet20", "output_scale": 0.5}), (3, 32, 32), 10)
    assert isinstance(net.scale, models.Scale) and net.scale.scale == 0.5


def test_resnet_circuit_from_blocks_and_channels():
    """kind = "resnet": blocks[i] basic blocks of channels[i] channels per stage, convertible."""
    from plastic.spec import resolve_circuit
    from plastic.train import build_circuit
    c = resolve_circuit({"kind": "resnet", "channels": [8, 16], "blocks": [1, 2],
                         "output_scale": 0.5})
    net = plastic.convert(build_circuit(c, (3, 32, 32), 10), "information")
    convs = [m for _, m in plastic.synapses(net) if isinstance(m, Conv2d)]
    assert len(convs) == 1 + 2 * 3 + 1  # stem, 3 blocks of 2, one projection shortcut
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with pytest.raises(plastic.SpecError, match="one entry per stage"):
        resolve_circuit({"kind": "resnet", "channels": [8, 16], "blocks": [1]})
    with pytest.raises(plastic.SpecError, match="stem"):
        build_circuit(resolve_circuit({"kind": "resnet", "stem": "tiny"}), (3, 32, 32), 10)


def test_layers_convert_cannot_make_plastic_are_named_in_a_warning():
    """A Conv1d (or an attention or recurrent layer) would silently keep exact backprop under
    every rule; convert says so, naming the layer."""
    net = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 14, 4))
    with pytest.warns(UserWarning, match=r"0 \(Conv1d\) carry weights .* exact backprop"):
        plastic.convert(net, "fa")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plastic.convert(models.convnet(3, [4, 8], 10), "fa")  # nothing unconverted: no warning
    # an attention layer stays whole: its out_proj (a Linear it never calls) became an "fa"
    # synapse that carried no error, yet was reported with angles
    att = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True,
                                                               dropout=0.0),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 5, 3))
    with pytest.warns(UserWarning, match=r"0.self_attn \(MultiheadAttention\)"):
        p = plastic.convert(att, "fa")
    assert [n for n, _ in plastic.synapses(p)] == ["0.linear1", "0.linear2", "2"]
    assert not isinstance(p[0].self_attn.out_proj, Dense)
    x = torch.randn(4, 5, 16)
    assert torch.allclose(p(x), att(x), atol=1e-6)
    with pytest.raises(plastic.SpecError, match="no Linear or Conv2d layer"):  # attention alone
        plastic.convert(torch.nn.MultiheadAttention(16, 2), "fa")


def test_tied_layers_stay_tied_and_what_convert_cannot_carry_is_reported():
    """A layer used twice becomes one synapse at both places, parameters shared between layers
    stay shared; a weight parametrization is refused, other hooks warned about, a lazy layer
    refused, and a second backward pass through a synapse is an error, not wrong gradients."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    c = plastic.convert(nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2)), "fa")
    assert c[0] is c[2] and isinstance(c[0], plastic.Dense)
    assert [n for n, _ in plastic.synapses(c)] == ["0", "4"]

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))
    t = plastic.convert(Tied(), "fa")
    assert t.a.weight is t.b.weight
    t(torch.randn(3, 4)).sum().backward()
    assert t.a.weight.grad is not None
    with pytest.raises(plastic.SpecError, match="weight parametrization"):
        plastic.convert(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)),
                                      nn.Linear(4, 2)), "fa")
    hooked = nn.Linear(4, 2)
    hooked.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="hooks registered on .* are not carried over"):
        plastic.convert(nn.Sequential(hooked), "fa")
    with pytest.raises(plastic.SpecError, match="lazy and has no weights yet"):
        plastic.convert(nn.Sequential(nn.LazyLinear(3)), "fa")
    with pytest.raises(plastic.SpecError, match="seed must be an integer"):
        plastic.convert(nn.Sequential(nn.Linear(4, 2)), "fa", seed=None)
    x = torch.randn(5, 4, requires_grad=True)
    net = plastic.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), "bp")
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.pow(2).sum().backward()


def test_conv2d_takes_same_and_valid_padding_as_torch_does():
    torch.manual_seed(0)
    for padding in ("same", "valid", 1, (1, 2)):
        ref = nn.Conv2d(3, 4, 3, padding=padding)
        syn = plastic.Conv2d(3, 4, 3, padding=padding)
        syn.load_state_dict(ref.state_dict(), strict=False)
        x = torch.randn(2, 3, 9, 9)
        assert torch.allclose(syn(x), ref(x), atol=1e-6), padding
    with pytest.raises(plastic.SpecError, match="padding='same' with an even kernel"):
        plastic.Conv2d(3, 4, 2, padding="same")


def test_convert_refuses_layers_it_would_compute_wrongly():
    """A Linear subclass with its own forward or buffers was swapped for a plain Linear (output
    off by 1.0); old-style weight_norm and pruning crashed in the copy or froze the layer; a
    pattern after "*" never applied; a non-string key was a TypeError."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Masked(nn.Linear):
        def __init__(self, *a):
            super().__init__(*a)
            self.register_buffer("mask", torch.ones_like(self.weight))
    for layer, what in ((Scaled(4, 3), "its own forward"), (Masked(4, 3), r"buffers \(mask\)")):
        with pytest.raises(plastic.SpecError, match=what):
            plastic.convert(nn.Sequential(layer), "fa")
    from torch.nn.utils import prune
    with pytest.warns(FutureWarning):  # deprecated, and still in use
        old_style = nn.utils.weight_norm(nn.Linear(4, 3))
    pruned = prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    for layer in (old_style, pruned):
        for inplace in (False, True):
            with pytest.raises(plastic.SpecError, match="weight parametrization"):
                plastic.convert(nn.Sequential(layer), "fa", inplace=inplace)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(plastic.SpecError, match=r"\['\[2\]'\] apply to no synapse"):
        plastic.convert(net, {"*": "fa", "[2]": "usf"})
    for order in ({"[2]": "usf", "*": "fa"}, {"*": "fa", "2": "usf"}):  # an exact name wins
        assert [s.feedback.kind for _, s in plastic.synapses(
            plastic.convert(net, order))] == ["fa", "usf"]
    with pytest.raises(plastic.SpecError, match="keys must be synapse names"):
        plastic.convert(net, {2: "usf", "*": "fa"})


def test_a_resnet_without_stages_is_a_spec_error():
    from plastic import spec as S
    with pytest.raises(plastic.SpecError, match="at least one stage"):
        S.resolve_circuit({"kind": "resnet", "channels": [], "blocks": []})
    with pytest.raises(plastic.SpecError, match="at least one stage"):
        models.ResNet((), ())


def test_a_fallback_pattern_behind_exact_names_and_spiking_tables_by_circuit_name():
    """'*' after every synapse is named exactly applies to nothing, harmlessly (it was refused);
    a time-stepped circuit's table names synapses as the circuit does ("2", as in the results)."""
    from plastic.simulator import TimeStepped
    from plastic.spiking import LIFPopulation
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    c = plastic.convert(net, {"0": "fa", "2": "usf", "*": "bp"})
    assert [s.feedback.kind for _, s in plastic.synapses(c)] == ["fa", "usf"]
    snn = TimeStepped(nn.Sequential(plastic.Dense(4, 4), LIFPopulation(), plastic.Dense(4, 2)), 3)
    c = plastic.convert(snn, {"2": "usf", "*": "fa"}, output="2")
    assert [s.feedback.kind for _, s in plastic.synapses(c)] == ["fa", "usf"]


def test_convert_refuses_what_it_would_change_before_it_changes_anything():
    """A Conv2d subclass overriding _conv_forward (a weight-standardised conv) was converted to a
    plain convolution, silently; a reflect-padded or even-kernel 'same' conv was refused halfway
    through an in-place swap (the layers before it already converted), without its name; complex
    weights gave gradients without torch's conjugates."""
    class Standardised(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, (w - w.mean()) / w.std(), b)
    with pytest.raises(SpecError, match="1 is a Standardised.*its own forward"):
        plastic.convert(nn.Sequential(nn.Conv2d(3, 4, 3), Standardised(4, 4, 3)))
    for bad, what in [(nn.Conv2d(4, 4, 3, padding_mode="reflect"), "padding_mode='reflect'"),
                      (nn.Conv2d(4, 4, 2, padding="same"), "even kernel")]:
        net = nn.Sequential(nn.Conv2d(3, 4, 3), bad)
        with pytest.raises(SpecError, match=f"convert: 1: .*{what}"):
            plastic.convert(net, inplace=True)
        assert type(net[0]) is nn.Conv2d  # untouched
    with pytest.raises(SpecError, match="complex weights"):
        plastic.convert(nn.Linear(3, 2).to(torch.complex64))


def test_set_feedback_checks_every_weight_of_the_feedback_synapse():
    """frsf keeps its random part as `magnitude`, which was not checked: a (1, in) magnitude on
    an (out, in) W ran with every row's |R| the same; a B in another dtype failed in the
    backward's matmul."""
    from plastic.feedback import FixedRandom, FixedRandomSignSymmetry
    syn = Dense(5, 3)
    with pytest.raises(SpecError, match="magnitude of shape \\(1, 5\\)"):
        syn.set_feedback(FixedRandomSignSymmetry(torch.zeros(1, 5)))
    with pytest.raises(SpecError, match="weight in torch.float64 .* W is torch.float32"):
        syn.set_feedback(FixedRandom(torch.zeros(3, 5, dtype=torch.float64)))
    syn.set_feedback(FixedRandomSignSymmetry(torch.zeros(3, 5)))  # the right shape is taken


def test_a_converted_layer_behaves_as_the_layer_in_its_corner_cases():
    """nn.Linear takes input= by name (a TypeError after conversion); a layer of 0 inputs or
    outputs backpropagates in torch (an ambiguous reshape error here); a model converted in eval
    mode got synapses in training mode."""
    lin = nn.Linear(4, 2)
    net = plastic.convert(nn.Sequential(lin))
    x = torch.randn(3, 4)
    assert torch.equal(net[0](input=x), lin(input=x))
    for n_in, n_out in [(0, 3), (3, 0)]:
        ref = nn.Linear(n_in, n_out)
        syn = plastic.convert(ref)
        xr = torch.randn(2, n_in, requires_grad=True)
        xs = xr.detach().clone().requires_grad_()
        ref(xr).sum().backward()
        w_grad = ref.weight.grad.clone()
        ref.weight.grad = None
        syn(xs).sum().backward()
        assert torch.equal(xs.grad, xr.grad) and torch.equal(syn.weight.grad, w_grad)
    evaluated = plastic.convert(models.mlp(4, [3], 2).eval(), "fa")
    assert not any(m.training for m in evaluated.modules())


def test_the_models_refuse_a_readout_they_cannot_build():
    for make in (lambda **k: models.mlp(4, [3], 2, **k), lambda **k: models.resnet20(**k),
                 lambda **k: models.convnet(3, [4], 10, image_size=8, **k)):
        with pytest.raises(SpecError, match="units_per_class must be an integer >= 1"):
            make(units_per_class=0)
        with pytest.raises(SpecError, match="output_scale must be a finite number > 0"):
            make(output_scale=-1.0)


def test_an_in_place_convert_refused_for_a_feedback_option_leaves_the_module_as_it_was():
    """A bad learned option was refused while building the second synapse's feedback, after the
    first was swapped (and the error did not name the synapse)."""
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(SpecError, match="convert: 0: feedback option every must be"):
        plastic.convert(net, "information", inplace=True, options={"every": 0})
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear]


def test_a_custom_feedback_synapse_may_keep_other_state_than_b():
    """set_feedback checked every tensor of W's rank against W's shape: low-rank factors or an
    input covariance of a custom kind were refused as a misshapen B."""
    from plastic.feedback import FeedbackSynapse

    class LowRank(FeedbackSynapse):
        kind = "lowrank"

        def __init__(self):
            super().__init__()
            self.register_buffer("u", torch.randn(3, 2))
            self.register_buffer("v", torch.randn(2, 5))

        def matrix(self, w):
            return self.u @ self.v
    syn = Dense(5, 3).set_feedback(LowRank())
    x = torch.randn(4, 5, requires_grad=True)
    syn(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 3) @ (syn.feedback.u @ syn.feedback.v))


def test_a_resnet20_run_recorded_before_option_a_is_not_taken_for_one_of_now():
    """The recorded spec of a resnet20 run made with projection shortcuts resolved to the same
    spec as an option A run: --resume pooled seeds of two circuits, or failed loading the old
    checkpoint with a traceback."""
    import json
    from plastic.results import _spec_differences
    from plastic.spec import load_protocol
    new = load_protocol("cifar10", ["circuit=resnet20"])
    assert new["circuit"]["shortcut"] == "A"
    old = json.loads(json.dumps(new))
    del old["circuit"]["shortcut"]  # as recorded before resnet20 took option A
    assert _spec_differences(old, new) == ["circuit.shortcut"]
    b = load_protocol("cifar10", ["circuit=resnet20", "circuit.shortcut=B"])
    assert _spec_differences(old, b) == []


def test_modules_tied_by_assignment_share_their_learned_feedback():
    """Two Linear modules sharing one W had a Kolen-Pollack B each, and each B took only its
    module's share of W's update (|B.grad - W.grad| 0.15 of 0.21), so B - W never decayed."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.h1, self.h2, self.out = (nn.Linear(10, 8), nn.Linear(8, 8),
                                                    nn.Linear(8, 8), nn.Linear(8, 3))
            self.h2.weight, self.h2.bias = self.h1.weight, self.h1.bias

        def forward(self, x):
            return self.out(torch.tanh(self.h2(torch.tanh(self.h1(torch.tanh(self.inp(x)))))))
    torch.manual_seed(0)
    for kind in ("kolen-pollack", "information"):
        net = plastic.convert(Tied(), kind, seed=0)
        assert net.h1.feedback is net.h2.feedback and net.h1 is not net.h2
        x = torch.randn(32, 10)
        F.cross_entropy(net(x), (x[:, 0] > 0).long()).backward()
        if kind == "kolen-pollack":
            for syn in (net.inp, net.h1, net.out):
                assert torch.allclose(syn.feedback.weight.grad, syn.weight.grad)
        assert len(list(net.parameters())) == len(set(map(id, net.parameters())))
    fa = plastic.convert(Tied(), "fa", seed=0)  # a fixed B per module, as before
    assert fa.h1.feedback is not fa.h2.feedback

"""Plain torch model definitions.  Each is defined once, with ``nn.Linear`` / ``nn.Conv2d`` and
plastic populations; ``plastic.convert`` then gives it the feedback synapses of any rule."""
from __future__ import annotations

import math
import numbers

import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .populations import ACTIVATIONS, RatePopulation
from .spiking import SPIKING_KINDS, LIFPopulation

__all__ = ["make_population", "mlp", "convnet", "Scale", "PopulationCode", "BasicBlock",
           "ZeroPadShortcut", "ResNet", "resnet18", "resnet20"]


def make_population(name: str) -> nn.Module:
    """A population module by name: a spiking kind (``lif``, ``lif_box``, ``adaptive_lif``) or
    a rate population with that activation.  A circuit with spiking populations is simulated in
    time (``plastic.simulator.TimeStepped``); the rest of its definition is the same."""
    if isinstance(name, str) and name.lower() in SPIKING_KINDS:
        return LIFPopulation(kind=name.lower())
    if isinstance(name, str) and name.lower() not in ACTIVATIONS:
        raise SpecError(f"unknown population {name!r}; spiking: {', '.join(SPIKING_KINDS)}; "
                        f"rate (activations): {', '.join(sorted(ACTIVATIONS))}")
    return RatePopulation(name)


def _rate_only(population, what: str) -> None:
    """Residual circuits are not sequential, so they are not simulated in time."""
    if isinstance(population, str) and population.lower() in SPIKING_KINDS:
        raise SpecError(f"{what} takes a rate population, not {population!r}: spiking circuits "
                        "must be sequential (mlp, convnet) to be simulated in time")


def _readout(n: int, outputs: int, output_scale: float, units_per_class: int) -> list[nn.Module]:
    """The dense readout synapse, with its population code and logit scale when they are set."""
    _check_readout(output_scale, units_per_class)
    layers: list[nn.Module] = [nn.Linear(n, outputs * units_per_class)]
    if units_per_class > 1:
        layers.append(PopulationCode(units_per_class))
    if output_scale != 1.0:
        layers.append(Scale(output_scale))
    return layers


def _check_readout(output_scale, units_per_class) -> None:
    if isinstance(units_per_class, bool) or not isinstance(units_per_class, numbers.Integral) \
            or units_per_class < 1:
        raise SpecError(f"units_per_class must be an integer >= 1, got {units_per_class!r}")
    try:
        scale_ok = (0 < float(output_scale) < math.inf) and not isinstance(output_scale, bool)
    except (TypeError, ValueError):
        scale_ok = False
    if not scale_ok:
        raise SpecError(f"output_scale must be a finite number > 0, got {output_scale!r}")


def mlp(in_features: int, hidden: list[int], outputs: int, population: str = "tanh",
        output_scale: float = 1.0, units_per_class: int = 1) -> nn.Sequential:
    """in -> hidden[0] -> ... -> outputs, a rate population after every hidden synapse."""
    layers: list[nn.Module] = [nn.Flatten()]
    n = in_features
    for i, h in enumerate(hidden):
        layers += [nn.Linear(n, h), make_population(population)]
        n = h
    layers += _readout(n, outputs, output_scale, units_per_class)
    return nn.Sequential(*layers)


class Scale(nn.Module):
    """Multiply by a constant: the logit scale of fast CIFAR-10 recipes (Page 2018 uses 1/8).
    A large flattened feature vector gives the classifier an effective step lr·||x||²; scaling
    its output by s divides that by 1/s², which keeps non-backprop rules (whose hidden features
    do not help the classifier early on) from blowing the logits up."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x):
        return x * self.scale

    def extra_repr(self):
        return f"scale={self.scale:g}"


def convnet(in_channels: int = 3, channels=(32, 64, 128), outputs: int = 10,
            population: str = "relu", batch_norm: bool = True, image_size: int = 32,
            output_scale: float = 1.0, units_per_class: int = 1) -> nn.Sequential:
    """A small ConvNet: [conv3x3 - (BN) - population - maxpool2] per stage, then one dense synapse
    (its output multiplied by ``output_scale`` when that is not 1; ``units_per_class`` as in
    ``PopulationCode``)."""
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for ch in channels:
        layers.append(nn.Conv2d(c, ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(ch))
        layers += [make_population(population), nn.MaxPool2d(2)]
        c, size = ch, size // 2
    layers += [nn.Flatten(), *_readout(c * size * size, outputs, output_scale, units_per_class)]
    return nn.Sequential(*layers)


class PopulationCode(nn.Module):
    """Each output read from a population of k units: y_c = Σ_{j<k} u_{c·k+j} / √k.

    The readout synapse then has k·outputs units.  With 1/√k (not the mean) a backprop step
    moves the outputs as much as a single readout unit's would, at the same learning rate.  With
    k·outputs at least the readout's inputs, the readout expands, as a 1000-class ImageNet
    readout (512 -> 1000) does and a 10-class one cannot; ``protocols/information_variants.toml``
    measures Information Alignment on such a readout."""

    def __init__(self, units_per_class: int):
        super().__init__()
        self.units_per_class = int(units_per_class)

    def forward(self, x):
        k = self.units_per_class
        return x.unflatten(-1, (-1, k)).sum(-1) * k ** -0.5

    def extra_repr(self):
        return f"units_per_class={self.units_per_class}"


SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """He et al. 2016's option A shortcut (Sec. 3.3, used for CIFAR in Sec. 4.2): the identity,
    subsampled by ``stride``, with zero channels added (half before, half after) for a wider
    block; it has no weights, so the error passes through it exactly under every rule."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise SpecError(f"a zero-padding (option A) shortcut cannot narrow {cin} channels "
                            f"to {cout}; use shortcut = 'B'")
        self.stride, self.pad = int(stride), ((cout - cin) // 2, cout - cin - (cout - cin) // 2)

    def forward(self, x):
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, *self.pad))

    def extra_repr(self):
        return f"stride={self.stride}, zero_channels={self.pad}"


class BasicBlock(nn.Module):
    """The two-conv residual block of He et al. 2016 with batch norm and a skip connection.
    Where the shape changes, ``shortcut`` is ``"B"`` (a 1x1-conv projection and batch norm) or
    ``"A"`` (``ZeroPadShortcut``: subsampled identity, zero-padded channels)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, population: str = "relu",
                 shortcut: str = "B"):
        super().__init__()
        _rate_only(population, "a residual block")
        if shortcut not in SHORTCUTS:
            raise SpecError(f"unknown ResNet shortcut {shortcut!r}; known: A (zero padding), "
                            "B (1x1-conv projection)")
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.pop1 = make_population(population)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pop2 = make_population(population)
        self.shortcut = nn.Sequential()
        if (stride != 1 or cin != cout) and shortcut == "A":
            self.shortcut = ZeroPadShortcut(cin, cout, stride)
        elif stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.pop1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.pop2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet (He et al. 2016): ``blocks[i]`` basic blocks of ``widths[i]`` channels per stage.
    ``stem='imagenet'`` uses the 7x7/2 conv and max pool of the ImageNet model; ``stem='cifar'``
    a 3x3/1 conv for 32x32 inputs.  The logits are multiplied by ``output_scale`` when it is
    not 1."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), outputs: int = 1000,
                 in_channels: int = 3, stem: str = "imagenet", population: str = "relu",
                 output_scale: float = 1.0, units_per_class: int = 1, shortcut: str = "B"):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise SpecError(f"unknown ResNet stem {stem!r}; known: imagenet, cifar")
        if len(blocks) != len(widths) or not len(widths):
            raise SpecError(f"ResNet: blocks {tuple(blocks)} needs one entry per stage of widths "
                            f"{tuple(widths)}, and at least one stage")
        _rate_only(population, "a ResNet")
        _check_readout(output_scale, units_per_class)
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.pop1 = make_population(population)
        stages, cin = [], w0
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stages.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1, population,
                                         shortcut))
                cin = w
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, outputs * units_per_class)
        self.code = PopulationCode(units_per_class) if units_per_class > 1 else nn.Identity()
        self.scale = Scale(output_scale) if output_scale != 1.0 else nn.Identity()

    def forward(self, x):
        x = self.pool(self.pop1(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x)).flatten(1)
        return self.scale(self.code(self.fc(x)))


def resnet18(outputs: int = 1000, in_channels: int = 3, stem: str = "imagenet",
             population: str = "relu", output_scale: float = 1.0, units_per_class: int = 1,
             shortcut: str = "B") -> ResNet:
    """ResNet-18: 4 stages of 2 basic blocks (20 convs incl. 3 shortcut convs, and 1 dense)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), outputs, in_channels, stem, population,
                  output_scale, units_per_class, shortcut)


def resnet20(outputs: int = 10, in_channels: int = 3, population: str = "relu",
             output_scale: float = 1.0, units_per_class: int = 1, shortcut: str = "A") -> ResNet:
    """ResNet-20 for CIFAR (He et al. 2016, Sec. 4.2): a 3x3 conv, 3 stages of 3 basic blocks
    with 16, 32, 64 channels, global average pooling and one dense synapse; 0.27M weights.
    Its shortcuts are option A, as there (and in BioTorch's resnet20): zero-padded identities,
    so only the 19 convs and the dense synapse carry error through feedback synapses;
    ``shortcut="B"`` gives 1x1-conv projections where the shape changes."""
    return ResNet((3, 3, 3), (16, 32, 64), outputs, in_channels, "cifar", population,
                  output_scale, units_per_class, shortcut)

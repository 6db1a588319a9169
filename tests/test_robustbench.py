"""RobustBench checkpoints in the registry's models (ncrobust/models/robustbench.py).

The networks below are this file's own re-implementations of RobustBench's
(github.com/RobustBench/robustbench, robustbench/model_zoo/architectures/wide_resnet.py and
resnet.py): their module names, hence their state-dict keys, and their forward computation,
written out step by step as there (``avg_pool2d`` with a fixed window, ``view``, the in-place
``+=``). Each is built with random weights and random BatchNorm running statistics (so BatchNorm in
eval mode is not the identity); its state dict, converted, loads ``strict=True`` into the registry
model, and the two give the same logits on random [0, 1] images (:func:`assert_same_logits`).

Bit-identical up to the pooling: RobustBench pools with ``avg_pool2d(out, 8)`` (WRN) or
``avg_pool2d(out, 4)`` (ResNets), the registry models with ``AdaptiveAvgPool2d(1)`` (any image
size), and the two kernels sum the 64 or 16 values in different orders: the pooled features differ
in their last bits, and the logits by 1-2 float32 ulps of their largest. So the logits are compared
twice: with the references' pool swapped for the registry's (:func:`registry_pooling`)
``torch.equal``, and as RobustBench computes them within 1e-6 of the largest logit (~8 ulps).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ncrobust.models import create_model
from ncrobust.models.robustbench import ROBUSTBENCH_ARCHITECTURES, _registry_shapes, from_robustbench


avg_pool = F.avg_pool2d  # RobustBench's pooling, a fixed window (registry_pooling swaps it)


@contextlib.contextmanager
def registry_pooling():
    """The references pool as the registry models do: ``adaptive_avg_pool2d(out, 1)``."""
    global avg_pool
    saved, avg_pool = avg_pool, lambda out, window: F.adaptive_avg_pool2d(out, 1)
    try:
        yield
    finally:
        avg_pool = saved


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, padding=0, bias=False)


class WideBlock(nn.Module):
    """wide_resnet.py ``BasicBlock``: where the channels change, the BN -> ReLU of the input
    feeds both the convolution and the 1x1 shortcut; otherwise the shortcut is the raw input."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1, self.conv1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), conv3x3(c_in, c_out, stride)
        self.bn2, self.relu2, self.conv2 = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), conv3x3(c_out, c_out)
        self.equal_in_out = c_in == c_out
        self.convShortcut = None if self.equal_in_out else conv1x1(c_in, c_out, stride)

    def forward(self, x):
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equal_in_out else x)))
        out = self.conv2(out)
        return torch.add(x if self.equal_in_out else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)))

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """wide_resnet.py ``WideResNet(depth, num_classes, widen_factor, sub_block1)``."""

    def __init__(self, depth: int = 28, num_classes: int = 10, widen_factor: int = 10, sub_block1: bool = False) -> None:
        super().__init__()
        n, channels = (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(3, 16)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        if sub_block1:  # TRADES's extra block, never used in forward
            self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(channels[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.n_channels = channels[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = avg_pool(out, 8)
        return self.fc(out.view(-1, self.n_channels))


class PreActBlock(nn.Module):
    """resnet.py ``PreActBlockV2`` (``shortcut_reads_raw_input=False``) and ``PreActBlock``
    (``True``: Wong2020Fast's block): the same tensors, another shortcut input."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut_reads_raw_input: bool = False) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), conv3x3(c_out, c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride))
        self.raw = shortcut_reads_raw_input

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x if self.raw else out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class BasicBlock(nn.Module):
    """resnet.py ``BasicBlock``: the shortcut is an empty ``nn.Sequential`` (the identity) or 1x1 conv + BN."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


def make_layers(block, **kwargs) -> list[nn.Sequential]:
    """``layer1 .. layer4``: two blocks each, 64, 128, 256, 512 channels, strides 1, 2, 2, 2."""
    layers, c_in = [], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers.append(nn.Sequential(block(c_in, c_out, stride, **kwargs), block(c_out, c_out, 1, **kwargs)))
        c_in = c_out
    return layers


class PreActResNet(nn.Module):
    """resnet.py ``PreActResNet(block, [2, 2, 2, 2], num_classes, bn_before_fc)``."""

    def __init__(self, num_classes: int = 10, bn_before_fc: bool = True, shortcut_reads_raw_input: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, 64)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_layers(
            PreActBlock, shortcut_reads_raw_input=shortcut_reads_raw_input
        )
        self.bn_before_fc = bn_before_fc
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        out = avg_pool(out, 4)
        return self.linear(out.view(out.size(0), -1))


class ResNet(nn.Module):
    """resnet.py ``ResNet18()``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(3, 64), nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_layers(BasicBlock)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = avg_pool(out, 4)
        return self.linear(out.view(out.size(0), -1))


REFERENCES = {
    "wrn28_10": lambda num_classes: WideResNet(28, num_classes, 10),
    "wrn34_10": lambda num_classes: WideResNet(34, num_classes, 10, sub_block1=True),  # TRADES's layout
    "preact_resnet18": lambda num_classes: PreActResNet(num_classes),
    "resnet18": lambda num_classes: ResNet(num_classes),
}


def randomized(net: nn.Module, seed: int) -> nn.Module:
    """``net`` in eval mode with random weights and random BatchNorm affine and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=gen)))
    return net.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def registry_model(architecture: str, state: dict, num_classes: int = 10) -> nn.Module:
    model = create_model(architecture, num_classes=num_classes, in_chans=3, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    model.load_state_dict(state, strict=True)
    return model.eval()


def assert_logits_match(model: nn.Module, reference: nn.Module, x: torch.Tensor, prepare=lambda x: x) -> None:
    """``model(x)`` is ``reference(prepare(x))``: bit for bit with the registry's pooling, within
    1e-6 of the largest logit with RobustBench's (see the module docstring)."""
    with torch.no_grad():
        logits, expected = model(x), reference(prepare(x))
        with registry_pooling():
            exact = reference(prepare(x))
    assert logits.shape == expected.shape and torch.isfinite(logits).all() and expected.std() > 0
    assert torch.equal(logits, exact), (logits - exact).abs().max()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def assert_same_logits(architecture: str, num_classes: int = 10, prefix: str = "", seed: int = 0) -> dict:
    """Converts a random reference network's state dict, loads it strictly and compares the logits
    (:func:`assert_logits_match`). Returns the state dict."""
    reference = randomized(REFERENCES[architecture](num_classes), seed)
    state = reference.state_dict()
    state = {f"{prefix}{key}": tensor for key, tensor in state.items()}
    converted = from_robustbench(state, architecture)
    model = registry_model(architecture, converted, num_classes)
    assert list(converted) == list(model.state_dict())  # the registry's order, nothing more
    assert torch.equal(converted["normalize.mean"], torch.zeros(1, 3, 1, 1))  # the identity: [0, 1] inputs
    assert torch.equal(converted["normalize.std"], torch.ones(1, 3, 1, 1))
    assert model.classifier.out_features == num_classes
    assert_logits_match(model, reference, images())
    return state


@pytest.mark.parametrize(
    "architecture, num_classes, prefix",
    # CIFAR-100's Addepalli2021Towards_PARN18; DataParallel's keys; both prefixes RobustBench's load_model strips
    [("preact_resnet18", 100, ""), ("resnet18", 10, "module."), ("resnet18", 10, "module.model.")],
)
def test_same_logits_as_robustbench(architecture, num_classes, prefix):
    assert_same_logits(architecture, num_classes, prefix)


@pytest.mark.slow  # two WRNs built, converted and run three times each: about 7 s
def test_same_logits_as_robustbench_wide_resnets():
    """WRN-28-10, and WRN-34-10 with TRADES's unused ``sub_block1`` (dropped). One depth's dict is
    refused for the other: blocks missing, blocks too many."""
    wrn28 = assert_same_logits("wrn28_10")
    wrn34 = assert_same_logits("wrn34_10", seed=1)
    assert any(key.startswith("sub_block1.") for key in wrn34)
    with pytest.raises(ValueError, match=r"WideResNet\(depth=34.*first missing key 'block1.layer.4.bn1.weight' \(of 30\), first unexpected key none$"):
        from_robustbench(wrn28, "wrn34_10")
    with pytest.raises(ValueError, match=r"for wrn28_10 .*first missing key none, first unexpected key 'block1.layer.4.bn1.weight'"):
        from_robustbench(wrn34, "wrn28_10")


@pytest.mark.parametrize("names, shape", [(("mu", "sigma"), (1, 3, 1, 1)), (("mean", "std"), (3,))])
def test_normalisation_buffers_are_the_checkpoints(names, shape):
    """A RobustBench wrapper's ``mu``/``sigma`` (``x = (x - mu) / sigma`` before the network:
    Rice2020OverfittingNetL2, Modas2021PRIMEResNet18, ...), or ``mean``/``std``, become the
    registry model's ``normalize`` buffers: the logits are the wrapper's."""
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2471, 0.2435, 0.2616])
    reference = randomized(PreActResNet(), seed=2)
    state = {**reference.state_dict(), names[0]: mean.view(shape), names[1]: std.view(shape)}
    converted = from_robustbench(state, "preact_resnet18")
    assert torch.equal(converted["normalize.mean"], mean.view(1, 3, 1, 1))
    assert torch.equal(converted["normalize.std"], std.view(1, 3, 1, 1))
    model = registry_model("preact_resnet18", converted)
    assert_logits_match(model, reference, images(), lambda x: (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


def test_a_wrong_key_is_named_in_one_line():
    state = randomized(ResNet(), seed=3).state_dict()
    state = {("layer2.1.bn3.weight" if key == "layer2.1.bn2.weight" else key): t for key, t in state.items()}
    with pytest.raises(ValueError) as err:
        from_robustbench(state, "resnet18")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("from_robustbench: not a state dict of RobustBench's ResNet18() for resnet18 (keys conv1, bn1, layer1-4.")
    assert message.endswith("first missing key 'layer2.1.bn2.weight' (of 1), first unexpected key 'layer2.1.bn3.weight' (of 1)")
    state["layer2.1.bn3.weight"] = torch.ones(7)
    state["layer2.1.bn2.weight"] = torch.ones(7)  # right name, wrong shape
    with pytest.raises(ValueError, match=r"unexpected key 'layer2.1.bn3.weight' \(of 1\), wrong shape layer2.1.bn2.weight \(7,\) \(expected \(128,\)\)$"):
        from_robustbench(state, "resnet18")


def test_another_architectures_dict_is_refused():
    """ResNet-18 and PreActResNet-18 dicts swapped, and RobustBench's ``PreActBlock`` network
    (Wong2020Fast, Andriushchenko2020Understanding: the shortcut reads the raw block input, no
    final BN): the same block tensors as the registry's, but no ``bn``, so it is refused."""
    resnet, preact = randomized(ResNet(), 4).state_dict(), randomized(PreActResNet(), 5).state_dict()
    with pytest.raises(ValueError, match=r"PreActBlockV2.*first missing key 'bn.weight' \(of 4\), first unexpected key 'bn1.weight' \(of 20\)"):
        from_robustbench(resnet, "preact_resnet18")  # the final BN's name, and the BNs of stem and shortcuts
    with pytest.raises(ValueError, match=r"ResNet18\(\).*first missing key 'bn1.weight' \(of 16\), first unexpected key 'bn.weight' \(of 5\)"):
        from_robustbench(preact, "resnet18")
    with pytest.raises(
        ValueError,
        match=r"for wrn28_10 .*first missing key 'block1.layer.0.bn1.weight' \(of 125\), first unexpected key "
        r"'layer1.0.conv1.weight' \(of 116\), wrong shape conv1.weight \(64, 3, 3, 3\) \(expected \(16, 3, 3, 3\)\)$",
    ):
        from_robustbench(resnet, "wrn28_10")
    wong = randomized(PreActResNet(bn_before_fc=False, shortcut_reads_raw_input=True), 6).state_dict()
    with pytest.raises(ValueError, match=r"first missing key 'bn.weight' \(of 4\), first unexpected key none$"):
        from_robustbench(wong, "preact_resnet18")
    with pytest.raises(ValueError, match="architecture 'vgg11_bn' is not one of wrn28_10, wrn34_10, preact_resnet18, resnet18"):
        from_robustbench(resnet, "vgg11_bn")
    assert ROBUSTBENCH_ARCHITECTURES == ("wrn28_10", "wrn34_10", "preact_resnet18", "resnet18")


def test_old_checkpoints_without_batchnorm_step_counts_load():
    """PyTorch before 0.4.1 saved no ``num_batches_tracked``; it is 0 then (eval mode never reads it)."""
    reference = randomized(ResNet(), seed=7)
    state = {key: t for key, t in reference.state_dict().items() if not key.endswith("num_batches_tracked")}
    converted = from_robustbench(state, "resnet18")
    assert converted["stages.stage1_block1.stem.1.num_batches_tracked"].item() == 0
    assert_logits_match(registry_model("resnet18", converted), reference, images())


def test_conversion_leaves_the_random_state_alone():
    """Building the registry model for its tensor shapes draws initial weights: not from the caller's generator."""
    _registry_shapes.cache_clear()
    state = randomized(ResNet(), seed=8).state_dict()
    torch.manual_seed(0)
    from_robustbench(state, "resnet18")
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))

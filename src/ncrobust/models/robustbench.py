"""RobustBench's CIFAR checkpoints in the registry's models.

RobustBench (github.com/RobustBench/robustbench, ``model_zoo/architectures``) keeps the parameter
names of the code its networks come from (TRADES's WideResNet, kuangliu's ResNets); the registry
models name theirs by tap (``stages.stage{s}_block{b}``). :func:`from_robustbench` renames a state
dict of one of the RobustBench networks in :data:`LAYOUTS` so that it loads, ``strict=True``, into
``create_model(architecture, num_classes=C, in_chans=3, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))``
(C from the classifier's weight). The registry model then computes what RobustBench's does
(tests/test_robustbench.py holds the logits of the two equal).

- ``wrn28_10``, ``wrn34_10``: ``WideResNet(depth, widen_factor=10)`` (wide_resnet.py), also with
  ``sub_block1=True`` (TRADES builds a block its forward never uses: its tensors are dropped).
- ``preact_resnet18``: ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)`` (Rice et
  al.'s network: Rice2020OverfittingNetL2, Kireev2021Effectiveness, Addepalli2021Towards_PARN18).
  RobustBench's ``PreActBlock`` networks (Wong2020Fast, Andriushchenko2020Understanding) compute
  another function (the shortcut reads the raw block input; no BN -> ReLU before the pool): they
  have no ``bn`` tensors and are refused for it.
- ``resnet18``: ``ResNet18()`` (resnet.py: Sehwag2021Proxy_R18, Addepalli2022Efficient_RN18, ...).

A DataParallel ``module.`` prefix and a ``model.`` prefix (Chen2020Efficient's file) are stripped,
as RobustBench's ``load_model`` does; where a file wraps the dict (``checkpoint["state_dict"]``,
Kireev2021Effectiveness's ``checkpoint["last"]``), pass the dict inside.

RobustBench models take [0, 1] inputs and normalise in their ``forward``: the converted dict sets
``normalize.mean``/``normalize.std`` from the checkpoint's own buffers (``mu``/``sigma`` or
``mean``/``std``), and to 0/1 (the identity) where it has none. A wrapper that normalises without
buffers (Hendrycks2019Using: ``2x - 1``, i.e. mean = std = 0.5) must have them set by hand.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch

from .registry import create_model


class Layout(NamedTuple):
    network: str  # RobustBench's constructor, for the error message
    keys: str  # its key layout, in short
    rules: tuple[tuple[str, str | None], ...]  # (RobustBench key, registry key); None: dropped


# Key templates: {s} a stage (1-based in both), {i} a block within it (0-based in RobustBench's
# nn.Sequential), {B} the registry's block prefix ``stages.stage{s}_block{i + 1}.``, {p} the rest of
# the key, kept. First matching rule wins, in both directions.
_WRN = (
    ("conv1.{p}", "stages.stage1_block1.stem.{p}"),
    ("block{s}.layer.{i}.convShortcut.{p}", "{B}shortcut.{p}"),
    ("block{s}.layer.{i}.{p}", "{B}{p}"),  # bn1, conv1, bn2, conv2 (relu1, relu2 hold nothing)
    ("bn1.{p}", "head.0.{p}"),  # the final BN -> ReLU
    ("fc.{p}", "classifier.{p}"),
    ("sub_block1.{p}", None),  # TRADES's unused extra block
)
_WRN_KEYS = "conv1, block1-3.layer.N.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc"
LAYOUTS = {
    "wrn28_10": Layout("WideResNet(depth=28, widen_factor=10)", _WRN_KEYS, _WRN),
    "wrn34_10": Layout("WideResNet(depth=34, widen_factor=10)", _WRN_KEYS, _WRN),
    "preact_resnet18": Layout(
        "PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)",
        "conv1, layer1-4.N.{bn1,conv1,bn2,conv2,shortcut.0}, bn, linear",
        (
            ("conv1.{p}", "stages.stage1_block1.stem.{p}"),
            ("layer{s}.{i}.shortcut.0.{p}", "{B}shortcut.{p}"),  # a bare conv in the registry
            ("layer{s}.{i}.{p}", "{B}{p}"),
            ("bn.{p}", "head.0.{p}"),
            ("linear.{p}", "classifier.{p}"),
        ),
    ),
    "resnet18": Layout(
        "ResNet18()",
        "conv1, bn1, layer1-4.N.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear",
        (
            ("conv1.{p}", "stages.stage1_block1.stem.0.{p}"),
            ("bn1.{p}", "stages.stage1_block1.stem.1.{p}"),
            ("layer{s}.{i}.{p}", "{B}{p}"),  # the same names inside a block
            ("linear.{p}", "classifier.{p}"),
        ),
    ),
}
ROBUSTBENCH_ARCHITECTURES = tuple(LAYOUTS)
# The normalisation buffers of RobustBench's wrappers (``mu``/``sigma``); the same under other names.
_NORMALIZE = (("mu", "normalize.mean"), ("sigma", "normalize.std"), ("mean", "normalize.mean"), ("std", "normalize.std"))

_FIELDS = {"s": r"(?P<s>\d+)", "i": r"(?P<i>\d+)", "p": r"(?P<p>.+)", "B": r"stages\.stage(?P<s>\d+)_block(?P<b>\d+)\.(?:block\.)?"}


@functools.cache
def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, ...
    return re.compile("".join(_FIELDS[part] if k % 2 else re.escape(part) for k, part in enumerate(parts)))


def _block(s: int, b: int) -> str:
    """The registry's prefix of block ``b`` of stage ``s``: the stem opens stage1_block1, an
    ``nn.Sequential(stem, block)``."""
    return f"stages.stage{s}_block{b}." + ("block." if (s, b) == (1, 1) else "")


def _rename(key: str, rules, backward: bool = False) -> str | None:
    """``key`` by the first rule that matches it (``backward``: a registry key to RobustBench's);
    ``None`` where none does, ``""`` for a dropped tensor."""
    for rb, registry in rules:
        source, target = (registry, rb) if backward else (rb, registry)
        match = source is not None and _regex(source).fullmatch(key)
        if match:
            if target is None:
                return ""
            fields = match.groupdict()
            if backward and "b" in fields:
                fields["i"] = int(fields["b"]) - 1
            elif not backward and "i" in fields:
                fields["B"] = _block(int(fields["s"]), int(fields["i"]) + 1)
            return target.format(**fields)
    return None


@functools.cache
def _registry_shapes(architecture: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the registry model (built once; the caller's random state
    is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        model = create_model(architecture, num_classes=num_classes, in_chans=3, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _optional(name: str) -> torch.Tensor | None:
    """Defaults for tensors a RobustBench dict may lack: the identity normalisation (no wrapper
    buffers) and BatchNorm's step count (absent before PyTorch 0.4.1; used only with momentum=None)."""
    if name == "normalize.mean":
        return torch.zeros(1, 3, 1, 1)
    if name == "normalize.std":
        return torch.ones(1, 3, 1, 1)
    if name.endswith(".num_batches_tracked"):
        return torch.tensor(0)
    return None


def from_robustbench(state_dict: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """The state dict of a RobustBench network (see the module docstring; ``module.`` and
    ``model.`` prefixes are stripped) renamed for the registry model ``architecture``, in its order.
    A dict that does not fit raises ``ValueError`` in one line naming the first missing and the
    first unexpected key (or wrongly shaped tensor), in RobustBench's names."""
    if architecture not in LAYOUTS:
        raise ValueError(f"from_robustbench: architecture {architecture!r} is not one of {', '.join(ROBUSTBENCH_ARCHITECTURES)}")
    layout = LAYOUTS[architecture]
    rules = layout.rules + _NORMALIZE
    keys = {key.removeprefix("module.").removeprefix("model."): tensor for key, tensor in state_dict.items()}
    renamed = {key: _rename(key, rules) for key in keys}  # None: no rule; "": dropped
    converted = {name: (keys[key], key) for key, name in renamed.items() if name}  # registry name -> (tensor, key)
    for name in ("normalize.mean", "normalize.std"):  # RobustBench's buffers are [1, 3, 1, 1]; others may be [3]
        if name in converted:
            tensor, key = converted[name]
            converted[name] = tensor.detach().to(torch.float32).reshape(1, -1, 1, 1), key
    classifier = converted.get("classifier.weight", (torch.empty(10, 0), ""))[0]
    shapes = _registry_shapes(architecture, classifier.shape[0] if classifier.ndim == 2 else 10)
    unexpected = [key for key, name in renamed.items() if name is None or (name and name not in shapes)]
    missing = [_rename(name, rules, backward=True) or name for name in shapes if name not in converted and _optional(name) is None]
    wrong = [
        f"{converted[name][1]} {tuple(converted[name][0].shape)} (expected {shape})"
        for name, shape in shapes.items()
        if name in converted and tuple(converted[name][0].shape) != shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"from_robustbench: not a state dict of RobustBench's {layout.network} for {architecture} "
            f"(keys {layout.keys}): first missing key {_first(missing)}, first unexpected key {_first(unexpected)}"
            + (f", wrong shape {wrong[0]}" if wrong else "")
        )
    return {name: converted[name][0] if name in converted else _optional(name) for name in shapes}


def _first(keys: list[str]) -> str:
    return f"{keys[0]!r} (of {len(keys)})" if keys else "none"

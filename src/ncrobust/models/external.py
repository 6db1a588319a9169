"""Networks trained elsewhere: a weights file and an architecture -> a measurable model.

A :class:`NetworkSpec` names the file, how its keys are laid out (``format``) and the
architecture, which is one of

- a name of this project's registry (``wrn28_10``, ``preact_resnet18``, ...), whose models keep
  their native taps;
- ``torchvision:NAME`` or ``timm:NAME``: built by that library (optional imports) with the
  dataset's number of classes, weights from the file;
- ``package.module:callable``: the user's own ``nn.Module`` class or factory, importable from
  the working directory or the Python path, called with ``num_classes`` (when it takes it) and
  the spec's ``options``.

Formats (``auto`` picks the first that fits):

- ``ncrobust``: this project's checkpoint (``{"model": state_dict, "epoch": e, "cell": ...}``;
  its architecture is the cell's model unless named);
- ``state_dict``: a plain state dict for the architecture (nested under ``state_dict``,
  ``model_state_dict``, ``model``, ``net`` or ``network`` too; a ``module.`` prefix of
  ``DataParallel`` is removed);
- ``robustbench``: a state dict in RobustBench's layout for a registry architecture that has a
  counterpart there (:mod:`ncrobust.models.robustbench`), converted to the registry's names;
- ``module``: a whole pickled ``nn.Module`` (``torch.save(model)``). Unpickling it runs code
  named by the file, so it needs ``trust=True``.

Every file is untrusted data: it is read with ``torch.load(weights_only=True)`` (tensors and plain
containers only), and a file that holds anything else is refused in one line naming ``--trust``.
Registry models are built with an identity normalisation (mean 0, std 1) that the file's own
``normalize`` buffers replace when it has them: a RobustBench model takes [0, 1] inputs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ncrobust.columns import PENULTIMATE
from ncrobust.io import ExplainedError

from .adapter import AdapterError, as_tapped
from .registry import create_model, list_models

FORMATS = ("auto", "ncrobust", "state_dict", "robustbench", "module")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
"""Keys under which training scripts commonly save the state dict inside a larger dict."""


class NetworkError(ExplainedError, ValueError):
    """A network file or spec that cannot be loaded as asked, with the fix."""


@dataclass(frozen=True)
class NetworkSpec:
    """A network to measure: its weights file and how to read it (module docstring). ``taps``:
    module names to measure besides the penultimate features (registry models: a subset of their
    taps; default all); ``classifier``: the linear layer making the logits (default: the last);
    ``mean``/``std``: the input normalisation the network expects, applied inside the model."""

    path: str
    architecture: str | None = None
    format: str = "auto"
    options: dict = field(default_factory=dict)
    taps: tuple[str, ...] | None = None
    classifier: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    trust: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise NetworkError(f"unknown format {self.format!r}; allowed: {', '.join(FORMATS)}")
        if (self.mean is None) != (self.std is None):
            raise NetworkError("give both mean and std of the input normalisation, or neither")


def read_file(path: str | os.PathLike, *, trust: bool = False):
    """The object saved in ``path``, read without running code (``weights_only=True``); with
    ``trust``, any pickle (a whole module, say): only for a file whose origin the user vouches for."""
    path = Path(path)
    if not path.is_file():
        raise NetworkError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise NetworkError(f"{path}: a safetensors file needs the safetensors package (pip install safetensors)") from None
        return load_file(str(path))
    if trust:
        _importable_here()
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if not trust and ("GLOBAL" in str(err) or "Unsupported" in str(err) or "weights_only" in str(err)):
            raise NetworkError(
                f"{path}: refused: it holds pickled objects other than tensors and plain containers, which load only "
                "by running code the file names; if you trust its origin, pass --trust (the spec's trust: true)"
            ) from None
        raise NetworkError(f"{path}: not a PyTorch weights file ({_first_line(err)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, OSError, AttributeError,
            ModuleNotFoundError) as err:
        raise NetworkError(f"{path}: not a readable PyTorch weights file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def state_dict_of(obj) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, or under one of :data:`NESTED_KEYS`; a ``module.``
    prefix on every key (``nn.DataParallel``'s) removed."""
    if not _is_state_dict(obj) and isinstance(obj, dict):
        for key in NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise NetworkError(f"no state dict found (a dict of tensors, or one under {', '.join(NESTED_KEYS)}); the file holds: {keys}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _importable_here() -> None:
    """The working directory on the import path, as ``python -m`` has it and a console script has not:
    a user's module (an architecture, or the class of a trusted pickled model) lives there."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _import(target: str):
    module_name, _, attr = target.partition(":")
    _importable_here()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise NetworkError(f"architecture {target!r}: cannot import {module_name} ({err}); run from the directory that "
                           "holds it or add it to PYTHONPATH") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise NetworkError(f"architecture {target!r}: {module_name} has no {attr!r}") from None


def build(architecture: str, *, num_classes: int, in_chans: int, image_size, options: dict | None = None) -> nn.Module:
    """The untrained network named ``architecture`` (module docstring) for the dataset's shapes."""
    options = dict(options or {})
    kind, sep, name = architecture.partition(":")
    try:
        if not sep:
            if architecture not in list_models():
                raise NetworkError(f"unknown architecture {architecture!r}; the registry has {', '.join(list_models())}, "
                                   "or name torchvision:NAME, timm:NAME or package.module:callable")
            zeros = tuple(0.0 for _ in range(in_chans))
            return create_model(architecture, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                                mean=zeros, std=tuple(1.0 for _ in range(in_chans)), **options)
        if kind == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
        if kind == "timm":
            try:
                import timm
            except ImportError:
                raise NetworkError(f"architecture {architecture!r} needs timm, which is not installed (pip install timm)") from None
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **options)
        factory = _import(architecture)
        accepts = inspect.signature(factory).parameters
        if "num_classes" in accepts or any(p.kind == p.VAR_KEYWORD for p in accepts.values()):
            options.setdefault("num_classes", num_classes)
        model = factory(**options)
    except NetworkError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise NetworkError(f"architecture {architecture!r} cannot be built with options {options}: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise NetworkError(f"architecture {architecture!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def fit(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` (strict), or one line naming the first missing, unexpected and
    mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1 else f"missing {missing[0]!r}")
        if unexpected:
            parts.append(f"unexpected {unexpected[0]!r} (and {len(unexpected) - 1} more)" if len(unexpected) > 1
                         else f"unexpected {unexpected[0]!r}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k!r} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        raise NetworkError(f"the weights do not fit {what}: {'; '.join(parts)}; check the architecture, its options and "
                           "the format (a RobustBench file: format robustbench)")
    model.load_state_dict(state)


def checkpoint_architecture(obj) -> str | None:
    """The registry model of an ncrobust checkpoint's contents (its ``cell``'s model), else None."""
    cell = obj.get("cell") if isinstance(obj, dict) else None
    model = cell.get("model") if isinstance(cell, dict) else None
    return model if model in list_models() else None


def _architecture(spec: NetworkSpec, obj) -> str:
    if spec.architecture:
        return spec.architecture
    if architecture := checkpoint_architecture(obj):
        return architecture
    raise NetworkError(f"{spec.path}: name its architecture (--arch): a registry name ({', '.join(list_models())}), "
                       "torchvision:NAME, timm:NAME or package.module:callable")


def _robustbench(state: dict, architecture: str) -> dict:
    from .robustbench import from_robustbench

    return from_robustbench(state, architecture)


def load_weights(spec: NetworkSpec, *, num_classes: int, in_chans: int, image_size,
                 contents=None) -> tuple[nn.Module, int]:
    """``(network, epoch)``: the spec's architecture with the file's weights, in eval mode, not yet
    tapped (:func:`load_network`); ``epoch`` is the file's (0 when it has none). ``contents``: the
    file as :func:`read_file` returned it, when the caller has already read it."""
    obj = read_file(spec.path, trust=spec.trust) if contents is None else contents
    if isinstance(obj, nn.Module):
        if spec.format not in ("auto", "module"):
            raise NetworkError(f"{spec.path}: holds a whole module, not the {spec.format} format; use format module")
        return obj.eval(), 0
    if spec.format == "module":
        raise NetworkError(f"{spec.path}: holds no pickled nn.Module (a {type(obj).__name__}); use format state_dict")
    epoch = int(obj["epoch"]) if isinstance(obj, dict) and isinstance(obj.get("epoch"), int) else 0
    architecture = _architecture(spec, obj)
    model = build(architecture, num_classes=num_classes, in_chans=in_chans, image_size=image_size, options=spec.options)
    state = state_dict_of(obj)
    what = f"{architecture}" + (f" with {spec.options}" if spec.options else "")
    if spec.format == "robustbench":
        fit(model, _robustbench(state, architecture), what)
    elif spec.format in ("ncrobust", "state_dict"):
        fit(model, state, what)
    else:  # auto: as saved, else RobustBench's layout when the architecture has one
        try:
            fit(model, state, what)
        except NetworkError as direct:
            from .robustbench import ROBUSTBENCH_ARCHITECTURES

            if architecture not in ROBUSTBENCH_ARCHITECTURES:
                raise
            try:
                converted = _robustbench(state, architecture)
            except ValueError:
                raise direct from None
            fit(model, converted, what)
    return model.eval(), epoch


def tapped(spec: NetworkSpec, model: nn.Module) -> nn.Module:
    """``model`` (the spec's architecture) with the taps of :mod:`ncrobust.models.base`
    (:func:`ncrobust.models.adapter.as_tapped`): the spec's taps, classifier and normalisation."""
    try:
        out = as_tapped(model, taps=() if spec.taps is None else spec.taps, classifier=spec.classifier,
                        mean=spec.mean, std=spec.std)
    except AdapterError as err:
        raise NetworkError(str(err)) from None
    if spec.taps is not None and out is model:  # a registry model: keep the taps asked for
        out = _SelectedTaps(model, spec.taps)
    return out


def load_network(spec: NetworkSpec, *, num_classes: int, in_chans: int, image_size,
                 contents=None) -> tuple[nn.Module, int]:
    """``(model, epoch)``: the spec's network with its weights and taps (:func:`tapped`), in eval mode;
    ``contents`` as in :func:`load_weights`."""
    model, epoch = load_weights(spec, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                                contents=contents)
    return tapped(spec, model).eval(), epoch


def spec_of(entry: dict) -> NetworkSpec:
    """The :class:`NetworkSpec` of a config's ``external`` entry (never trusted: no pickled code); a job
    reads the path from its input, the entry in its slice has none (:data:`ncrobust.stages.EXTERNAL_UNSLICED`)."""
    as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
    return NetworkSpec(path=entry.get("path", ""), architecture=entry["architecture"], format=entry.get("format", "auto"),
                       options=dict(entry.get("options") or {}), taps=as_tuple(entry.get("taps")),
                       classifier=entry.get("classifier"), mean=as_tuple(entry.get("mean")), std=as_tuple(entry.get("std")))


class _SelectedTaps(nn.Module):
    """A registry model measured at some of its taps only (``penultimate`` always)."""

    def __init__(self, model: nn.Module, taps) -> None:
        super().__init__()
        self.model = model
        self._taps = [t for t in model.tap_names if t in set(taps) and t != PENULTIMATE]

    @property
    def classifier(self) -> nn.Linear:
        return self.model.classifier

    @property
    def tap_names(self) -> list[str]:
        return [*self._taps, PENULTIMATE]

    def forward(self, x: torch.Tensor, taps: bool = False):
        if not taps:
            return self.model(x)
        logits, acts = self.model(x, taps=True)
        return logits, {name: acts[name] for name in self.tap_names}

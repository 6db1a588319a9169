"""Any ``nn.Module`` classifier as a model of this project (:mod:`ncrobust.models.base`'s contract).

The evaluation reads three things of a model: ``model(x, taps=True)`` -> ``(logits, taps)``,
``model.tap_names`` (ending in ``"penultimate"``) and ``model.classifier`` (the last
``nn.Linear``, whose rows are the NC2/NC3 classifier). :class:`TappedModule` gives a plain module
all three with forward hooks, so its forward pass (and every attack's backward pass) is the
module's own:

- the classifier is the module's last ``nn.Linear`` (or one named), and the ``penultimate`` tap
  is that layer's input: the features it maps to logits;
- further taps are the outputs of modules named by their ``named_modules()`` names;
- inputs are images in [0, 1]: a module trained on normalised inputs gets its normalisation as a
  first layer (``mean``/``std``), so that attacks and their budgets stay in pixel space.

:func:`check_classifier` checks on a batch that the module's output is C logits made by that
layer (a softmax or a scaling after it would make NC2/NC3 describe another map).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ncrobust.columns import PENULTIMATE
from ncrobust.io import ExplainedError

from .base import Normalize, TappedNet, eval_mode


class AdapterError(ExplainedError, ValueError):
    """A module that cannot be measured as it is, with what to change."""


def last_linear(module: nn.Module) -> str:
    """The name of ``module``'s last ``nn.Linear`` in registration order (where torchvision's,
    timm's and most hand-written classifiers keep their head)."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise AdapterError("the model has no nn.Linear layer to read a classifier from; name its last layer "
                           "with --classifier (it must be an nn.Linear)")
    return names[-1]


def _first_tensor(output):
    """A hooked module's output as one tensor (the first of a tuple or list: an LSTM's, say)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


class TappedModule(nn.Module):
    """``module`` with the taps of :mod:`ncrobust.models.base`: outputs of the modules named in
    ``taps`` (in that order) and ``penultimate``, the input of ``classifier`` (default: the last
    ``nn.Linear``). ``mean``/``std``: the normalisation ``module`` expects, applied to the [0, 1]
    inputs first (none by default: the module takes [0, 1] inputs itself)."""

    def __init__(self, module: nn.Module, *, taps: list[str] | tuple[str, ...] = (), classifier: str | None = None,
                 mean=None, std=None) -> None:
        super().__init__()
        self.module = module
        self.normalize = None if mean is None else Normalize(mean, std)
        modules = dict(module.named_modules())
        self.classifier_name = classifier or last_linear(module)
        if self.classifier_name not in modules:
            raise AdapterError(f"--classifier {self.classifier_name!r}: no such module; its linear layers: "
                               f"{', '.join(n for n, m in modules.items() if isinstance(m, nn.Linear)) or 'none'}")
        if not isinstance(modules[self.classifier_name], nn.Linear):
            raise AdapterError(f"--classifier {self.classifier_name!r} is a {type(modules[self.classifier_name]).__name__}, "
                               "not an nn.Linear: name the linear layer that makes the logits")
        if PENULTIMATE in taps:
            raise AdapterError(f"{PENULTIMATE!r} is always the classifier's input; leave it out of --taps")
        unknown = [t for t in taps if t not in modules or t == ""]
        if unknown:
            raise AdapterError(f"--taps {', '.join(map(repr, unknown))}: no such module; e.g. "
                               f"{', '.join(n for n, _ in list(module.named_children())[:8])}")
        self._taps = list(dict.fromkeys(taps))
        self._acts: dict[str, torch.Tensor] | None = None
        for name in self._taps:
            modules[name].register_forward_hook(self._keep_output(name))
        modules[self.classifier_name].register_forward_pre_hook(self._keep_input)

    def _keep_output(self, name: str):
        def hook(_module, _inputs, output):
            if self._acts is not None:
                self._acts[name] = _first_tensor(output)
        return hook

    def _keep_input(self, _module, inputs):
        if self._acts is not None:
            self._acts[PENULTIMATE] = inputs[0]

    @property
    def classifier(self) -> nn.Linear:
        return self.module.get_submodule(self.classifier_name)

    @property
    def tap_names(self) -> list[str]:
        return [*self._taps, PENULTIMATE]

    def forward(self, x: torch.Tensor, taps: bool = False):
        if self.normalize is not None:
            x = self.normalize(x)
        if not taps:
            return self.module(x)
        self._acts = {}
        try:
            logits = self.module(x)
            acts = self._acts
        finally:
            self._acts = None
        missing = [name for name in self.tap_names if name not in acts]
        if missing:
            raise AdapterError(f"tap {missing[0]!r} was not reached by the forward pass; name modules the forward pass runs")
        return logits, OrderedDict((name, acts[name]) for name in self.tap_names)


def as_tapped(module: nn.Module, *, taps=(), classifier: str | None = None, mean=None, std=None) -> nn.Module:
    """A measurable model: the project's own models as they are (their native taps; ``taps`` then
    selects among them), any other module through :class:`TappedModule`."""
    if isinstance(module, TappedNet) and classifier is None and mean is None:
        unknown = [t for t in taps if t not in module.tap_names]
        if unknown:
            raise AdapterError(f"--taps {', '.join(map(repr, unknown))}: not a tap of this model; taps: {', '.join(module.tap_names)}")
        return module
    return TappedModule(module, taps=taps, classifier=classifier, mean=mean, std=std)


@torch.no_grad()
def check_classifier(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """One line when ``model`` is not measurable on ``x`` (a small batch of the dataset, in [0, 1]):
    its output is not ``[N, num_classes]`` logits, or they are not its classifier's map of its
    ``penultimate`` features (a softmax, a scale or a second head after the last linear layer)."""
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise AdapterError(f"inputs must be images in [0, 1] (found values in [{float(x.min()):.3g}, {float(x.max()):.3g}]); "
                           "put the normalisation in the model (--mean/--std) instead of the data")
    with eval_mode(model):
        logits, acts = model(x, taps=True)
    if logits.ndim != 2 or logits.shape != (len(x), num_classes):
        raise AdapterError(f"the model's output has shape {tuple(logits.shape)}, not [N, {num_classes}] logits for the "
                           f"dataset's {num_classes} classes: build it with num_classes={num_classes}")
    head = model.classifier
    if head.out_features != num_classes:
        raise AdapterError(f"the classifier layer has {head.out_features} outputs, the dataset {num_classes} classes")
    remade = head(acts[PENULTIMATE])
    if not torch.allclose(remade.float(), logits.float(), rtol=1e-4, atol=1e-5):
        raise AdapterError("the model's output is not its classifier layer's output (something follows the last "
                           "nn.Linear: a softmax, a scale): name the layer that makes the logits with --classifier, "
                           "or return the logits")

"""A small model registry: ``@register_model("name")`` on a constructor, ``create_model(name, ...)``."""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from .base import check_normalized_features, image_hw, normalize_features

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ANY_SHAPE: set[str] = set()


def register_model(name: str, *, any_shape: bool = False) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a constructor taking keyword arguments ``num_classes, in_chans, image_size, mean, std``.

    ``any_shape``: it also takes ``image_size=(height, width)`` (non-square inputs: MNIST-1D's
    one-row sequences); the others are built for square images only."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        if any_shape:
            _ANY_SHAPE.add(name)
        return fn

    return decorate


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def any_shape_models() -> list[str]:
    """Names of the models that take non-square inputs (``image_size=(height, width)``), sorted."""
    return sorted(_ANY_SHAPE)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int | tuple[int, int],
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    **kwargs,
) -> nn.Module:
    """Build model ``name``; ``kwargs`` are the family's own options (width, depth, ...) and
    ``normalized_features`` (every family: :func:`ncrobust.models.base.normalize_features`; it
    implies a bias-free classifier, so ``bias=True`` with it is an error)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    height, width = image_hw(image_size)
    if height != width and name not in _ANY_SHAPE:
        raise ValueError(
            f"{name} takes square images, not {height}x{width} inputs; for sequences (mnist1d) use one of "
            f"{', '.join(any_shape_models())}"
        )
    image_size = height if height == width else (height, width)
    shape = dict(num_classes=num_classes, in_chans=in_chans, image_size=image_size, mean=mean, std=std)
    temperature = None
    if "normalized_features" in kwargs:
        kwargs = dict(kwargs)
        temperature = check_normalized_features(name, kwargs.pop("normalized_features"))
        if kwargs.get("bias", False) is not False:
            raise ValueError(f"{name}: normalized_features has a bias-free classifier (Yaras et al.); drop bias: true")
        kwargs["bias"] = False
    try:
        model = _MODELS[name](**shape, **kwargs)
        return model if temperature is None else normalize_features(model, temperature)
    except TypeError as err:  # a misspelt option (config models.<name>) is bad input, not a bug
        if "unexpected keyword argument" not in str(err):
            raise
        allowed = [p for p in inspect.signature(type(_MODELS[name](**shape)).__init__).parameters if p not in ("self", *shape)]
        allowed.append("normalized_features")
        unknown = sorted(set(kwargs) - set(allowed)) or sorted(kwargs)
        raise ValueError(f"unknown option {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}") from None

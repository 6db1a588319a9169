"""Model families and their registry. Import a family module here to register it."""

from . import cnn1d, convnet, deep_linear, mlp, preact_resnet, resnet, vgg, wide_resnet  # noqa: F401  (registration side effects)
from .base import Normalize, TappedNet
from .registry import create_model, list_models, register_model

__all__ = ["Normalize", "TappedNet", "create_model", "list_models", "register_model"]

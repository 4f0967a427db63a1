"""Backbones; importing this package registers every architecture."""
from condconv.models import efficientnet, mnasnet, mobilenet_v1, mobilenet_v2, resnet  # noqa: F401
from condconv.models.base import CondConvNet, channels_last_, init_weights
from condconv.models.registry import create_model, get_arch, list_models, register_model

__all__ = ["CondConvNet", "channels_last_", "init_weights", "create_model", "get_arch", "list_models", "register_model"]

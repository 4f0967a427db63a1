"""condconv: CondConv layers, backbones, placements, MADD counting and routing statistics.

Depends on torch (and torchvision ops) only.
"""
from condconv.layers import CondConv2d, CondLinear, RoutingFn
from condconv.madds import count_madds, count_params
from condconv.models import create_model, list_models
from condconv.routing import LayerRouted, annealed_temperature, set_routing_temperature
from condconv.spec import ModelSpec
from condconv.summary import format_summary, model_summary

__all__ = [
    "CondConv2d",
    "CondLinear",
    "RoutingFn",
    "LayerRouted",
    "annealed_temperature",
    "set_routing_temperature",
    "ModelSpec",
    "create_model",
    "list_models",
    "count_madds",
    "count_params",
    "model_summary",
    "format_summary",
]
__version__ = "0.1.0"

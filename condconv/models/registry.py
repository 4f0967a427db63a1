"""The one registry of model constructors, and `create_model`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, Union

from torch import nn

from condconv.placement import FC, HEAD, resolve_placement
from condconv.spec import ModelSpec

__all__ = ["ArchDef", "register_model", "list_models", "get_arch", "create_model", "resolve_positions"]


@dataclass(frozen=True)
class ArchDef:
    """How to build one architecture.

    ``block_configs(spec)`` lists the body blocks without building anything, so a placement can be
    validated first; ``build(spec, configs, positions)`` then makes the module, with CondConv at
    ``positions`` (block indices and "head"/"fc").
    """

    name: str
    block_configs: Callable[[ModelSpec], Sequence[Any]]
    paper_placement: Callable[[Sequence[Any]], Iterable[Union[int, str]]]
    build: Callable[[ModelSpec, Sequence[Any], frozenset], nn.Module]
    extras: tuple[str, ...] = (HEAD, FC)
    description: str = ""


_REGISTRY: dict[str, ArchDef] = {}


def register_model(arch: ArchDef) -> ArchDef:
    """Add an architecture to the registry (called at import of its module)."""
    if arch.name in _REGISTRY:
        raise ValueError(f"arch {arch.name!r} is registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def _load() -> None:
    import condconv.models  # noqa: F401  (importing the package registers every arch)


def list_models() -> list[str]:
    """Names of all registered architectures."""
    _load()
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchDef:
    """The `ArchDef` of a registered architecture."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown arch {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def resolve_positions(spec: ModelSpec) -> tuple[Sequence[Any], frozenset]:
    """The block configs of ``spec`` and the CondConv positions its placement resolves to."""
    arch = get_arch(spec.arch)
    configs = arch.block_configs(spec)
    if spec.num_experts == 0:
        return configs, frozenset()
    positions = resolve_placement(spec.placement, len(configs), arch.paper_placement(configs), arch.extras)
    return configs, positions


def create_model(arch_or_spec: Union[str, ModelSpec], **overrides: Any) -> nn.Module:
    """Build a model from an arch name (plus `ModelSpec` fields as keywords) or from a `ModelSpec`.

    ``create_model("efficientnet_b0", num_experts=8)`` uses the paper's placement. Everything is
    validated (ValueError) before any module is built.
    """
    if isinstance(arch_or_spec, ModelSpec):
        spec = arch_or_spec.replace(**overrides) if overrides else arch_or_spec
    elif isinstance(arch_or_spec, str):
        spec = ModelSpec(arch=arch_or_spec, **overrides)
    else:
        raise ValueError(f"create_model takes an arch name or a ModelSpec, not {type(arch_or_spec).__name__}")
    configs, positions = resolve_positions(spec)
    model = get_arch(spec.arch).build(spec, configs, positions)
    model.spec = spec
    return model

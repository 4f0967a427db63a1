"""Argument checks shared by the converters and data modules (one message format for all of them)."""
from __future__ import annotations

__all__ = ["require_int_at_least"]


def require_int_at_least(name: str, value: object, lowest: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= ``lowest``."""
    if not isinstance(value, int) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")

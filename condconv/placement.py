"""Where a model uses CondConv: parse, validate and resolve a placement to a set of positions.

Positions are body-block indices (ints, in forward order), plus ``"head"`` (the final 1x1 conv)
and ``"fc"`` (the classifier) where an architecture has them.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

__all__ = ["Placement", "PLACEMENT_FORMS", "HEAD", "FC", "check_placement", "resolve_placement", "placement_name"]

HEAD = "head"
FC = "fc"
Placement = Union[str, Sequence[Union[int, str]]]
PLACEMENT_FORMS = '"paper", "all", "none", "last:K" (K >= 0), or a list of block indices (and "head"/"fc")'


def _parse_last(placement: str) -> int:
    try:
        k = int(placement.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"placement {placement!r} is not valid; expected one of {PLACEMENT_FORMS}") from None
    if k < 0:
        raise ValueError(f"placement {placement!r} has K < 0; expected one of {PLACEMENT_FORMS}")
    return k


def check_placement(placement: Placement) -> None:
    """Validate the form of a placement (not its range, which depends on the architecture)."""
    if isinstance(placement, str):
        if placement in ("paper", "all", "none"):
            return
        if placement.startswith("last:"):
            _parse_last(placement)
            return
        raise ValueError(f"placement {placement!r} is not valid; expected one of {PLACEMENT_FORMS}")
    if not isinstance(placement, (list, tuple)):
        raise ValueError(f"placement {placement!r} is not valid; expected one of {PLACEMENT_FORMS}")
    for item in placement:
        if isinstance(item, bool) or not (isinstance(item, int) or item in (HEAD, FC)):
            raise ValueError(
                f"placement entry {item!r} is not valid; expected a block index (int), {HEAD!r} or {FC!r}"
            )


def resolve_placement(
    placement: Placement,
    num_blocks: int,
    paper: Iterable[int | str],
    extras: Sequence[str] = (HEAD, FC),
) -> frozenset[int | str]:
    """The set of CondConv positions for ``placement`` in a model of ``num_blocks`` body blocks.

    ``paper`` is the architecture's paper placement and ``extras`` the non-block positions it has.
    Raises ValueError naming the bad entry and the valid range.
    """
    check_placement(placement)
    if isinstance(placement, str):
        if placement == "paper":
            return frozenset(paper)
        if placement == "all":
            return frozenset(range(num_blocks)) | frozenset(extras)
        if placement == "none":
            return frozenset()
        k = _parse_last(placement)
        if k > num_blocks:
            raise ValueError(f"placement {placement!r} asks for {k} blocks; this model has {num_blocks} (0..{num_blocks})")
        return frozenset(range(num_blocks - k, num_blocks))
    positions: set[int | str] = set()
    for item in placement:
        if isinstance(item, str):
            if item not in extras:
                raise ValueError(f"placement entry {item!r} does not exist in this model; it has {list(extras)}")
            positions.add(item)
        elif not -num_blocks <= item < num_blocks:
            raise ValueError(
                f"placement names block {item}, which does not exist; valid block indices are 0..{num_blocks - 1}"
            )
        else:
            positions.add(item % num_blocks)
    return frozenset(positions)


def placement_name(placement: Placement) -> str:
    """A short stable string for a placement, used in model names (e.g. ``paper``, ``last3``, ``b10.11.fc``)."""
    if isinstance(placement, str):
        return placement.replace(":", "")
    ints = sorted(i for i in placement if isinstance(i, int))
    strs = sorted(i for i in placement if isinstance(i, str))
    return "b" + ".".join([str(i) for i in ints] + strs)

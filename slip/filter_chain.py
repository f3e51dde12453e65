"""Filter chains as configuration: which annotation filters run, with which parameters.

A chain is written ``"containment:0.8,min_area:50,disjoint"`` (:func:`parse_filters`). Each filter is a
small frozen dataclass holding its parameters (defaults, range checks, ``params()``); its implementation
lives in :mod:`slip.filters` (``run_filter(spec, maskset)``). This module imports no model
code, so the producer can check a job's chain, and status can read a job's manifest, without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from slip.errors import ConfigError


class Filter(Protocol):
    """A filter's parameters: what :func:`slip.filters.apply_filters` runs (its implementation lives there)."""

    name: str

    def params(self) -> dict: ...


@dataclass(frozen=True)
class Containment:
    """Drop segments nested in others (the SLIP paper's filter), then the largest one as background.

    ``keep="parent"`` (default): segments are visited by area, largest first (ties: lower index); one
    is dropped when its intersection with an already KEPT larger segment exceeds ``threshold`` of its
    own area. ``keep="child"``: visited smallest first; a segment is dropped when a KEPT smaller
    segment lies inside it by the same measure (the parent goes, the part stays).
    ``drop_largest``: afterwards the largest surviving segment is dropped as the background.
    Without ``drop_largest`` the filter is idempotent; with it, a second pass drops the next largest.

    The authors' notebook (``filter_annotations`` then ``pop(0)``) differs in two details: there a
    segment already dropped can still drop smaller ones, and equal-area segments never drop each other
    (so exact duplicates both survive); here only kept segments count and ties go to the lower index.
    Beware: with ``keep="parent"`` a whole-image proposal contains every object, so all of them go and
    then it goes as background, leaving nothing; use ``keep="child"`` for proposals that include one.
    """

    threshold: float = 0.8  # fraction of the smaller segment's area that must lie inside the other
    drop_largest: bool = True  # drop the largest surviving segment as background
    keep: str = "parent"  # "parent": keep the container; "child": keep the contained part

    name = "containment"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"containment threshold must be in [0, 1], got {self.threshold}")
        if self.keep not in ("parent", "child"):
            raise ConfigError(f"containment keep must be 'parent' or 'child', got {self.keep!r}")

    def params(self) -> dict:
        return asdict(self)



@dataclass(frozen=True)
class MinArea:
    """Drop segments smaller than ``pixels``."""

    pixels: int = 0  # minimum area in pixels; a segment with exactly this many is kept

    name = "min_area"

    def __post_init__(self) -> None:
        if self.pixels < 0:
            raise ConfigError(f"min_area must be >= 0 pixels, got {self.pixels}")

    def params(self) -> dict:
        return asdict(self)



@dataclass(frozen=True)
class Dedup:
    """Greedy mask NMS: of two segments with mask IoU above ``iou``, keep the higher ``predicted_iou``.

    Segments are visited by ``predicted_iou``, best first (ties: lower index); one is dropped when its
    IoU with an already kept segment exceeds ``iou``. Idempotent.
    """

    iou: float = 0.9  # mask IoU above which two segments count as duplicates

    name = "dedup"

    def __post_init__(self) -> None:
        if not 0.0 <= self.iou <= 1.0:
            raise ConfigError(f"dedup iou must be in [0, 1], got {self.iou}")

    def params(self) -> dict:
        return asdict(self)



@dataclass(frozen=True)
class Disjoint:
    """Make segments pairwise disjoint; each overlapping pixel goes to the better-scored segment.

    Scores are ``predicted_iou`` (ties: lower index). The union of all masks is unchanged; segments
    left with no pixels are removed (and counted as removed); boxes are recomputed. Idempotent.
    Cost: O(N·H·W) worst case, in practice O(Σ_i |box_i|), with one ``(H, W)`` scratch mask.
    """

    name = "disjoint"

    def params(self) -> dict:
        return {}



# --- parsing ----------------------------------------------------------------------------------------


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"not a boolean: {text!r}")
    return lowered in ("true", "1", "yes")


# name -> (constructor, ordered parameter names, parameter parsers)
FILTERS: dict[str, tuple[Callable[..., Filter], tuple[str, ...], dict[str, Callable[[str], object]]]] = {
    "containment": (Containment, ("threshold", "keep", "drop_largest"),
                    {"threshold": float, "keep": str, "drop_largest": _to_bool}),
    "min_area": (MinArea, ("pixels",), {"pixels": int}),
    "dedup": (Dedup, ("iou",), {"iou": float}),
    "disjoint": (Disjoint, (), {}),
}


def parse_filters(spec: str) -> tuple[Filter, ...]:
    """A CLI string -> filters, e.g. ``"containment:0.8,min_area:50,disjoint"``.

    Items are comma-separated, ``name[:arg[:arg...]]``; an argument is positional or ``key=value``,
    e.g. ``"containment:0.9:keep=child:drop_largest=false"``. ``"none"`` means no filters.
    Raises :class:`~slip.errors.ConfigError` naming the bad item.
    """
    if spec.strip().lower() == "none":
        return ()
    if not spec.strip():
        raise ConfigError("empty filter spec: give e.g. 'containment:0.8,disjoint', or 'none' for no filters")
    return tuple(_parse_item(item.strip()) for item in spec.split(","))


def _parse_item(item: str) -> Filter:
    name, *args = item.split(":")
    if name not in FILTERS:
        raise ConfigError(f"unknown filter {name!r} in {item!r}: use one of {', '.join(FILTERS)}")
    build, names, parsers = FILTERS[name]
    kwargs: dict[str, object] = {}
    for position, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if not sep:
            if position >= len(names):
                raise ConfigError(f"filter {item!r}: {name} takes at most {len(names)} argument(s)")
            key, value = names[position], arg
        if key not in parsers:
            raise ConfigError(f"filter {item!r}: {name} has no parameter {key!r} (has: {', '.join(names) or 'none'})")
        if key in kwargs:
            raise ConfigError(f"filter {item!r}: parameter {key!r} given twice")
        try:
            kwargs[key] = parsers[key](value)
        except ValueError as e:
            raise ConfigError(f"filter {item!r}: bad value {value!r} for {key}") from e
    return build(**kwargs)

"""The per-request segment options, declared once.

Every option a segment request can carry — name, type, default, help and validation — is one field of
:class:`SegmentOptions`. Everything else is built from it:

* the options of ``slip segment`` and ``slip submit segment`` (:func:`with_segment_options`: same names,
  same help, same checks);
* the job payload (``SegmentOptions.model_dump(mode="json")`` is stored, :meth:`SegmentOptions.parse` reads
  it back);
* the library's :class:`slip.config.SlipConfig` (its ``options`` field);
* :func:`slip.request.resolve`, the only place where the precedence of options is written (``None``
  means "not given": the checkpoint's recommendation, else the default, fills it in).

Speed-and-memory knobs (points per batch, crops per batch, device, dtype, threads) are not request
options: they are the process's settings (:mod:`slip.settings`). This module imports no model code.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, List, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slip.errors import ConfigError, InputError

MAX_PIXELS = 64_000_000  # largest image accepted by default (slip.images.DEFAULT_MAX_PIXELS)
RECOMMENDED = "default: the SAM's recommendation (generator.json beside the checkpoint), else SAM's"
Threshold = Union[float, tuple[Optional[float], ...], None]


@dataclass(frozen=True)
class GeneratorOptions:
    """The output-changing options of SAM's automatic mask generator, with SAM's defaults."""

    points_per_side: int = 32  # point grid side: points_per_side**2 point prompts per image
    pred_iou_thresh: float = 0.88  # keep masks whose predicted IoU exceeds this
    stability_score_thresh: float = 0.95  # keep masks whose stability score reaches this
    stability_score_offset: float = 1.0  # logit offset used by the stability score
    box_nms_thresh: float = 0.7  # box IoU above which the lower-scored mask is dropped (1.0 = no NMS)
    crop_n_layers: int = 0  # extra layers of image crops (0 = the whole image only)
    crop_nms_thresh: float = 0.7  # box IoU for duplicates between crops
    crop_overlap_ratio: float = 512 / 1500  # overlap of neighbouring crops, fraction of the crop side
    crop_n_points_downscale_factor: int = 1  # point grid shrink per crop layer
    min_mask_region_area: int = 0  # holes and islands under this many pixels are removed (0 = off)

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(GeneratorOptions))

    def merged(self, overrides: Mapping[str, Any], *, source: str) -> "GeneratorOptions":
        """These options with ``overrides`` applied; ConfigError naming ``source`` for an unknown name
        or a value of the wrong type."""
        known = {f.name: f.type for f in fields(self)}
        for name, value in overrides.items():
            if name not in known:
                raise ConfigError(f"{source}: {name!r} is not a mask generator option "
                                  f"(expected some of {', '.join(known)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
            if known[name] == "int" and float(value) != int(value):
                raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
        cast = {n: (int(v) if known[n] == "int" else float(v)) for n, v in overrides.items()}
        return replace(self, **cast)

    def to_json(self) -> dict:
        return asdict(self)


def option(default: Any, help: str, *, flag: str | None = None, cli: bool = True, **checks: Any) -> Any:
    """A declared option: its default, its one-line ``help``, its command-line ``flag`` (default
    ``--the-name``; ``"--on/--off"`` for booleans) and pydantic ``checks`` (ge, le, ...)."""
    return Field(default, description=help, json_schema_extra={"flag": flag, "cli": cli}, **checks)


class SegmentOptions(BaseModel):
    """What a segment request gives explicitly; ``None`` fields are resolved by :func:`slip.request.resolve`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # SAM's automatic mask generator (None: the SAM checkpoint's generator.json, else SAM's default)
    points_per_side: Optional[int] = option(None, f"SAM point grid side; {RECOMMENDED} 32.", ge=1, le=256)
    pred_iou_thresh: Optional[float] = option(None, f"SAM predicted-IoU threshold; {RECOMMENDED} 0.88.", ge=0, le=1)
    stability_score_thresh: Optional[float] = option(None, f"SAM stability-score threshold; {RECOMMENDED} 0.95.",
                                                     ge=0, le=1)
    stability_score_offset: Optional[float] = option(None, f"SAM stability-score logit offset; {RECOMMENDED} 1.0.",
                                                     ge=0)
    box_nms_thresh: Optional[float] = option(None, f"SAM box NMS IoU threshold (1.0 = no NMS); {RECOMMENDED} 0.7.",
                                             ge=0, le=1)
    crop_n_layers: Optional[int] = option(None, f"SAM image-crop layers; {RECOMMENDED} 0.", ge=0, le=4)
    crop_nms_thresh: Optional[float] = option(None, f"SAM box NMS IoU between crops; {RECOMMENDED} 0.7.", ge=0, le=1)
    crop_overlap_ratio: Optional[float] = option(None, f"SAM crop overlap, fraction of the crop side; {RECOMMENDED} "
                                                 "0.34.", ge=0, lt=1)
    crop_n_points_downscale_factor: Optional[int] = option(None, f"SAM point grid shrink per crop layer; "
                                                           f"{RECOMMENDED} 1.", ge=1)
    min_mask_region_area: Optional[int] = option(None, f"SAM: remove holes and islands under this many pixels "
                                                 f"(0 = off); {RECOMMENDED} 0.", ge=0)
    # annotation filters
    filters: Optional[str] = option(None, "Filter chain, e.g. 'containment:0.8,min_area:50,disjoint' or 'none'; "
                                    "default: the SAM's recommended chain (filters.json beside the checkpoint), else "
                                    "the paper's 'containment'.")
    # segment crops for the ranker
    crop_background: Literal["black", "gray", "blur", "none"] = option("black", "Background of segment crops: "
                                                                       "black | gray | blur | none.")
    crop_padding: float = option(0.0, "Crop padding as a fraction of the box side.", ge=0, le=2)
    square: bool = option(True, "Pad crops to a square before resizing.", flag="--square/--no-square")
    # ranking and answers
    top_k: int = option(5, "Candidates listed per prompt.", ge=0, le=100)
    threshold: Threshold = option(None, "Similarity below which a segment is not an answer: one value, or one per "
                                  "--prompt (repeat); default: the ranker's calibrated threshold.json, if any.")
    calibrated: bool = option(True, "Without --threshold, use the ranker's calibrated threshold (or none).",
                              flag="--calibrated/--no-threshold")
    instances: Literal["one", "all"] = option("one", "one: the best segment per prompt; all: every segment above "
                                              "the threshold (deduplicated).")
    one_to_one: bool = option(False, "One-to-one assignment: prompts never share a segment.",
                              flag="--one-to-one/--no-one-to-one")
    # engines (slip.engines.build: the engine itself is a model setting, --engine / SLIP_ENGINE)
    propose: Optional[str] = option(None, "--engine sam3-rank: the generic concept SAM 3 proposes segments for, "
                                    "e.g. 'animal' (default 'object').", min_length=1)
    # outputs and input limits
    render: bool = option(False, "Also write mask_<i>.png and overlay_<i>.png (else segments.json alone).",
                          flag="--render/--no-render")
    max_pixels: int = option(MAX_PIXELS, "Refuse images with more pixels than this.", ge=1)

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: Optional[str]) -> Optional[str]:
        """A bad chain is refused where the request is made, before any work."""
        if value is not None:
            from slip.filter_chain import parse_filters

            parse_filters(value)  # ConfigError naming the bad part
        return value

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Threshold:
        """One value, or one per prompt; a list of one is one value; each a cosine similarity in [-1, 1]."""
        if isinstance(value, (list, tuple)):
            value = None if not value else (value[0] if len(value) == 1 else tuple(value))
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0):
                raise ValueError(f"threshold {v!r} is not a cosine similarity in [-1, 1]")
        return value

    def generator_overrides(self) -> dict[str, Any]:
        """The mask generator options given explicitly (name -> value)."""
        return {name: getattr(self, name) for name in GeneratorOptions.names() if getattr(self, name) is not None}

    def check_prompts(self, count: int) -> None:
        """ConfigError when a per-prompt threshold list does not match ``count`` prompts."""
        if isinstance(self.threshold, tuple) and len(self.threshold) != count:
            raise ConfigError(f"{len(self.threshold)} thresholds for {count} prompts: give one value, or one "
                              f"per prompt")

    @staticmethod
    def parse(data: Any) -> "SegmentOptions":
        """Validate a dict (a job payload, a JSON file, command-line values): one-line errors."""
        return parse_model(SegmentOptions, data)


def parse_model(model: type[BaseModel], data: Any):
    """``model.model_validate(data)`` with pydantic's errors turned into one-line SLIP errors (an InputError
    raised by a validator is passed on as it is)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, InputError):
                raise cause from e
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or model.__name__
        raise ConfigError(f"invalid {model.__name__}: {where}: {first['msg']}") from e


# --- command-line options from the declaration -------------------------------------------------------------


def with_segment_options(defaults: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a typer command taking ``options: SegmentOptions`` so that it takes every declared option as
    a command-line option instead and receives them as one validated :class:`SegmentOptions`.

    ``defaults`` changes a default for this command only (``slip segment`` renders PNGs by default)."""
    import typer

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command)  # real types: the wrapper lives in another module
        own = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in signature.parameters.items()
               if name != "options"]
        declared = [_parameter(name, field, (defaults or {}).get(name, field.default), typer)
                    for name, field in SegmentOptions.model_fields.items() if _on_cli(field)]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in list(kwargs) if name in SegmentOptions.model_fields}
            from slip.cli.common import user_errors

            with user_errors():
                options = SegmentOptions.parse(given)
            return command(options=options, **kwargs)

        run.__signature__ = signature.replace(parameters=own + declared)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in own + declared}
        del run.__wrapped__  # typer must read the new signature, not the wrapped command's
        return run

    return decorate


def _on_cli(field: Any) -> bool:
    return bool((field.json_schema_extra or {}).get("cli", True))


def _parameter(name: str, field: Any, default: Any, typer: Any) -> inspect.Parameter:
    """A keyword parameter carrying a ``typer.Option`` for one declared field."""
    flag = (field.json_schema_extra or {}).get("flag") or f"--{name.replace('_', '-')}"
    annotation = _cli_type(name, field)
    if name == "threshold":
        default = None  # repeatable on the command line: none, one, or one per prompt
    info = typer.Option(default, *flag.split(" "), help=field.description)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _cli_type(name: str, field: Any) -> Any:
    """The type typer parses the option as (repeatable float for thresholds, plain types otherwise)."""
    if name == "threshold":
        return Optional[List[float]]
    annotation = field.annotation
    if getattr(annotation, "__origin__", None) is Literal:
        return str
    return annotation

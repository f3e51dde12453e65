"""The resolved request: every setting that shapes a result, resolved once, as a frozen value.

A request (:class:`slip.options.SegmentOptions`, the one declaration of the options) holds only what the
user gave explicitly (``None`` = not given). :func:`resolve` meets it with
the loaded models (:class:`slip.sam.SamBundle`, :class:`slip.rankers.loading.RankerBundle`) and is the
**only** place where the precedence of options is written:

    SAM's / the paper's defaults  <  the checkpoint's recommendation files  <  options given explicitly

* generator options: :class:`GeneratorOptions` defaults < ``generator.json`` beside the SAM < explicit;
* filter chain: the paper's ``containment`` < ``filters.json`` beside the SAM < explicit;
* similarity threshold: none < ``threshold.json`` beside the ranker < explicit (``calibrated=False``
  ignores the ranker's file).

The :class:`ResolvedRequest` names the models by the SHA-256 of the weights that were really loaded, so
replacing a checkpoint or editing a recommendation file changes every key derived from it:

* :meth:`ResolvedRequest.proposal_digest` — SAM + dtype + generator options + filter chain (the cached
  proposals of an image);
* :meth:`ResolvedRequest.embedding_digest` — the proposals + ranker + dtype + crop (their embeddings);
* :meth:`ResolvedRequest.result_digest` — the embeddings + prompts + ranking options (a result).

Digests are SHA-256 hex of :func:`canonical_json`. This module imports no model code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from slip.errors import ConfigError
from slip.options import GeneratorOptions, SegmentOptions

PAPER_FILTERS = "containment"  # the SLIP paper's filter chain: used when neither the user nor the checkpoint says
DTYPES = ("fp32", "bf16", "fp16")  # compute precision (autocast over fp32 weights)


def canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted keys, no blanks, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclass(frozen=True)
class CropSpec:
    """How each segment is cut out for the ranker (mirrors :class:`slip.crops.CropConfig`)."""

    background: str = "black"  # outside the mask: black | gray | blur | none
    padding: float = 0.0  # grow the tight box by this fraction of its side, on each side
    square: bool = True  # pad the box to a square (keeps the aspect ratio) instead of stretching it

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelRef:
    """A loaded model as results name it."""

    spec: str  # as asked for (vit_b, synth, a path, a hub id): for people; not part of any digest
    arch: str  # architecture, e.g. vit_b, synth-sam, hf-clip, slip-dual-encoder, tiny-random
    sha256: str  # SHA-256 of the weights (and their config) that were really loaded

    def identity(self) -> dict:
        """What a result depends on: the architecture and the weights, not the spelling of the spec."""
        return {"arch": self.arch, "sha256": self.sha256}

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedRequest:
    """Every setting that shapes a result, with the precedence applied (see the module docstring)."""

    sam: ModelRef  # the SAM that proposes segments
    ranker: ModelRef  # the CLIP-style ranker that scores them
    dtype: str  # compute precision: fp32 | bf16 | fp16
    generator: GeneratorOptions  # mask generator options, resolved
    filters: tuple[dict, ...]  # the filter chain, each filter's resolved parameters: {"name", **params}
    crop: CropSpec  # segment crops
    top_k: int  # candidates listed per prompt
    threshold: float | tuple[float | None, ...] | None  # similarity threshold(s), resolved
    instances: str  # one | all
    one_to_one: bool  # Hungarian assignment across prompts
    engine: str = "slip"  # how prompts become masks: slip | sam3 | sam3-rank (slip.engines.build)
    propose: str | None = None  # sam3-rank: the concept SAM 3 proposes for; None for the other engines

    def engine_identity(self) -> dict:
        """``{}`` for the slip engine (its digests stay what they were), else the engine and its concept."""
        if self.engine == "slip":
            return {}
        return {"engine": self.engine, **({"propose": self.propose} if self.propose is not None else {})}

    def filter_chain(self) -> str:
        """The filter chain as a ``slip.filter_chain.parse_filters`` string (``"none"`` when empty)."""
        return chain_text(self.filters)

    def thresholds(self, prompts: int) -> tuple[float | None, ...]:
        """One threshold per prompt (ConfigError when a per-prompt list has the wrong length)."""
        if not isinstance(self.threshold, tuple):
            return (self.threshold,) * prompts
        if len(self.threshold) != prompts:
            raise ConfigError(f"{len(self.threshold)} thresholds for {prompts} prompts: give one value, or one per prompt")
        return self.threshold

    def proposal_identity(self) -> dict:
        return {"sam": self.sam.identity(), "dtype": self.dtype, "generator": self.generator.to_json(),
                "filters": list(self.filters), **self.engine_identity()}

    def embedding_identity(self) -> dict:
        return {"proposals": self.proposal_digest(), "ranker": self.ranker.identity(), "dtype": self.dtype,
                "crop": self.crop.to_json()}

    def result_identity(self, prompts: Sequence[str]) -> dict:
        return {"embeddings": self.embedding_digest(), "prompts": list(prompts), "top_k": self.top_k,
                "thresholds": list(self.thresholds(len(prompts))), "instances": self.instances,
                "one_to_one": self.one_to_one}

    def proposal_digest(self) -> str:
        return digest(self.proposal_identity())

    def embedding_digest(self) -> str:
        return digest(self.embedding_identity())

    def result_digest(self, prompts: Sequence[str]) -> str:
        return digest(self.result_identity(prompts))

    def to_json(self) -> dict:
        """The whole record, as written into every ``segments.json``."""
        data = asdict(self)
        data["filters"] = list(self.filters)
        data["threshold"] = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return data


def resolve(options: SegmentOptions, *, sam: ModelRef, sam_generator: Mapping[str, Any], sam_filters: str | None,
            ranker: ModelRef, ranker_threshold: float | None, dtype: str = "fp32", engine: str = "slip",
            propose: str | None = None) -> ResolvedRequest:
    """The request ``options`` resolved against the loaded models' recommendations.

    ``sam_generator`` / ``sam_filters``: the SAM checkpoint's generator.json options and filters.json chain
    ({} / None when it has none); ``ranker_threshold``: the ranker's threshold.json value (None if none);
    ``engine`` / ``propose``: the engine that answers and sam3-rank's resolved concept (slip.engines.build).
    Raises ConfigError for an invalid recommendation, naming where it came from (the options themselves were
    validated by their declaration).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    generator, filters = resolve_proposals(options, sam_spec=sam.spec, sam_generator=sam_generator,
                                           sam_filters=sam_filters)
    crop = CropSpec(background=options.crop_background, padding=options.crop_padding, square=options.square)
    return ResolvedRequest(
        sam=sam, ranker=ranker, dtype=dtype, generator=generator, filters=filters, crop=crop, top_k=options.top_k,
        threshold=_threshold(options, ranker_threshold), instances=options.instances, one_to_one=options.one_to_one,
        engine=engine, propose=propose,
    )


def resolve_proposals(options: SegmentOptions, *, sam_spec: str, sam_generator: Mapping[str, Any],
                      sam_filters: str | None) -> tuple[GeneratorOptions, tuple[dict, ...]]:
    """The prompt-independent part of :func:`resolve`: generator options and the canonical filter chain
    (for code that only proposes segments, such as evaluation with SAM proposals)."""
    generator = (GeneratorOptions()
                 .merged(sam_generator, source=f"generator.json of SAM {sam_spec}")
                 .merged(options.generator_overrides(), source="the request's generator options"))
    chain = options.filters if options.filters is not None else (sam_filters or PAPER_FILTERS)
    return generator, canonical_filters(chain)


def canonical_filters(chain: str) -> tuple[dict, ...]:
    """Each filter of a chain string with its resolved parameters, so two spellings of one chain compare
    equal (``"containment"`` == ``"containment:0.9"`` when 0.9 is the default)."""
    from slip.filter_chain import parse_filters  # imported here: the chain's module is only needed to resolve

    return tuple({"name": f.name, **f.params()} for f in parse_filters(chain))


def chain_text(filters: tuple[dict, ...]) -> str:
    """A canonical filter chain as a ``slip.filter_chain.parse_filters`` string (``"none"`` when empty)."""
    items = [":".join([f["name"], *(f"{k}={_text(v)}" for k, v in f.items() if k != "name")]) for f in filters]
    return ",".join(items) or "none"


def _threshold(options: SegmentOptions, calibrated: float | None) -> float | tuple[float | None, ...] | None:
    """The explicit threshold(s), else the ranker's calibrated one (when allowed), else None."""
    explicit = options.threshold
    if explicit is None:
        return calibrated if options.calibrated else None
    if isinstance(explicit, tuple):
        return tuple(None if v is None else float(v) for v in explicit)
    return float(explicit)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)

"""Match text prompts to segments by cosine similarity of their embeddings.

The SLIP paper picks, for each prompt, the segment whose CLIP image embedding is most similar to the
prompt's text embedding (argmax of the similarity matrix). :func:`rank` does that and adds a top-k
list, an optional "no match" threshold, and an optional one-to-one assignment (Hungarian algorithm)
so that two prompts cannot claim the same segment.

Shapes: segment embeddings ``(N, D)``, text embeddings ``(P, D)``, both unit L2 norm (so the dot
product is the cosine similarity), any device. The similarity matrix comes back ``(N, P)`` float32 on
the CPU, segments x prompts, as stored in :class:`~slip.types.SlipResult`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from slip.errors import ConfigError, PromptError
from slip.types import Match


def validate_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    """Check prompts are non-empty strings; returns them as a tuple (unchanged, not stripped).

    Raises :class:`~slip.errors.PromptError` for no prompts, a non-string, or an empty/blank prompt.
    """
    if isinstance(prompts, str):
        raise PromptError("prompts must be a list of strings, got a single string: wrap it in a list")
    prompts = tuple(prompts)
    if not prompts:
        raise PromptError("no prompts given: pass at least one text prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise PromptError(f"prompt {i} is empty or blank: give a short description such as 'a red car'")
    return prompts


def similarity_matrix(segment_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` x ``(P, D)`` unit-norm embeddings -> ``(N, P)`` float32 CPU cosine similarities."""
    if segment_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise ConfigError(
            f"embeddings must be 2-D (N, D) and (P, D), got {tuple(segment_embeddings.shape)} "
            f"and {tuple(text_embeddings.shape)}"
        )
    n, d_img = segment_embeddings.shape
    p, d_txt = text_embeddings.shape
    if n == 0:
        return torch.zeros((0, p), dtype=torch.float32)
    if d_img != d_txt:
        raise ConfigError(f"image embeddings have D={d_img} but text embeddings D={d_txt}: the ranker is inconsistent")
    text = text_embeddings.to(device=segment_embeddings.device, dtype=segment_embeddings.dtype)
    return (segment_embeddings @ text.T).float().cpu()


def rank(
    segment_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    prompts: Sequence[str],
    *,
    top_k: int = 5,
    threshold: float | None = None,
    one_to_one: bool = False,
) -> tuple[torch.Tensor, tuple[Match, ...]]:
    """Pick the best segment for each prompt.

    Returns ``(similarity, matches)``: the ``(N, P)`` float32 CPU similarity matrix and one
    :class:`~slip.types.Match` per prompt, in prompt order.

    * ``top_k``: each match lists up to ``top_k`` ``(segment index, similarity)`` pairs, best first
      (ties: lower index), always from the plain per-prompt ranking.
    * ``threshold``: a chosen segment whose similarity is below it is rejected (``index=None``).
    * ``one_to_one``: segments are assigned by :func:`scipy.optimize.linear_sum_assignment`
      maximising the total similarity, so no segment serves two prompts; with more prompts than
      segments the prompts left over get no match.

    ``Match.score`` is the similarity of the chosen segment; for a prompt without a match it is the
    best similarity any segment reached (``None`` only when there are no segments).
    """
    prompts = validate_prompts(prompts)
    if len(prompts) != text_embeddings.shape[0]:
        raise ConfigError(f"{len(prompts)} prompts but {text_embeddings.shape[0]} text embeddings")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    similarity = similarity_matrix(segment_embeddings, text_embeddings)
    sim = similarity.double().numpy()
    chosen = _assign_one_to_one(sim) if one_to_one else _assign_argmax(sim)
    matches = tuple(_match(prompt, sim[:, p], chosen[p], top_k, threshold) for p, prompt in enumerate(prompts))
    return similarity, matches


# --- stages -------------------------------------------------------------------------------------------


def _order(column: np.ndarray) -> np.ndarray:
    """Segment indices by similarity, best first, ties by lower index."""
    return np.lexsort((np.arange(len(column)), -column))


def _assign_argmax(sim: np.ndarray) -> list[int | None]:
    """``(N, P)`` -> the best segment of each prompt (``None`` when ``N == 0``)."""
    if sim.shape[0] == 0:
        return [None] * sim.shape[1]
    return [int(_order(sim[:, p])[0]) for p in range(sim.shape[1])]


def _assign_one_to_one(sim: np.ndarray) -> list[int | None]:
    """``(N, P)`` -> a segment per prompt maximising the total similarity, no segment used twice."""
    if not np.isfinite(sim).all():
        raise ConfigError("similarity matrix contains NaN or infinity: the ranker produced invalid embeddings")
    chosen: list[int | None] = [None] * sim.shape[1]
    segments, prompt_ids = linear_sum_assignment(sim, maximize=True)
    for s, p in zip(segments.tolist(), prompt_ids.tolist()):
        chosen[p] = s
    return chosen


def _match(prompt: str, column: np.ndarray, index: int | None, top_k: int, threshold: float | None) -> Match:
    """One prompt's ``(N,)`` similarity column and chosen segment -> its :class:`Match`."""
    if len(column) == 0:
        return Match(prompt=prompt, index=None, score=None, top_k=())
    order = _order(column)
    ranked = tuple((int(i), float(column[i])) for i in order[:top_k])
    if index is not None and threshold is not None and column[index] < threshold:
        index = None
    score = float(column[index]) if index is not None else float(column[order[0]])
    return Match(prompt=prompt, index=index, score=score, top_k=ranked)

"""Match text prompts to segments by cosine similarity of their embeddings.

The SLIP paper picks, for each prompt, the segment whose CLIP image embedding is most similar to the
prompt's text embedding (argmax of the similarity matrix). :func:`rank` does that and adds a top-k
list, per-prompt "not found" thresholds, every instance of a prompt (``instances="all"``, deduplicated
by mask IoU), and a one-to-one assignment (Hungarian algorithm) so that two prompts never share a segment.

Shapes: segment embeddings ``(N, D)``, text embeddings ``(P, D)``, both unit L2 norm (so the dot
product is the cosine similarity), any device; masks ``(N, H, W)`` bool. The similarity matrix comes
back ``(N, P)`` float32 on the CPU, segments x prompts, as stored in :class:`~slip.types.SlipResult`.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from slip.errors import ConfigError, PromptError
from slip.types import Match

INSTANCE_MODES = ("one", "all")  # rank(instances=...): the best segment only | every segment above threshold
_INFEASIBLE = -1e6  # assignment score of a (segment, prompt) pair below the prompt's threshold

Threshold = float | None | Sequence[float | None]


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


def validate_thresholds(threshold: Threshold, prompts: int) -> tuple[float | None, ...]:
    """One threshold (or None) per prompt from a single value, None, or a sequence of ``prompts`` values.

    Raises :class:`~slip.errors.ConfigError` for a wrong length or a value outside ``[-1, 1]`` (the range
    of a cosine similarity) or not a number.
    """
    if threshold is None or isinstance(threshold, (numbers.Real, str)):
        values = (threshold,) * prompts
    else:
        values = tuple(threshold)
        if len(values) != prompts:
            raise ConfigError(f"got {len(values)} thresholds for {prompts} prompts: give one per prompt (null = none)")
    for i, t in enumerate(values):
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not -1.0 <= float(t) <= 1.0:
            raise ConfigError(f"threshold {t!r} (prompt {i}) must be a cosine similarity in [-1, 1] or null")
    return tuple(None if t is None else float(t) for t in values)


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
    threshold: Threshold = None,
    one_to_one: bool = False,
    instances: str = "one",
    masks: torch.Tensor | np.ndarray | None = None,
    dedup_iou: float = 0.5,
) -> tuple[torch.Tensor, tuple[Match, ...]]:
    """Pick the segment(s) of each prompt.

    Returns ``(similarity, matches)``: the ``(N, P)`` float32 CPU similarity matrix and one
    :class:`~slip.types.Match` per prompt, in prompt order.

    * ``threshold``: None, one value for every prompt, or one value (or None) per prompt, each in
      ``[-1, 1]``. A segment is an instance of a prompt only when its similarity is ``>=`` the prompt's
      threshold; a prompt with nothing above it gets ``instances == ()`` (an explicit "not found",
      never an error). ``Match.best`` keeps the best candidate whatever the threshold.
    * ``instances="one"``: the paper's argmax: at most one instance per prompt.
    * ``instances="all"``: every segment at or above the prompt's threshold, best first, with
      duplicates removed (two instances whose masks overlap with IoU > ``dedup_iou``: the lower-scored
      one goes). Needs ``masks`` ``(N, H, W)`` bool. **Without a threshold for a prompt, only its
      argmax is returned**: with no threshold there is no way to tell which other segments show the
      prompted object, and returning every segment of the image would be noise. Calibrate one
      (``slip calibrate``, ``threshold.json``) or pass it to get several instances.
    * ``one_to_one``: a segment serves at most one prompt. The first instance of every prompt is
      assigned by :func:`scipy.optimize.linear_sum_assignment` (as many prompts as possible get a
      segment above their threshold, then the total similarity is maximal); with ``instances="all"``
      further instances go greedily, highest similarity first, to segments no prompt has taken.
    * ``top_k``: each match lists up to ``top_k`` ``(segment index, similarity)`` pairs of the plain
      per-prompt ranking, best first (ties: lower index), whatever the threshold and assignment.
    """
    prompts = validate_prompts(prompts)
    if len(prompts) != text_embeddings.shape[0]:
        raise ConfigError(f"{len(prompts)} prompts but {text_embeddings.shape[0]} text embeddings")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    if instances not in INSTANCE_MODES:
        raise ConfigError(f"instances must be one of {', '.join(INSTANCE_MODES)}, got {instances!r}")
    thresholds = validate_thresholds(threshold, len(prompts))
    similarity = similarity_matrix(segment_embeddings, text_embeddings)
    sim = similarity.double().numpy()
    if instances == "all":
        masks = _check_masks(masks, sim.shape[0], dedup_iou)
    # 1. the first instance of each prompt: argmax, or the one-to-one assignment
    first = _assign_one_to_one(sim, thresholds) if one_to_one else _assign_argmax(sim)
    chosen = [[] if i is None or not _passes(sim[i, p], thresholds[p]) else [i] for p, i in enumerate(first)]
    # 2. further instances above each prompt's threshold, deduplicated (and not taken, one-to-one)
    if instances == "all":
        chosen = _more_instances(sim, thresholds, chosen, _Overlap(masks, dedup_iou), one_to_one)
    matches = tuple(_match(prompt, sim[:, p], chosen[p], thresholds[p], top_k) for p, prompt in enumerate(prompts))
    return similarity, matches


# --- stages -------------------------------------------------------------------------------------------


def _passes(score: float, threshold: float | None) -> bool:
    return threshold is None or score >= threshold


def _order(column: np.ndarray) -> np.ndarray:
    """Segment indices by similarity, best first, ties by lower index."""
    return np.lexsort((np.arange(len(column)), -column))


def _check_masks(masks, n: int, dedup_iou: float) -> torch.Tensor:
    """``masks`` as an ``(N, H, W)`` bool tensor (any device), or a ConfigError."""
    if masks is None:
        raise ConfigError("instances='all' needs the segment masks (N, H, W) to remove duplicate instances")
    if not (isinstance(dedup_iou, (int, float)) and 0.0 <= dedup_iou <= 1.0):
        raise ConfigError(f"dedup_iou must be an IoU in [0, 1], got {dedup_iou!r}")
    masks = torch.as_tensor(masks)
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ConfigError(f"masks must be (N={n}, H, W), got {tuple(masks.shape)}")
    return masks.bool()


def _assign_argmax(sim: np.ndarray) -> list[int | None]:
    """``(N, P)`` -> the best segment of each prompt (``None`` when ``N == 0``)."""
    if sim.shape[0] == 0:
        return [None] * sim.shape[1]
    return [int(_order(sim[:, p])[0]) for p in range(sim.shape[1])]


def _assign_one_to_one(sim: np.ndarray, thresholds: Sequence[float | None]) -> list[int | None]:
    """``(N, P)`` -> a segment per prompt, no segment used twice: most prompts above their threshold
    first, then the largest total similarity. Pairs below the threshold may be returned (callers drop them)."""
    if not np.isfinite(sim).all():
        raise ConfigError("similarity matrix contains NaN or infinity: the ranker produced invalid embeddings")
    limits = np.array([-math.inf if t is None else t for t in thresholds])
    gain = np.where(sim >= limits[None, :], sim, _INFEASIBLE)
    chosen: list[int | None] = [None] * sim.shape[1]
    segments, prompt_ids = linear_sum_assignment(gain, maximize=True)
    for s, p in zip(segments.tolist(), prompt_ids.tolist()):
        chosen[p] = s
    return chosen


class _Overlap:
    """Mask IoU between segments, computed on demand; a box bound skips most pixel comparisons."""

    def __init__(self, masks: torch.Tensor, limit: float) -> None:
        self.masks = masks  # (N, H, W) bool
        self.limit = limit  # IoU above which two instances are duplicates
        self.areas = masks.flatten(1).sum(1).cpu().numpy()  # (N,) pixels
        self.boxes = _boxes(masks)  # (N, 4) XYXY inclusive pixel bounds (-1 rows for empty masks)

    def duplicate(self, i: int, j: int) -> bool:
        """True when segments ``i`` and ``j`` overlap with mask IoU > ``limit``."""
        a, b = self.boxes[i], self.boxes[j]
        w = min(a[2], b[2]) - max(a[0], b[0]) + 1
        h = min(a[3], b[3]) - max(a[1], b[1]) + 1
        larger = max(self.areas[i], self.areas[j])
        if w <= 0 or h <= 0 or larger == 0 or w * h / larger <= self.limit:  # IoU <= inter / larger <= box inter / larger
            return False
        inter = int((self.masks[i] & self.masks[j]).sum())
        return inter / (self.areas[i] + self.areas[j] - inter) > self.limit


def _boxes(masks: torch.Tensor) -> np.ndarray:
    """``(N, H, W)`` bool -> ``(N, 4)`` int64 inclusive XYXY bounds; ``-1`` rows for empty masks."""
    out = np.full((masks.shape[0], 4), -1, np.int64)
    rows, cols = masks.any(2).cpu().numpy(), masks.any(1).cpu().numpy()
    for k in range(masks.shape[0]):
        ys, xs = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
        if len(ys):
            out[k] = (xs[0], ys[0], xs[-1], ys[-1])
    return out


def _more_instances(sim: np.ndarray, thresholds: Sequence[float | None], chosen: list[list[int]],
                    overlap: _Overlap, one_to_one: bool) -> list[list[int]]:
    """Add every other segment above each prompt's threshold, highest similarity first, unless it
    duplicates one of the prompt's instances or (``one_to_one``) another prompt took it."""
    taken = {i for picks in chosen for i in picks}
    pairs = [(-sim[s, p], p, s) for p, t in enumerate(thresholds) if t is not None and chosen[p]
             for s in np.flatnonzero(sim[:, p] >= t).tolist()]
    for _, p, s in sorted(pairs):
        if s in chosen[p] or (one_to_one and s in taken):
            continue
        if any(overlap.duplicate(s, kept) for kept in chosen[p]):
            continue
        chosen[p].append(s)
        taken.add(s)
    return chosen


def _match(prompt: str, column: np.ndarray, chosen: list[int], threshold: float | None, top_k: int) -> Match:
    """One prompt's ``(N,)`` similarity column and chosen segments -> its :class:`Match`."""
    if len(column) == 0:
        return Match(prompt=prompt, instances=(), best=None, threshold=threshold, top_k=())
    order = _order(column)
    return Match(
        prompt=prompt,
        instances=tuple((int(i), float(column[i])) for i in chosen),
        best=(int(order[0]), float(column[order[0]])),
        threshold=threshold,
        top_k=tuple((int(i), float(column[i])) for i in order[:top_k]),
    )

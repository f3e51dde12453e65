"""Answers from a score matrix: the pipeline's ranking rules over scores that are not plain cosines.

Two sources give scores on their own scale instead of cosine similarities: rankers trained with a sigmoid loss
(SigLIP: ``Ranker.score`` maps cosines to a pairwise probability, ``Ranker.calibrated`` is True) and SAM 3 (each
instance's score for the prompt that found it). :func:`rank_scores` applies :func:`slip.ranking.rank`'s rules
(threshold, ``instances``, one-to-one, top-k) to such an ``(N, P)`` matrix, so every engine answers alike.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from slip.ranking import rank, similarity_matrix
from slip.types import Match


def rank_scores(scores: torch.Tensor, prompts: Sequence[str], *, top_k: int, threshold, instances: str,
                one_to_one: bool, masks: Optional[torch.Tensor]) -> tuple[torch.Tensor, tuple[Match, ...]]:
    """:func:`slip.ranking.rank` over a given ``(N, P)`` score matrix instead of embeddings (the matrix is the
    segment side, the identity the prompt side: their product is the scores, exactly)."""
    identity = torch.eye(scores.shape[1], dtype=torch.float32, device=scores.device)
    return rank(scores.float(), identity, prompts, top_k=top_k, threshold=threshold, one_to_one=one_to_one,
                instances=instances, masks=masks)


def ranker_scores(ranker, segment_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``(N, P)`` scores of a calibrated ranker (its own scale), None for a plain cosine ranker."""
    if not getattr(ranker, "calibrated", False):
        return None
    return ranker.score(similarity_matrix(segment_embeddings, text_embeddings))

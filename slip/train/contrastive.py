"""Contrastive losses of the two trainable ranker families.

Shapes: image and text embeddings ``(B, D)``, row ``i`` of each is the ``i``-th image-caption pair;
``labels`` ``(B,)`` int64 class ids (pairs with equal labels share a caption).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` logits and row-stochastic targets -> ``(B,)`` per-row cross-entropy."""
    return (-targets * F.log_softmax(logits, dim=-1)).sum(1)


def paper_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The SLIP paper's loss (the "simple CLIP" recipe), a scalar.

    ``logits = text @ image.T / T``; soft targets ``softmax((image @ image.T + text @ text.T) / 2 * T)``
    (so pairs of the same class are not pushed apart); symmetric cross-entropy, averaged. The
    embeddings are the raw projection-head outputs (not normalised) and ``T = 1``, as in the paper.
    """
    logits = text_emb @ image_emb.T / temperature
    similarity = (image_emb @ image_emb.T + text_emb @ text_emb.T) / 2
    targets = F.softmax(similarity * temperature, dim=-1)
    texts_loss = soft_cross_entropy(logits, targets)
    images_loss = soft_cross_entropy(logits.T, targets.T)
    return ((images_loss + texts_loss) / 2.0).mean()


def symmetric_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy on unit-norm embeddings scaled by ``exp(logit_scale)``, a scalar.

    The target of each row is spread evenly over the pairs with the same label (equal captions), which
    is the standard one-hot CLIP target when all captions in the batch differ.
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.T
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    targets = same / same.sum(1, keepdim=True)
    return ((soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets)) / 2.0).mean()

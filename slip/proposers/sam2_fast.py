"""SAM 2's prompt encoder + mask decoder for a grid of single points: the official modules, the
point-independent work once per image, bit-identical logits.

``SAM2ImagePredictor._predict`` decodes a batch of ``B`` points by copying the image embedding and its
positional encoding ``B`` times (``repeat_interleave``) and running the two-way transformer on ``B`` full-size
copies. :class:`Sam2PointDecoder` runs the same operations on the same values, differently scheduled:

* the first two-way block's image-side projections (token->image keys and values, image->token queries),
  which do not depend on the point, run once per image;
* the rest runs on chunks of points small enough to stay in cache, with the official blocks themselves;
* the token MLP heads see the official batch's rows at their places (BLAS kernels choose their blocking by
  the matrix shape), so every value is the official one.

``tests/engines/test_sam2_generator.py`` checks the logits and IoU bit for bit against
``SAM2ImagePredictor`` on the real architecture.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from slip.sam_fast import chunk_sizes, finish_two_way, merge_heads, project, split_heads


class Sam2PointDecoder:
    """``Sam2PointDecoder(model, features)(coords)`` returns what the official predictor's decoder returns for
    one positive point per prompt with ``multimask_output=True``: ``(B, 3, 4h, 4w)`` low-resolution logits and
    ``(B, 3)`` predicted IoU. ``features``: ``{"image_embed": (1, C, h, w), "high_res_feats": [(1, C/8, 4h,
    4w), (1, C/4, 2h, 2w)]}`` as ``SAM2ImagePredictor.set_image`` computes them.
    """

    def __init__(self, model, features: dict, *, chunk: Optional[int] = None, cache_bytes: int = 32 << 20) -> None:
        self.model, self.features = model, features
        self.image = features["image_embed"]
        self.high_res = [f for f in features["high_res_feats"]]
        self.chunk = chunk or max(4, cache_bytes // (16 * self.image[0].numel()))
        self._prepare()

    def __call__(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 2)`` float32 XY points in the model's input frame -> logits ``(B, 3, 4h, 4w)``, IoU ``(B, 3)``."""
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        encoder = self.model.sam_prompt_encoder
        sparse, dense = encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        if len(sparse) == 1:  # the official predictor does not repeat the image for one point: call it
            masks, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=self.image, image_pe=self.pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False,
                high_res_features=self.high_res,
            )
            return masks, iou
        sizes = chunk_sizes(len(sparse), self.chunk)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [self._decode(part, start, len(sparse)) for part, start in zip(sparse.split(sizes), starts)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _prepare(self) -> None:
        """The point-independent tensors: the image tokens, their positional encoding (``(1, N, C)`` views laid
        out as the official decoder lays them out) and the first block's image-side projections."""
        encoder, decoder = self.model.sam_prompt_encoder, self.model.sam_mask_decoder
        layer = decoder.transformer.layers[0]
        self.pe = encoder.get_dense_pe()  # (1, C, h, w)
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = self.image + dense
        self.size = tuple(src.shape[-2:])
        self.keys = src.flatten(2).permute(0, 2, 1)
        self.key_pe = self.pe.flatten(2).permute(0, 2, 1)
        keys_pe = self.keys + self.key_pe
        self.t2i_k = project(layer.cross_attn_token_to_image.k_proj, keys_pe)
        self.t2i_v = project(layer.cross_attn_token_to_image.v_proj, self.keys)
        self.i2t_q = project(layer.cross_attn_image_to_token.q_proj, keys_pe)

    def _decode(self, sparse: Tensor, start: int, batch: int) -> tuple[Tensor, Tensor]:
        """``MaskDecoder.predict_masks`` for ``(b, T, C)`` sparse embeddings, rows ``start:start + b`` of a batch of
        ``batch`` points; multimask outputs only."""
        decoder = self.model.sam_mask_decoder
        transformer = decoder.transformer
        b = len(sparse)
        # 1. output tokens (object score, IoU, masks) + prompt tokens
        weights = [decoder.obj_score_token.weight] if decoder.pred_obj_scores else []
        output_tokens = torch.cat([*weights, decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        # 2. the first two-way block, its image side shared by all points; 3. the rest, as the official one
        hs, keys = finish_two_way(transformer, tokens, *self._first_layer(tokens), self.pe, start=start, batch=batch)
        s = 1 if decoder.pred_obj_scores else 0
        # 4. masks from the mask tokens and the upscaled image tokens (with the high-resolution features)
        c, (h, w) = keys.shape[-1], self.size
        src = keys.transpose(1, 2).view(b, c, h, w)
        upscaled = self._upscale(src)
        mask_tokens = hs[:, s + 1 : s + 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in[start : start + b] @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou = decoder.iou_prediction_head(hs[:, s, :])[start : start + b]
        return masks[:, 1:], iou[:, 1:]

    def _upscale(self, src: Tensor) -> Tensor:
        """``(b, C, h, w)`` image tokens -> ``(b, C/8, 4h, 4w)``, as the official decoder does it."""
        decoder = self.model.sam_mask_decoder
        if not decoder.use_high_res_features:
            return decoder.output_upscaling(src)
        dc1, ln1, act1, dc2, act2 = decoder.output_upscaling
        feat_s0, feat_s1 = self.high_res
        upscaled = act1(ln1(dc1(src) + feat_s1))
        return act2(dc2(upscaled) + feat_s0)

    def _first_layer(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``transformer.layers[0]`` (``skip_first_layer_pe``) with the precomputed image projections:
        ``(b, T, C)`` tokens -> queries ``(b, T, C)``, keys ``(b, N, C)``."""
        layer = self.model.sam_mask_decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        b = len(tokens)
        # 1. self-attention of the tokens (no positional term in the first block)
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        # 2. tokens attend to the image
        attn_out = _attend(t2i, t2i.q_proj(queries + tokens), self.t2i_k.expand(b, -1, -1),
                           self.t2i_v.expand(b, -1, -1))
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        # 3. the image attends to the tokens: the first per-point image tensor
        attn_out = _attend(i2t, self.i2t_q.expand(b, -1, -1), i2t.k_proj(queries + tokens), i2t.v_proj(queries))
        return queries, layer.norm4(self.keys + attn_out)


def _attend(attn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM 2's ``Attention.forward`` after its input projections (eval mode: no dropout)."""
    q, k, v = (split_heads(t, attn.num_heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    return attn.out_proj(merge_heads(out))

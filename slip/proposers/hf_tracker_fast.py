"""The transformers SAM 2 prompt encoder + mask decoder (EdgeTAM, SAM 3 tracker) for a grid of single points: the
model's own modules, the point-independent work once per image, the same logits as ``model.forward``.

``Sam2MaskDecoder.forward`` (and its EdgeTAM / SAM 3 tracker copies) decodes ``B`` points by copying the image
embedding, its positional encoding and both high-resolution feature maps ``B`` times (``repeat_interleave``) and
running the two-way transformer on ``B`` full-size copies. :class:`HfFastPointDecoder` runs the same operations on
the same values, scheduled differently:

* the first two-way block's image-side projections (token->image keys and values, image->token queries), which do
  not depend on the point, run once per image on one copy, and attention reads them broadcast over the points;
* the image embedding, its positional encoding and the high-resolution features are broadcast, never copied;
* the rest runs on chunks of points small enough to stay in cache, with the model's own blocks, attention
  function and heads; the token MLP heads see the whole batch's rows at their places (BLAS kernels choose their
  blocking by the matrix shape), so every value is the one ``model.forward`` computes for the batch.

``tests/engines/test_hf_trackers.py`` checks logits and IoU bit for bit against ``model.forward`` (batches of 64,
7 and 1 points, both families); :class:`slip.proposers.hf_tracker_generator.HfPointDecoder` is the plain call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from slip.sam_fast import chunk_sizes


class HfFastPointDecoder:
    """``HfFastPointDecoder(model, features)(coords)`` returns what ``model(image_embeddings=features,
    input_points=coords[None, :, None], input_labels=ones, multimask_output=True)`` returns for one positive point
    per prompt: ``(B, 3, 4h, 4w)`` logits and ``(B, 3)`` predicted IoU. ``features``: ``get_image_embeddings`` of
    one image, ``[(1, C/8, 4h, 4w), (1, C/4, 2h, 2w), (1, C, h, w)]``; ``coords``: ``(B, 2)`` float32 XY in the
    model's input frame."""

    def __init__(self, model, features: list[Tensor], *, chunk: Optional[int] = None,
                 cache_bytes: int = 32 << 20) -> None:
        self.model, self.decoder = model, model.mask_decoder
        self.high_res = list(features[:-1])
        self.image = features[-1]
        self.chunk = chunk or max(4, cache_bytes // (16 * self.image[0].numel()))
        self._prepare()

    def __call__(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        points = coords[None, :, None, :]  # (1 image, B prompts, 1 point, XY), as the pipeline passes them
        labels = torch.ones(points.shape[:3], dtype=torch.long, device=coords.device)
        sparse, _ = self.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                              input_masks=None)
        decoder = self.decoder
        output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight,
                                   decoder.mask_tokens.weight], dim=0)
        batch = sparse.shape[1]
        tokens = torch.cat((output_tokens.repeat(1, batch, 1, 1), sparse), dim=2).to(decoder.iou_token.weight.dtype)
        sizes = chunk_sizes(batch, self.chunk)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [self._decode(tokens, start, size) for start, size in zip(starts, sizes)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _prepare(self) -> None:
        """The point-independent tensors, laid out as the decoder lays out its copies: image tokens and their
        positional encoding ``(1, 1, N, C)`` (views of ``(1, C, h, w)``), and the first block's image-side
        projections ``(1, heads, N, d)``."""
        encoder, layer = self.model.prompt_encoder, self.decoder.transformer.layers[0]
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # what the prompt encoder adds without masks
        src = self.image + dense.expand(1, -1, *self.image.shape[-2:])
        self.size = tuple(src.shape[-2:])
        pe = self.model.get_image_wide_positional_embeddings().repeat(1, 1, 1, 1)
        self.keys = src.flatten(2).transpose(1, 2).unsqueeze(1)
        self.key_pe = pe.flatten(2).transpose(1, 2).unsqueeze(1)
        key = self.keys + self.key_pe
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        self.t2i_k = _heads(t2i, t2i.k_proj(key), 1)
        self.t2i_v = _heads(t2i, t2i.v_proj(self.keys), 1)
        self.i2t_q = _heads(i2t, i2t.q_proj(key), 1)

    def _decode(self, tokens: Tensor, start: int, b: int) -> tuple[Tensor, Tensor]:
        """``Sam2MaskDecoder.forward`` for points ``start:start + b`` of the ``(1, B, T, C)`` tokens of a batch;
        multimask outputs only."""
        decoder, transformer = self.decoder, self.decoder.transformer
        part = tokens[:, start : start + b]
        # 1. the first two-way block, its image side shared by all points; 2. the other blocks, as the model's
        queries, keys = self._first_layer(part)
        key_pe = self.key_pe.expand(b, -1, -1, -1)
        for layer in transformer.layers[1:]:
            queries, keys, _ = layer(queries=queries, keys=keys, query_point_embedding=part,
                                     key_point_embedding=key_pe, attention_similarity=None)
        attn_out, _ = transformer.final_attn_token_to_image(query=queries + part, key=keys + key_pe, value=keys)
        hs = transformer.layer_norm_final_attn(queries + attn_out)
        # 3. the token heads over the whole batch's rows (this part's at their places, zeros elsewhere)
        batch = tokens.shape[1]
        hs = torch.cat([hs.new_zeros((1, start, *hs.shape[2:])), hs,
                        hs.new_zeros((1, batch - start - b, *hs.shape[2:]))], dim=1)
        hyper_in = torch.stack([mlp(hs[:, :, 2 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=2)[:, start : start + b]
        iou = decoder.iou_prediction_head(hs[:, :, 1, :])[:, start : start + b]
        # 4. masks from the mask tokens and the upscaled image tokens (with the high-resolution features)
        c, (h, w) = keys.shape[-1], self.size
        image = keys.transpose(2, 3).view(b, c, h, w)
        feat_s0, feat_s1 = self.high_res
        upscaled = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(image) + feat_s1))
        upscaled = decoder.activation(decoder.upscale_conv2(upscaled) + feat_s0)
        _, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(1, b, c, h * w)).view(b, -1, h, w)
        return masks[:, 1:], iou[0, :, 1:]

    def _first_layer(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``transformer.layers[0]`` (no positional term on its self-attention) with the precomputed image-side
        projections: ``(1, b, T, C)`` tokens -> queries ``(1, b, T, C)``, keys ``(b, 1, N, C)``."""
        layer = self.decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        b = tokens.shape[1]
        # 1. self-attention of the tokens
        queries, _ = layer.self_attn(query=tokens, key=tokens, value=tokens)
        queries = layer.layer_norm1(queries)
        # 2. tokens attend to the image
        q = _heads(t2i, t2i.q_proj(queries + tokens), b)
        attn_out = _attend(t2i, q, self.t2i_k.expand(b, -1, -1, -1), self.t2i_v.expand(b, -1, -1, -1), (1, b))
        queries = layer.layer_norm2(queries + attn_out)
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        # 3. the image attends to the tokens: the first per-point image tensor
        query = queries + tokens
        k, v = _heads(i2t, i2t.k_proj(query), b), _heads(i2t, i2t.v_proj(queries), b)
        attn_out = _attend(i2t, self.i2t_q.expand(b, -1, -1, -1), k, v, (b, 1))
        return queries, layer.layer_norm4(self.keys + attn_out)


def _heads(attn, x: Tensor, rows: int) -> Tensor:
    """A projection's ``(..., internal_dim)`` output as ``(rows, heads, tokens, head_dim)``, as ``Sam2Attention``
    splits it."""
    return x.view(rows, -1, attn.num_attention_heads, attn.head_dim).transpose(1, 2)


def _attend(attn, q: Tensor, k: Tensor, v: Tensor, shape: tuple[int, int]) -> Tensor:
    """``Sam2Attention.forward`` after its input projections: the model's attention function (eval: no dropout),
    heads merged into ``shape + (tokens, internal_dim)``, the output projection."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.sam2.modeling_sam2 import eager_attention_forward

    # config._attn_implementation: how transformers' attention interface documents choosing the function
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attn, q, k, v, attention_mask=None, dropout=0.0, scaling=attn.scaling, is_causal=attn.is_causal)
    out = out.reshape(*shape, -1, attn.num_attention_heads * attn.head_dim).contiguous()
    return attn.o_proj(out)

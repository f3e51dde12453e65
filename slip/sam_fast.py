"""Faster forward passes through SAM's own modules: same weights, same state dict, same outputs.

Three drop-ins for stages of ``segment_anything``, each checked against the official computation by
``tests/slip/test_generator_fast.py``:

* :func:`encode_image` — ``ImageEncoderViT.forward`` without the materialised ``(N, N)`` attention
  matrix. :func:`exact_attention` (the default) runs the official attention's own operations on a block
  of query rows at a time, in place: bit-identical output, a fraction of the memory traffic.
  :func:`fused_attention` uses ``scaled_dot_product_attention`` with the decomposed relative-position
  bias as an additive mask: same output to ~1e-6, no faster on CPU, and rounding differences reorder
  near-tied masks in the generator, so it is opt-in. :func:`fuse_attention` installs either on a
  model's own attention layers (for ``SamPredictor`` and other callers); ``state_dict`` is untouched.
* :class:`PointDecoder` — prompt encoder + mask decoder for single-point prompts on one image
  embedding. The official decoder copies the image embedding and its positional encoding once per
  point (``repeat_interleave``); here the first two-way block's image-side projections, which do not
  depend on the point, run once per image, and the rest runs in chunks of points that stay in cache.
  Every operation is the official one on the same values, so the logits are bit-identical.
* :class:`WindowUpscaler` — SAM's ``postprocess_masks`` (two bilinear resizes) evaluated only inside
  the window where a mask can be positive, with PyTorch's own index, weight and fused-multiply-add
  arithmetic: bit-identical values, checked against ``postprocess_masks`` when it is built.
"""

from __future__ import annotations

import math
from types import MethodType
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from segment_anything.modeling.image_encoder import Block, get_rel_pos, window_partition, window_unpartition
from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import Tensor

# --- image encoder: fused attention --------------------------------------------------------------------------


def fused_attention(attn: EncoderAttention, x: Tensor, *, max_bias_bytes: int = 256 << 20) -> Tensor:
    """``attn(x)`` for ``(B, H, W, C)`` tokens, by ``scaled_dot_product_attention``.

    The decomposed relative-position term (``add_decomposed_rel_pos``) becomes the additive float mask
    ``rel_h[q, k_row] + rel_w[q, k_col]`` of shape ``(B * heads, H * W, H * W)``, built for a group of
    heads at a time so that it stays under ``max_bias_bytes``. Returns ``(B, H, W, C)``.
    """
    b, h, w, _ = x.shape
    heads = attn.num_heads
    # 1. projections, as the official layer: (3, B * heads, H * W, head_dim)
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        # 2. attention with the relative-position bias, a group of heads at a time
        rel_h = get_rel_pos(h, h, attn.rel_pos_h)
        rel_w = get_rel_pos(w, w, attn.rel_pos_w)
        group = max(1, max_bias_bytes // ((h * w) ** 2 * q.element_size()))
        out = torch.cat([
            F.scaled_dot_product_attention(
                q[i : i + group], k[i : i + group], v[i : i + group],
                attn_mask=_rel_pos_bias(q[i : i + group], rel_h, rel_w, (h, w)), scale=attn.scale,
            )
            for i in range(0, len(q), group)
        ])
    # 3. heads back together, output projection
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def exact_attention(attn: EncoderAttention, x: Tensor, *, max_rows: int = 1024) -> Tensor:
    """``attn(x)`` for ``(B, H, W, C)`` tokens, bit for bit, without the full ``(N, N)`` matrix.

    The official layer's own operations (scaled ``q @ k^T``, the two relative-position terms added in
    the same order, softmax, ``@ v``) on ``max_rows`` queries at a time (whole rows of the token grid),
    the sums updated in place: the same values, a fraction of the memory traffic. Returns ``(B, H, W, C)``.
    """
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    if attn.use_rel_pos:
        r_q = q.reshape(len(q), h, w, -1)
        bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, attn.rel_pos_h))
        bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, attn.rel_pos_w))
    out = torch.empty_like(q)
    keys, step = k.transpose(-2, -1), max(1, max_rows // w)  # query grid rows per step
    for top in range(0, h, step):
        rows = slice(top * w, min(h, top + step) * w)
        scores = (q[:, rows] * attn.scale) @ keys
        if attn.use_rel_pos:
            grid = scores.view(len(q), -1, w, h, w)
            grid += bias_h[:, top : top + step, :, :, None]
            grid += bias_w[:, top : top + step, :, None, :]
        torch.bmm(scores.softmax(dim=-1), v, out=out[:, rows])
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def _rel_pos_bias(q: Tensor, rel_h: Tensor, rel_w: Tensor, size: tuple[int, int]) -> Tensor:
    """``(G, H * W, H * W)`` additive attention bias of ``add_decomposed_rel_pos`` for ``(G, H * W, D)``
    queries; ``rel_h`` / ``rel_w``: ``(H, H, D)`` / ``(W, W, D)`` from ``get_rel_pos``."""
    h, w = size
    r_q = q.reshape(len(q), h, w, -1)
    bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h)
    bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w)
    return (bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]).reshape(len(q), h * w, h * w)


def _block(block: Block, x: Tensor, attention: Callable[[EncoderAttention, Tensor], Tensor]) -> Tensor:
    """``block(x)`` (``(1, H, W, C)`` tokens) with ``attention`` in place of ``block.attn``."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        size = x.shape[1], x.shape[2]
        x, padded = window_partition(x, block.window_size)
        x = window_unpartition(attention(block.attn, x), block.window_size, padded, size)
    else:
        x = attention(block.attn, x)
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def encode_image(encoder: torch.nn.Module, x: Tensor, *, exact: bool = True) -> Tensor:
    """``encoder(x)`` for a ``(1, 3, S, S)`` normalised, padded image -> ``(1, C, S / 16, S / 16)``
    embedding. When ``encoder`` is segment_anything's ``ImageEncoderViT``, its attention runs as
    :func:`exact_attention` (bit-identical) or, with ``exact=False``, :func:`fused_attention`."""
    if not _is_vit(encoder):
        return encoder(x)
    attention = exact_attention if exact else fused_attention
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = _block(block, x, attention)
    return encoder.neck(x.permute(0, 3, 1, 2))


def fuse_attention(sam: Sam, *, exact: bool = True) -> Sam:
    """Make ``sam``'s own encoder attention layers run :func:`exact_attention` (or, with ``exact=False``,
    :func:`fused_attention`), in place, for every caller (``SamPredictor`` too). Idempotent.

    Only ``forward`` of each ``Attention`` instance changes: parameters, buffers and ``state_dict`` stay
    as they are, so checkpoints load and save as before. Returns ``sam``.
    """
    attention = exact_attention if exact else fused_attention
    for module in sam.image_encoder.modules():
        if isinstance(module, EncoderAttention):
            module.forward = MethodType(attention, module)
    return sam


def _is_vit(encoder: torch.nn.Module) -> bool:
    return isinstance(encoder, ImageEncoderViT) and all(
        type(b) is Block and type(b.attn) is EncoderAttention for b in encoder.blocks
    )


# --- mask decoder: per-image work once ------------------------------------------------------------------------


class PointDecoder:
    """SAM's prompt encoder + mask decoder for one positive point per prompt, on one image embedding.

    ``PointDecoder(sam, features)(coords)`` returns what ``sam.mask_decoder(..., multimask_output=True)``
    returns for those points: ``(B, 3, h, w)`` low-resolution logits and ``(B, 3)`` predicted IoU.
    Models whose prompt encoder / mask decoder are not segment_anything's classes are called as they are.
    """

    def __init__(self, sam: Sam, features: Tensor, *, chunk: Optional[int] = None, cache_bytes: int = 32 << 20) -> None:
        self.sam, self.features = sam, features
        self.fast = _is_official_decoder(sam)
        # points per chunk: ~4 per-point copies of the image tokens (fp32) within cache_bytes
        self.chunk = chunk or max(4, cache_bytes // (16 * features[0].numel()))
        if self.fast:
            self._prepare()

    def __call__(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 2)`` XY points in the encoder's input frame -> logits ``(B, 3, h, w)``, IoU ``(B, 3)``."""
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        sparse, dense = self.sam.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        if not self.fast:
            return self.sam.mask_decoder(
                image_embeddings=self.features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            )
        if len(sparse) == 1:  # the official decoder lays a single point out differently: call it
            return self.sam.mask_decoder(
                image_embeddings=self.features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            )
        sizes = chunk_sizes(len(sparse), self.chunk)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [self._decode(part, start, len(sparse)) for part, start in zip(sparse.split(sizes), starts)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _prepare(self) -> None:
        """The point-independent tensors: image tokens, their positional encoding, and the first
        two-way block's image-side projections (``(1, N, D)`` each, N = h * w image tokens)."""
        encoder, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        layer = decoder.transformer.layers[0]
        pe = encoder.get_dense_pe()  # (1, C, h, w)
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # what the prompt encoder adds without masks
        src = self.features + dense
        self.size, self.pe = tuple(src.shape[-2:]), pe
        # 1. tokens as the official decoder lays them out: (1, N, C) views of (1, C, h, w) tensors
        self.keys = src.flatten(2).permute(0, 2, 1)
        self.key_pe = pe.flatten(2).permute(0, 2, 1)
        keys_pe = self.keys + self.key_pe
        # 2. projections that see only image tokens (token->image keys / values, image->token queries)
        self.t2i_k = project(layer.cross_attn_token_to_image.k_proj, keys_pe)
        self.t2i_v = project(layer.cross_attn_token_to_image.v_proj, self.keys)
        self.i2t_q = project(layer.cross_attn_image_to_token.q_proj, keys_pe)

    def _decode(self, sparse: Tensor, start: int, batch: int) -> tuple[Tensor, Tensor]:
        """``MaskDecoder.predict_masks`` for ``(b, T, C)`` sparse embeddings, rows ``start:start + b`` of a
        ``batch`` of points; multimask outputs only."""
        decoder: MaskDecoder = self.sam.mask_decoder
        transformer: TwoWayTransformer = decoder.transformer
        b = len(sparse)
        # 1. output tokens + prompt tokens
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        # 2. the first two-way block, its image side shared by all points; 3. the rest, as the official one
        hs, keys = finish_two_way(transformer, tokens, *self._first_layer(tokens), self.pe, start=start, batch=batch)
        # 4. masks from the mask tokens and the upscaled image tokens; IoU from the IoU token
        c, (h, w) = keys.shape[-1], self.size
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in[start : start + b] @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou = decoder.iou_prediction_head(hs[:, 0, :])[start : start + b]
        return masks[:, 1:], iou[:, 1:]

    def _first_layer(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``transformer.layers[0]`` (``skip_first_layer_pe``) with the precomputed image projections:
        ``(b, T, C)`` tokens -> queries ``(b, T, C)``, keys ``(b, N, C)``."""
        layer = self.sam.mask_decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        # 1. self-attention of the tokens (no positional term in the first block)
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        # 2. tokens attend to the image
        attn_out = _attend(t2i, t2i.q_proj(queries + tokens), self.t2i_k, self.t2i_v)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        # 3. the image attends to the tokens: the first per-point image tensor
        attn_out = _attend(i2t, self.i2t_q, i2t.k_proj(queries + tokens), i2t.v_proj(queries))
        return queries, layer.norm4(self.keys + attn_out)


def chunk_sizes(total: int, chunk: int) -> list[int]:
    """``total`` points split into parts of ``chunk`` (at least 4), the remainder merged into the last
    part when it is under 4: tiny matrix products take other BLAS kernels than the official batch's."""
    chunk = max(chunk, 4)
    sizes = [chunk] * (total // chunk)
    rest = total - sum(sizes)
    if rest and (rest >= 4 or not sizes):
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def finish_two_way(transformer: torch.nn.Module, tokens: Tensor, queries: Tensor, keys: Tensor, pe: Tensor, *,
                   start: int, batch: int) -> tuple[Tensor, Tensor]:
    """The two-way transformer after its first block (SAM 1's and SAM 2's alike): the other blocks and the
    final token->image attention, as the official transformer runs them. ``tokens`` ``(b, T, C)``; ``queries``,
    ``keys`` the first block's outputs; ``pe`` ``(1, C, h, w)``. Returns ``(hs, keys)``: ``hs`` padded with
    zero rows to the official batch of ``batch`` points (these ``b`` at row ``start``: the token MLPs' BLAS
    kernels depend on the batch), ``keys`` ``(b, h*w, C)``."""
    b = len(tokens)
    key_pe = torch.repeat_interleave(pe, b, dim=0).flatten(2).permute(0, 2, 1)
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    hs = transformer.norm_final_attn(queries + attn_out)
    hs = torch.cat([hs.new_zeros((start, *hs.shape[1:])), hs, hs.new_zeros((batch - start - b, *hs.shape[1:]))])
    return hs, keys


def project(linear: torch.nn.Linear, x: Tensor) -> Tensor:
    """``linear(x)`` for ``(1, N, C)`` image tokens, computed the way the official decoder computes it for
    a batch of points (a contiguous copy, a matrix product, then the bias), so the values are the same."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.mm(flat, linear.weight.t()).add_(linear.bias).view(*x.shape[:-1], -1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, C)`` -> ``(B, heads, N, C / heads)``: the same operations as the SAM 1 / SAM 2 decoders'
    ``Attention._separate_heads`` (so the same values), without calling their private method."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, N, c)`` -> ``(B, N, heads * c)``, as their ``Attention._recombine_heads``."""
    b, heads, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * c)


def _attend(attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``DecoderAttention.forward`` after its input projections; batch dimensions broadcast."""
    q, k, v = (split_heads(t, attn.num_heads) for t in (q, k, v))
    scores = q @ k.permute(0, 1, 3, 2)
    scores = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
    return attn.out_proj(merge_heads(scores @ v))


def _is_official_decoder(sam: Sam) -> bool:
    decoder, encoder = sam.mask_decoder, sam.prompt_encoder
    return (
        type(decoder) is MaskDecoder and type(encoder) is PromptEncoder
        and type(decoder.transformer) is TwoWayTransformer and decoder.num_multimask_outputs == 3
    )


# --- mask upscaling: SAM's postprocess_masks inside windows -------------------------------------------------


class WindowUpscaler:
    """SAM's ``postprocess_masks`` (bilinear to ``img_size``, crop to ``input_size``, bilinear to
    ``crop_size``) for one geometry, computed only where a mask can be above the threshold.

    Bilinear weights are non-negative, so an output pixel can exceed a threshold only if one of its
    low-resolution sources does (up to rounding, covered by a margin): each mask is evaluated in the
    window those sources span. Inside it, the values are computed with PyTorch's own index and weight
    formulas and its fused multiply-add, so they are bit-identical to ``postprocess_masks`` of the
    official generators' ``(B, 3, h, w)`` logits; the constructor checks that on random logits and refuses
    (``ValueError``) when this build differs.

    PyTorch's CPU kernel depends on the thread count: with one thread, 3-channel inputs take its
    channels-last kernel (each output pixel from its four corners, ``fma`` chained), otherwise the generic
    separable one (columns, then rows). An upscaler matches the kernel of the thread count it was built
    under (callers key their caches by it: :func:`kernel_key`).

    :meth:`direct` builds the one-pass variant SAM 2 uses (``F.interpolate`` of the low-resolution logits
    straight to the crop size).
    """

    def __init__(self, sam: Sam, low_res: tuple[int, int], input_size: tuple[int, int], crop_size: tuple[int, int]):
        img = sam.image_encoder.img_size
        stages = [((low_res[i], img, input_size[i]), (input_size[i], crop_size[i], crop_size[i])) for i in (0, 1)]
        reference = lambda x: sam.postprocess_masks(x[None], input_size, crop_size)[0]  # noqa: E731
        self._build(stages, reference, low_res, crop_size)

    @classmethod
    def direct(cls, low_res: tuple[int, int], crop_size: tuple[int, int]) -> "WindowUpscaler":
        """One bilinear resize (``align_corners=False``) of ``low_res`` logits to ``crop_size``."""
        upscaler = cls.__new__(cls)
        stages = [((low_res[i], crop_size[i], crop_size[i]),) for i in (0, 1)]
        reference = lambda x: F.interpolate(x[None], crop_size, mode="bilinear", align_corners=False)[0]  # noqa
        upscaler._build(stages, reference, low_res, crop_size)
        return upscaler

    def _build(self, stages: list, reference: Callable[[Tensor], Tensor], low_res: tuple[int, int],
               crop_size: tuple[int, int]) -> None:
        """``stages``: per axis (rows, columns), ``(n_in, n_out, kept)`` per resize (``kept``: the first output
        pixels kept, the crop to the input size); ``reference``: ``(3, h, w)`` -> ``(3, H, W)`` logits, computed
        as the official generators compute them (three masks per point: one 3-channel image)."""
        self.reference, self.crop_size = reference, crop_size
        variants = [(fma, combine) for fma in (True, False) for combine in ("corner", "addcmul", "double", "plain")]
        for index_fma, combine in variants:
            self.rows = _Axis(stages[0], index_fma)
            self.cols = _Axis(stages[1], index_fma)
            self.combine = combine
            if self._agrees(low_res):
                return
        raise ValueError(f"this PyTorch build's bilinear upscaling could not be reproduced for {crop_size}")

    def values(self, logits: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
        """The upscaled values of one ``(h, w)`` float32 logit map, output rows ``rows[0]..rows[1]`` and
        columns ``cols[0]..cols[1]`` (inclusive) -> ``(rows, cols)`` float32."""
        (lr, r_tables), (lc, c_tables) = self.rows.plan(*rows), self.cols.plan(*cols)
        out = logits[lr[0] : lr[1] + 1, lc[0] : lc[1] + 1]
        for r_table, c_table in zip(r_tables, c_tables):
            if self.combine == "corner":  # channels-last kernel: four corners, fma chained
                out = _corners(out, r_table, c_table)
            else:  # generic kernel: columns, then rows (PyTorch's order)
                out = self._lerp(self._lerp(out, c_table, -1), r_table, -2)
        return out

    def windows(self, logits: Tensor, threshold: float) -> np.ndarray:
        """``(K, 4)`` int64 inclusive output windows ``[row0, row1, col0, col1]`` of ``(K, h, w)`` logits:
        outside its window, the upscaled mask is surely ``<= threshold`` (``row0 = -1`` when no pixel can
        exceed it). The margin covers rounding: ~20x the error of two bilinear passes."""
        margin = 1e-4 + 1e-5 * logits.abs().amax((1, 2))
        support = logits > (threshold - margin)[:, None, None]
        out = np.full((len(logits), 4), -1, dtype=np.int64)
        for axis, (table, dim) in enumerate(((self.rows, 2), (self.cols, 1))):
            hit = support.any(dim).to(torch.uint8)  # (K, h or w): low-res rows / columns with support
            first = hit.argmax(1).numpy()
            last = hit.shape[1] - 1 - hit.flip(1).argmax(1).numpy()
            out[:, 2 * axis : 2 * axis + 2] = table.spans(first, last)
        empty = (out[:, 0] < 0) | (out[:, 2] < 0) | ~support.flatten(1).any(1).numpy()
        out[empty] = -1
        return out

    def _lerp(self, x: Tensor, table: tuple[Tensor, Tensor, Tensor, Tensor], dim: int) -> Tensor:
        """One bilinear pass along ``dim``: ``fma(x[i0], w0, x[i1] * w1)`` as PyTorch's CPU kernel."""
        i0, i1, w0, w1 = table
        shape = (-1, 1) if dim == -2 else (-1,)
        a, b = x.index_select(dim, i0), x.index_select(dim, i1)
        w0, w1 = w0.view(shape), w1.view(shape)
        if self.combine == "addcmul":
            return torch.addcmul(b * w1, a, w0)
        if self.combine == "double":
            return (a.double() * w0.double() + (b * w1).double()).float()
        return a * w0 + b * w1

    def _agrees(self, low_res: tuple[int, int]) -> bool:
        """Whether :meth:`values` reproduces the reference bit for bit, whole and in sub-windows."""
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn((3, *low_res), generator=gen) * 8
        reference = self.reference(logits)
        h, w = self.crop_size
        windows = [((0, h - 1), (0, w - 1)), ((h // 3, h - 1), (w // 5, w // 2)), ((0, h // 2), (w // 3, w - 1))]
        return all(
            torch.equal(self.values(x, rows, cols), ref[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1])
            for x, ref in zip(logits, reference) for rows, cols in windows
        )


def in_threes(upscale: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """``upscale`` (``(B, 3, h, w)`` -> ``(B, 3, H, W)``) of ``(K, h, w)`` logits laid out three to an image, as
    the official generators pass them (PyTorch's CPU kernel depends on the channel count): ``(K, H, W)``."""
    k = len(logits)
    padded = torch.cat([logits, logits.new_zeros((-k % 3, *logits.shape[1:]))]) if k % 3 else logits
    out = upscale(padded.view(-1, 3, *logits.shape[1:]))
    return out.view(-1, *out.shape[2:])[:k]


def kernel_key() -> bool:
    """Which of PyTorch's CPU bilinear kernels 3-channel inputs take now (True: channels-last, one thread)."""
    return torch.get_num_threads() == 1


def _corners(x: Tensor, rows: tuple, cols: tuple) -> Tensor:
    """One bilinear resize as PyTorch's channels-last CPU kernel computes a pixel:
    ``fma(x11, w11, fma(x10, w10, fma(x00, w00, x01 * w01)))`` with ``wAB = hA * wB`` (float32); each fma is
    evaluated exactly in float64 and rounded once to float32."""
    i0, i1, h0, h1 = rows
    j0, j1, w0, w1 = cols
    top, bottom = x.index_select(0, i0), x.index_select(0, i1)
    x00, x01 = top.index_select(1, j0), top.index_select(1, j1)
    x10, x11 = bottom.index_select(1, j0), bottom.index_select(1, j1)
    h0, h1, w0, w1 = h0[:, None], h1[:, None], w0[None], w1[None]
    out = x01 * (h0 * w1)
    for corner, weight in ((x00, h0 * w0), (x10, h1 * w0), (x11, h1 * w1)):
        out = (corner.double() * weight.double() + out.double()).float()
    return out


class _Axis:
    """One axis of the resizes: for each, per output pixel the two source indices and weights."""

    def __init__(self, stages: Sequence[tuple[int, int, int]], index_fma: bool) -> None:
        # (n_in, n_out, kept): the first `kept` outputs of each resize are kept (the crop to the input size)
        self.stages = [tuple(t[:kept] for t in _bilinear_table(n_in, n_out, index_fma)) for n_in, n_out, kept in stages]
        self.sources = [[t.numpy() for t in stage[:2]] for stage in self.stages]

    def spans(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """``(K, 2)`` inclusive ranges of output pixels that read any low-res pixel in ``low..high``
        (``(K,)`` each); ``-1`` where none does."""
        out = np.stack([low, high], 1)
        dead = np.zeros(len(low), dtype=bool)
        for sources in self.sources:
            out = _reading(sources, np.maximum(out[:, 0], 0), out[:, 1])
            dead |= out[:, 0] < 0
        out[dead] = -1
        return out

    def plan(self, first: int, last: int):
        """For output pixels ``first..last``: the low-res range they need, and each resize's table
        re-indexed into the range of its input that is needed."""
        tables = []
        for stage in reversed(self.stages):
            i0, i1, w0, w1 = (t[first : last + 1] for t in stage)
            first, last = int(i0[0]), int(i1[-1])
            tables.append((i0 - first, i1 - first, w0, w1))
        return (first, last), tables[::-1]


def _reading(table: list, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``(K, 2)`` inclusive ranges of output pixels whose two (non-decreasing) sources meet ``low..high``;
    ``-1`` rows where the range is empty."""
    i0, i1 = table
    out = np.stack([np.searchsorted(i1, low, side="left"), np.searchsorted(i0, high, side="right") - 1], 1)
    out[out[:, 0] > out[:, 1]] = -1
    return out


def _bilinear_table(n_in: int, n_out: int, index_fma: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch's bilinear (``align_corners=False``) sources and weights along one axis: ``(n_out,)`` int64
    ``i0``, ``i1`` and float32 ``w0``, ``w1`` (``compute_source_index_and_lambda`` in float32)."""
    if n_in == n_out:
        index = np.arange(n_out)
        return _tensors(index, index, np.ones(n_out, np.float32), np.zeros(n_out, np.float32))
    scale = np.float32(n_in) / np.float32(n_out)
    centre = np.arange(n_out).astype(np.float32) + np.float32(0.5)
    if index_fma:  # scale * centre - 0.5 with one rounding
        src = (np.float64(scale) * centre.astype(np.float64) - 0.5).astype(np.float32)
    else:
        src = scale * centre - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return _tensors(i0, i0 + (i0 < n_in - 1), (np.float32(1) - w1).astype(np.float32), w1)


def _tensors(*arrays: np.ndarray) -> tuple[Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)

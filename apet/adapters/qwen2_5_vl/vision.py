"""Qwen2.5-VL's vision graph: patches -> ViT (window and full attention) -> 2x2 merger -> ApET stage 1.

One run takes images of one patch grid (the batch dim), so full attention needs no mask and ApET
sees [B, N, D]. Window attention follows the host's :mod:`~apet.models.qwen2_5_vl.geometry`:
queries, keys and values are gathered into [W, S] windows, attend with a key mask for the empty
slots of edge windows, and are gathered back — plain MatMul/Softmax/Gather, no [P, P] mask, no
data-dependent index arithmetic. Tokens stay in merge-block raster order throughout (Hugging Face
permutes to window order and back; attention, norms and MLPs are order-independent), so the
merger's output is in the order ApET and the M-RoPE positions expect. ApET runs on the merger's
output (the LLM space), where the authors apply it; ``finish`` has nothing left to project.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from apet.contracts.compression import CompressionConfig
from apet.modeling.vision import VisionStages
from apet.models.qwen2_5_vl.geometry import window_layout
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """Softmax attention. Exported as MatMul - (Add mask) - Softmax - MatMul in the graph dtype, the pattern
    TensorRT fuses, or through the attention function the tower's config names when an export registered one
    (``--attention op``: the ONNX ``Attention`` node, apet.export.attention.hf_attention); eagerly through SDPA,
    so the torch backend's full-attention blocks never hold the [heads, P, P] scores of a large image
    (4 x 16 x 8192² fp16 would be 8 GiB)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        implementation = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        if implementation not in (None, "eager", "sdpa"):
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            # the interface's 4-D mask, one row per query (ONNX Runtime does not broadcast the query axis)
            mask = None if bias is None else bias.unsqueeze(0).expand(-1, -1, q.shape[2], -1)
            return ALL_ATTENTION_FUNCTIONS[implementation](attn, q, k, v, mask, scaling=scale)[0].transpose(1, 2)
        scores = (q * scale) @ k.transpose(-1, -2)
        return F.softmax(scores if bias is None else scores + bias, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class QwenVisionStages(VisionStages):
    input_names = ["pixel_values", "patch_positions", "window_index", "window_slot"]

    def __init__(self, adapter, select) -> None:
        super().__init__(adapter, select)
        # export passes apet.compression.selector: a fixed budget (--tokens K) gives static output shapes
        config = getattr(select, "config", None)
        fixed = isinstance(config, CompressionConfig) and config.keep_ratio is None
        self.fixed_keep = config.keep if fixed else None

    def _vit(self) -> nn.Module:
        return self.adapter.visual()

    def _rotary(self, patch_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary tables [P, head_dim] (float32): the first half of the frequencies rotate by the row,
        the second half by the column, repeated for both halves of the head."""
        inv_freq = self._vit().rotary_pos_emb.inv_freq.to(torch.float32)
        freqs = patch_positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [P, 2, d/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def _attention(self, block: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        attn = block.attn
        batch, patches = h.shape[0], h.shape[1]
        dim, heads = int(attn.qkv.in_features), int(attn.num_heads)  # static
        head_dim = dim // heads
        q, k, v = attn.qkv(h).reshape(batch, patches, 3, heads, head_dim).unbind(2)  # [B, P, heads, d]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(h.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(h.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, P, d]
        if window is None:
            out = _attend(attn, q, k, v, None, head_dim**-0.5)
        else:
            gather, bias, slot = window  # bias [heads·W, 1, S]
            slots = bias.shape[-1]
            # [B, heads, W·S, d] -> [B, heads·W, S, d]: windows become attention heads (the 4-D pattern TensorRT fuses)
            q, k, v = (t.index_select(2, gather).reshape(batch, -1, slots, head_dim) for t in (q, k, v))
            out = _attend(attn, q, k, v, bias, head_dim**-0.5)
            out = out.reshape(batch, heads, -1, head_dim).index_select(2, slot)
        return attn.proj(out.transpose(1, 2).reshape(batch, patches, dim))

    def features(self, pixel_values: torch.Tensor, patch_positions: torch.Tensor, window_index: torch.Tensor,
                 window_slot: torch.Tensor) -> torch.Tensor:
        """[B, P, 1176] patches of B same-grid images -> merged tokens [B, P/4, H_llm]."""
        vit = self._vit()
        dtype = self.adapter.dtype
        weight = vit.patch_embed.proj.weight  # Conv3d with stride = kernel: a linear map of each patch
        h = pixel_values.to(dtype) @ weight.reshape(weight.shape[0], -1).t()
        cos, sin = self._rotary(patch_positions)
        empty = window_index < 0
        bias = torch.where(empty, torch.finfo(dtype).min, torch.zeros((), dtype=dtype, device=h.device))
        heads = int(vit.blocks[0].attn.num_heads)
        bias = bias.unsqueeze(0).expand(heads, -1, -1).reshape(-1, 1, bias.shape[-1])  # [heads·W, 1, S]
        window = (window_index.clamp(min=0).reshape(-1), bias, window_slot)
        full = set(self.adapter.spec.extra["fullatt_block_indexes"])
        for i, block in enumerate(vit.blocks):
            h = h + self._attention(block, block.norm1(h), cos, sin, None if i in full else window)
            h = h + block.mlp(block.norm2(h))
        merger = vit.merger
        batch = h.shape[0]
        return merger.mlp(merger.ln_q(h).reshape(batch, -1, merger.hidden_size))

    def finish(self, tokens: torch.Tensor, index: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tokens, index

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        recipe = QwenImageRecipe.from_json(self.adapter.spec.processor)
        tokens = -(-recipe.min_pixels // (recipe.factor * recipe.factor))  # the smallest image's
        side = max(1, math.isqrt(tokens))
        units_h, units_w = side, -(-tokens // side)
        rows, cols = units_h * recipe.merge_size, units_w * recipe.merge_size
        layout = window_layout(rows, cols, recipe)
        device = self.adapter.device
        pixels = torch.randn(batch, rows * cols, recipe.patch_dim, dtype=self.adapter.dtype, device=device)
        return (pixels,) + tuple(torch.from_numpy(a).to(device) for a in layout.arrays().values())

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        kept = {0: "batch"} if self.fixed_keep is not None else {0: "batch", 1: "kept"}  # K per image or fixed
        return {"pixel_values": {0: "batch", 1: "patches"}, "patch_positions": {0: "patches"},
                "window_index": {0: "windows"}, "window_slot": {0: "patches"}, "visual_embeds": kept,
                "keep_index": kept}

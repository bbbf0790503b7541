"""Qwen2.5-VL's vision graph: patches -> ViT (window and full attention) -> 2x2 merger -> ApET stage 1.

One run takes images of one patch grid (the batch dim), so full attention needs no mask and ApET
sees [B, N, D]. Window attention follows the host's :mod:`~apet.models.qwen2_5_vl.geometry`:
queries, keys and values are gathered into [W, S] windows, attend with a key mask for the empty
slots of edge windows, and are gathered back — plain MatMul/Softmax/Gather, no [P, P] mask, no
data-dependent index arithmetic. Tokens stay in merge-block raster order throughout (Hugging Face
permutes to window order and back; attention, norms and MLPs are order-independent), so the
merger's output is in the order ApET and the M-RoPE positions expect. ApET runs on the merger's
output (the LLM space), where the authors apply it; ``finish`` has nothing left to project.

Eagerly on a GPU (:mod:`apet.modeling.fast_path`) the same function runs without the mask: the patches are
permuted to window order once, every window of every image is one segment of a packed FlashAttention varlen call
(:class:`PackedWindows`), full attention is mask-free SDPA, and the tokens go back to merge-block order before the
merger. The block math (:meth:`QwenVisionStages._blocks`) is one loop for both forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from apet.contracts.compression import CompressionConfig
from apet.kernels import activations, decoder_fused
from apet.kernels import rotary as rotary_kernel
from apet.kernels.varlen import varlen_attention
from apet.modeling.aligned_mlp import aligned_gated_mlp, is_gated_mlp
from apet.modeling.fast_path import fast_tower, rms_norm
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


@dataclass(frozen=True)
class Rotary:
    """The 2-D rotary tables of one run, [P, d] float32, applied in float32 like Hugging Face. The graph's form
    rotates q and k one at a time (rotate_half: negation, concatenation, two products); the fast form rotates
    them together ([B, P, 2, heads, d]) with one rolled copy and a multiply-add on a sign-folded sine table
    (the same values: rotate_half(x) = roll(x, d/2) x (-1 | +1)), eagerly on a GPU as one Triton pass
    (:mod:`apet.kernels.rotary`), compiled as torch ops inductor fuses."""

    cos: torch.Tensor
    sin: torch.Tensor
    fused: bool

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor, fused: bool) -> "Rotary":
        if fused:
            half = sin.shape[-1] // 2
            sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cls(cos, sin, fused)

    def qkv(self, qkv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, P, 3, heads, d] projections -> rotated q, rotated k, v ([B, P, heads, d] each)."""
        if self.fused:
            if rotary_kernel.available(qkv):  # eager on a GPU: one Triton pass
                q, k = rotary_kernel.rotate_qk(qkv, self.cos, self.sin, dtype).unbind(2)
                return q, k, qkv.select(2, 2)
            x = qkv.narrow(2, 0, 2)
            cos, sin = self.cos[:, None, None], self.sin[:, None, None]  # [P, 1, 1, d]: over (q|k, heads)
            q, k = torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin).to(dtype).unbind(2)
            return q, k, qkv.select(2, 2)
        q, k, v = qkv.unbind(2)
        cos, sin = self.cos.unsqueeze(-2), self.sin.unsqueeze(-2)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(dtype)
        return q, k, v


class Windows(Protocol):
    def attend(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               batch: torch.Tensor | int) -> torch.Tensor:
        """q, k, v [B, P, heads, d] -> [B, P, heads, d], each patch attending within its window (``batch``: B
        as the caller read it, so a traced graph reads the shape once)."""


@dataclass(frozen=True)
class MaskedWindows:
    """The graph's form: q/k/v gathered into [B, heads·W, S, d] windows (windows become attention heads, the
    4-D pattern TensorRT fuses), a key mask for the empty slots of edge windows, gathered back."""

    gather: torch.Tensor  # [W·S] patch of each slot (empty slots read patch 0, masked)
    bias: torch.Tensor  # [heads·W, 1, S]
    slot: torch.Tensor  # [P] slot of each patch

    @classmethod
    def of(cls, window_index: torch.Tensor, window_slot: torch.Tensor, heads: int,
           dtype: torch.dtype) -> "MaskedWindows":
        empty = window_index < 0
        bias = torch.where(empty, torch.finfo(dtype).min, torch.zeros((), dtype=dtype, device=window_index.device))
        bias = bias.unsqueeze(0).expand(heads, -1, -1).reshape(-1, 1, bias.shape[-1])
        return cls(window_index.clamp(min=0).reshape(-1), bias, window_slot)

    def attend(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               batch: torch.Tensor | int) -> torch.Tensor:
        heads = int(attn.num_heads)  # static
        head_dim = int(attn.qkv.in_features) // heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, P, d]
        slots = self.bias.shape[-1]
        q, k, v = (t.index_select(2, self.gather).reshape(batch, -1, slots, head_dim) for t in (q, k, v))
        out = _attend(attn, q, k, v, self.bias, scale)
        return out.reshape(batch, heads, -1, head_dim).index_select(2, self.slot).transpose(1, 2)


@dataclass(frozen=True)
class PackedWindows:
    """The GPU fast path's form: patches in window order (``order``; ``restore`` is its inverse), every window
    of every image one segment of ``cu_seqlens``, attended as packed variable-length segments with no mask. All
    of it comes from the host's layout on the device, without a host read (graph capture)."""

    order: torch.Tensor  # [P] the patch at each window-order position
    restore: torch.Tensor  # [P] the window-order position of each patch
    cu_seqlens: torch.Tensor  # [B·W + 1] int32
    max_seqlen: int

    @classmethod
    def of(cls, window_index: torch.Tensor, window_slot: torch.Tensor, batch: int) -> "PackedWindows":
        order = torch.argsort(window_slot)  # slots are unique and ascend in window order
        lengths = (window_index >= 0).sum(1).to(torch.int32).repeat(batch)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(order, torch.argsort(order), cu_seqlens, int(window_index.shape[1]))

    def attend(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               batch: torch.Tensor | int) -> torch.Tensor:
        packed = [t.reshape(-1, t.shape[2], t.shape[3]) for t in (q, k, v)]  # [B·P, heads, d]
        return varlen_attention(*packed, self.cu_seqlens, self.max_seqlen, scale=scale).reshape(q.shape)


def add_norm(norm: nn.Module, h: torch.Tensor, delta: torch.Tensor | None,
             fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, norm(h + delta)); ``delta`` None: (h, norm(h)). Fast: one Triton kernel where the norm is a
    known RMSNorm (:func:`apet.kernels.decoder_fused.add_rms_norm`, Hugging Face's arithmetic), else one-call
    RMSNorm; the graph form: the add and the module."""
    if fast:
        found = decoder_fused.rms_norm_of(norm)
        if found is not None and found[0].dtype == h.dtype and decoder_fused.available(h):
            return decoder_fused.add_rms_norm(h, found[0], found[1], delta)
    if delta is not None:
        h = h + delta
    return h, (rms_norm(norm, h) if fast else norm(h))


@torch.compiler.disable
def _build_aligned(mlp: nn.Module) -> None:
    """Build the padded MLP before torch.compile traces the tower (inside, it would break the graph)."""
    aligned_gated_mlp(mlp)


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

    def _attention(self, block: nn.Module, h: torch.Tensor, rotary: Rotary, window: Windows | None) -> torch.Tensor:
        """The block's attention on [B, P, C]: over the windows ``window`` forms, or over all P patches."""
        attn = block.attn
        batch, patches = h.shape[0], h.shape[1]
        dim, heads = int(attn.qkv.in_features), int(attn.num_heads)  # static
        head_dim = dim // heads
        q, k, v = rotary.qkv(attn.qkv(h).reshape(batch, patches, 3, heads, head_dim), h.dtype)  # [B, P, heads, d]
        if window is None:
            out = _attend(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, head_dim**-0.5)
            out = out.transpose(1, 2)
        else:
            out = window.attend(attn, q, k, v, head_dim**-0.5, batch)
        return attn.proj(out.reshape(batch, patches, dim))

    def prepare_fast(self) -> None:
        super().prepare_fast()
        for block in self._vit().blocks:
            if is_gated_mlp(block.mlp):  # Qwen3-VL's tower (this class's subclass) has a plain two-layer MLP
                _build_aligned(block.mlp)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
        """The block's gated MLP; fast: gate and up as one matmul with the width padded from 3,420 to 3,456
        (:mod:`apet.modeling.aligned_mlp`: the unpadded width kept cuBLAS on a 2-aligned sm80 kernel), and eagerly
        on a GPU silu(gate)·up as one Triton pass (:mod:`apet.kernels.activations`)."""
        if not fast:
            return mlp(x)
        fused = aligned_gated_mlp(mlp)
        gate_up = F.linear(x, fused.gate_up, fused.gate_up_bias)
        if activations.is_silu(mlp.act_fn) and activations.available(gate_up):
            hidden = activations.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(fused.padded, dim=-1)
            hidden = mlp.act_fn(gate) * up
        return F.linear(hidden, fused.down, fused.down_bias)

    def _blocks(self, h: torch.Tensor, rotary: Rotary, window: Windows, fast: bool) -> torch.Tensor:
        """Every ViT block on [B, P, C] (windowed or full attention, as the checkpoint lists them): each residual
        add and the norm after it are one step (one Triton kernel on the fast path, :func:`add_norm`)."""
        full = set(self.adapter.spec.extra["fullatt_block_indexes"])
        delta = None
        for i, block in enumerate(self._vit().blocks):
            h, x = add_norm(block.norm1, h, delta, fast)
            delta = self._attention(block, x, rotary, None if i in full else window)
            h, x = add_norm(block.norm2, h, delta, fast)
            delta = self._mlp(block.mlp, x, fast)
        return h + delta

    def features(self, pixel_values: torch.Tensor, patch_positions: torch.Tensor, window_index: torch.Tensor,
                 window_slot: torch.Tensor) -> torch.Tensor:
        """[B, P, 1176] patches of B same-grid images -> merged tokens [B, P/4, H_llm].

        The GPU fast path (:func:`~apet.modeling.fast_path.fast_tower`) permutes the patches to window order
        once, runs the window blocks as packed segments and permutes back before the merger; the graph keeps
        merge-block order and gathers each window block's q/k/v (module docstring)."""
        vit = self._vit()
        dtype = self.adapter.dtype
        weight = vit.patch_embed.proj.weight  # Conv3d with stride = kernel: a linear map of each patch
        h = pixel_values.to(dtype) @ weight.reshape(weight.shape[0], -1).t()
        cos, sin = self._rotary(patch_positions)
        heads = int(vit.blocks[0].attn.num_heads)
        packed = PackedWindows.of(window_index, window_slot, h.shape[0]) if fast_tower(h) else None
        if packed is not None:
            h, cos, sin = h.index_select(1, packed.order), cos[packed.order], sin[packed.order]
        window = packed or MaskedWindows.of(window_index, window_slot, heads, dtype)
        h = self._blocks(h, Rotary.of(cos, sin, packed is not None), window, packed is not None)
        if packed is not None:
            h = h.index_select(1, packed.restore)
        merger = vit.merger
        batch = h.shape[0]
        x = add_norm(merger.ln_q, h, None, packed is not None)[1]
        return merger.mlp(x.reshape(batch, -1, merger.hidden_size))

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

"""Independent references for Qwen2.5-VL built only from Hugging Face pieces (no apet code):
``Qwen2VLImageProcessorPil``, the tokenizer's chat template, ``get_rope_index``, the model's own ViT,
``generate``; and the authors' stage 1 restated in float64 (:func:`authors_reference.qwen_stage1`).

* :func:`hf_generate` — plain greedy ``generate`` with ``mm_token_type_ids`` (3-D positions);
* :func:`hf_compressed_generate` — the authors' pipeline: full-sequence M-RoPE positions from
  ``get_rope_index``, ApET stage 1 on the merger's output (``int(r·n)``, blend), dropped image tokens
  removed from ids and positions (gathered, not renumbered), then ``generate`` with those positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from authors_reference import qwen_stage1

MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 2048 * 28 * 28  # the authors' evaluation bounds


@dataclass
class HfBatch:
    input_ids: torch.Tensor  # [B, L] left-padded, every image token present
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    image_token_id: int

    @property
    def mm_token_type_ids(self) -> torch.Tensor:
        return (self.input_ids == self.image_token_id).to(torch.int64)


def hf_batch(adapter, images: list, prompts: list[str], min_pixels: int = MIN_PIXELS,
             image_processor=None) -> HfBatch:
    """Ids, mask and patches as Hugging Face's processor makes them (``image_processor``: one of the
    checkpoint's own; default the authors' evaluation range)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(adapter.source_dir)
    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=MAX_PIXELS)
    processed = image_processor(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"]
    rows = []
    for grid, prompt in zip(grids, prompts):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * int(grid.prod() // 4))).input_ids)
    longest = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return HfBatch(ids, mask, processed["pixel_values"], grids, adapter.model.config.image_token_id)


def _strip(out: torch.Tensor, prompt_length: int, eos: tuple[int, ...]) -> list[list[int]]:
    """New tokens per row, cut before the first EOS (apet-run does not return it)."""
    rows = []
    for row in out[:, prompt_length:].tolist():
        stops = [row.index(e) for e in eos if e in row]
        rows.append(row[: min(stops)] if stops else row)
    return rows


def hf_generate(adapter, images: list, prompts: list[str], new_tokens: int,
                with_token_types: bool = True) -> list[list[int]]:
    batch = hf_batch(adapter, images, prompts)
    extra = {"mm_token_type_ids": batch.mm_token_type_ids} if with_token_types else {}
    with torch.no_grad():
        out = adapter.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                     do_sample=False, max_new_tokens=new_tokens, **extra)
    return _strip(out, batch.input_ids.shape[1], adapter.spec.eos_token_ids)


def merged_tokens(adapter, batch: HfBatch) -> list[torch.Tensor]:
    """The patch merger's output per image (Hugging Face's ViT)."""
    with torch.no_grad():
        merged = adapter.model.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output
    sizes = (batch.image_grid_thw.prod(-1) // 4).tolist()
    return list(merged.split(sizes))


@dataclass
class Compressed:
    tokens: list[torch.Tensor]  # kept rows per image (float32)
    kept: list[torch.Tensor]  # kept merged-token indices per image, ascending
    full_positions: torch.Tensor  # get_rope_index of the uncompressed batch [3, B, L]
    input_ids: torch.Tensor  # compressed, left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # full positions gathered at the kept tokens [3, B, L']


def compress_like_authors(adapter, batch: HfBatch, ratio: float, basis: int = 10) -> Compressed:
    full_positions, _ = adapter.model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                                           image_grid_thw=batch.image_grid_thw,
                                                           attention_mask=batch.attention_mask)
    tokens, kept = [], []
    for merged in merged_tokens(adapter, batch):
        n = merged.shape[0]
        values, index = qwen_stage1(merged, keep=max(basis + 1, int(ratio * n)), k=basis)
        tokens.append(values.to(merged.dtype))
        kept.append(index)
    return Compressed(tokens, kept, full_positions,
                      *gathered_prompts(batch, full_positions, kept, adapter.spec.pad_token_id or 0))


def gathered_prompts(batch: HfBatch, full_positions: torch.Tensor, kept: list[torch.Tensor],
                     pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, positions [3, B, L']) of the batch with only the ``kept`` image tokens of each row, positions
    get_rope_index's of the full prompt gathered (not renumbered), left-padded again."""
    rows = []
    for b, index in enumerate(kept):
        real = batch.attention_mask[b].bool()
        ids, positions = batch.input_ids[b][real], full_positions[:, b][:, real]
        image = (ids == batch.image_token_id).nonzero()[:, 0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[image] = False
        keep[image[torch.as_tensor(index)]] = True
        rows.append((ids[keep], positions[:, keep]))
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    position_ids = torch.zeros((3, len(rows), longest), dtype=torch.long)
    for b, (ids, positions) in enumerate(rows):
        input_ids[b, longest - len(ids):] = ids
        mask[b, longest - len(ids):] = 1
        position_ids[:, b, longest - len(ids):] = positions
    return input_ids, mask, position_ids


def hf_compressed_generate(adapter, images: list, prompts: list[str], ratio: float,
                           new_tokens: int) -> tuple[list[list[int]], Compressed]:
    """Greedy ``generate`` of the authors' compressed pipeline (see the module docstring)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    batch = hf_batch(adapter, images, prompts)
    done = compress_like_authors(adapter, batch, ratio)
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=done.tokens)}  # generate's pre-encoded media
    with torch.no_grad():
        out = adapter.model.generate(input_ids=done.input_ids, attention_mask=done.attention_mask,
                                     position_ids=done.position_ids, mm_encoder_outputs=encoded,
                                     image_grid_thw=batch.image_grid_thw, do_sample=False, max_new_tokens=new_tokens)
    return _strip(out, done.input_ids.shape[1], adapter.spec.eos_token_ids), done

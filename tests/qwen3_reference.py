"""Independent references for Qwen3-VL built from Hugging Face pieces and the float64 oracle only (no apet code):
``Qwen2VLImageProcessorPil`` with the checkpoint's own processor settings, the tokenizer's chat template,
``get_rope_index``, the model's ViT (merger output and DeepStack features), ``generate``.

* :func:`hf_generate` — plain greedy ``generate`` with ``mm_token_type_ids`` (3-D positions);
* :func:`hf_compressed_generate` — our rule (docs/algorithm.md) on Hugging Face modules: ApET's selection and
  merge from the float64 oracle (:func:`numpy_reference.compress_weights`) on the merger's output, the same
  weights applied to every DeepStack level (``merge``) or its kept rows taken (``gather``), dropped image tokens
  removed from ids and from get_rope_index's full-sequence positions (gathered), then ``generate`` with those
  pre-encoded features (``mm_encoder_outputs``: Hugging Face's own splice and ``_deepstack_process``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy_reference import compress_weights
from qwen_reference import HfBatch, _strip, gathered_prompts
from qwen_reference import hf_batch as qwen_hf_batch


def image_processor(checkpoint: Path):
    """Hugging Face's Qwen2-VL image processor with the checkpoint's saved settings (16-px patches, its range)."""
    from transformers import Qwen2VLImageProcessorPil

    settings = json.loads((Path(checkpoint) / "processor_config.json").read_text())["image_processor"]
    return Qwen2VLImageProcessorPil(**{k: v for k, v in settings.items() if k != "image_processor_type"})


def hf_batch(adapter, images: list, prompts: list[str]) -> HfBatch:
    return qwen_hf_batch(adapter, images, prompts, image_processor=image_processor(adapter.source_dir))


def hf_generate(adapter, images: list, prompts: list[str], new_tokens: int) -> list[list[int]]:
    batch = hf_batch(adapter, images, prompts)
    with torch.no_grad():
        out = adapter.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                     mm_token_type_ids=batch.mm_token_type_ids, do_sample=False,
                                     max_new_tokens=new_tokens)
    return _strip(out, batch.input_ids.shape[1], adapter.spec.eos_token_ids)


def vision_outputs(adapter, batch: HfBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the merger's output [n, H] and the DeepStack levels [L, n, H] (Hugging Face's ViT)."""
    with torch.no_grad():
        out = adapter.model.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw)
    sizes = (batch.image_grid_thw.prod(-1) // 4).tolist()
    levels = torch.stack(list(out.deepstack_features))  # [L, total, H]
    return list(out.pooler_output.split(sizes)), list(levels.split(sizes, dim=1))


@dataclass
class Compressed:
    tokens: list[torch.Tensor]  # kept rows per image [K, H] (float32)
    levels: list[torch.Tensor]  # DeepStack levels' kept rows per image [L, K, H]
    kept: list[np.ndarray]  # kept merged-token indices per image, ascending
    input_ids: torch.Tensor  # compressed, left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # full positions gathered at the kept tokens [3, B, L']


def compress_with_oracle(adapter, batch: HfBatch, ratio: float, deepstack: str = "merge",
                         basis: int = 10) -> Compressed:
    full_positions, _ = adapter.model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                                           image_grid_thw=batch.image_grid_thw,
                                                           attention_mask=batch.attention_mask)
    tokens, levels, kept = [], [], []
    for merged, stack in zip(*vision_outputs(adapter, batch)):
        n = merged.shape[0]
        weights, index = compress_weights(merged.double().numpy(), max(basis + 1, int(ratio * n)), basis)
        tokens.append(torch.from_numpy(weights @ merged.double().numpy()).float())
        if deepstack == "merge":
            levels.append(torch.from_numpy(weights @ stack.double().numpy()).float())
        else:
            levels.append(stack[:, index])
        kept.append(index)
    return Compressed(tokens, levels, kept,
                      *gathered_prompts(batch, full_positions, kept, adapter.spec.pad_token_id or 0))


def hf_compressed_generate(adapter, images: list, prompts: list[str], ratio: float, new_tokens: int,
                           deepstack: str = "merge") -> tuple[list[list[int]], Compressed]:
    """Greedy ``generate`` of the compressed pipeline (see the module docstring)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    batch = hf_batch(adapter, images, prompts)
    done = compress_with_oracle(adapter, batch, ratio, deepstack)
    levels = len(done.levels[0])
    encoded = {"image": BaseModelOutputWithDeepstackFeatures(
        pooler_output=done.tokens, deepstack_features=[[stack[i] for stack in done.levels] for i in range(levels)])}
    with torch.no_grad():
        out = adapter.model.generate(input_ids=done.input_ids, attention_mask=done.attention_mask,
                                     position_ids=done.position_ids, mm_encoder_outputs=encoded,
                                     image_grid_thw=batch.image_grid_thw, do_sample=False, max_new_tokens=new_tokens)
    return _strip(out, done.input_ids.shape[1], adapter.spec.eos_token_ids), done

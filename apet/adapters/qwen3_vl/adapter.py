"""Adapter for Hugging Face ``Qwen3VLForConditionalGeneration`` (ViT with learned + 2-D rotary positions, 2x2 merger
and DeepStack mergers + a Qwen3 LLM: q/k RMSNorm, interleaved M-RoPE, tied embeddings in the 2B/4B checkpoints).

Loading, the language modules and the pixel range are Qwen2.5-VL's (:class:`QwenAdapter`); what differs is the
recipe (16-px patches, the checkpoint's pixel range by default), the decoder facts (q/k norm, one injected input per
DeepStack level) and the rotary tables, which interleave the temporal, height and width frequencies.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apet.adapters.qwen2_5_vl.adapter import QwenAdapter
from apet.contracts.specs import DecoderSpec
from apet.errors import UsageError
from apet.modeling.adapter import describe_decoder
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, processor_settings
from apet.models.qwen3_vl.family import DEEPSTACK_FLAG, DEEPSTACK_MODES
from apet.models.qwen3_vl.recipe import qwen3_recipe
from apet.models.qwen3_vl.templates import PROMPT_TEMPLATES, prompt_template

log = logging.getLogger(__name__)

FAMILY = "qwen3_vl"
HF_MROPE_SECTION = (24, 20, 20)  # Qwen3VLTextRotaryEmbedding's default
TENSORRT_TOPK = 3840  # the largest K TensorRT's TopK layer takes (ApET's ranking is a TopK of K)


def decoder_spec(text: Any, injected_layers: int) -> DecoderSpec:
    """The LLM's facts: 3-D positions, and one injected input per DeepStack level (q/k norm: the seam reads it
    from the checkpoint's layers)."""
    return describe_decoder(text, position_rank=3, injected_layers=injected_layers, qk_norm=True)


def interleaved_axes(frequencies: int, section: tuple[int, ...] | list[int]) -> list[int]:
    """Which position (0 temporal, 1 height, 2 width) rotates each frequency: Hugging Face's interleaved M-RoPE
    takes frequency j from the height for j % 3 == 1 and j < 3·section[1], from the width for j % 3 == 2 and
    j < 3·section[2], from the temporal position otherwise."""
    axes = []
    for j in range(frequencies):
        if j % 3 == 1 and j < 3 * section[1]:
            axes.append(1)
        elif j % 3 == 2 and j < 3 * section[2]:
            axes.append(2)
        else:
            axes.append(0)
    return axes


class Qwen3Adapter(QwenAdapter):
    family = FAMILY
    prompt_templates = PROMPT_TEMPLATES
    model_class = "Qwen3VLForConditionalGeneration"
    checkpoint_name = "Qwen3-VL"

    read_prompt_template = staticmethod(prompt_template)
    default_mrope_section = HF_MROPE_SECTION
    no_processor_files = "uses the published Qwen3-VL range"

    @classmethod
    def image_recipe(cls, config: Any, source_dir: Path | None, pixel_range: str | None = None,
                     source: str = "the checkpoint") -> QwenImageRecipe:
        """No window attention; the checkpoint's own range by default (there is no authors' range)."""
        settings = processor_settings(source_dir)
        if pixel_range is None:
            return qwen3_recipe(settings, source=source)
        return qwen3_recipe(settings, pixel_range, source=source)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        return decoder_spec(config.text_config, len(config.vision_config.deepstack_visual_indexes))

    @classmethod
    def family_extra(cls, config: Any) -> dict[str, Any]:
        return {"deepstack_visual_indexes": [int(i) for i in config.vision_config.deepstack_visual_indexes],
                "deepstack": DEEPSTACK_MODES[0]}

    def set_deepstack(self, mode: str) -> None:
        """``--deepstack merge|gather``: how the vision graph forms the DeepStack levels' kept rows (manifest
        ``model.extra.deepstack``)."""
        if mode not in DEEPSTACK_MODES:
            raise UsageError(f"{DEEPSTACK_FLAG} {mode!r} is unknown", f"use one of {', '.join(DEEPSTACK_MODES)}")
        self.spec = replace(self.spec, extra={**self.spec.extra, "deepstack": mode})

    def fit_budget(self, plan: Any) -> None:
        """As Qwen2.5-VL (a fixed K raises min_pixels); and a warning when the largest image's K exceeds what
        TensorRT's TopK takes (the checkpoint's range reaches 16,384 tokens: K = 4,915 at --ratio 0.3)."""
        super().fit_budget(plan)
        stage1 = plan.stage1
        if stage1.keep > TENSORRT_TOPK:
            fits = max((n for n in range(stage1.max_tokens + 1) if stage1.keep_for(n) <= TENSORRT_TOPK), default=0)
            log.warning("the largest image keeps %d tokens, above TensorRT's TopK limit of %d: engines fail on images "
                        "above %d merged tokens; pass --pixel-range %d:%d to stay within it (ONNX Runtime and torch "
                        "are not limited)", stage1.keep, TENSORRT_TOPK, fits, self.recipe().min_tokens, fits)

    def recipe(self) -> QwenImageRecipe:
        return QwenImageRecipe.from_json(self.spec.processor)

    # -- language ----------------------------------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleaved M-RoPE tables [B, T, head_dim] for positions [3, B, T], as ``Qwen3VLTextRotaryEmbedding``
        computes them (bit for bit), written as a constant one-hot choice of each frequency's position instead of
        the strided in-place copy of the Hugging Face module, so the graph has no ScatterND."""
        module = self._language_model().rotary_emb
        inv_freq = module.inv_freq.to(device=hidden.device, dtype=torch.float32)
        choice = self._axis_choice(int(inv_freq.shape[0]), hidden.device)  # [3, d/2]
        positions = position_ids.expand(3, -1, -1).to(torch.float32).unsqueeze(-1)  # [3, B, T, 1]
        freqs = (positions * choice[:, None, None, :]).sum(0) * inv_freq  # [B, T, d/2]
        scale = float(getattr(module, "attention_scaling", 1.0))
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scale).to(hidden.dtype), (emb.sin() * scale).to(hidden.dtype)

    def _axis_choice(self, frequencies: int, device: torch.device) -> torch.Tensor:
        """Which of (t, h, w) each frequency rotates by, one-hot [3, d/2], made once per device: a host-to-device
        copy is not allowed while the static decoder's steps are captured as CUDA graphs."""
        cache = self.__dict__.setdefault("_axis_choices", {})
        key = (frequencies, str(device))
        if key not in cache:
            axes = torch.tensor(interleaved_axes(frequencies, self.spec.extra["mrope_section"]), device=device)
            cache[key] = (axes == torch.arange(3, device=device).unsqueeze(-1)).to(torch.float32)
        return cache[key]

    def hf_position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        return self._language_model().rotary_emb(hidden, position_ids)

"""The adapter protocol: everything generic code may ask of a vision-language model family.

Export, engines and runtime only see :class:`VisionLanguageAdapter` and the
plain-data specs below; each model family implements the protocol in one
file of :mod:`apet.models`. The language model must be a Llama-style decoder
(RMSNorm, rotary attention with optional GQA and q/k/v bias, gated MLP), which
covers Vicuna/Llama, Mistral and Qwen2 language towers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class DecoderSpec:
    """Static shape facts of the language model (written to the manifest)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    hidden_act: str = "silu"


@dataclass(frozen=True)
class ProcessorSpec:
    """How an image becomes ``pixel_values`` (the CLIP recipe: [pad to square,] resize, centre crop, rescale,
    normalise). ``image_fit`` is ``pad`` (the original LLaVA-1.5's ``image_aspect_ratio: pad``: the image is
    first padded to a square with the mean colour, so nothing is cut off) or ``crop`` (Hugging Face's CLIP
    processor: shortest edge resized, centre cropped)."""

    crop_height: int
    crop_width: int
    shortest_edge: int
    resample: int  # PIL resampling filter id (3 = bicubic)
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_center_crop: bool = True
    image_fit: str = "crop"


@dataclass(frozen=True)
class ModelSpec:
    """What the manifest records about the source model."""

    family: str
    source: str
    n_tokens: int  # visual tokens per image before compression
    patch_grid: tuple[int, int]
    vision_dim: int
    image_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    prompt_template: str  # contains "{prompt}" and exactly one image placeholder
    image_placeholder: str
    decoder: DecoderSpec
    processor: ProcessorSpec
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_template_name: str = "custom"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class VisionLanguageAdapter(ABC):
    """One model family. Subclasses register themselves in :mod:`apet.models.registry`."""

    family: ClassVar[str]
    prompt_templates: ClassVar[dict[str, str]] = {}  # named templates a user may pick with --prompt-template
    image_fits: ClassVar[tuple[str, ...]] = ("pad", "crop")

    def __init__(self, model: nn.Module, spec: ModelSpec, source_dir: Path | None) -> None:
        self.model = model
        self.spec = spec
        self.source_dir = source_dir

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, path: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "VisionLanguageAdapter":
        """Load a local checkpoint directory (safetensors only)."""

    @classmethod
    @abstractmethod
    def random_init(cls, config: Any, *, dtype: torch.dtype, device: str) -> "VisionLanguageAdapter":
        """A randomly initialised model with the given HF config (shape-only benchmarks, full-size proofs)."""

    # -- vision side -------------------------------------------------------------------------------
    @abstractmethod
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, D_vision]: the select layer's patch tokens, CLS removed."""

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K, D_vision] -> [B, K, H_llm]; per token, so it may run after compression."""

    # -- language side -----------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self) -> Sequence[nn.Module]:
        """Llama-style decoder layers (input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp)."""

    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @abstractmethod
    def lm_head(self) -> nn.Linear: ...

    @abstractmethod
    def embed_tokens(self) -> nn.Embedding: ...

    @abstractmethod
    def rotary_embedding(self) -> nn.Module:
        """The HF rotary module: ``inv_freq`` buffer and ``attention_scaling``; called as (x, position_ids)."""

    # -- text side ---------------------------------------------------------------------------------
    @abstractmethod
    def save_text_assets(self, out_dir: Path) -> list[str]:
        """Write tokenizer/processor files into ``out_dir``; returns the relative paths written."""

    def customize(self, *, image_fit: str | None = None, prompt_template: str | None = None) -> None:
        """Apply the user's ``--image-fit`` / ``--prompt-template`` (None keeps the family default)."""
        from dataclasses import replace

        from apet.errors import UsageError

        if image_fit is not None:
            if image_fit not in self.image_fits:
                raise UsageError(f"--image-fit {image_fit!r} is not available for {self.family}",
                                 f"use one of {', '.join(self.image_fits)}")
            self.spec = replace(self.spec, processor=replace(self.spec.processor, image_fit=image_fit))
        if prompt_template is not None:
            if prompt_template not in self.prompt_templates:
                raise UsageError(f"--prompt-template {prompt_template!r} is unknown for {self.family}",
                                 f"use one of {', '.join(self.prompt_templates)}")
            self.spec = replace(self.spec, prompt_template=self.prompt_templates[prompt_template],
                                prompt_template_name=prompt_template)

    def format_prompt(self, user_text: str) -> str:
        return self.spec.prompt_template.format(prompt=user_text)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

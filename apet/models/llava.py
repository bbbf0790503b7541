"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP ViT + MLP projector + Llama)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from apet.errors import ArtifactError, UsageError
from apet.models.base import DecoderSpec, ModelSpec, ProcessorSpec, VisionLanguageAdapter

log = logging.getLogger(__name__)

# Named prompt templates. ``vicuna_v1`` is the conversation the original LLaVA-1.5 was trained and evaluated
# with (llava/conversation.py ``conv_vicuna_v1``: system sentence, ``USER: <image>\n{q} ASSISTANT:``), the
# authors' evaluation prompt and our default; ``hf`` is the shorter one of the Hugging Face model cards.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PROMPT_TEMPLATES = {
    "vicuna_v1": VICUNA_V1_SYSTEM + " USER: <image>\n{prompt} ASSISTANT:",
    "hf": "USER: <image>\n{prompt} ASSISTANT:",
}
DEFAULT_TEMPLATE = "vicuna_v1"
DEFAULT_IMAGE_FIT = "pad"  # the original LLaVA-1.5's image_aspect_ratio
TEXT_ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                    "generation_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}", "check that the checkpoint directory is complete") from exc


def processor_spec_from_dir(path: Path | None, image_size: int) -> ProcessorSpec:
    """The CLIP image-processor settings of a checkpoint (either file layout transformers writes);
    CLIP defaults at ``image_size`` when there is no checkpoint directory (random-init models)."""
    settings: dict[str, Any] = {}
    if path is not None and (path / "preprocessor_config.json").is_file():
        settings = _read_json(path / "preprocessor_config.json")
    elif path is not None and (path / "processor_config.json").is_file():
        settings = _read_json(path / "processor_config.json").get("image_processor", {})
    size = settings.get("size", {"shortest_edge": image_size})
    crop = settings.get("crop_size", {"height": image_size, "width": image_size})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    shortest = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else int(size)
    return ProcessorSpec(
        crop_height=int(crop["height"]), crop_width=int(crop["width"]), shortest_edge=int(shortest),
        resample=int(settings.get("resample", 3)), rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
        image_mean=tuple(settings.get("image_mean", [0.48145466, 0.4578275, 0.40821073])),
        image_std=tuple(settings.get("image_std", [0.26862954, 0.26130258, 0.27577711])),
        do_center_crop=bool(settings.get("do_center_crop", True)), image_fit=DEFAULT_IMAGE_FIT,
    )


def _takes_causal_mask(layer: nn.Module) -> bool:
    """Older transformers' CLIP encoder layers require a positional causal_attention_mask."""
    import inspect

    return "causal_attention_mask" in inspect.signature(layer.forward).parameters


class LlavaAdapter(VisionLanguageAdapter):
    family = "llava"
    prompt_templates = PROMPT_TEMPLATES

    @classmethod
    def load(cls, path: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "LlavaAdapter":
        from transformers import LlavaForConditionalGeneration

        path = Path(path)
        config = _read_json(path / "config.json")
        if config.get("model_type") != "llava":
            raise UsageError(f"{path} holds a {config.get('model_type')!r} checkpoint, not LLaVA",
                             "pass a LLaVA-1.5 checkpoint directory (config.json model_type 'llava')")
        if not list(path.glob("*.safetensors")):
            raise ArtifactError(f"{path} has no .safetensors weights",
                                "convert the checkpoint to safetensors; pickled weights are never loaded")
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True)
        return cls._wrap(model.to(device).eval(), source=str(path), source_dir=path)

    @classmethod
    def random_init(cls, config: Any, *, dtype: torch.dtype, device: str) -> "LlavaAdapter":
        from transformers import LlavaForConditionalGeneration

        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        return cls._wrap(model.eval(), source="random-init", source_dir=None)

    @classmethod
    def _wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "LlavaAdapter":
        config = model.config
        strategy = config.vision_feature_select_strategy
        layer = config.vision_feature_layer
        if strategy not in ("default", "full") or not isinstance(layer, int):
            raise UsageError(f"LLaVA vision_feature_select_strategy={strategy!r} / layer={layer!r} is unsupported",
                             "LLaVA-1.5 checkpoints use a single feature layer with 'default' or 'full'")
        vision, text = config.vision_config, config.text_config
        grid = vision.image_size // vision.patch_size
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        decoder = DecoderSpec(
            num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads or text.num_attention_heads, head_dim=head_dim,
            intermediate_size=text.intermediate_size, vocab_size=text.vocab_size, rms_norm_eps=text.rms_norm_eps,
            max_positions=text.max_position_embeddings, hidden_act=text.hidden_act,
        )
        eos = text.eos_token_id if text.eos_token_id is not None else 2
        processor = processor_spec_from_dir(source_dir, vision.image_size)
        spec = ModelSpec(
            family=cls.family, source=source, n_tokens=grid * grid + (1 if strategy == "full" else 0),
            patch_grid=(grid, grid), vision_dim=vision.hidden_size, image_token_id=int(config.image_token_index),
            bos_token_id=text.bos_token_id, eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
            pad_token_id=text.pad_token_id, prompt_template=PROMPT_TEMPLATES[DEFAULT_TEMPLATE],
            prompt_template_name=DEFAULT_TEMPLATE, image_placeholder="<image>",
            decoder=decoder, processor=processor,
            extra={"vision_feature_layer": layer, "vision_feature_select_strategy": strategy},
        )
        return cls(model, spec, source_dir)

    # -- vision ------------------------------------------------------------------------------------
    def _tower(self) -> nn.Module:
        tower = self.model.model.vision_tower if hasattr(self.model, "model") else self.model.vision_tower
        return getattr(tower, "vision_model", tower)  # older transformers wrap CLIPVisionTransformer

    def _projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector if hasattr(self.model, "model") else \
            self.model.multi_modal_projector

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run only the encoder layers the select layer needs (LLaVA-1.5 skips the last one)."""
        tower = self._tower()
        layers = tower.encoder.layers
        select = self.spec.extra["vision_feature_layer"]
        depth = select if select >= 0 else len(layers) + 1 + select
        hidden = tower.embeddings(pixel_values.to(self.dtype))
        hidden = tower.pre_layrnorm(hidden)
        extra = {"causal_attention_mask": None} if _takes_causal_mask(layers[0]) else {}
        for layer in layers[:depth]:
            out = layer(hidden, None, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.spec.extra["vision_feature_select_strategy"] == "default":
            hidden = hidden[:, 1:]
        return hidden

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self._projector()(features)

    # -- language ----------------------------------------------------------------------------------
    def _language_model(self) -> nn.Module:
        return self.model.model.language_model if hasattr(self.model, "model") else self.model.language_model.model

    def decoder_layers(self) -> Sequence[nn.Module]:
        return list(self._language_model().layers)

    def final_norm(self) -> nn.Module:
        return self._language_model().norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head if hasattr(self.model, "lm_head") else self.model.language_model.lm_head

    def embed_tokens(self) -> nn.Embedding:
        return self._language_model().embed_tokens

    def rotary_embedding(self) -> nn.Module:
        return self._language_model().rotary_emb

    # -- text assets -------------------------------------------------------------------------------
    def save_text_assets(self, out_dir: Path) -> list[str]:
        if self.source_dir is None:
            return []
        written = []
        for name in TEXT_ASSET_FILES:
            src = self.source_dir / name
            if src.is_file():
                shutil.copy2(src, out_dir / name)
                written.append(name)
        if "tokenizer.json" not in written:
            raise ArtifactError(f"{self.source_dir} has no tokenizer.json",
                                "save the tokenizer with a fast tokenizer (tokenizer.save_pretrained) first")
        return written

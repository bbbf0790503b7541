"""Resolve ``--model`` (alias, local directory, hub id, ``tiny``, ``*-shapes``) to an adapter."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apet.errors import UsageError
from apet.models.base import VisionLanguageAdapter
from apet.models.llava import LlavaAdapter

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[VisionLanguageAdapter]] = {"llava": LlavaAdapter}
ALIASES = {"llava": "llava-hf/llava-1.5-7b-hf", "llava-13b": "llava-hf/llava-1.5-13b-hf"}
SHAPES = ("llava-shapes", "llava-13b-shapes")


def _family_of(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"{path} is not a checkpoint directory (no config.json)",
                         "pass a directory saved with save_pretrained, an alias (tiny, llava, llava-13b) or a hub id")
    model_type = json.loads(config.read_text()).get("model_type", "")
    if model_type not in ADAPTERS:
        raise UsageError(f"model family {model_type!r} in {path} is not supported",
                         f"supported families: {', '.join(ADAPTERS)}")
    return model_type


def _from_hub_cache(repo_id: str, option: str = "--model") -> Path:
    """A hub id resolves only from the local HF cache: the tool never downloads at run time."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:
        raise UsageError(
            f"cannot load {repo_id!r}: it is not a local directory and not in the Hugging Face cache "
            f"({type(exc).__name__})",
            f"download it where you have network (huggingface-cli download {repo_id} --local-dir DIR) "
            f"and pass {'--model' if option == '--model' else '--checkpoint'} DIR",
        ) from exc


def resolve_checkpoint(model: str, option: str = "--model") -> Path:
    """The local checkpoint directory ``model`` names (creating the tiny one on demand); errors name
    ``option``, the command-line option the value came from."""
    if model == "tiny":
        from apet.models.tiny import ensure_tiny_llava

        return ensure_tiny_llava()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    repo_id = ALIASES.get(model, model)
    if repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~")):
        return _from_hub_cache(repo_id, option)
    known = ", ".join(["tiny", *ALIASES, *SHAPES])
    raise UsageError(f"{option} {model!r} is neither a known alias nor an existing directory",
                     f"use one of {known}, a local checkpoint directory or an org/name hub id")


def load_adapter(model: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 option: str = "--model") -> VisionLanguageAdapter:
    """Load the adapter for ``model`` (see :func:`resolve_checkpoint`; ``*-shapes`` builds random weights)."""
    if model in SHAPES:
        return LlavaAdapter.random_init(shapes_config(model), dtype=dtype, device=device)
    path = resolve_checkpoint(model, option)
    adapter = ADAPTERS[_family_of(path)].load(path, dtype=dtype, device=device)
    if model in ALIASES or model == "tiny":
        adapter.spec = replace(adapter.spec, source=ALIASES.get(model, model))
    return adapter


def shapes_config(name: str) -> Any:
    """LLaVA-1.5-7B/13B architecture configs (CLIP ViT-L/14-336 + 2-layer MLP + Vicuna)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    big = name == "llava-13b-shapes"
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=5120 if big else 4096, intermediate_size=13824 if big else 11008,
                       num_hidden_layers=40 if big else 32, num_attention_heads=40 if big else 32,
                       num_key_value_heads=40 if big else 32, vocab_size=32064, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=576)

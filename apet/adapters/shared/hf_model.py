"""Adapters over one transformers model class: load a checkpoint directory (safetensors only, checked model type)
or random-initialise a config (the ``*-shapes`` models), then ``wrap`` the model — the only family-specific part.
The language side is found where transformers 5 puts it (``model.model.language_model``, ``model.lm_head``); a
family overrides what its checkpoints keep elsewhere."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from apet.errors import UsageError
from apet.modeling.adapter import VisionLanguageAdapter
from apet.models.shared.hf_files import copy_text_assets, read_json, require_safetensors

RANDOM_INIT_SEED = 0


class HfCheckpointAdapter(VisionLanguageAdapter):
    model_class: ClassVar[str]  # the transformers class name
    checkpoint_name: ClassVar[str | None] = None  # how messages name the checkpoint kind (default: the family)

    @classmethod
    def load(cls, path: Path, *, dtype: torch.dtype | None = None, device: str = "cpu") -> "HfCheckpointAdapter":
        import transformers

        path = Path(path)
        model_type = read_json(path / "config.json").get("model_type")
        if model_type != cls.family.replace("-", "_"):
            raise UsageError(f"{path} holds a {model_type!r} checkpoint, not {cls.family}",
                             f"pass a {cls.checkpoint_name or cls.family} checkpoint directory")
        require_safetensors(path)
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype or torch.float32,
                                                                           use_safetensors=True)
        return cls.wrap(model.to(device).eval(), source=str(path), source_dir=path)

    @classmethod
    def random_init(cls, config: Any, *, dtype: torch.dtype | None, device: str,
                    seed: int = RANDOM_INIT_SEED) -> "HfCheckpointAdapter":
        """Seeded, so two processes get the same weights (runs on one ``*-shapes`` model are comparable token for
        token) without touching the caller's random state."""
        import transformers

        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            model = getattr(transformers, cls.model_class)._from_config(config, dtype=dtype or torch.float32)
        return cls.wrap(model.eval(), source="random-init", source_dir=None)

    @classmethod
    @abstractmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "HfCheckpointAdapter": ...

    # -- language side (transformers 5's layout) -------------------------------------------------------
    def _inner(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "model") else self.model

    def _language_model(self) -> nn.Module:
        inner = self._inner()
        return inner.language_model if hasattr(inner, "language_model") else inner

    def decoder_layers(self) -> Sequence[nn.Module]:
        return list(self._language_model().layers)

    def final_norm(self) -> nn.Module:
        return self._language_model().norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def embed_tokens(self) -> nn.Embedding:
        return self._language_model().embed_tokens

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._language_model().rotary_emb(hidden, position_ids)

    # -- text assets -------------------------------------------------------------------------------------
    def save_text_assets(self, out_dir: Path) -> list[str]:
        return copy_text_assets(self.source_dir, out_dir)

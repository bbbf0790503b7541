"""The torch half of a model family: a loaded checkpoint and the modules generic code may ask for.

The language model must be a Llama-style decoder (RMSNorm, rotary attention with optional GQA, q/k/v bias and
per-head q/k RMSNorm, gated MLP), which covers Vicuna/Llama, Mistral, Qwen2 and Qwen3 language towers; the one
layer both export and the GPU path compute is :mod:`apet.modeling.decoder_block`. What
differs on the vision side is not asked of the adapter by generic code: the family builds its
vision graph (:class:`VisionStages`) from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from apet.contracts.specs import ModelSpec
from apet.errors import UsageError
from apet.modeling.decoder_block import has_qk_norm


class VisionLanguageAdapter(ABC):
    """One loaded model of a family (see :mod:`apet.models.family` for the family itself)."""

    family: ClassVar[str]
    prompt_templates: ClassVar[dict[str, str]] = {}  # named templates a user may pick with --prompt-template

    def __init__(self, model: nn.Module, spec: ModelSpec, source_dir: Path | None) -> None:
        self.model = model
        self.source_dir = source_dir
        self.spec = spec
        layers = self.decoder_layers()
        if layers:  # q/k norms are what the checkpoint's layers have (the manifest records it)
            self.spec = replace(spec, decoder=replace(spec.decoder, qk_norm=has_qk_norm(layers[0])))

    # -- language side -----------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self) -> Sequence[nn.Module]:
        """Llama-style decoder layers (input_layernorm, self_attn.{q,k,v,o}_proj [, self_attn.{q,k}_norm],
        post_attention_layernorm, mlp), computed by :class:`apet.modeling.decoder_block.DecoderBlock`."""

    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @abstractmethod
    def lm_head(self) -> nn.Linear:
        """The output projection; with tied embeddings its weight is the embedding table's."""

    @abstractmethod
    def embed_tokens(self) -> nn.Embedding: ...

    @abstractmethod
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, head_dim] for ``position_ids`` ([B, T], or [3, B, T] for M-RoPE families): the
        family's rotary variant (1-D, sectioned or interleaved M-RoPE) ends as merged tables here."""

    def hf_position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """What the Hugging Face decoder layers take as ``position_embeddings`` (the reference path);
        the same as :meth:`rotary` unless the family's layers apply M-RoPE sections themselves."""
        return self.rotary(hidden, position_ids)

    def extra_embeddings(self) -> dict[str, torch.Tensor]:
        """Learned rows the runtime splices besides tokens and vision output (e.g. LLaVA-NeXT's
        ``image_newline``), by name; they are appended to the embedding table at export."""
        return {}

    def extra_row_ids(self) -> dict[str, int]:
        """Ids of :meth:`extra_embeddings` in the extended embedding table: appended after the vocabulary, in
        order (the exported table, the torch backend's table and in-memory manifests all use these)."""
        rows = int(self.embed_tokens().weight.shape[0])
        return {name: rows + i for i, name in enumerate(self.extra_embeddings())}

    # -- text side ---------------------------------------------------------------------------------
    @abstractmethod
    def save_text_assets(self, out_dir: Path) -> list[str]:
        """Write tokenizer/processor files into ``out_dir``; returns the relative paths written."""

    def customize(self, **options: Any) -> None:
        """Apply the family's export options by name (``image_fit`` for ``--image-fit``; None keeps the family
        default), in the order given: each is this adapter's ``set_<name>`` method. The family declares which
        options it takes (:class:`apet.models.family.FamilyOption`); one its adapter has no setter for is refused."""
        for name, value in options.items():
            if value is None:
                continue
            setter = getattr(self, f"set_{name.replace('-', '_')}", None)
            if setter is None:
                raise UsageError(f"--{name.replace('_', '-')} is not available for {self.family}",
                                 "drop the option (apet-export --help lists each option's families)")
            setter(value)

    def set_prompt_template(self, prompt_template: str) -> None:
        """``--prompt-template``: one of the family's named templates (:attr:`prompt_templates`)."""
        if prompt_template not in self.prompt_templates:
            raise UsageError(f"--prompt-template {prompt_template!r} is unknown for {self.family}",
                             f"use one of {', '.join(self.prompt_templates)}")
        self.spec = replace(self.spec, prompt_template=self.prompt_templates[prompt_template],
                            prompt_template_name=prompt_template)

    def fit_budget(self, plan: Any) -> None:
        """Adapt preprocessing to the compression plan before export (a dynamic-resolution family raises its
        minimum image size so every image has at least a fixed budget's K tokens); most families need nothing."""

    def format_prompt(self, user_text: str) -> str:
        return self.spec.prompt_template.format(prompt=user_text)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def describe_decoder(text_config: Any, position_rank: int = 1, injected_layers: int = 0, qk_norm: bool = False):
    """A :class:`DecoderSpec` from a Hugging Face text config (Llama, Mistral, Qwen2/3 field names).

    ``position_rank`` 3 for M-RoPE position ids; ``injected_layers`` for a family whose vision side feeds the
    first layers (DeepStack). ``qk_norm`` is not a config field: whatever is passed, the adapter sets it from the
    checkpoint's layers when it is made (:class:`VisionLanguageAdapter`)."""
    from apet.contracts.specs import DecoderSpec

    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return DecoderSpec(
        num_layers=text_config.num_hidden_layers, hidden_size=text_config.hidden_size,
        num_heads=text_config.num_attention_heads,
        num_kv_heads=text_config.num_key_value_heads or text_config.num_attention_heads, head_dim=head_dim,
        intermediate_size=text_config.intermediate_size, vocab_size=text_config.vocab_size,
        rms_norm_eps=text_config.rms_norm_eps, max_positions=text_config.max_position_embeddings,
        hidden_act=text_config.hidden_act, position_rank=position_rank, injected_layers=injected_layers,
        qk_norm=qk_norm,
    )

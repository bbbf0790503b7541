"""Plain-data facts about a model and its graphs, as the manifest records them (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dims (ints or symbolic names) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def resolve_shape(spec: Mapping[str, Any], dims: Mapping[str, int]) -> tuple[int, ...]:
    """A manifest I/O entry's shape with its symbolic dims replaced by ``dims`` values."""
    out = []
    for d in spec["shape"]:
        if isinstance(d, str):
            if d not in dims:
                raise KeyError(f"no value for dim {d!r} of {spec['name']}")
            out.append(int(dims[d]))
        else:
            out.append(int(d))
    return tuple(out)


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
    position_rank: int = 1  # 1: position_ids [B, T]; 3: M-RoPE position_ids [3, B, T]
    # the attention normalises q and k per head (RMSNorm over head_dim) after projection, before rotary
    qk_norm: bool = False
    # DeepStack-style inputs: after layer i < injected_layers the visual rows get + injected_embeds[i][row]
    injected_layers: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """What the manifest records about the source model. ``processor`` is the family's own preprocessing
    settings (its processor module reads them); ``n_tokens`` is visual tokens per view/frame before ApET."""

    family: str
    source: str
    n_tokens: int
    patch_grid: tuple[int, int]
    vision_dim: int
    image_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    prompt_template: str  # contains "{prompt}" and exactly one media placeholder
    image_placeholder: str
    decoder: DecoderSpec
    processor: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_template_name: str = "custom"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VisionShape:
    """A ViT's size as the benchmarks' FLOP and byte counts see it (a family's torch half declares it)."""

    tokens: int  # incl. CLS
    dim: int
    mlp_dim: int
    layers: int  # layers actually run (up to the select layer)
    patch: int
    channels: int = 3
    window: int | None = None  # window-attention ViTs (Qwen2.5-VL): tokens per attention window
    full_layers: int = 0  # ... and how many of the layers attend over all tokens
    projector: bool = True  # a per-token projector runs after ApET (False: ApET sees the LLM space already)
    temporal: int = 1  # frames per patch (Qwen2.5-VL's patch embedding sees 2)
    mlp_matrices: int = 2  # dim x mlp_dim matrices per MLP: 2 (fc1, fc2), 3 for a gated MLP (gate, up, down)

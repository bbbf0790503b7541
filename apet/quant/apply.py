"""Quantize a loaded model's LLM in place: (AWQ scales, folded) then round-to-nearest, one decoder
layer at a time, every ``nn.Linear`` of a layer replaced by a :class:`QuantLinear`.

Layer by layer so the float weights of a layer are released as soon as its quantized copy exists:
a 7B export peaks at the float model plus one layer, never two float copies. The same function
quantizes for export, for the torch backend (which rebuilds an artifact's weights from the
checkpoint and the artifact's AWQ scales), for apet-eval and for apet-bench.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apet.contracts.weights import WeightSpec
from apet.errors import UsageError
from apet.modeling.adapter import VisionLanguageAdapter
from apet.quant.awq import Group, apply_scale, capture_inputs, foldable, layer_groups, search_scale
from apet.quant.calibration import CalibrationSet
from apet.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@dataclass
class QuantResult:
    spec: WeightSpec  # with the group size resolved
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # AWQ scale per group key
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # AWQ search: RTN vs AWQ loss per group
    modules: list[str] = field(default_factory=list)  # qualified names of the replaced linears
    float_bytes: int = 0
    quantized_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        return {"modules": len(self.modules), "float_bytes": self.float_bytes,
                "quantized_bytes": self.quantized_bytes,
                "ratio": round(self.quantized_bytes / self.float_bytes, 4) if self.float_bytes else None}


def _targets(adapter: VisionLanguageAdapter, spec: WeightSpec) -> list[nn.Linear]:
    linears = [_get(layer, path) for layer in adapter.decoder_layers() for path in PROJECTIONS]
    if spec.quantize_lm_head:
        linears.append(adapter.lm_head())
    return linears


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def resolve_spec(adapter: VisionLanguageAdapter, spec: WeightSpec) -> WeightSpec:
    """Validate ``spec`` against the model: group size vs input sizes, even output sizes for INT4."""
    spec = spec.validate()
    if not spec.quantized:
        return spec
    targets = _targets(adapter, spec)
    kinds = {type(t).__name__ for t in targets if not isinstance(t, nn.Linear)}
    if kinds:
        raise UsageError(f"the LLM is already quantized or not made of nn.Linear ({', '.join(sorted(kinds))})",
                         "load the float checkpoint")
    spec = spec.resolve_group_size([t.in_features for t in targets])
    odd = [t.out_features for t in targets if t.out_features % 2]
    if spec.format == "int4" and odd:
        raise UsageError(f"INT4 packs two weights per byte; an output size of {odd[0]} is odd", "use --weights int8")
    return spec


class _Replacer:
    """Swaps modules by identity (generic over families: no attribute paths assumed above the layers)."""

    def __init__(self, model: nn.Module) -> None:
        self.where = {id(m): (parent, name, f"{prefix}.{name}" if prefix else name)
                      for prefix, parent in model.named_modules() for name, m in parent.named_children()}

    def name(self, module: nn.Module) -> str:
        return self.where[id(module)][2]

    def replace(self, module: nn.Module, new: nn.Module) -> None:
        parent, attr, _ = self.where[id(module)]
        setattr(parent, attr, new)


def _run_layer(adapter: VisionLanguageAdapter, layer: nn.Module, hidden: torch.Tensor, sample,
               index: int | None = None) -> torch.Tensor:
    """Decoder layer ``index`` on one sample, with the sample's injected inputs for that layer added after it."""
    from apet.modeling.blocks import additive_mask

    cos_sin = adapter.hf_position_embeddings(hidden, sample.positions)
    bias = additive_mask(sample.mask, hidden.shape[1], hidden.dtype)
    # no KV-cache argument at all: its name changed in transformers 5.24 (apet.models.compat) and None is the default
    out = layer(hidden, attention_mask=bias, position_ids=sample.positions, use_cache=False,
                position_embeddings=cos_sin)
    out = out[0] if isinstance(out, tuple) else out
    return out if index is None else sample.after_layer(index, out)


def _awq_groups(result: QuantResult, groups: list[Group], calibration: CalibrationSet | None,
                run: Any) -> list[Group]:
    """Search (with calibration) or take recorded scales, and fold them; returns the groups folded."""
    groups = [g for g in groups if foldable(g)]
    if calibration is not None:
        features, _ = capture_inputs([g.hook for g in groups], run)
        for group, x in zip(groups, features):
            scale, losses = search_scale(x, group.linears, result.spec.format, result.spec.group_size)
            result.scales[group.key], result.losses[group.key] = scale.cpu(), losses
    for group in groups:
        if group.key in result.scales:
            apply_scale(group, result.scales[group.key])
    return groups


@torch.no_grad()
def quantize_model(adapter: VisionLanguageAdapter, spec: WeightSpec, calibration: CalibrationSet | None = None,
                   scales: dict[str, torch.Tensor] | None = None) -> QuantResult:
    """Quantize ``adapter``'s LLM in place. AWQ takes ``calibration`` (searched) or ``scales`` (recorded
    by an export, to rebuild its weights); RTN takes neither."""
    spec = resolve_spec(adapter, spec)
    result = QuantResult(spec)
    if not spec.quantized:
        return result
    awq = spec.method == "awq"
    if awq and calibration is None and scales is None:
        raise UsageError("AWQ needs calibration data or recorded scales", "pass calibration, or use rtn")
    result.scales = dict(scales or {})
    search = calibration if (awq and scales is None) else None
    replacer = _Replacer(adapter.model)
    hidden = [s.embeds for s in search.samples] if search else []
    layers = list(adapter.decoder_layers())
    for index, layer in enumerate(tqdm(layers, desc=f"quantize {spec.format} ({spec.method})", unit="layer",
                                       disable=None)):
        if awq:
            outputs: list[torch.Tensor] = []

            def run(layer=layer, outputs=outputs, index=index) -> None:
                outputs.extend(_run_layer(adapter, layer, h, s, index) for h, s in zip(hidden, search.samples))

            _awq_groups(result, layer_groups(index, layer), search, run)
            hidden = outputs
        for path in PROJECTIONS:
            _quantize(result, replacer, _get(layer, path), spec)
    if spec.quantize_lm_head:
        head = adapter.lm_head()
        if awq:
            norm = adapter.final_norm()
            group = Group("lm_head", norm, [head], head)
            _awq_groups(result, [group], search, lambda: [head(norm(h)) for h in hidden])
        _quantize(result, replacer, adapter.lm_head(), spec)
    if awq:
        result.spec = replace(spec, calibration=dict(calibration.info) if calibration else dict(spec.calibration))
    log.info("quantized %d projections: %.1f MB -> %.1f MB", len(result.modules), result.float_bytes / 1e6,
             result.quantized_bytes / 1e6)
    return result


def _quantize(result: QuantResult, replacer: _Replacer, linear: nn.Linear, spec: WeightSpec) -> None:
    name = replacer.name(linear)
    quantized = QuantLinear.from_linear(linear, spec.format, spec.group_size, name)
    result.float_bytes += linear.weight.numel() * linear.weight.element_size()
    result.quantized_bytes += quantized.weight_bytes
    result.modules.append(name)
    replacer.replace(linear, quantized)


def is_quantized(adapter: VisionLanguageAdapter) -> bool:
    return any(isinstance(m, QuantLinear) for m in adapter.decoder_layers()[0].modules())


def match_artifact(adapter: VisionLanguageAdapter, weights: WeightSpec, artifact_dir: Any) -> QuantResult | None:
    """Give a float checkpoint an artifact's weights (the torch backend): the recorded AWQ scales
    folded, then the same round-to-nearest; no-op for fp16 artifacts or an adapter already quantized."""
    from pathlib import Path

    from safetensors.torch import load_file

    from apet.errors import ArtifactError

    if not weights.quantized or is_quantized(adapter):
        return None
    scales = None
    if weights.method == "awq":
        path = Path(artifact_dir) / (weights.scales_file or "")
        if not weights.scales_file or not path.is_file():
            raise ArtifactError(f"the artifact's AWQ scales ({weights.scales_file}) are missing",
                                "re-export the artifact")
        scales = load_file(str(path), device=str(adapter.device))
    return quantize_model(adapter, weights, scales=scales)

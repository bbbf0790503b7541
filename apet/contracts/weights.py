"""What an artifact's LLM weights are stored as (torch-free: the manifest, ``apet inspect`` and the
deployed runtime read it without importing the quantizer).

Weight-only quantization of the LLM graph: the decoder layers' seven projections (q, k, v, o, gate,
up, down) and, unless kept, the LM head. Activations stay in the network dtype, the vision graph and
ApET are untouched. INT8 is symmetric per output channel; INT4 is symmetric block-wise along the
input dimension (``group_size`` inputs share one scale), as TensorRT's weight-only GEMMs and ONNX
``DequantizeLinear`` (opset 21 blocked quantization) express them. Symmetric because TensorRT's
dequantize layers reject non-zero zero points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

from apet.errors import UsageError

WEIGHT_FORMATS = ("fp16", "int8", "int4")
METHODS = ("rtn", "awq")
DEFAULT_GROUP_SIZE = 128
QUANT_OPSET = 21  # DequantizeLinear with block_size and the INT4 type
BITS = {"int8": 8, "int4": 4}
QMAX = {"int8": 127, "int4": 7}  # symmetric range [-QMAX-1, QMAX]; the scale maps amax to QMAX


@dataclass(frozen=True)
class WeightSpec:
    """The weight format of one artifact (``manifest.weights``).

    ``format`` fp16 means "as the network dtype" (fp16, or fp32 for parity exports): nothing quantized.
    ``calibration`` records where AWQ's activation statistics came from (kind, samples, tokens, sha256
    of the data file) so an artifact says how it was made.
    """

    format: str = "fp16"
    group_size: int | None = None  # INT4 only
    method: str | None = None  # rtn | awq (None for fp16)
    quantize_lm_head: bool = True
    calibration: dict[str, Any] = field(default_factory=dict)
    scales_file: str | None = None  # AWQ scales, for the torch backend to rebuild the same weights

    @property
    def quantized(self) -> bool:
        return self.format != "fp16"

    @property
    def bits(self) -> int:
        return BITS.get(self.format, 16)

    def validate(self) -> "WeightSpec":
        if self.format not in WEIGHT_FORMATS:
            raise UsageError(f"--weights {self.format!r} is unknown", f"use one of {', '.join(WEIGHT_FORMATS)}")
        if not self.quantized:
            return self
        if self.method not in METHODS:
            raise UsageError(f"--calibration {self.method!r} is unknown", f"use one of {', '.join(METHODS)}")
        if self.format == "int4":
            if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
                raise UsageError(f"--group-size {self.group_size} must be an even number >= 2",
                                 f"use a power of two such as 32, 64 or {DEFAULT_GROUP_SIZE} (default)")
        elif self.group_size is not None:
            raise UsageError("--group-size applies to --weights int4 only (INT8 is per output channel)",
                             "drop --group-size, or pass --weights int4")
        return self

    def resolve_group_size(self, input_dims: Sequence[int]) -> "WeightSpec":
        """Fix the INT4 group size for a model whose quantized matrices have these input dims (K).

        An explicit ``--group-size`` must divide every K (blocks never straddle rows); without one the
        default is 128, or for small models (the tiny test checkpoints) the largest power of two <= 128
        that divides every K."""
        if self.format != "int4":
            return self
        dims = sorted(set(int(k) for k in input_dims))
        if self.group_size is not None:
            bad = [k for k in dims if k % self.group_size]
            if bad:
                raise UsageError(f"--group-size {self.group_size} does not divide the input size {bad[0]} of the "
                                 f"LLM's projections (input sizes {', '.join(map(str, dims))})",
                                 f"pass a --group-size that divides all of them, e.g. {_largest_group(dims)}")
            return self
        group = _largest_group(dims)
        if group < 2:
            raise UsageError(f"no even group size divides the LLM's input sizes {dims}", "use --weights int8")
        return replace(self, group_size=group)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> "WeightSpec":
        if not data:
            return cls()
        known = {k: data[k] for k in ("format", "group_size", "method", "quantize_lm_head", "calibration",
                                      "scales_file") if k in data}
        return cls(**known).validate()

    def describe(self, dtype: str) -> str:
        """``dtype``: the network dtype (manifest.dtype), which unquantized weights are stored in."""
        if not self.quantized:
            return f"{dtype} (not quantized)"
        group = f", group {self.group_size}" if self.format == "int4" else ", per output channel"
        head = "" if self.quantize_lm_head else ", LM head kept"
        calib = self.calibration or {}
        source = f" on {calib.get('samples', '?')} {calib.get('kind', '')} samples" if self.method == "awq" else ""
        return f"{self.format} weight-only ({self.method}{source}{group}{head})"


def _largest_group(dims: Sequence[int], limit: int = DEFAULT_GROUP_SIZE) -> int:
    group = limit
    while group >= 2 and any(k % group for k in dims):
        group //= 2
    return group


def default_method(fmt: str) -> str | None:
    """AWQ for INT4 (round-to-nearest loses too much at 4 bits), RTN for INT8 (near lossless)."""
    return {"int4": "awq", "int8": "rtn"}.get(fmt)


def weight_bytes_per_param(fmt: str, group_size: int | None = None, dtype_bytes: int = 2) -> float:
    """Storage per weight including scales (fp16): INT4 adds 2 bytes per group, INT8's per-channel
    scales are negligible next to K."""
    if fmt == "int4":
        return 0.5 + dtype_bytes / float(group_size or DEFAULT_GROUP_SIZE)
    if fmt == "int8":
        return 1.0
    return float(dtype_bytes)

"""The prefill's attention kernels alone, at the prompt shapes of the 7B benchmarks (run by hand on a CUDA machine):
FlashAttention varlen over packed segments (:func:`apet.kernels.varlen.packed_causal_attention`, the unpadded
prompt's form before) against SDPA's causal kernels (:func:`apet.kernels.varlen.causal_attention`, the form now),
each with the kernels it ran and its largest error against a float32 causal softmax of the same float16 inputs.

    python scripts/gpu_prefill_attention.py --out prefill_attention.json

Inputs are laid out as the decoder block makes them (token-major [B, T, H, d] viewed head-major). Each variant is
timed as :data:`CALLS` calls captured in one CUDA graph (no launch gaps of eager calls; as the path replays its
prefill), events around each replay, with the torch profiler's kernel names beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_variants import kernel_profile  # noqa: E402

from apet.atomic import write_atomic  # noqa: E402
from apet.bench.timing import time_call  # noqa: E402
from apet.kernels.device_timing import captured  # noqa: E402
from apet.kernels.varlen import causal_attention, left_pad_segments, packed_causal_attention  # noqa: E402

# (name, batch, tokens, query heads, kv heads): LLaVA-1.5-7B's 136-token prompt (0.11, batch 1 and 4), its
# stage-2 rows, Qwen2.5-VL-7B's 647 (0.3) and 2,065 (1.0) tokens, LLaVA-NeXT-7B's 2,968
SHAPES = [("llava_136", 1, 136, 32, 32), ("llava_136_b4", 4, 136, 32, 32), ("llava_72_stage2", 1, 72, 32, 32),
          ("qwen_647", 1, 647, 28, 4), ("qwen_2065", 1, 2065, 28, 4), ("next_2968", 1, 2968, 32, 32)]


def variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    batch, _, length, _ = q.shape
    segments = left_pad_segments(torch.ones(batch, length, dtype=torch.long, device=q.device))
    groups = q.shape[1] // k.shape[1]
    found: dict[str, Callable[[], torch.Tensor]] = {
        "packed_varlen (before)": lambda: packed_causal_attention(q, k, v, segments),
        "causal_sdpa (now)": lambda: causal_attention(q, k, v)}
    if groups > 1:  # cuDNN may refuse grouped heads: the same call with k and v repeated
        k_rep, v_rep = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        found["causal_sdpa, k/v repeated"] = lambda: causal_attention(q, k_rep, v_rep)
    for name, backend in (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION")):
        found[f"sdpa forced {name}"] = _forced(q, k, v, backend, groups)
    return found


def _forced(q, k, v, backend: str, groups: int) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))

    def run() -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


CALLS = 20


def graphed_us(fn: Callable[[], torch.Tensor]) -> dict[str, Any]:
    """µs per call of ``fn`` replayed as :data:`CALLS` calls in one CUDA graph (median and p10-p90 of 30 replays)."""
    def calls() -> None:
        for _ in range(CALLS):
            fn()

    timing = time_call(captured(calls).replay, device="cuda", warmup=5, repeats=30)
    per_call = 1000 / CALLS
    return {"us_median": round(timing.median_ms * per_call, 2),
            "us_p10_p90": [round(timing.p10_ms * per_call, 2), round(timing.p90_ms * per_call, 2)]}


def measure(name: str, batch: int, tokens: int, heads: int, kv_heads: int) -> dict[str, Any]:
    generator = torch.Generator(device="cuda").manual_seed(tokens)

    def head_major(h: int) -> torch.Tensor:
        return torch.randn(batch, tokens, h, 128, device="cuda", dtype=torch.float16,
                           generator=generator).transpose(1, 2)

    q, k, v = head_major(heads), head_major(kv_heads), head_major(kv_heads)
    groups = heads // kv_heads
    reference = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(groups, dim=1),
                                               v.float().repeat_interleave(groups, dim=1), is_causal=True)
    return {"shape": {"batch": batch, "tokens": tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": 128},
            "variants": timed_variants(name, variants(q, k, v), reference)}


def timed_variants(name: str, variants: dict[str, Callable[[], torch.Tensor]],
                   reference: torch.Tensor) -> dict[str, Any]:
    """Each variant's µs per call (:func:`graphed_us`), its largest error against ``reference`` and its kernels; a
    backend that refuses the shape is recorded with why."""
    rows: dict[str, Any] = {}
    for label, fn in variants.items():
        try:
            out = fn()
            profile = kernel_profile(fn, count=4)
            rows[label] = {**graphed_us(fn), "max_abs_error_vs_fp32": float((out.float() - reference).abs().max()),
                           "kernels": [t["kernel"] for t in profile["top"]]}
        except Exception as exc:  # a backend that refuses the shape: say why, keep measuring
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(name, label, {k: v for k, v in rows[label].items() if k != "kernels"},
              rows[label].get("kernels", [""])[0][:90], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cudnn": torch.backends.cudnn.version(), "shapes": {}}
    with torch.no_grad():
        for name, *shape in SHAPES:
            report["shapes"][name] = measure(name, *shape)
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Qwen2.5-VL-7B's vision-tower attention kernels alone at 1344² (9,216 patches, 16 heads of 80; 144 windows of 64
patches), run by hand on a CUDA machine: the window blocks as FlashAttention varlen over packed segments (the fast
path's form) against one SDPA batch of equal windows (possible where every window is full) and each SDPA backend
forced; the full-attention blocks as SDPA picks (the form now) against each backend forced. Each with the kernels it
ran and its largest error against float32 attention of the same float16 inputs.

    python scripts/gpu_tower_attention.py --out tower_attention.json

Inputs are laid out as the tower makes them (q, k, v token-major views of one [B, P, 3, heads, d] tensor); timing as
scripts/gpu_prefill_attention.py (calls captured in one CUDA graph).

Measured on the H200 (docs/benchmarks.md, "Prefill levers timed"): the fast path's kernels are already the fastest
SDPA offers here; one batch of windows was 8 % faster alone and no faster in the tower.
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

from gpu_prefill_attention import timed_variants  # noqa: E402

from apet.atomic import write_atomic  # noqa: E402
from apet.kernels.varlen import varlen_attention  # noqa: E402

PATCHES, HEADS, HEAD_DIM, WINDOW = 9216, 16, 80, 64
BACKENDS = (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> torch.Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def window_variants(q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    """q, k, v [1, P, heads, d] in window order -> each form's [windows, heads, S, d] output."""
    segments = torch.arange(0, PATCHES + 1, WINDOW, dtype=torch.int32, device=q.device)
    packed = [t.reshape(PATCHES, HEADS, HEAD_DIM) for t in (q, k, v)]
    batched = [t.reshape(-1, WINDOW, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]
    found = {"varlen FlashAttention (now)": lambda: varlen_attention(*packed, segments, WINDOW).reshape(
        -1, WINDOW, HEADS, HEAD_DIM).transpose(1, 2), "one SDPA batch": _sdpa(*batched, None)}
    found.update({f"one SDPA batch, forced {name}": _sdpa(*batched, backend) for name, backend in BACKENDS})
    return found


def full_variants(q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    heads_major = [t.transpose(1, 2) for t in (q, k, v)]
    found = {"SDPA (now)": _sdpa(*heads_major, None)}
    found.update({f"SDPA forced {name}": _sdpa(*heads_major, backend) for name, backend in BACKENDS})
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, PATCHES, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16, generator=generator)
    q, k, v = qkv.unbind(2)  # [1, P, heads, d] views, as the tower's rotary leaves them
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cudnn": torch.backends.cudnn.version(),
                              "shape": {"patches": PATCHES, "heads": HEADS, "head_dim": HEAD_DIM, "window": WINDOW}}
    with torch.no_grad():
        windows = F.scaled_dot_product_attention(*(t.float().reshape(-1, WINDOW, HEADS, HEAD_DIM).transpose(1, 2)
                                                   for t in (q, k, v)))
        report["windows"] = timed_variants("windows", window_variants(q, k, v), windows)
        full = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
        report["full"] = timed_variants("full", full_variants(q, k, v), full)
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

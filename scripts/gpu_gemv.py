"""cuBLAS against apet's skinny-matmul kernel (apet.kernels.gemv) on the decode projections of the 7B-shape
models, rows 1 and 4 (run by hand on a CUDA machine): µs, TB/s of weight read, and what the dispatcher picks.

  python scripts/gpu_gemv.py --out gemv.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from apet.kernels import gemv

# (name, out features, in features, bias): LLaVA-1.5-7B (Vicuna) and Qwen2.5-VL-7B decode projections
SHAPES = [("llava.qkv", 12288, 4096, False), ("llava.o", 4096, 4096, False), ("llava.gate_up", 22016, 4096, False),
          ("llava.down", 4096, 11008, False), ("llava.head", 32064, 4096, False),
          ("qwen.qkv", 4608, 3584, True), ("qwen.o", 3584, 3584, False), ("qwen.gate_up", 37888, 3584, False),
          ("qwen.down", 3584, 18944, False), ("qwen.head", 152064, 3584, False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_out = []
    for rows in (1, 4):
        for name, n, k, has_bias in SHAPES:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            b = torch.randn(n, device="cuda", dtype=torch.float16) if has_bias else None
            cublas = gemv._time_ms(lambda: F.linear(x, w, b), 50)
            configs = {str(c): gemv._time_ms(lambda c=c: gemv.kernel_matmul(x, w, b, c), 50) for c in gemv.CONFIGS}
            picked = gemv.choice(x, w, b)
            error = (gemv.linear(x, w, b).float() - F.linear(x, w, b).float()).abs().max().item()
            best = min(configs.values())
            gbytes = n * k * 2 / 1e9
            row = {"rows": rows, "name": name, "cublas_us": round(cublas * 1e3, 1), "kernel_us": round(best * 1e3, 1),
                   "cublas_tbs": round(gbytes / cublas, 2), "kernel_tbs": round(gbytes / best, 2),
                   "picked": str(picked), "max_abs_diff": error, "configs_us": {c: round(t * 1e3, 1)
                                                                               for c, t in configs.items()}}
            rows_out.append(row)
            print(rows, name, row["cublas_us"], "us cuBLAS", row["kernel_us"], "us kernel", row["kernel_tbs"],
                  "TB/s; picked", picked, "diff", error, flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()

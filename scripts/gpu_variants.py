"""Which fast-path variant to ship: CUDA graphs alone, + fused projections, + torch.compile (GPU, by hand).

  python scripts/gpu_variants.py --out variants.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from apet.bench.run import _configs
from apet.bench.stages import ApetPath, Request, summarize_generation
from apet.models.registry import load_adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llava-shapes")
    parser.add_argument("--ratio", type=float, default=0.11)
    args = parser.parse_args()
    torch.manual_seed(0)
    adapter = load_adapter(args.model, dtype=torch.float16, device="cuda")
    _, stage1, stage2 = _configs(adapter, args.ratio, 2)
    request = Request(1, 40, 64)
    report = {}
    for name, fuse, compiled in (("graphs", False, False), ("fused+graphs", True, False),
                                 ("fused+compile+graphs", True, True)):
        t0 = time.perf_counter()
        path = ApetPath(adapter, stage1, stage2, request, graphs=True, fuse=fuse, compile=compiled)
        setup_s = time.perf_counter() - t0
        path.generate()
        runs = [path.generate()[1] for _ in range(8)]
        gen = summarize_generation(runs)
        stages = {k: v.median_ms for k, v in path.stage_timings(20).items()}
        report[name] = {"setup_s": round(setup_s, 1), "ttft_ms": gen["ttft"]["median_ms"],
                        "decode_ms": gen["decode_per_token"]["median_ms"], "stages_ms": stages}
        print(name, json.dumps(report[name]), flush=True)
        del path
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

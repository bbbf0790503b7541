"""Which GPU fast-path kernel changes the tiny LLaVA's greedy tokens at batch 2 (run by hand on a CUDA machine):
the static path with one new piece on at a time against the HF-module reference (the requests and exports of
scripts/gpu_floor.py)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from gpu_floor import export_tiny, matching, tiny_generation, tiny_requests, variant

    from apet.adapters.llava.tiny import create_tiny_llava
    from apet.compression import FUSED
    from apet.kernels import gemv
    from apet.runtime.fusion import KERNELS
    from apet.runtime.pipeline import Pipeline

    images, prompts = tiny_requests()
    artifact, adapter = export_tiny(Path(tempfile.mkdtemp()), "llava", create_tiny_llava, {"ratio": 0.11})
    with variant(False):
        reference = Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter, torch_mode="reference")
        want = [r.token_ids for r in reference.generate_batch(images, prompts, tiny_generation())]
    pieces = {"stage_kernel": lambda on: FUSED.__setitem__("stage_kernel", on),
              "norm_rotary": lambda on: KERNELS.__setitem__("enabled", on),
              "gemv": lambda on: gemv.ENABLED.__setitem__("value", on), "packed": None}
    for name, switch in pieces.items():
        with variant(False):
            if switch is not None:
                switch(True)
            static = Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter, torch_mode="static")
            static.backend.decoder.prefill_attention = "auto" if name == "packed" else "masked"
            got = [r.token_ids for r in static.generate_batch(images, prompts, tiny_generation())]
        print("only", name, "matching", matching(got, want), "of", [len(w) for w in want], flush=True)


if __name__ == "__main__":
    main()

"""Which GPU fast-path kernel changes the tiny LLaVA's greedy tokens at batch 2 (run by hand on a CUDA machine):
the static path with one new piece on at a time against the HF-module reference."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from conftest import make_image
    from gpu_floor import variant

    from apet.adapters.llava.tiny import create_tiny_llava
    from apet.compression import FUSED
    from apet.export.artifact import ExportConfig, export_artifact
    from apet.kernels import gemv
    from apet.models.registry import load_adapter
    from apet.runtime.fusion import KERNELS
    from apet.runtime.pipeline import Pipeline
    from apet.runtime.sampling import GenerationConfig

    root = Path(tempfile.mkdtemp())
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    prompts = ["What is in the picture?", "How many objects are there and what color are they?"]
    checkpoint = create_tiny_llava(root / "llava")
    artifact = root / "artifact"
    export_artifact(ExportConfig(model=str(checkpoint), out=artifact, dtype="fp16", ratio=0.11))
    adapter = load_adapter(str(checkpoint), dtype=torch.float16, device="cuda")
    config = GenerationConfig(max_new_tokens=24)
    with variant(False):
        reference = Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter, torch_mode="reference")
        want = [r.token_ids for r in reference.generate_batch(images, prompts, config)]
    pieces = {"stage_kernel": lambda on: FUSED.__setitem__("stage_kernel", on),
              "norm_rotary": lambda on: KERNELS.__setitem__("enabled", on),
              "gemv": lambda on: gemv.ENABLED.__setitem__("value", on), "packed": None}
    for name, switch in pieces.items():
        with variant(False):
            if switch is not None:
                switch(True)
            static = Pipeline.load(artifact, backend="torch", device="cuda", adapter=adapter, torch_mode="static")
            static.backend.decoder.prefill_attention = "auto" if name == "packed" else "masked"
            got = [r.token_ids for r in static.generate_batch(images, prompts, config)]
        same = [int(np.sum(np.array(a[:len(b)]) == np.array(b[:len(a)]))) for a, b in zip(got, want)]
        print("only", name, "matching", same, "of", [len(w) for w in want], flush=True)


if __name__ == "__main__":
    main()

"""The bench's ONNX Runtime path in a process of its own, without torch: how the torch-free device runtime runs
(``pip install apet`` on a Jetson never loads torch), so the bench times it the way its users run it. The bench's
own process holds the torch path (its weights, CUDA graphs and allocator); this one holds only ONNX Runtime.

The parent (:func:`time_in_own_process`) writes the request, starts ``python -m apet.bench.ort_process SPEC OUT``
and reads back the raw timings and the outputs its parity check compares. The child rebuilds the request from the
artifact's manifest and the bench's tokenizer (:func:`apet.bench.ort_profile.synthetic_request`: the family's
processor, seeded media, filler words); the parent checks that it is the bench's own request, array for array,
before trusting a number.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apet.bench.ort_timing import OrtTimings, time_backend
from apet.errors import BackendError

log = logging.getLogger(__name__)
INPUT_PREFIX = "input:"
ORT_PROCESSES = ("own", "shared")  # apet-bench --ort-process: where ONNX Runtime is timed


@dataclass(frozen=True)
class OrtRunSpec:
    """What the child runs: the artifact, the backend's options and the bench's request."""

    artifact: str
    device: str
    cuda_graphs: bool
    decode_attention: str
    rewrites: str
    batch: int
    image_size: tuple[int, int]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    parity_steps: int
    tokenizer: str | None = None  # the bench's request's tokenizer (stages.request_tokenizer): None, random ids

    def backend(self, manifest: Any) -> Any:
        """The ONNX Runtime backend this run times (the backend alone: random-weight *-shapes artifacts have no
        tokenizer, the synthetic request needs none)."""
        from apet.runtime.pipeline import make_backend

        return make_backend("onnxruntime", Path(self.artifact), manifest, self.device, cuda_graphs=self.cuda_graphs,
                            decode_attention=self.decode_attention, ort_rewrites=self.rewrites)


def _child(spec: OrtRunSpec, out: Path) -> None:
    from apet.bench.ort_profile import synthetic_request
    from apet.manifest import read_manifest

    manifest = read_manifest(Path(spec.artifact))
    backend = spec.backend(manifest)
    tokenizer = Path(spec.tokenizer) if spec.tokenizer is not None else None
    processor, inputs, make_layout = synthetic_request(manifest, tokenizer, spec.batch, tuple(spec.image_size),
                                                       spec.prompt_tokens, spec.new_tokens)
    timings = time_backend(backend, processor, inputs, make_layout, spec.repeats, spec.parity_steps)
    arrays = {"keep_index": timings.keep_index, "visual_embeds": timings.visual_embeds,
              "logits": np.stack(timings.logits), "token_ids": make_layout(timings.keep_index).token_ids,
              **{INPUT_PREFIX + name: value for name, value in inputs.arrays.items()}}
    if timings.stage2_index is not None:
        arrays["stage2_index"] = timings.stage2_index
    np.savez(out / "arrays.npz", **arrays)
    (out / "timings.json").write_text(json.dumps({
        "ttft_ms": timings.ttft_ms, "parts_ms": timings.parts_ms, "decode_ms": timings.decode_ms,
        "tokens": timings.tokens, "backend": timings.backend, "torch_imported": "torch" in sys.modules}))


def time_in_own_process(spec: OrtRunSpec, vision_arrays: dict[str, np.ndarray],
                        make_layout: Any) -> tuple[OrtTimings, bool]:
    """Run :func:`time_backend` in a child process -> (its timings, whether the child imported torch). Raises
    BackendError where the child fails or did not run the bench's request (``vision_arrays``, and the token ids
    ``make_layout`` gives for its kept indices)."""
    with tempfile.TemporaryDirectory(prefix="apet-ort-process-") as scratch:
        out = Path(scratch)
        (out / "spec.json").write_text(json.dumps(asdict(spec)))
        command = [sys.executable, "-m", "apet.bench.ort_process", str(out / "spec.json"), str(out)]
        log.info("ONNX Runtime in its own process: %s", " ".join(command))
        done = subprocess.run(command, check=False)  # its log and ONNX Runtime's go to this process's stderr
        if done.returncode != 0:
            raise BackendError(f"the bench's ONNX Runtime process exited with {done.returncode} (its error is "
                               "printed above)", "fix that error, or pass --ort-process shared to run ONNX "
                               "Runtime in the bench's own process")
        result = json.loads((out / "timings.json").read_text())
        with np.load(out / "arrays.npz") as saved:
            arrays = {name: saved[name] for name in saved.files}
    _check_same_request(arrays, vision_arrays, make_layout)
    timings = OrtTimings(result["ttft_ms"], result["parts_ms"], result["decode_ms"], result["tokens"],
                         list(arrays["logits"]), arrays["keep_index"], arrays["visual_embeds"],
                         arrays.get("stage2_index"), result["backend"])
    return timings, bool(result["torch_imported"])


def _check_same_request(child: dict[str, np.ndarray], vision_arrays: dict[str, np.ndarray], make_layout: Any) -> None:
    """The child's vision inputs and prompt must be the bench's: otherwise its times belong to another request."""
    theirs = {name[len(INPUT_PREFIX):]: value for name, value in child.items() if name.startswith(INPUT_PREFIX)}
    differ = sorted(set(theirs) ^ set(vision_arrays)) or \
        [name for name in theirs if not np.array_equal(theirs[name], vision_arrays[name])]
    if not differ and not np.array_equal(child["token_ids"], make_layout(child["keep_index"]).token_ids):
        differ = ["token_ids"]
    if differ:
        raise BackendError(f"the ONNX Runtime process ran another request than the bench ({', '.join(differ)} "
                           "differ): the artifact's processor is not the bench model's",
                           "export the artifact from the bench's --model, or pass --ort-process shared")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fields = json.loads(Path(args[0]).read_text())
    _child(OrtRunSpec(**fields), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

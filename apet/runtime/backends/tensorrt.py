"""TensorRT / TensorRT-RTX backend: engines from ``apet-build``, device buffers through torch.

The KV cache is preallocated to ``max_context``: each layer has two flat
device buffers used ping-pong, the engine reading the past from one (viewed
as a contiguous [B, kv, P, d] tensor) and writing the present to the other.
Profile 0 of ``llm.plan`` serves prefill, profile 1 decode; each has its own
execution context. :class:`StepShapes` computes every binding's shape for a
step from the manifest's graph I/O and the cache layout, and is what the CPU tests exercise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apet.contracts.files import ENGINE_FILES, REPORT_NAME, manifest_digest, read_report, sha256_file
from apet.contracts.io import IMAGE_START, STAGE2_INDEX, past_names, present_to_past
from apet.contracts.specs import resolve_shape
from apet.errors import ArtifactError, BackendError, InputError, option
from apet.manifest import Manifest
from apet.models.family import Layout
from apet.runtime.backends.base import Backend, VisionOutput, import_optional, splice

PREFILL_PROFILE, DECODE_PROFILE = 0, 1
_DTYPES = {"fp16": "float16", "fp32": "float32"}


def tensorrt_available(artifact_dir: Path) -> bool:
    """Engines and their report are present, a TensorRT module imports and a CUDA device exists."""
    if not all((Path(artifact_dir) / f).is_file() for f in (*ENGINE_FILES.values(), REPORT_NAME)):
        return False
    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx_bindings")):
        return False
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class StepShapes:
    """Shapes of every llm.plan binding for one step, from the manifest alone."""

    manifest: Manifest
    batch: int
    seq: int
    past: int  # past length of the layers before stage 2

    @property
    def profile(self) -> int:
        return DECODE_PROFILE if self.seq == 1 and self.past > 0 else PREFILL_PROFILE

    def _resolve(self, specs: list[dict]) -> dict[str, tuple[int, ...]]:
        dims = self.manifest.cache_layout.dims(self.batch, self.seq, self.past)
        dims["seq_out"] = 1  # apet-run's graphs return the last position's logits only
        return {spec["name"]: resolve_shape(spec, dims) for spec in specs}

    def inputs(self) -> dict[str, tuple[int, ...]]:
        return self._resolve(self.manifest.graphs["llm"].inputs)

    def outputs(self) -> dict[str, tuple[int, ...]]:
        return self._resolve(self.manifest.graphs["llm"].outputs)


@dataclass(frozen=True)
class EngineLimits:
    """The largest request llm.plan's profiles accept (``build_report.json`` limits), checked before any work:
    the engines may be built smaller than the export (``apet-build --max-context/--max-prompt/--max-batch``)."""

    max_batch: int
    max_context: int
    max_prompt: int

    @classmethod
    def from_report(cls, report: dict) -> "EngineLimits":
        limits = report.get("limits") or {}
        try:
            return cls(int(limits["max_batch"]), int(limits["max_context"]), int(limits["max_prompt"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{REPORT_NAME} has no valid limits ({exc})",
                                "rebuild the engines: apet-build DIR --overwrite") from exc

    def check(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the engines' max batch {self.max_batch}",
                             f"split the request, or rebuild: apet-build DIR --max-batch {batch} --overwrite")
        if prompt_tokens > self.max_prompt:
            raise InputError(f"the prompt needs {prompt_tokens} tokens, over the engines' prefill profile maximum "
                             f"{self.max_prompt} (apet-build --max-prompt)",
                             f"shorten the prompt, or rebuild: apet-build DIR --max-prompt {prompt_tokens} "
                             "--overwrite")
        if prompt_tokens + new_tokens > self.max_context:
            raise InputError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the engines' decode profile "
                             f"maximum {self.max_context} (apet-build --max-context)",
                             f"lower {option('max_new_tokens')}, or rebuild: apet-build DIR --max-context "
                             f"{prompt_tokens + new_tokens} --overwrite (up to the export's max_context)")


def set_shape(context, name: str, shape: tuple[int, ...], engine: str) -> None:
    """``set_input_shape`` returns False (it does not raise) for a shape outside the active profile."""
    if not context.set_input_shape(name, tuple(int(d) for d in shape)):
        raise InputError(f"{name} shape {tuple(shape)} is outside {engine}'s optimization profile",
                         "rebuild the engines for this request size (apet-build --max-batch/--max-prompt/"
                         "--max-context ... --overwrite)")


def check_engines(artifact_dir: Path, manifest: Manifest, runtime_kind: str, runtime_version: str) -> dict:
    """Refuse engines of another export, another TensorRT version, or that changed on disk."""
    report = read_report(artifact_dir)
    if report is None:
        raise ArtifactError(f"{Path(artifact_dir) / REPORT_NAME} is missing", "run apet-build on the artifact")
    if report.get("manifest_sha256") != manifest_digest(artifact_dir):
        raise ArtifactError("the engines were built from another export of this directory",
                            f"rebuild them: apet-build {artifact_dir} --overwrite")
    if report.get("builder") != runtime_kind or report.get("version") != runtime_version:
        raise ArtifactError(f"the engines were built by {report.get('builder')} {report.get('version')}, "
                            f"this runtime has {runtime_kind} {runtime_version}",
                            f"rebuild the engines with the TensorRT installed here (apet-build {artifact_dir} "
                            "--overwrite)")
    for name, entry in report.get("engines", {}).items():
        path = Path(artifact_dir) / entry.get("file", ENGINE_FILES.get(name, ""))
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{path.name} is missing or changed after apet-build",
                                f"rebuild the engines: apet-build {artifact_dir} --overwrite")
    return report


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cuda") -> None:
        super().__init__(artifact_dir, manifest)
        import torch

        from apet.engines.api import load_api

        api = load_api("auto")
        self.limits = EngineLimits.from_report(check_engines(artifact_dir, manifest, api.kind, api.version))
        self.torch, self.trt = torch, api.module
        if not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA device",
                               f"pass {option('backend', 'onnxruntime')} on this machine")
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engines = {}
        for name, file in ENGINE_FILES.items():
            engine = runtime.deserialize_cuda_engine((self.artifact_dir / file).read_bytes())
            if engine is None:
                raise BackendError(f"{file} cannot be deserialized on {torch.cuda.get_device_name(self.device)}",
                                   "rebuild for this GPU (TensorRT-RTX: --compute-capability matching it)")
            self.engines[name] = engine
        self.vision_context = self.engines["vision"].create_execution_context()
        self.llm_contexts = []
        for profile in (PREFILL_PROFILE, DECODE_PROFILE):
            context = self.engines["llm"].create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.llm_contexts.append(context)
        self.dtype = getattr(torch, _DTYPES[manifest.dtype])
        table = import_optional("safetensors.torch", "dev", "loading the embedding table")
        self.table = table.load_file(str(self.artifact_dir / manifest.embeddings["file"]),
                                     device=str(self.device))[manifest.embeddings.get("tensor", "weight")]
        self._allocate_cache()
        self.batch = self.past = 0
        self.image_start = None

    def _allocate_cache(self) -> None:
        spec = self.manifest.model.decoder
        elements = self.manifest.max_batch * spec.num_kv_heads * self.manifest.max_context * spec.head_dim
        names = past_names(spec.num_layers)
        self.cache = {name: [self.torch.empty(elements, dtype=self.dtype, device=self.device) for _ in range(2)]
                      for name in names}  # layers after stage 2 use a prefix (the cache layout's capacity)
        self.current = 0  # which of the two buffers holds the past

    def _run(self, context, tensors: dict[str, object]) -> None:
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT execution failed", "run with --verbose for the TensorRT log")

    @classmethod
    def available(cls, artifact_dir: Path, device: str | None) -> bool:
        return tensorrt_available(artifact_dir) and (device is None or device.startswith("cuda"))

    def _encode(self, arrays: dict[str, np.ndarray]) -> VisionOutput:
        torch = self.torch
        dtypes = {"float16": torch.float16, "float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
        specs = {spec["name"]: spec for spec in self.manifest.graphs["vision"].inputs}
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)).to(self.device, dtypes[specs[name]["dtype"]])
                   for name, value in arrays.items()}
        for name, tensor in tensors.items():
            set_shape(self.vision_context, name, tuple(tensor.shape), ENGINE_FILES["vision"])
        for spec in self.manifest.graphs["vision"].outputs:
            # the engine computes output shapes from the input shapes (a per-image budget K is a shape
            # computation of the image's token count, not an input dim)
            shape = tuple(int(d) for d in self.vision_context.get_tensor_shape(spec["name"]))
            tensors[spec["name"]] = torch.empty(shape, dtype=dtypes[spec["dtype"]], device=self.device)
        with torch.cuda.stream(self.stream):
            self._run(self.vision_context, tensors)
        self.stream.synchronize()
        return VisionOutput(tensors["visual_embeds"], tensors["keep_index"].cpu().numpy())

    def _step(self, embeds, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        torch = self.torch
        shapes = StepShapes(self.manifest, embeds.shape[0], embeds.shape[1], self.past)
        context = self.llm_contexts[shapes.profile]
        tensors = {"inputs_embeds": embeds.contiguous(),
                   "position_ids": torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(self.device),
                   "attention_mask": torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device)}
        if self.image_start is not None:
            tensors[IMAGE_START] = self.image_start
        for name, shape in shapes.inputs().items():
            if name.startswith("past_"):
                tensors[name] = self.cache[name][self.current][: int(np.prod(shape))].view(shape)
            set_shape(context, name, shape, ENGINE_FILES["llm"])
        for name, shape in shapes.outputs().items():
            if name.startswith("present_"):
                buffer = self.cache[present_to_past(name)][1 - self.current]
                tensors[name] = buffer[: int(np.prod(shape))].view(shape)
            else:
                dtype = torch.int64 if name == STAGE2_INDEX else self.dtype
                tensors[name] = torch.empty(shape, dtype=dtype, device=self.device)
        with torch.cuda.stream(self.stream):
            self._run(context, tensors)
        self.stream.synchronize()
        self.current = 1 - self.current
        self.past = shapes.past + shapes.seq
        return tensors["logits"][:, -1].float().cpu().numpy()

    def _prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray:
        torch = self.torch
        rows = torch.from_numpy(layout.visual_rows).to(self.device)
        embeds = splice(self.table, torch.from_numpy(layout.token_ids).to(self.device), visual.embeds, rows)
        self.past = 0
        has_stage2 = self.manifest.compression.stage2 is not None
        self.image_start = torch.from_numpy(layout.image_start).to(self.device) if has_stage2 else None
        return self._step(embeds, layout.attention_mask, layout.positions)

    def _decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        embeds = self.table[self.torch.from_numpy(token_ids).to(self.device)][:, None]
        return self._step(embeds, attention_mask, positions)

    def check_request(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        super().check_request(batch, prompt_tokens, new_tokens)
        self.limits.check(batch, prompt_tokens, new_tokens)

    def cache_lengths(self) -> list[int]:
        return self.manifest.cache_layout.lengths(self.past)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def peak_memory_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated(self.device))

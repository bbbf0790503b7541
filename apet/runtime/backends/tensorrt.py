"""TensorRT / TensorRT-RTX backend: engines from ``apet-build``; device memory, streams and copies through
NVIDIA's CUDA Python bindings (:mod:`apet.cuda_memory`), never torch, so it runs on a Jetson with
only JetPack's TensorRT and ``apet[cuda12]`` / ``apet[cuda13]`` installed (docs/jetson.md).

The KV cache is preallocated to ``max_context``: each layer has two flat
device buffers used ping-pong, the engine reading the past from one (viewed
as a contiguous [B, kv, P, d] prefix) and writing the present to the other.
Profile 0 of ``llm.plan`` serves prefill, profile 1 decode; each has its own
execution context. :class:`StepShapes` computes every binding's shape for a
step from the manifest's graph I/O and the cache layout.

The embedding table stays on the host (NumPy): prompts are spliced there and uploaded, one
[B, S, H] copy per step, as the ONNX Runtime backend does; the visual embeddings come back to the host
once per vision run for it. On a Jetson host and device memory are the same DRAM, so this costs no
second copy of the table (docs/jetson.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apet.contracts.files import ENGINE_FILES, REPORT_NAME, manifest_digest, read_report, sha256_file
from apet.contracts.io import (
    IMAGE_START,
    INJECTED_EMBEDS,
    INJECTED_ROWS,
    STAGE2_INDEX,
    past_names,
    present_to_past,
)
from apet.contracts.specs import resolve_shape
from apet.cuda_memory import (
    INSTALL_HINT,
    CudaDevice,
    DeviceBuffer,
    Scratch,
    cuda_device_count,
    device_index,
    load_driver,
)
from apet.errors import ArtifactError, BackendError, InputError, MissingExtraError, option
from apet.manifest import Manifest
from apet.models.family import Layout
from apet.runtime.backends.base import (
    Backend,
    VisionOutput,
    injected_inputs,
    load_embedding_table,
    no_injected,
    splice_numpy,
)

log = logging.getLogger(__name__)
PREFILL_PROFILE, DECODE_PROFILE = 0, 1
_DTYPES = {"fp16": "float16", "fp32": "float32"}


def tensorrt_available(artifact_dir: Path, driver: Any = None) -> bool:
    """Engines and their report are present, a TensorRT module imports and the CUDA driver shows a device
    (through cuda-python, not torch). Engines that cannot be used here say why in the log, since ``auto``
    then falls back to ONNX Runtime on the CPU."""
    if not all((Path(artifact_dir) / f).is_file() for f in (*ENGINE_FILES.values(), REPORT_NAME)):
        return False
    from apet.engines.api import find_tensorrt

    if find_tensorrt() is None:
        log.warning("engines are present but no TensorRT Python module imports (on a Jetson: JetPack's "
                    "python3-libnvinfer, see docs/jetson.md): using another backend")
        return False
    try:
        driver = driver or load_driver()
    except (BackendError, MissingExtraError):  # load_driver raises MissingExtraError where the package is absent
        log.warning("engines are present but NVIDIA's CUDA Python bindings are not installed (%s): using "
                    "another backend", INSTALL_HINT)
        return False
    if cuda_device_count(driver) == 0:
        log.warning("engines are present but the CUDA driver shows no device: using another backend")
        return False
    return True



@dataclass(frozen=True)
class StepShapes:
    """Shapes of every llm.plan binding for one step, from the manifest alone."""

    manifest: Manifest
    batch: int
    seq: int
    past: int  # past length of the layers before stage 2
    rows: int = 0  # visual rows of the injected inputs (the prefill's; 0 at decode)

    @property
    def profile(self) -> int:
        return DECODE_PROFILE if self.seq == 1 and self.past > 0 else PREFILL_PROFILE

    def _resolve(self, specs: list[dict]) -> dict[str, tuple[int, ...]]:
        dims = self.manifest.cache_layout.dims(self.batch, self.seq, self.past, self.rows)
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

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cuda", *, api: Any = None,
                 cuda: CudaDevice | None = None) -> None:
        """``api`` (a :class:`apet.engines.api.TrtApi`) and ``cuda`` default to the installed TensorRT and
        the CUDA driver; tests pass stand-ins."""
        super().__init__(artifact_dir, manifest)
        from apet.engines.api import load_api

        api = api or load_api("auto")
        self.limits = EngineLimits.from_report(check_engines(artifact_dir, manifest, api.kind, api.version))
        self.trt = api.module
        self.cuda = cuda or CudaDevice(device_index(device))
        self.stream = self.cuda.stream()
        self.scratch = Scratch(self.cuda)  # step inputs and outputs, reused across steps
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engines = {}
        for name, file in ENGINE_FILES.items():
            engine = runtime.deserialize_cuda_engine((self.artifact_dir / file).read_bytes())
            if engine is None:
                raise BackendError(f"{file} cannot be deserialized on {self.cuda.name}",
                                   "rebuild for this GPU (TensorRT-RTX: --compute-capability matching it)")
            self.engines[name] = engine
        self.vision_context = self.engines["vision"].create_execution_context()
        self.llm_contexts = []
        for profile in (PREFILL_PROFILE, DECODE_PROFILE):
            context = self.engines["llm"].create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.handle)
            self.llm_contexts.append(context)
        self.dtype = np.dtype(_DTYPES[manifest.dtype])
        self.specs = {graph: {spec["name"]: spec for spec in (*manifest.graphs[graph].inputs,
                                                                 *manifest.graphs[graph].outputs)}
                      for graph in ENGINE_FILES}
        self.table = load_embedding_table(artifact_dir, manifest)  # host: prompts are spliced there
        self._allocate_cache()
        self.batch = self.past = 0
        self.image_start: DeviceBuffer | None = None

    def _allocate_cache(self) -> None:
        """Sized by the engines' limits, which ``apet-build --max-batch/--max-context`` may set below the
        export's: on a Jetson that is how the cache is made to fit (docs/jetson.md)."""
        spec = self.manifest.model.decoder
        elements = self.limits.max_batch * spec.num_kv_heads * self.limits.max_context * spec.head_dim
        names = past_names(spec.num_layers)
        self.cache = {name: [self.cuda.allocate(elements, self.dtype) for _ in range(2)]
                      for name in names}  # layers after stage 2 use a prefix (the cache layout's capacity)
        self.current = 0  # which of the two buffers holds the past

    def _dtype(self, graph: str, name: str) -> np.dtype:
        spec = self.specs[graph].get(name)
        if spec is None:
            return self.dtype
        try:
            return np.dtype(spec["dtype"])
        except TypeError as exc:
            raise BackendError(f"{name} of {ENGINE_FILES[graph]} is {spec['dtype']}, which NumPy cannot hold",
                               "re-export with --dtype fp16 or fp32") from exc

    def _upload(self, graph: str, name: str, value: np.ndarray) -> DeviceBuffer:
        value = np.ascontiguousarray(value, dtype=self._dtype(graph, name))
        return self.scratch.get(f"{graph}:{name}", value.shape, value.dtype).upload(value, self.stream)

    def _run(self, context, tensors: dict[str, DeviceBuffer]) -> None:
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.address)
        if not context.execute_async_v3(self.stream.handle):
            raise BackendError("TensorRT execution failed", "run with --verbose for the TensorRT log")

    @classmethod
    def available(cls, artifact_dir: Path, device: str | None) -> bool:
        return tensorrt_available(artifact_dir) and (device is None or device.startswith("cuda"))

    def _encode(self, arrays: dict[str, np.ndarray]) -> VisionOutput:
        context, engine = self.vision_context, ENGINE_FILES["vision"]
        tensors = {name: self._upload("vision", name, value) for name, value in arrays.items()}
        for name, tensor in tensors.items():
            set_shape(context, name, tensor.shape, engine)
            context.set_tensor_address(name, tensor.address)
        for spec in self.manifest.graphs["vision"].outputs:
            # the engine computes output shapes from the input shapes (a per-image budget K is a shape
            # computation of the image's token count, not an input dim)
            shape = tuple(int(d) for d in context.get_tensor_shape(spec["name"]))
            tensors[spec["name"]] = self.scratch.get(f"vision:{spec['name']}", shape,
                                                     self._dtype("vision", spec["name"]))
        self._run(context, tensors)
        return VisionOutput.of({spec["name"]: tensors[spec["name"]].download(self.stream)
                                for spec in self.manifest.graphs["vision"].outputs})

    def _step(self, embeds: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray,
              injected: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        layers = self.manifest.model.decoder.injected_layers
        if layers and injected is None:  # a decode step: no visual rows
            injected = no_injected(layers, self.manifest.model.decoder.hidden_size, *embeds.shape[:2], self.dtype)
        rows = 0 if injected is None else injected[0].shape[1]
        shapes = StepShapes(self.manifest, embeds.shape[0], embeds.shape[1], self.past, rows)
        context, engine = self.llm_contexts[shapes.profile], ENGINE_FILES["llm"]
        host = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": attention_mask}
        if injected is not None:
            host[INJECTED_EMBEDS], host[INJECTED_ROWS] = injected
        tensors: dict[str, DeviceBuffer] = {}
        for name, shape in shapes.inputs().items():
            if name.startswith("past_"):
                tensors[name] = self.cache[name][self.current].view(shape)
            elif name == IMAGE_START:
                if self.image_start is None:
                    raise BackendError("llm.plan takes image_start but no prefill set it",
                                       "this is a bug in apet: please report it")
                tensors[name] = self.image_start
            else:
                tensors[name] = self._upload("llm", name, host[name])
            set_shape(context, name, shape, engine)
        for name, shape in shapes.outputs().items():
            if name.startswith("present_"):
                tensors[name] = self.cache[present_to_past(name)][1 - self.current].view(shape)
            else:
                dtype = np.int64 if name == STAGE2_INDEX else self._dtype("llm", name)
                tensors[name] = self.scratch.get(f"llm:{name}", shape, dtype)
        self._run(context, tensors)
        logits = tensors["logits"].download(self.stream)  # waits for the step
        self.current = 1 - self.current  # the present just written is the next step's past
        self.past = shapes.past + shapes.seq
        return logits[:, -1].astype(np.float32)

    def _prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray:
        embeds = splice_numpy(self.table, layout.token_ids, np.asarray(visual.embeds), layout.visual_rows)
        self.past = 0
        has_stage2 = self.manifest.compression.stage2 is not None
        self.image_start = self._upload("llm", IMAGE_START, layout.image_start) if has_stage2 else None
        layers = self.manifest.model.decoder.injected_layers
        injected = injected_inputs(visual.injected, layers, layout.visual_rows) if layers else None
        return self._step(embeds, layout.attention_mask, layout.positions, injected)

    def _decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._step(self.table[token_ids][:, None], attention_mask, positions)

    def check_request(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        super().check_request(batch, prompt_tokens, new_tokens)
        self.limits.check(batch, prompt_tokens, new_tokens)

    def cache_lengths(self) -> list[int]:
        return self.manifest.cache_layout.lengths(self.past)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def peak_memory_bytes(self) -> int | None:
        """What apet allocated (KV cache, step buffers; high-water mark) plus the activation memory TensorRT
        reserves for each execution context; not the engines' weights."""
        contexts = [("vision", 1), ("llm", len(self.llm_contexts))]
        activations = sum(count * int(getattr(self.engines[name], "device_memory_size_v2",
                                              getattr(self.engines[name], "device_memory_size", 0)) or 0)
                          for name, count in contexts)
        return self.cuda.peak_bytes + activations

    def close(self) -> None:
        """Free the device buffers (the engines go with the object)."""
        self.synchronize()
        for buffers in self.cache.values():
            for buffer in buffers:
                buffer.free()
        for buffer in self.scratch.buffers.values():
            buffer.free()
        self.cache, self.scratch.buffers = {}, {}

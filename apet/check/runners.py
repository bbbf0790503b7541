"""Polygraphy runners for one apet request: each runs vision -> splice -> prefill -> greedy decode and returns the
stage outputs by scope name, so Polygraphy's ``Comparator.run`` runs them all on the same feed.

ONNX Runtime runs through Polygraphy's own ``OnnxrtRunner`` (one per graph, on the graphs with their scope
boundaries, or with ``per_layer`` every tensor, marked as outputs: Polygraphy's ``ModifyOutputs``); TensorRT and
torch run through :class:`BackendRunner`, a Polygraphy ``BaseRunner`` over apet's backend of that name, which
reports the graphs' own outputs (kept indices, visual tokens, stage-2 indices, logits, greedy tokens). The torch
backend is imported by the backend registry only when asked for (``apet[export]``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apet.check.graph import GraphScopes, graph_scopes
from apet.contracts.comparison import GREEDY, KEEP_INDEX, STEP_LOGITS
from apet.contracts.io import (
    IMAGE_START,
    INJECTED_EMBEDS,
    INJECTED_ROWS,
    LOGITS,
    STAGE2_INDEX,
    past_names,
    present_names,
)
from apet.contracts.onnx_graph import external_locations
from apet.extras import import_extra
from apet.manifest import Manifest
from apet.models.family import VisionInputs
from apet.runtime.backends.base import injected_inputs, load_embedding_table, no_injected, splice_numpy
from apet.runtime.backends.ort_options import cuda_provider

NODE_PREFIX = "node:"  # per-layer outputs: "node:<graph>:<tensor>"
SPAN_START = "request:image_start"  # where each row's image span starts: facts of the request, not compared


def polygraphy(module: str) -> Any:
    return import_extra(f"polygraphy.{module}", extra="check", purpose="apet check")


@dataclass
class Request:
    """The request every runner answers: the same preprocessed media, prompt and number of greedy steps."""

    inputs: VisionInputs
    prompt: str
    steps: int


def artifact_processor(artifact: Path, manifest: Manifest) -> Any:
    """The family's processor of the artifact. A random-weight ``*-shapes`` export has no tokenizer: its prompt
    becomes the synthetic encoder's seeded pseudo-random ids, the same in every runner as long as each asks its own
    fresh processor once (what the runners do per inference)."""
    from apet.models.registry import family_of

    synthetic = manifest.model.source == "random-init" and not (Path(artifact) / "tokenizer.json").is_file()
    return family_of(manifest).processor(None if synthetic else Path(artifact), manifest)


def as_numpy(value: Any) -> np.ndarray:
    """A backend's array (numpy, an OrtValue, a torch tensor) as numpy, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)


def _base_runner() -> type:
    return polygraphy("backend.base").BaseRunner


def _metadata(arrays: dict[str, np.ndarray]) -> Any:
    meta = polygraphy("common").TensorMetadata()
    for name, value in arrays.items():
        meta.add(name, value.dtype, value.shape)
    return meta


class _RequestRunner:
    """The shared half of both runners: the request, and the decode loop on a ``prefill``/``decode`` pair."""

    def _setup(self, artifact: Path, manifest: Manifest, request: Request) -> None:
        self.artifact, self.manifest, self.request = Path(artifact), manifest, request
        self.processor = artifact_processor(self.artifact, manifest)
        self.dtype = np.float16 if manifest.dtype == "fp16" else np.float32

    def get_input_metadata_impl(self):
        return _metadata(self.request.inputs.arrays)

    def _greedy(self, logits: np.ndarray, layout, decode) -> tuple[np.ndarray, np.ndarray]:
        tokens, step_logits, mask = [], [logits], layout.attention_mask
        for _ in range(self.request.steps - 1):
            token = logits.argmax(-1).astype(np.int64)
            tokens.append(token)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            logits = decode(token, mask, self.processor.decode_positions(layout, mask))
            step_logits.append(logits)
        tokens.append(logits.argmax(-1).astype(np.int64))
        return np.stack(tokens), np.stack(step_logits)


def make_onnxrt_runner(artifact: Path, manifest: Manifest, request: Request, device: str = "cpu",
                       per_layer: bool = False, name: str | None = None):
    """An ONNX Runtime runner of the artifact's two graphs, through Polygraphy's OnnxrtRunner."""
    base = _base_runner()

    class ArtifactOnnxrtRunner(_RequestRunner, base):
        def __init__(self) -> None:
            base.__init__(self, name=name or f"onnxruntime:{Path(artifact).name}", prefix="apet-onnxrt")
            self._setup(artifact, manifest, request)
            self.device, self.per_layer = device, per_layer
            self.scopes: dict[str, GraphScopes] = {}

        def _session(self, graph: str):
            import onnx
            import onnxruntime as ort

            path = self.artifact / self.manifest.graphs[graph].file
            model = onnx.load(str(path), load_external_data=False)  # a 7B graph's 13 GB of weights stay on disk
            self.scopes[graph] = found = graph_scopes(model)
            marked = polygraphy("constants").MARK_ALL if self.per_layer else \
                [t for ts in found.boundaries.values() for t in ts]
            existing = [o.name for o in model.graph.output]
            if isinstance(marked, list):
                marked = existing + [t for t in marked if t not in existing]
            model = polygraphy("backend.onnx").ModifyOutputs(model, outputs=marked)()
            options = ort.SessionOptions()
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
            providers = [cuda_provider(), "CPUExecutionProvider"] \
                if self.device.startswith("cuda") else ["CPUExecutionProvider"]
            if external_locations(model):
                # weights in files beside the graph (a 7B llm.onnx: 13 GB, over the 2 GB protobuf limit): the
                # marked graph goes to ONNX Runtime as bytes without them, and it reads them from the artifact
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(path.parent))
            data = polygraphy("backend.onnx").BytesFromOnnx(model)()
            session = ort.InferenceSession(data, options, providers=providers)
            return polygraphy("backend.onnxrt").OnnxrtRunner(session, name=f"{self.name}/{graph}")

        def activate_impl(self) -> None:
            self.vision, self.llm = self._session("vision"), self._session("llm")
            self.vision.activate()
            self.llm.activate()
            self.table = load_embedding_table(self.artifact, self.manifest)

        def deactivate_impl(self) -> None:
            self.vision.deactivate()
            self.llm.deactivate()

        def _stage_outputs(self, graph: str, outputs: dict[str, np.ndarray], result: OrderedDict) -> None:
            for scope, tensors in self.scopes[graph].boundaries.items():
                hidden = [t for t in tensors if t in outputs and outputs[t].ndim == 3 and outputs[t].dtype.kind == "f"]
                if hidden:
                    result[scope] = outputs[hidden[-1]]
            if self.per_layer:
                for tensor in self.scopes[graph].tensor_order:
                    if tensor in outputs:
                        result[f"{NODE_PREFIX}{graph}:{tensor}"] = outputs[tensor]

        def infer_impl(self, feed_dict):
            start, result = time.perf_counter(), OrderedDict()
            feed = {k: v.astype(self.dtype) if v.dtype.kind == "f" else v for k, v in feed_dict.items()}
            vis = self.vision.infer(feed)
            self._stage_outputs("vision", vis, result)
            embeds, keep = vis["visual_embeds"], vis[KEEP_INDEX]
            result[KEEP_INDEX] = keep
            self.processor = artifact_processor(self.artifact, self.manifest)  # the same prompt ids in every runner
            layout = self.processor.layout([self.request.prompt], self.request.inputs, keep, self.request.steps)
            result[SPAN_START] = np.asarray(layout.image_start)
            decoder = self.manifest.model.decoder
            names = set(self.llm.get_input_metadata().keys())
            past = {n: np.zeros((layout.batch, decoder.num_kv_heads, 0, decoder.head_dim), self.dtype)
                    for n in past_names(decoder.num_layers)}

            def run(embeds_in: np.ndarray, positions: np.ndarray, mask: np.ndarray, record: bool) -> np.ndarray:
                feed = {"inputs_embeds": np.ascontiguousarray(embeds_in, dtype=self.dtype),
                        "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
                        "attention_mask": np.ascontiguousarray(mask, dtype=np.int64), **past}
                if IMAGE_START in names:
                    feed[IMAGE_START] = np.ascontiguousarray(layout.image_start, dtype=np.int64)
                if INJECTED_EMBEDS in names:  # the prefill's visual rows; none at decode
                    layers = decoder.injected_layers
                    injected, rows = injected_inputs(vis.get(INJECTED_EMBEDS), layers, layout.visual_rows) \
                        if record else no_injected(layers, decoder.hidden_size, *embeds_in.shape[:2], self.dtype)
                    feed[INJECTED_EMBEDS], feed[INJECTED_ROWS] = injected.astype(self.dtype), rows
                out = self.llm.infer(feed)
                past.update({p: out[q] for p, q in zip(past_names(decoder.num_layers),
                                                        present_names(decoder.num_layers))})
                if record:
                    self._stage_outputs("llm", out, result)
                    if STAGE2_INDEX in out:
                        result[STAGE2_INDEX] = np.asarray(out[STAGE2_INDEX])
                return np.asarray(out[LOGITS])[:, -1].astype(np.float32)

            spliced = splice_numpy(self.table, layout.token_ids, np.asarray(embeds), layout.visual_rows)
            logits = run(spliced, layout.positions, layout.attention_mask, True)
            result[LOGITS] = logits
            result[GREEDY], result[STEP_LOGITS] = self._greedy(
                logits, layout, lambda t, m, p: run(self.table[t][:, None], p, m, False))
            self.inference_time = time.perf_counter() - start
            return result

    return ArtifactOnnxrtRunner()


def make_backend_runner(backend: str, artifact: Path, manifest: Manifest, request: Request, device: str | None,
                        name: str | None = None, **options: Any):
    """A runner over apet's own ``backend`` (tensorrt, torch): the graphs' outputs, and stage 1's input features
    where the backend exposes them (torch), so both sides of a comparison have ApET's margins."""
    base = _base_runner()

    class BackendRunner(_RequestRunner, base):
        def __init__(self) -> None:
            base.__init__(self, name=name or f"{backend}:{Path(artifact).name}", prefix=f"apet-{backend}")
            self._setup(artifact, manifest, request)

        def activate_impl(self) -> None:
            from apet.runtime.pipeline import make_backend

            self.backend = make_backend(backend, self.artifact, self.manifest, device, **options)

        def deactivate_impl(self) -> None:
            self.backend = None

        def infer_impl(self, feed_dict):
            start, result = time.perf_counter(), OrderedDict()
            visual = self.backend.encode(self.request.inputs)
            keep = as_numpy(visual.keep_index)
            if visual.features is not None:
                result["vision"] = as_numpy(visual.features)
            result["projector"], result[KEEP_INDEX] = as_numpy(visual.embeds), keep
            self.processor = artifact_processor(self.artifact, self.manifest)  # the same prompt ids in every runner
            layout = self.processor.layout([self.request.prompt], self.request.inputs, keep, self.request.steps)
            result[SPAN_START] = np.asarray(layout.image_start)
            logits = self.backend.prefill(layout, visual)
            stage2 = getattr(self.backend, "stage2_index", None)
            if stage2 is not None:
                result[STAGE2_INDEX] = as_numpy(stage2)
            result[LOGITS] = logits
            result[GREEDY], result[STEP_LOGITS] = self._greedy(logits, layout, self.backend.decode)
            self.inference_time = time.perf_counter() - start
            return result

    return BackendRunner()

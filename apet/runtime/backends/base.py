"""The small interface every runtime backend implements, its registry, and helpers they share.

The pipeline speaks numpy at this boundary for ids, masks, positions and logits (small), while
visual embeddings and the KV cache stay in the backend's own memory (device tensors, OrtValues)
between calls. As in Polygraphy's runners, the public methods validate and the ``_``-prefixed ones
run, so a backend never re-checks what the base class checked.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from apet.contracts.io import INJECTED_EMBEDS, VISION_OUTPUTS
from apet.errors import BackendError, InputError
from apet.extras import import_extra
from apet.manifest import Manifest
from apet.models.family import Layout, VisionInputs


@dataclass
class VisionOutput:
    embeds: Any  # backend-native visual embeddings, flattened by rows for splicing
    keep_index: np.ndarray | list[np.ndarray]  # kept indices (int64) [B, K], or one array per medium
    apet_ms: float | None = None  # time of ApET alone, where the backend can separate it
    features: Any = None  # stage 1's input [B, N, D], where the backend has it apart (apet check's margins)
    # backend-native [L, N, H]: per-layer inputs for the same N rows as ``embeds`` (DecoderSpec.injected_layers)
    injected: Any = None

    @classmethod
    def of(cls, outputs: Mapping[str, Any], apet_ms: float | None = None, features: Any = None) -> "VisionOutput":
        """From the vision graph's outputs by name (:mod:`apet.contracts.io`); kept indices as int64 numpy."""
        embeds, keep = (outputs[name] for name in VISION_OUTPUTS)
        return cls(embeds, np.asarray(keep).astype(np.int64, copy=False), apet_ms, features,
                   injected=outputs.get(INJECTED_EMBEDS))


@dataclass
class FirstToken:
    """A request's first token: the vision output, the layout around its kept indices, the prefill's logits, and
    each step's wall ms. A backend that runs vision and prefill as one graph reports their time as ``prefill_ms``
    (``vision_ms`` 0)."""

    visual: VisionOutput
    layout: Layout
    logits: np.ndarray  # float32 [B, V]
    vision_ms: float
    layout_ms: float
    prefill_ms: float


class Backend(ABC):
    """Runs the artifact's vision and language graphs; owns the KV cache between calls."""

    name: ClassVar[str] = "?"

    def __init__(self, artifact_dir: Path, manifest: Manifest) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest

    @classmethod
    def available(cls, artifact_dir: Path, device: str | None) -> bool:
        """Whether ``auto`` may pick this backend for ``artifact_dir`` on ``device``."""
        return True

    # -- public: validate, then run --------------------------------------------------------------
    def encode(self, inputs: VisionInputs) -> VisionOutput:
        """The vision graph on one batch of requests (one run, or several concatenated: see VisionInputs)."""
        self.check_batch(inputs.items)
        runs = inputs.all_runs()
        if len(runs) == 1:
            return self._encode(runs[0])
        return concatenate_outputs([self._encode(arrays) for arrays in runs])

    def prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray:
        """Whole prompts (visual rows spliced in) -> float32 logits [B, V]; starts a new cache."""
        self.check_prompt(layout)
        return self._prefill(layout, visual)

    def first_token(self, inputs: VisionInputs, layout_for: Callable[[np.ndarray], Layout]) -> FirstToken:
        """The vision graph, the prompt laid out around its kept indices (``layout_for``) and the prefill: a
        request's first token. A backend may run them as one (:class:`FirstToken`)."""
        start = time.perf_counter()
        visual = self.encode(inputs)
        self.synchronize()
        encoded = time.perf_counter()
        layout = layout_for(visual.keep_index)
        laid_out = time.perf_counter()
        logits = self.prefill(layout, visual)
        return FirstToken(visual, layout, logits, (encoded - start) * 1e3, (laid_out - encoded) * 1e3,
                          (time.perf_counter() - laid_out) * 1e3)

    def check_prompt(self, layout: Layout) -> None:
        """Refuse a prefill the backend cannot run: its batch, or a prompt longer than the artifact's context."""
        self.check_request(layout.batch, layout.token_ids.shape[1], 1)
        if layout.token_ids.shape[1] > self.manifest.max_context:
            raise InputError(f"a prompt of {layout.token_ids.shape[1]} tokens exceeds the artifact's max_context "
                             f"{self.manifest.max_context}",
                             "shorten the prompt or re-export with apet-export --max-context")

    def decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One new token per row [B] with the full mask [B, P+1] and its positions -> float32 logits [B, V]."""
        return self._decode(token_ids, attention_mask, positions)

    def check_request(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        """Refuse a request this backend cannot serve before its prefill runs (engines may be built smaller
        than the export's limits)."""
        self.check_batch(batch)

    def check_batch(self, batch: int) -> None:
        if batch > self.manifest.max_batch:
            raise InputError(f"batch of {batch} exceeds the artifact's max batch {self.manifest.max_batch}",
                             "split the request, or re-export/re-build with a larger --max-batch (apet-export, "
                             "apet-build)")

    # -- implementations ---------------------------------------------------------------------------
    @abstractmethod
    def _encode(self, arrays: dict[str, np.ndarray]) -> VisionOutput: ...

    @abstractmethod
    def _prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def cache_lengths(self) -> list[int]:
        """Current past length of every layer (layers after stage 2 are shorter)."""

    def peak_memory_bytes(self) -> int | None:
        return None

    def apet_ms(self, visual: VisionOutput, inputs: VisionInputs | None = None) -> float | None:
        """Milliseconds of ApET (stage 1) in the request's vision run (``inputs``), where the backend can tell;
        called after the first token's timing so that reading a profile does not count as vision time."""
        return visual.apet_ms

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""



# -- registry --------------------------------------------------------------------------------------
# name -> "module:Class"; modules import their optional dependencies lazily, so listing costs nothing
BACKENDS: dict[str, str] = {
    "tensorrt": "apet.runtime.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "apet.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "apet.runtime.backends.torch:TorchBackend",
}
BACKEND_EXTRAS = {"torch": "export"}  # the extra a backend's module needs to import at all
AUTO_ORDER = ("tensorrt", "onnxruntime")  # ``auto`` takes the first one available


def register_backend(name: str, target: str, auto: bool = False) -> None:
    """Add a backend (``"package.module:Class"``); ``auto`` puts it first in the ``auto`` order."""
    global AUTO_ORDER
    BACKENDS[name] = target
    if auto:
        AUTO_ORDER = (name, *AUTO_ORDER)


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r} is unknown", f"use one of auto, {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(import_extra(module, extra=BACKEND_EXTRAS.get(name, "export"), purpose=f"the {name} backend"), cls)


def resolve_backend(name: str, artifact_dir: Path, device: str | None) -> str:
    """``auto`` -> the first backend of :data:`AUTO_ORDER` available here; other names pass through."""
    if name != "auto":
        backend_class(name)  # unknown names fail here
        return name
    for candidate in AUTO_ORDER:
        if backend_class(candidate).available(artifact_dir, device):
            return candidate
    raise BackendError("no runtime backend is available", "pip install onnxruntime (CPU) or build engines")


# -- shared helpers --------------------------------------------------------------------------------
def load_embedding_table(artifact_dir: Path, manifest: Manifest) -> np.ndarray:
    """The token-embedding table with the family's extra rows (numpy, the export dtype)."""
    from safetensors.numpy import load_file

    entry = manifest.embeddings
    path = Path(artifact_dir) / entry["file"]
    if not path.is_file():
        raise BackendError(f"{path} is missing", "re-export the artifact")
    return load_file(str(path))[entry.get("tensor", "weight")]


def _concatenate(parts: list[Any], axis: int) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    return sys.modules["torch"].cat(parts, dim=axis)  # device tensors of the torch backend, which imported torch


def concatenate_outputs(outputs: list[VisionOutput]) -> VisionOutput:
    """Several vision runs as one output: embedding rows concatenated in run order (numpy or torch, as the
    backend made them), injected inputs along their row axis (1) likewise, one kept-index array per medium."""
    embeds = _concatenate([o.embeds.reshape(-1, o.embeds.shape[-1]) for o in outputs], 0)
    injected = None
    if outputs[0].injected is not None:
        injected = _concatenate([o.injected.reshape(o.injected.shape[0], -1, o.injected.shape[-1])
                                 for o in outputs], 1)
    index = [np.asarray(row) for o in outputs for row in o.keep_index]
    times = [o.apet_ms for o in outputs]
    return VisionOutput(embeds, index, None if any(t is None for t in times) else float(sum(times)),
                        injected=injected)


def injected_inputs(visual: Any, layers: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LLM's injected inputs for a prefill: [L, N, H] rows in the order of the flattened visual embeddings
    and the [B, T] row of each token (the layout's ``visual_rows``, -1 for text)."""
    if visual is None:
        raise BackendError(f"the LLM takes {layers} layers of injected inputs but the vision graph returned none",
                           "re-export the artifact")
    visual = np.asarray(visual)
    return visual.reshape(layers, -1, visual.shape[-1]), np.ascontiguousarray(rows, dtype=np.int64)


def no_injected(layers: int, hidden: int, batch: int, length: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The injected inputs of a decode step: no rows (N = 0), every token text (-1)."""
    return np.zeros((layers, 0, hidden), dtype=dtype), np.full((batch, length), -1, dtype=np.int64)


def splice_numpy(table: np.ndarray, token_ids: np.ndarray, visual: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Token embeddings with every slot whose ``rows`` entry is >= 0 taken from the flattened visual rows."""
    embeds = table[token_ids]
    flat = visual.reshape(-1, visual.shape[-1])
    where = rows >= 0
    embeds[where] = flat[rows[where]]
    return embeds



def import_optional(module: str, extra: str, purpose: str) -> Any:
    """Import a backend package: missing, the :class:`MissingExtraError` naming the pip extra that provides it;
    present but unusable (a shared library that fails to load), a BackendError saying why."""
    try:
        return import_extra(module, extra=extra, purpose=purpose)
    except (ImportError, OSError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name and not module.startswith(exc.name.split(".")[0]):
            raise
        raise BackendError(f"{purpose} needs the Python package {module!r}, which cannot be imported ({exc})",
                           f'pip install "apet[{extra}]"') from exc

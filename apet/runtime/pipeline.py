"""``Pipeline``: image -> preprocess -> vision graph -> splice -> prefill -> decode -> text (DESIGN §6).

Concurrency model: a Pipeline serves one request at a time (a lock around
``generate``; the backends keep one KV cache). Threads may share a Pipeline
and are served in turn; for parallel requests, load one Pipeline per worker.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from apet.devices import check_device
from apet.errors import BackendError, InputError, UsageError
from apet.manifest import Manifest, read_manifest
from apet.runtime.backends.base import Backend
from apet.runtime.preprocess import ImageInput, pixel_batch
from apet.runtime.sampling import GenerationConfig, Sampler
from apet.runtime.text import PromptEncoder, StreamDecoder

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
DEMO_IMAGE = "@demo"  # the small image shipped with the package, usable wherever an image is


def resolve_image(image: ImageInput) -> ImageInput:
    """``@demo`` -> the bundled image; a directory is refused by name (not reported as missing)."""
    if isinstance(image, str) and image == DEMO_IMAGE:
        return str(Path(__file__).resolve().parents[1] / "assets" / "demo.png")
    if isinstance(image, (str, Path)) and Path(image).is_dir():
        raise InputError(f"image {image} is a directory, not an image file", "pass one image file (JPEG/PNG/...)")
    return image
StreamCallback = Callable[[int, str], None]  # (batch row, text delta)


@dataclass
class Stats:
    """Per-request timings (ms) and memory; TTFT counts from the start of preprocessing."""

    backend: str
    batch: int
    prompt_tokens: list[int]
    visual_tokens: int
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    apet_ms: float | None = None
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None
    cache_lengths: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    stats: Stats
    keep_index: list[int]


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def make_backend(name: str, artifact_dir: Path, manifest: Manifest, device: str, **options: Any) -> Backend:
    """Instantiate a backend; ``auto`` = TensorRT engines when present and importable, else ONNX Runtime."""
    if name not in BACKENDS:
        raise UsageError(f"backend {name!r} is unknown", f"use one of {', '.join(BACKENDS)}")
    device = check_device(device)
    if name == "auto":
        from apet.runtime.backends.tensorrt import tensorrt_available

        name = "tensorrt" if tensorrt_available(artifact_dir) else "onnxruntime"
        log.info("backend auto -> %s", name)
    if name == "onnxruntime":
        from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifact_dir, manifest, device=device, threads=options.get("threads"),
                                  profile_apet=bool(options.get("profile_apet")))
    if name == "torch":
        from apet.runtime.backends.torch import StaticTorchBackend, TorchBackend

        mode = options.get("torch_mode") or ("static" if device.startswith("cuda") else "reference")
        if mode not in ("reference", "static"):
            raise UsageError(f"torch mode {mode!r} is unknown", "use reference (HF modules) or static (CUDA graphs)")
        if mode == "static":
            return StaticTorchBackend(artifact_dir, manifest, device=device, checkpoint=options.get("checkpoint"),
                                      adapter=options.get("adapter"), cuda_graphs=options.get("cuda_graphs", True),
                                      compile=options.get("compile", False))
        return TorchBackend(artifact_dir, manifest, device=device, checkpoint=options.get("checkpoint"),
                            adapter=options.get("adapter"))
    from apet.runtime.backends.tensorrt import TensorRTBackend

    if not device.startswith("cuda"):
        raise BackendError("the tensorrt backend runs on a CUDA device", "pass --device cuda, or --backend onnxruntime")
    return TensorRTBackend(artifact_dir, manifest, device=device)


class Pipeline:
    def __init__(self, artifact_dir: Path, manifest: Manifest, backend: Backend) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.backend = backend
        self.encoder = PromptEncoder(self.artifact_dir, manifest)
        self.eos_ids = set(manifest.model.eos_token_ids)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "auto", device: str = "cpu", *,
             verify_checksums: bool = True, **options: Any) -> "Pipeline":
        artifact_dir = Path(artifact_dir)
        manifest = read_manifest(artifact_dir, verify_checksums=verify_checksums)
        return cls(artifact_dir, manifest, make_backend(backend, artifact_dir, manifest, device, **options))

    # -- public API --------------------------------------------------------------------------------
    def generate(self, image: ImageInput, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 stream: StreamCallback | None = None) -> Result:
        config = GenerationConfig(max_new_tokens, temperature, top_p, seed, tuple(stop))
        return self.generate_batch([image], [prompt], config, stream)[0]

    def generate_batch(self, images: Sequence[ImageInput], prompts: Sequence[str],
                       config: GenerationConfig = GenerationConfig(),
                       stream: StreamCallback | None = None) -> list[Result]:
        if len(images) != len(prompts) or not prompts:
            raise UsageError(f"{len(images)} images for {len(prompts)} prompts", "pass one image per prompt")
        with self._lock:
            return self._generate(list(images), list(prompts), config, stream)

    # -- the request ---------------------------------------------------------------------------------
    def _generate(self, images: list[ImageInput], prompts: list[str], config: GenerationConfig,
                  stream: StreamCallback | None) -> list[Result]:
        backend, batch = self.backend, len(prompts)
        backend.check_batch(batch)
        start = time.perf_counter()
        encoded = self.encoder.encode(prompts, self.manifest.max_context, config.max_new_tokens)
        backend.check_request(batch, encoded.token_ids.shape[1], config.max_new_tokens)
        pixels = pixel_batch([resolve_image(image) for image in images], self.manifest.model.processor)
        stats = Stats(backend.name, batch, encoded.prompt_lengths, self.manifest.visual_tokens)
        stats.preprocess_ms = (time.perf_counter() - start) * 1e3

        t0 = time.perf_counter()
        visual = backend.encode_images(pixels)
        backend.synchronize()
        stats.vision_ms = (time.perf_counter() - t0) * 1e3
        stats.apet_ms = backend.apet_ms(visual)

        t0 = time.perf_counter()
        logits = backend.prefill(encoded.token_ids, encoded.attention_mask, encoded.image_start, visual)
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3
        stats.ttft_ms = (time.perf_counter() - start) * 1e3

        sampler, mask = Sampler(config), encoded.attention_mask
        decoders = [StreamDecoder(self.encoder) for _ in range(batch)]
        finish: list[str | None] = [None] * batch
        eos, pad = self.eos_ids, self.encoder.pad_id
        t0 = time.perf_counter()
        for step in range(config.max_new_tokens):
            tokens = sampler(logits)
            for row in range(batch):
                if finish[row] is None:
                    finish[row] = self._accept(row, int(tokens[row]), decoders[row], eos, config, stream)
                else:
                    tokens[row] = pad
            stats.new_tokens = step + 1
            if all(f is not None for f in finish) or step + 1 == config.max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
            logits = backend.decode(tokens.astype(np.int64), mask)
        backend.synchronize()
        stats.decode_ms = (time.perf_counter() - t0) * 1e3
        for row, decoder in enumerate(decoders):
            rest = decoder.flush()
            if rest and stream is not None and finish[row] != "stop":
                stream(row, rest)
        stats.decode_tokens_per_s = stats.new_tokens / (stats.decode_ms / 1e3) if stats.decode_ms > 0 else 0.0
        stats.peak_rss_mb = _peak_rss_mb()
        device_peak = backend.peak_memory_bytes()
        stats.peak_device_mb = None if device_peak is None else device_peak / (1 << 20)
        stats.cache_lengths = backend.cache_lengths()
        return [Result(self._final_text(d, config), d.ids, finish[row] or "length", stats,
                       visual.keep_index[row].tolist()) for row, d in enumerate(decoders)]

    @staticmethod
    def _accept(row: int, token: int, decoder: StreamDecoder, eos: set[int], config: GenerationConfig,
                stream: StreamCallback | None) -> str | None:
        """Record one token of one row; returns why the row finished, or None."""
        if token in eos:
            return "eos"
        delta = decoder.push(token)
        if delta and stream is not None:
            stream(row, delta)
        if config.stop and any(s in decoder.text for s in config.stop):
            return "stop"
        return None

    @staticmethod
    def _final_text(decoder: StreamDecoder, config: GenerationConfig) -> str:
        text = decoder.text
        for stop in config.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return text

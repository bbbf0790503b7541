"""``Pipeline``: image -> preprocess -> vision graph -> splice -> prefill -> decode -> text (docs/architecture.md).

Concurrency model: a Pipeline serves one request at a time (a lock around
``generate``; the backends keep one KV cache). Threads may share a Pipeline
and are served in turn; for parallel requests, load one Pipeline per worker,
or batch them: ``generate_batch`` takes one :class:`GenerationConfig` per row
(each row samples with its own seeded RNG and stops on its own limits, so a
request's answer does not depend on its batch-mates) and a ``cancelled`` hook
that ends a row early (a server's client that went away).
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
from apet.errors import BackendError, UsageError, option
from apet.manifest import Manifest, consistent_read, read_manifest
from apet.models.family import Layout
from apet.models.registry import family_of
from apet.runtime.backends.base import Backend, backend_class, resolve_backend
from apet.runtime.sampling import GenerationConfig, Sampler
from apet.runtime.stopping import StopHoldback
from apet.runtime.text import StreamDecoder

log = logging.getLogger(__name__)

MediaInput = Any  # an image (path, bytes, PIL image, array) or, for video families, a video
StreamCallback = Callable[[int, str], None]  # (batch row, text delta)
CancelCheck = Callable[[int], bool]  # (batch row) -> stop generating for it now


@dataclass
class Stats:
    """Per-request timings (ms) and memory; TTFT counts from the start of preprocessing."""

    backend: str
    batch: int
    prompt_tokens: list[int]
    visual_tokens: list[int]
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
    finish_reason: str  # "eos" | "stop" | "length" | "cancelled"
    stats: Stats
    keep_index: list  # kept positions of this request's image: [K1], or [views][K1] for multi-view families


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def make_backend(name: str, artifact_dir: Path, manifest: Manifest, device: str | None, **options: Any) -> Backend:
    """Instantiate a registered backend; ``auto`` = the first one available (TensorRT engines on a GPU,
    else ONNX Runtime). ``device`` None = the backend's own default (cuda for TensorRT, cpu otherwise)."""
    device = None if device is None else check_device(device)  # spelling; each backend asks its own driver
    name = resolve_backend(name, artifact_dir, device)
    log.info("backend %s", name)
    if name == "tensorrt":  # it asks the CUDA driver itself (cuda-python), without torch
        if manifest.kv_cache != "dynamic":
            raise BackendError(f"the tensorrt backend runs the dynamic KV-cache form, this artifact is "
                               f"--kv-cache {manifest.kv_cache}", f"pass {option('backend', 'onnxruntime')}, or "
                               "re-export with apet-export --kv-cache dynamic")
        if device is not None and not device.startswith("cuda"):
            raise BackendError("the tensorrt backend runs on a CUDA device",
                               f"pass {option('device', 'cuda')}, or {option('backend', 'onnxruntime')}")
        return backend_class(name)(artifact_dir, manifest, device=device or "cuda")
    device = device or "cpu"
    if name == "onnxruntime":
        return backend_class(name)(artifact_dir, manifest, device=device, threads=options.get("threads"),
                                   profile_apet=bool(options.get("profile_apet")),
                                   cuda_graphs=bool(options.get("cuda_graphs", True)),
                                   decode_attention=str(options.get("decode_attention", "auto")),
                                   rewrites=options.get("ort_rewrites"))
    if name == "torch":  # the host's reference and GPU fast path (apet[export]); imported by name
        return backend_class(name).create(artifact_dir, manifest, device=device, **options)
    return backend_class(name)(artifact_dir, manifest, device=device, **options)


class Pipeline:
    def __init__(self, artifact_dir: Path, manifest: Manifest, backend: Backend) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.backend = backend
        self.processor = family_of(manifest).processor(self.artifact_dir, manifest)
        self.encoder = self.processor.encoder
        self.eos_ids = set(manifest.model.eos_token_ids)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "auto", device: str | None = None, *,
             verify_checksums: bool = True, **options: Any) -> "Pipeline":
        """Load the artifact's files of one version: a load that overlaps an apet-export or apet-build replacing
        them is repeated, and raises the retryable ArtifactChangedError if they keep changing (DESIGN §3)."""
        artifact_dir = Path(artifact_dir)

        def load() -> "Pipeline":
            manifest = read_manifest(artifact_dir, verify_checksums=verify_checksums)
            return cls(artifact_dir, manifest, make_backend(backend, artifact_dir, manifest, device, **options))

        return consistent_read(artifact_dir, load)

    # -- public API --------------------------------------------------------------------------------
    def generate(self, image: MediaInput = None, prompt: str = "", *, video: MediaInput = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), stream: StreamCallback | None = None) -> Result:
        """Answer ``prompt`` about one ``image`` or one ``video`` (a file, a directory of frames, a .npy or a
        [T, H, W, 3] array), whichever the artifact's family takes (``family_of(manifest).media``)."""
        config = GenerationConfig(max_new_tokens, temperature, top_p, seed, tuple(stop))
        return self.generate_batch([self._medium(image, video)], [prompt], config, stream)[0]

    def _medium(self, image: MediaInput, video: MediaInput) -> MediaInput:
        """The one medium given, checked against what the family reads."""
        media, family = family_of(self.manifest).media_of(self.manifest), self.manifest.model.family
        article = {"image": "an", "video": "a"}
        if (image is None) == (video is None):
            raise UsageError("pass exactly one of image= and video=",
                             f"this {family} artifact takes {article[media]} {media} (apet-run --{media})")
        given = "image" if video is None else "video"
        if given != media:
            raise UsageError(f"this {family} artifact takes {article[media]} {media}, not {article[given]} {given}",
                             f"pass {media}= (apet-run --{media})")
        return image if video is None else video

    def generate_batch(self, media: Sequence[MediaInput], prompts: Sequence[str],
                       config: GenerationConfig | Sequence[GenerationConfig] = GenerationConfig(),
                       stream: StreamCallback | None = None, cancelled: CancelCheck | None = None) -> list[Result]:
        """One prefill and decode loop for all rows; ``config`` is shared or given per row."""
        if len(media) != len(prompts) or not prompts:
            kind = family_of(self.manifest).media_of(self.manifest)
            raise UsageError(f"{len(media)} {kind}s for {len(prompts)} prompts", f"pass one {kind} per prompt")
        configs = [config] * len(prompts) if isinstance(config, GenerationConfig) else list(config)
        if len(configs) != len(prompts):
            raise UsageError(f"{len(configs)} generation configs for {len(prompts)} prompts",
                             "pass one GenerationConfig, or one per prompt")
        with self._lock:
            return self._generate(list(media), list(prompts), configs, stream, cancelled)

    # -- the request ---------------------------------------------------------------------------------
    def _generate(self, media: list[MediaInput], prompts: list[str], configs: list[GenerationConfig],
                  stream: StreamCallback | None, cancelled: CancelCheck | None) -> list[Result]:
        backend, processor, batch = self.backend, self.processor, len(prompts)
        backend.check_batch(batch)
        steps = max(c.max_new_tokens for c in configs)  # the cache must hold the longest row's answer
        start = time.perf_counter()
        longest = processor.check_prompts(prompts, steps)
        backend.check_request(batch, longest, steps)  # engines may be smaller than the export
        inputs = processor.vision_inputs(media)
        preprocess_ms = (time.perf_counter() - start) * 1e3

        def layout_for(keep_index: np.ndarray) -> Layout:
            layout = processor.layout(prompts, inputs, keep_index, steps)
            backend.check_request(batch, layout.token_ids.shape[1], steps)
            return layout

        first = backend.first_token(inputs, layout_for)
        done = time.perf_counter()
        visual, layout, logits = first.visual, first.layout, first.logits
        stats = Stats(backend.name, batch, layout.prompt_lengths, layout.visual_tokens, preprocess_ms=preprocess_ms,
                      vision_ms=first.vision_ms, apet_ms=backend.apet_ms(visual, inputs))
        stats.prefill_ms = first.prefill_ms  # the layout's host time is in ttft_ms only, as before
        stats.ttft_ms = (done - start) * 1e3

        samplers, mask = [Sampler(c) for c in configs], layout.attention_mask
        decoders = [StreamDecoder(self.encoder) for _ in range(batch)]
        holds = [StopHoldback(c.stop) for c in configs]  # streamed text never shows a stop string
        finish: list[str | None] = [None] * batch
        eos, pad = self.eos_ids, self.encoder.pad_id
        t0 = time.perf_counter()
        for step in range(steps):
            tokens = np.full(batch, pad, dtype=np.int64)
            for row, config in enumerate(configs):
                if finish[row] is None and cancelled is not None and cancelled(row):
                    finish[row] = "cancelled"
                if finish[row] is None:
                    tokens[row] = samplers[row](logits[row:row + 1])[0]
                    finish[row] = self._accept(row, int(tokens[row]), decoders[row], holds[row], eos, config,
                                               stream)
                    if finish[row] is None and step + 1 == config.max_new_tokens:
                        finish[row] = "length"
            stats.new_tokens = step + 1
            if all(f is not None for f in finish):
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
            logits = backend.decode(tokens.astype(np.int64), mask, processor.decode_positions(layout, mask))
        backend.synchronize()
        stats.decode_ms = (time.perf_counter() - t0) * 1e3
        for row, decoder in enumerate(decoders):
            rest = holds[row].finish(self._final_text(decoder, configs[row]))  # held back text, partial characters
            if rest and stream is not None and finish[row] != "cancelled":
                stream(row, rest)
        stats.decode_tokens_per_s = stats.new_tokens / (stats.decode_ms / 1e3) if stats.decode_ms > 0 else 0.0
        stats.peak_rss_mb = _peak_rss_mb()
        device_peak = backend.peak_memory_bytes()
        stats.peak_device_mb = None if device_peak is None else device_peak / (1 << 20)
        stats.cache_lengths = backend.cache_lengths()
        kept = processor.item_keep_index(inputs, visual.keep_index)
        return [Result(self._final_text(d, configs[row]), d.ids, finish[row] or "length", stats,
                       kept[row].tolist() if row < len(kept) else [])
                for row, d in enumerate(decoders)]

    @staticmethod
    def _accept(row: int, token: int, decoder: StreamDecoder, hold: StopHoldback, eos: set[int],
                config: GenerationConfig, stream: StreamCallback | None) -> str | None:
        """Record one token of one row; returns why the row finished, or None."""
        if token in eos:
            return "eos"
        delta = hold.push(decoder.push(token))
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

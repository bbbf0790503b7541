"""PyTorch backend: the source checkpoint run through its own Hugging Face modules with the same
ApET stages (the reference of DESIGN §7), eagerly on CPU or GPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from apet.compression import CompressionConfig, Stage2Config, stage_configs
from apet.errors import BackendError
from apet.manifest import Manifest
from apet.models.base import VisionLanguageAdapter
from apet.reference import Reference, ReferenceState
from apet.runtime.backends.base import Backend, VisionOutput, splice


def compression_from_manifest(manifest: Manifest) -> tuple[CompressionConfig, Stage2Config | None]:
    c = manifest.compression
    stage2 = None if c.stage2 is None else (c.stage2.layer, c.stage2.keep)
    return stage_configs(c.stage1_keep, stage2, c.basis_k, c.basis_method, c.merge, c.seed)


def load_source_adapter(manifest: Manifest, checkpoint: str | None, device: str) -> VisionLanguageAdapter:
    from apet.models.registry import load_adapter

    source = checkpoint or manifest.model.source
    if source == "random-init":
        raise BackendError("the artifact was exported from a random-init model; the torch backend needs weights",
                           "pass checkpoint=PATH (apet-run --checkpoint PATH)")
    dtype = torch.float16 if device.startswith("cuda") and manifest.dtype == "fp16" else torch.float32
    option = "--checkpoint" if checkpoint else "the manifest's model.source (override with --checkpoint)"
    return load_adapter(source, dtype=dtype, device=device, option=option)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cpu", checkpoint: str | None = None,
                 adapter: VisionLanguageAdapter | None = None) -> None:
        super().__init__(artifact_dir, manifest)
        self.device = torch.device(device)
        self.adapter = adapter or load_source_adapter(manifest, checkpoint, device)
        if self.adapter.spec.n_tokens != manifest.model.n_tokens or \
                self.adapter.spec.decoder.vocab_size != manifest.model.decoder.vocab_size:
            raise BackendError("the checkpoint does not match the artifact (token count or vocabulary differs)",
                               "pass the checkpoint the artifact was exported from")
        stage1, stage2 = compression_from_manifest(manifest)
        self.reference = Reference(self.adapter, stage1, stage2, rule=manifest.compression.rule)
        self.table = self.adapter.embed_tokens().weight
        self.state: ReferenceState | None = None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def encode_images(self, pixel_values: np.ndarray) -> VisionOutput:
        pixels = torch.from_numpy(pixel_values).to(self.device, self.adapter.dtype)
        features = self.adapter.vision_features(pixels)
        self.synchronize()
        start = time.perf_counter()
        kept = self.reference.select(features, self.reference.stage1)
        self.synchronize()
        apet_ms = (time.perf_counter() - start) * 1e3
        return VisionOutput(self.adapter.project(kept.tokens), kept.index.cpu().numpy(), apet_ms)

    @torch.no_grad()
    def prefill(self, token_ids: np.ndarray, attention_mask: np.ndarray, image_start: np.ndarray,
                visual: VisionOutput) -> np.ndarray:
        self.check_batch(token_ids.shape[0])
        start = torch.from_numpy(image_start).to(self.device)
        embeds = splice(self.table, torch.from_numpy(token_ids).to(self.device), visual.embeds, start)
        mask = torch.from_numpy(attention_mask).to(self.device)
        logits, self.state = self.reference.prefill(embeds, mask, start)
        return logits[:, -1].float().cpu().numpy()

    @torch.no_grad()
    def decode(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        assert self.state is not None, "prefill first"
        embeds = self.table[torch.from_numpy(token_ids).to(self.device)][:, None]
        logits = self.reference.decode(embeds, self.state)
        return logits[:, -1].float().cpu().numpy()

    def cache_lengths(self) -> list[int]:
        return self.reference.cache_lengths(self.state) if self.state is not None else []

    def peak_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None


class StaticTorchBackend(TorchBackend):
    """The GPU fast path: static KV cache, every stage captured as a CUDA graph (eager on CPU).

    Prompts are left-padded to a multiple of ``bucket`` tokens so a handful of
    prefill graphs serve every prompt length; graphs are captured on first use.
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cuda", checkpoint: str | None = None,
                 adapter: VisionLanguageAdapter | None = None, cuda_graphs: bool = True, bucket: int = 16,
                 compile: bool = False) -> None:
        super().__init__(artifact_dir, manifest, device, checkpoint, adapter)
        from apet.runtime.static_decoder import StaticDecoder

        if manifest.compression.rule != "apet" and manifest.compression.stage2 is not None:
            raise BackendError("the static-cache path runs ApET at stage 2; other rules need the reference path",
                               "use torch_mode='reference' for rule comparisons")
        on_gpu = self.device.type == "cuda"
        self.decoder = StaticDecoder(self.adapter, self.reference.stage2, manifest.max_batch, manifest.max_context,
                                     fuse=on_gpu)
        self.use_graphs = cuda_graphs and on_gpu
        self.compile = compile
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.bucket = bucket
        self.calls: dict[tuple, object] = {}

    def _call(self, key: tuple, fn, example: dict[str, torch.Tensor], before_capture=None):
        from apet.runtime.cuda_graphs import GraphedCall

        if key not in self.calls:
            fn = torch.compile(fn, dynamic=False) if self.compile else fn
            self.calls[key] = GraphedCall(fn, example, enabled=self.use_graphs, pool=self.pool,
                                          before_capture=before_capture)
        return self.calls[key]

    def _vision(self, pixel_values: torch.Tensor):
        kept = self.reference.select(self.adapter.vision_features(pixel_values), self.reference.stage1)
        return self.adapter.project(kept.tokens), kept.index

    @torch.no_grad()
    def encode_images(self, pixel_values: np.ndarray) -> VisionOutput:
        pixels = torch.from_numpy(pixel_values).to(self.device, self.adapter.dtype)
        call = self._call(("vision", pixels.shape[0]), self._vision, {"pixel_values": pixels})
        embeds, index = call(pixel_values=pixels)
        return VisionOutput(embeds.clone(), index.cpu().numpy())

    def _prefill(self, token_ids: torch.Tensor, mask: torch.Tensor, image_start: torch.Tensor,
                 visual: torch.Tensor) -> torch.Tensor:
        return self.decoder.prefill(splice(self.table, token_ids, visual, image_start), mask, image_start)

    @torch.no_grad()
    def prefill(self, token_ids: np.ndarray, attention_mask: np.ndarray, image_start: np.ndarray,
                visual: VisionOutput) -> np.ndarray:
        self.check_batch(token_ids.shape[0])
        extra = -token_ids.shape[1] % self.bucket
        if token_ids.shape[1] + extra > self.manifest.max_context:
            extra = 0
        pad = self.manifest.model.pad_token_id or 0
        ids = np.pad(token_ids, ((0, 0), (extra, 0)), constant_values=pad)
        mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
        tensors = {"token_ids": torch.from_numpy(ids).to(self.device), "mask": torch.from_numpy(mask).to(self.device),
                   "image_start": torch.from_numpy(image_start + extra).to(self.device), "visual": visual.embeds}
        call = self._call(("prefill",) + tuple(ids.shape), self._prefill, tensors)
        self.padding = extra
        return call(**tensors).float().cpu().numpy()

    @torch.no_grad()
    def decode(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        from apet.runtime.backends.base import positions_from_mask

        tensors = {"token_ids": torch.from_numpy(token_ids).to(self.device),
                   "positions": torch.from_numpy(positions_from_mask(attention_mask)[:, -1:]).to(self.device)}
        key = ("decode", token_ids.shape[0])
        if key not in self.calls:
            saved = self.decoder.snapshot()
            self._call(key, self._decode, tensors, before_capture=lambda: self.decoder.restore(saved))
        return self.calls[key](**tensors).float().cpu().numpy()

    def _decode(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(self.table[token_ids][:, None], positions)

    def cache_lengths(self) -> list[int]:
        return [n - self.padding for n in self.decoder.cache_lengths()]

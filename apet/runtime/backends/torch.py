"""PyTorch backends: the source checkpoint run through its own Hugging Face modules with the same ApET
stages (the reference of docs/algorithm.md, "How we check it"), and on a GPU a static-cache path captured as CUDA
graphs."""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apet.contracts.io import KEEP_INDEX
from apet.errors import BackendError, UsageError, option
from apet.kernels.varlen import PromptPadding, prompt_padding
from apet.manifest import Manifest
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.devices import check_torch_device
from apet.modeling.fast_path import fast_towers
from apet.modeling.reference import Reference, ReferenceState
from apet.models.family import Layout
from apet.models.registry import family_of
from apet.runtime.backends.base import Backend, VisionOutput
from apet.runtime.compiled import check_compile_mode, compile_measured


def load_source_adapter(manifest: Manifest, checkpoint: str | None, device: str) -> VisionLanguageAdapter:
    from apet.models.registry import load_adapter

    source = checkpoint or manifest.model.source
    if source == "random-init":
        raise BackendError("the artifact was exported from a random-init model; the torch backend needs weights",
                           f"pass {option('checkpoint', 'PATH')}, the source checkpoint directory")
    dtype = torch.float16 if device.startswith("cuda") and manifest.dtype == "fp16" else torch.float32
    named = option("checkpoint") if checkpoint else \
        f"the manifest's model.source (override with {option('checkpoint')})"
    return load_adapter(source, dtype=dtype, device=device, option=named)


def embedding_table(adapter: VisionLanguageAdapter) -> torch.Tensor:
    """The token embeddings with the family's extra rows appended, as the exported table has them."""
    table = adapter.embed_tokens().weight
    extra = adapter.extra_embeddings()
    if not extra:
        return table
    return torch.cat([table, *[row.reshape(1, -1).to(table.dtype) for row in extra.values()]])


def splice(table: torch.Tensor, token_ids: torch.Tensor, visual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The torch version of :func:`apet.runtime.backends.base.splice_numpy` (no Python loop, so it can sit
    inside a CUDA graph)."""
    flat = visual.reshape(-1, visual.shape[-1])
    picked = flat[rows.clamp(min=0)]
    return torch.where((rows >= 0).unsqueeze(-1), picked, table[token_ids])


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def create(cls, artifact_dir: Path, manifest: Manifest, *, device: str, **options: Any) -> "TorchBackend":
        """The torch backend in ``torch_mode`` (``reference``: HF modules; ``static``: static cache and CUDA
        graphs, the default on a GPU)."""
        check_torch_device(device)
        mode = options.get("torch_mode") or ("static" if device.startswith("cuda") else "reference")
        if mode not in ("reference", "static"):
            raise UsageError(f"torch mode {mode!r} is unknown", "use reference (HF modules) or static (CUDA graphs)")
        if mode == "static":
            return StaticTorchBackend(artifact_dir, manifest, device=device, checkpoint=options.get("checkpoint"),
                                      adapter=options.get("adapter"), cuda_graphs=options.get("cuda_graphs", True),
                                      compile=options.get("compile", False),
                                      compile_mode=options.get("compile_mode", "default"))
        return cls(artifact_dir, manifest, device=device, checkpoint=options.get("checkpoint"),
                   adapter=options.get("adapter"))

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cpu", checkpoint: str | None = None,
                 adapter: VisionLanguageAdapter | None = None) -> None:
        super().__init__(artifact_dir, manifest)
        self.device = torch.device(device)
        adapter = adapter or load_source_adapter(manifest, checkpoint, device)
        # a dynamic-resolution family's n_tokens is the export's pixel range (--pixel-range), not the checkpoint's
        tokens_differ = adapter.spec.n_tokens != manifest.model.n_tokens and not family_of(manifest).dynamic_tokens
        if tokens_differ or adapter.spec.decoder.vocab_size != manifest.model.decoder.vocab_size:
            raise BackendError("the checkpoint does not match the artifact (token count or vocabulary differs)",
                               "pass the checkpoint the artifact was exported from")
        # the same weights under the artifact's settings (e.g. --frames, --media), without touching the caller's
        self.adapter = copy.copy(adapter)
        self.adapter.spec = manifest.model
        if manifest.weights.quantized:  # the artifact's INT8/INT4 weights, rebuilt from the float checkpoint
            from apet.quant.apply import match_artifact

            match_artifact(self.adapter, manifest.weights, artifact_dir)
        plan = manifest.compression
        self.reference = Reference(self.adapter, plan.stage1, plan.stage2, rule=plan.rule)
        self.table = embedding_table(self.adapter)
        self.state: ReferenceState | None = None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def stage2_index(self) -> np.ndarray | None:
        """Stage 2's kept indices of the last prefill, as the ONNX Runtime backend has them (apet check); None
        before a prefill, without stage 2, or on the static path (its decoder keeps them on the device)."""
        if self.state is None or self.state.stage2_index is None:
            return None
        return self.state.stage2_index.cpu().numpy()

    def _tensors(self, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The vision inputs in graph order, floats in the model dtype."""
        tensors = [torch.from_numpy(arrays[name]).to(self.device) for name in self.reference.vision.input_names]
        return tuple(t.to(self.adapter.dtype) if t.is_floating_point() else t for t in tensors)

    @torch.no_grad()
    def _encode(self, arrays: dict[str, np.ndarray]) -> VisionOutput:
        vision = self.reference.vision
        inputs = self._tensors(arrays)
        with fast_towers(False):  # the reference runs the graph's forms; the static path the GPU fast path
            features = vision.vision(*inputs)
        self.synchronize()
        start = time.perf_counter()
        tokens, index = vision.apet_stage1(features)
        self.synchronize()
        apet_ms = (time.perf_counter() - start) * 1e3
        outputs = vision.named(vision.projector(tokens, index, *inputs))
        return VisionOutput.of({**outputs, KEEP_INDEX: outputs[KEEP_INDEX].cpu().numpy()}, apet_ms, features)

    def _injected(self, visual: VisionOutput) -> torch.Tensor | None:
        """The vision side's per-layer inputs [L, N, H] (None when the family declares none)."""
        layers = self.adapter.spec.decoder.injected_layers
        if not layers:
            return None
        if visual.injected is None:
            raise BackendError(f"the LLM takes {layers} layers of injected inputs but the vision stages returned "
                               "none", "this is a bug in the family's vision stages")
        return visual.injected.reshape(layers, -1, visual.injected.shape[-1])

    @torch.no_grad()
    def _prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray:
        rows = torch.from_numpy(layout.visual_rows).to(self.device)
        embeds = splice(self.table, torch.from_numpy(layout.token_ids).to(self.device), visual.embeds, rows)
        mask = torch.from_numpy(layout.attention_mask).to(self.device)
        start = torch.from_numpy(layout.image_start).to(self.device)
        positions = torch.from_numpy(layout.positions).to(self.device)
        logits, self.state = self.reference.prefill(embeds, mask, start, positions, self._injected(visual), rows)
        return logits[:, -1].float().cpu().numpy()

    @torch.no_grad()
    def _decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.state is None:
            raise BackendError("decode before prefill", "call prefill first")
        embeds = self.table[torch.from_numpy(token_ids).to(self.device)][:, None]
        logits = self.reference.decode(embeds, self.state, torch.from_numpy(positions).to(self.device))
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
                 compile: bool = False, compile_mode: str = "default") -> None:
        super().__init__(artifact_dir, manifest, device, checkpoint, adapter)
        from apet.runtime.static_decoder import StaticDecoder

        if manifest.compression.rule != "apet" and manifest.compression.stage2 is not None:
            raise BackendError("the static-cache path runs ApET at stage 2; other rules need the reference path",
                               "use torch_mode='reference' for rule comparisons")
        on_gpu = self.device.type == "cuda"
        self.decoder = StaticDecoder(self.adapter, self.reference.stage2, manifest.max_batch, manifest.max_context,
                                     fuse=on_gpu)
        self.use_graphs = cuda_graphs and on_gpu
        if on_gpu:
            self.reference.vision.prepare_fast()  # the tower's fused weights, before a compile traces it
        self.compile, self.compile_mode = compile, check_compile_mode(compile_mode)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.bucket = bucket
        self.padding = 0
        self.context = 0
        self.calls: dict[tuple, object] = {}

    def _call(self, key: tuple, fn, example: dict[str, torch.Tensor], before_capture=None):
        from apet.runtime.cuda_graphs import GraphedCall

        if key not in self.calls:
            fn = compile_measured(fn, self.compile_mode) if self.compile else fn
            self.calls[key] = GraphedCall(fn, example, enabled=self.use_graphs, pool=self.pool,
                                          before_capture=before_capture)
        return self.calls[key]

    @torch.no_grad()
    def _encode(self, arrays: dict[str, np.ndarray]) -> VisionOutput:
        inputs = self._tensors(arrays)
        names = self.reference.vision.input_names
        call = self._call(("vision",) + tuple(tuple(t.shape) for t in inputs),
                          lambda **kw: self.reference.vision(*(kw[n] for n in names)), dict(zip(names, inputs)))
        outputs = self.reference.vision.named(call(**dict(zip(names, inputs))))
        return VisionOutput.of({name: value.clone() if name != KEEP_INDEX else value.cpu().numpy()
                                for name, value in outputs.items()})

    def _graph_prefill(self, token_ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                       positions: torch.Tensor, image_start: torch.Tensor, visual: torch.Tensor,
                       injected: torch.Tensor | None = None, padding: PromptPadding = "other") -> torch.Tensor:
        return self.decoder.prefill(splice(self.table, token_ids, visual, rows), mask, positions, image_start,
                                    injected, rows, padding=padding)

    @torch.no_grad()
    def _prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray:
        length = layout.token_ids.shape[1]
        extra = -length % self.bucket
        if length + extra > self.manifest.max_context:
            extra = 0
        pad = ((0, 0), (extra, 0))
        position_pad = pad if layout.positions.ndim == 2 else ((0, 0),) + pad
        arrays = {"token_ids": np.pad(layout.token_ids, pad, constant_values=self.manifest.model.pad_token_id or 0),
                  "mask": np.pad(layout.attention_mask, pad),
                  "rows": np.pad(layout.visual_rows, pad, constant_values=-1),
                  "positions": np.pad(layout.positions, position_pad, constant_values=1),
                  "image_start": layout.image_start + extra}
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in arrays.items()}
        tensors["visual"] = visual.embeds
        injected = self._injected(visual)
        if injected is not None:
            tensors["injected"] = injected
        # no pad or a left pad (read here, on the host copy) lets the decoder attend without a mask
        padding = prompt_padding(torch.from_numpy(arrays["mask"]))
        call = self._call(("prefill", padding) + tuple(arrays["token_ids"].shape) + tuple(visual.embeds.shape),
                          functools.partial(self._graph_prefill, padding=padding), tensors)
        self.padding = extra
        self.context = length + extra  # cache positions in use (host-side: graphs replay without Python)
        return call(**tensors).float().cpu().numpy()

    @torch.no_grad()
    def _decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        tensors = {"token_ids": torch.from_numpy(token_ids).to(self.device),
                   "positions": torch.from_numpy(np.ascontiguousarray(positions)).to(self.device)}
        span = self.decoder.span(self.context)  # one graph per (batch, span): attention reads only the span
        key = ("decode", token_ids.shape[0], span)
        if key not in self.calls:
            saved = self.decoder.snapshot()
            self._call(key, functools.partial(self._graph_decode, span=span), tensors,
                       before_capture=lambda: self.decoder.restore(saved))
        self.context += 1
        return self.calls[key](**tensors).float().cpu().numpy()

    def _graph_decode(self, token_ids: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        return self.decoder.decode(self.table[token_ids][:, None], positions, span)

    def cache_lengths(self) -> list[int]:
        return [n - self.padding for n in self.decoder.cache_lengths()]

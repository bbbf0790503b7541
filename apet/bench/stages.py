"""Per-stage timings of the apet torch path (static cache, CUDA graphs) at one token budget."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from apet.bench.timing import Timing, summarize, time_call
from apet.compression import CompressionConfig, Stage2Config
from apet.models.base import VisionLanguageAdapter
from apet.runtime.backends.base import splice
from apet.runtime.cuda_graphs import GraphedCall
from apet.runtime.static_decoder import StaticDecoder

TEXT_BEFORE_IMAGE = 5  # "<s> USER:" in the LLaVA-1.5 template


@dataclass(frozen=True)
class Request:
    """A synthetic request: random pixels, ``prompt_tokens`` text tokens around the image, N new tokens."""

    batch: int
    prompt_tokens: int
    new_tokens: int


def synthetic_inputs(adapter: VisionLanguageAdapter, request: Request, visual_tokens: int, seed: int = 0):
    spec, device = adapter.spec, adapter.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    proc = spec.processor
    pixels = torch.randn(request.batch, 3, proc.crop_height, proc.crop_width, generator=generator)
    text = torch.randint(3, min(spec.decoder.vocab_size, 30000), (request.batch, request.prompt_tokens),
                         generator=generator)
    before = min(TEXT_BEFORE_IMAGE, request.prompt_tokens)
    image = torch.full((request.batch, visual_tokens), spec.image_token_id)
    ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    mask = torch.ones_like(ids)
    start = torch.full((request.batch,), before, dtype=torch.long)
    return pixels.to(device, adapter.dtype), ids.to(device), mask.to(device), start.to(device)


class ApetPath:
    """The compressed model at one budget, every stage captured as its own CUDA graph."""

    def __init__(self, adapter: VisionLanguageAdapter, stage1: CompressionConfig, stage2: Stage2Config | None,
                 request: Request, graphs: bool, fuse: bool = True, compile: bool = False,
                 max_context: int | None = None) -> None:
        self.adapter, self.stage1, self.stage2, self.request = adapter, stage1, stage2, request
        pixels, ids, mask, start = synthetic_inputs(adapter, request, stage1.keep)
        self.max_context = max_context or ids.shape[1] + request.new_tokens + 8
        self.decoder = StaticDecoder(adapter, stage2, request.batch, self.max_context, fuse=fuse)
        maybe = (lambda fn: torch.compile(fn, dynamic=False)) if compile else (lambda fn: fn)
        self.table = adapter.embed_tokens().weight
        pool = torch.cuda.graph_pool_handle() if graphs and pixels.is_cuda else None
        g = dict(enabled=graphs, pool=pool)
        c = stage1
        with torch.no_grad():
            self.vision = GraphedCall(maybe(lambda pixel_values: adapter.vision_features(pixel_values)),
                                      {"pixel_values": pixels}, **g)
            features = self.vision(pixel_values=pixels).clone()
            self.apet1 = GraphedCall(maybe(lambda x: c.apply(x).tokens), {"x": features}, **g)
            kept = self.apet1(x=features).clone()
            self.projector = GraphedCall(lambda t: adapter.project(t), {"t": kept}, **g)
            visual = self.projector(t=kept).clone()
            self.prefill = GraphedCall(maybe(self._prefill), {"ids": ids, "mask": mask, "start": start,
                                                              "visual": visual}, **g)
            self.prefill_inputs = {"ids": ids, "mask": mask, "start": start, "visual": visual}
            self.apet2 = None
            if stage2 is not None:
                hidden = torch.randn(request.batch, stage1.keep, adapter.spec.decoder.hidden_size,
                                     device=pixels.device, dtype=adapter.dtype)
                c2 = stage2.compression
                self.apet2 = GraphedCall(maybe(lambda x: c2.apply(x).tokens), {"x": hidden}, **g)
                self.apet2_input = hidden
            self.pixels, self.features, self.kept = pixels, features, kept
            self.prefill(**self.prefill_inputs)
            saved = self.decoder.snapshot()
            token = torch.zeros(request.batch, dtype=torch.long, device=pixels.device)
            position = torch.full((request.batch, 1), ids.shape[1], dtype=torch.long, device=pixels.device)
            self.decode = GraphedCall(maybe(self._decode), {"token": token, "position": position},
                                      before_capture=lambda: self.decoder.restore(saved), **g)
            self.prompt_length = ids.shape[1]

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, visual: torch.Tensor):
        return self.decoder.prefill(splice(self.table, ids, visual, start), mask, start)

    def _decode(self, token: torch.Tensor, position: torch.Tensor):
        return self.decoder.decode(self.table[token][:, None], position)

    @torch.no_grad()
    def first_token(self) -> torch.Tensor:
        """Vision -> ApET -> projector -> prefill -> argmax, graphs replayed back to back (no host sync)."""
        features = self.vision(pixel_values=self.pixels)
        kept = self.apet1(x=features)
        visual = self.projector(t=kept)
        logits = self.prefill(**{**self.prefill_inputs, "visual": visual})
        return logits.argmax(-1)

    @torch.no_grad()
    def generate(self) -> tuple[torch.Tensor, list[float]]:
        """TTFT then new_tokens-1 decode steps; returns the tokens and per-step ms (device events)."""
        device = self.pixels.device
        timer = _Timer(device)
        timer.start()
        token = self.first_token()
        steps = [timer.stop()]
        tokens = [token]
        for i in range(self.request.new_tokens - 1):
            position = torch.full((self.request.batch, 1), self.prompt_length + i, dtype=torch.long, device=device)
            timer.start()
            token = self.decode(token=token, position=position).argmax(-1)
            steps.append(timer.stop())
            tokens.append(token)
        return torch.stack(tokens, 1), steps

    def stage_timings(self, repeats: int) -> dict[str, Timing]:
        device = self.pixels.device
        timings = {
            "vision_tower": time_call(lambda: self.vision(pixel_values=self.pixels), device=device, repeats=repeats),
            "apet_stage1": time_call(lambda: self.apet1(x=self.features), device=device, repeats=repeats),
            "projector": time_call(lambda: self.projector(t=self.kept), device=device, repeats=repeats),
            "prefill": time_call(lambda: self.prefill(**self.prefill_inputs), device=device, repeats=repeats),
        }
        if self.apet2 is not None:
            timings["apet_stage2"] = time_call(lambda: self.apet2(x=self.apet2_input), device=device,
                                               repeats=repeats)
        return timings

    def cache_lengths(self, context: int) -> list[int]:
        removed = self.stage2.removed if self.stage2 else 0
        split = self.stage2.layer if self.stage2 else len(self.decoder.layers)
        return [context - (removed if i >= split else 0) for i in range(len(self.decoder.layers))]


class _Timer:
    """Device events on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return float(self.begin.elapsed_time(self.end))
        return (time.perf_counter() - self.t0) * 1e3


def summarize_generation(runs: list[list[float]]) -> dict[str, Any]:
    """TTFT, decode ms/token and end-to-end over repeated generations."""
    ttft = summarize([r[0] for r in runs])
    decode = summarize([ms for r in runs for ms in r[1:]]) if any(len(r) > 1 for r in runs) else None
    e2e = summarize([sum(r) for r in runs])
    return {"ttft": ttft.to_json(), "decode_per_token": decode.to_json() if decode else None,
            "end_to_end": e2e.to_json()}

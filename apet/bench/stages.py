"""Per-stage timings of the apet torch path (static cache, CUDA graphs) at one token budget."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apet.bench import ort_profile
from apet.bench.timing import Timing, summarize, time_call
from apet.compression import compress_with, selector
from apet.contracts.io import KEEP_INDEX, VISUAL_EMBEDS
from apet.contracts.plan import CompressionPlan
from apet.kernels.varlen import prompt_padding
from apet.manifest import in_memory_manifest
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.vision import injected_of
from apet.models.registry import get_family
from apet.runtime.backends.torch import embedding_table, splice
from apet.runtime.compiled import compile_measured
from apet.runtime.cuda_graphs import GraphedCall
from apet.runtime.static_decoder import StaticDecoder


@dataclass(frozen=True)
class Request:
    """A synthetic request: one random-content image per row, ``prompt_tokens`` text tokens around the visual
    span (the family's real layout; random ids where the model has no tokenizer), N new tokens."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    image_size: tuple[int, int] = (640, 480)


def bench_manifest(adapter: VisionLanguageAdapter, plan: CompressionPlan, request: Request, max_context: int):
    dtype = "fp16" if adapter.dtype == torch.float16 else "fp32"
    return in_memory_manifest(adapter.spec, plan, dtype=dtype, max_batch=request.batch, max_context=max_context,
                              extra_rows=adapter.extra_row_ids())


def synthetic_request(adapter: VisionLanguageAdapter, plan: CompressionPlan, request: Request, max_context: int,
                      seed: int = 0):
    """(processor, vision inputs, a function keep_index -> Layout) through the family's own processor, so the
    benchmark runs the layout users get (the checkpoint's tokenizer where it has one: :func:`request_tokenizer`)."""
    return ort_profile.synthetic_request(bench_manifest(adapter, plan, request, max_context),
                                         request_tokenizer(adapter), request.batch, request.image_size,
                                         request.prompt_tokens, request.new_tokens, seed)


def request_tokenizer(adapter: VisionLanguageAdapter) -> Path | None:
    """The tokenizer the bench's request is written with: the checkpoint's, where it has one."""
    return ort_profile.tokenizer_dir(adapter.source_dir)


def _device(arrays: dict[str, np.ndarray], names: list[str], adapter: VisionLanguageAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        tensor = torch.from_numpy(arrays[name]).to(adapter.device)
        out[name] = tensor.to(adapter.dtype) if tensor.is_floating_point() else tensor
    return out


class ApetPath:
    """The compressed model at one budget, every stage captured as its own CUDA graph."""

    def __init__(self, adapter: VisionLanguageAdapter, plan: CompressionPlan, request: Request, graphs: bool,
                 fuse: bool = True, compile: bool = False, max_context: int = 2048,
                 prefill_attention: str = "auto", compile_mode: str = "default") -> None:
        self.adapter, self.plan, self.request = adapter, plan, request
        stage1, stage2 = plan.stage1, plan.stage2
        _, inputs, make_layout = synthetic_request(adapter, plan, request, max_context)
        stages = get_family(adapter.family).vision_stages(adapter, selector(stage1))
        names = stages.input_names
        vision_inputs = _device(inputs.arrays, names, adapter)
        self.max_context = max_context
        self.decoder = StaticDecoder(adapter, stage2, request.batch, self.max_context, fuse=fuse,
                                     prefill_attention=prefill_attention)
        maybe = (lambda fn: compile_measured(fn, compile_mode)) if compile else (lambda fn: fn)
        self.table = embedding_table(adapter)
        device = adapter.device
        pool = torch.cuda.graph_pool_handle() if graphs and device.type == "cuda" else None
        if device.type == "cuda":
            stages.prepare_fast()  # the tower's fused weights, before a compile traces it
        g = dict(enabled=graphs, pool=pool)
        with torch.no_grad():
            start = time.perf_counter()
            self.vision = GraphedCall(maybe(lambda **kw: stages.vision(*(kw[n] for n in names))), vision_inputs, **g)
            features = self.vision(**vision_inputs).clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # compile (--compile), warm-up runs and capture of the vision graph: what a first image waits for
            self.vision_warmup_s = time.perf_counter() - start
            self.apet1 = GraphedCall(maybe(lambda x: stages.apet_stage1(x)), {"x": features}, **g)
            tokens, index = (t.clone() for t in self.apet1(x=features))
            finished = stages.named(stages.projector(tokens, index, *(vision_inputs[n] for n in names)))
            # the graph returns every vision output (visual rows, kept positions[, injected]): first_token uses the
            # rows, request_first_token lays the prompt out from the positions as a user's request does
            self.projector = GraphedCall(lambda t, i: stages.projector(t, i, *(vision_inputs[n] for n in names)),
                                         {"t": tokens, "i": index}, **g)
            visual = self.projector(t=tokens, i=index)[0].clone()
            layout = make_layout(finished[KEEP_INDEX].cpu().numpy())
            self.visual_tokens, self.views = int(layout.visual_tokens[0]), features.shape[0] // request.batch
            self.prefill_inputs = self._layout_inputs(layout, visual, finished)
            self.prompt_padding = prompt_padding(torch.from_numpy(layout.attention_mask))
            self.prefill = GraphedCall(maybe(self._prefill), self.prefill_inputs, **g)
            self.apet2 = None
            if stage2 is not None:
                hidden = torch.randn(request.batch, stage1.keep, adapter.spec.decoder.hidden_size,
                                     device=device, dtype=adapter.dtype)
                c2 = stage2.compression
                self.apet2 = GraphedCall(maybe(lambda x: compress_with(c2, x).tokens), {"x": hidden}, **g)
                self.apet2_input = hidden
            self.vision_inputs, self.features, self.kept = vision_inputs, features, (tokens, index)
            self.host_inputs, self.make_layout, self.stages = inputs.arrays, make_layout, stages
            self.prefill(**self.prefill_inputs)
            saved = self.decoder.snapshot()
            self.prompt_length = layout.token_ids.shape[1]
            token = torch.zeros(request.batch, dtype=torch.long, device=device)
            position = torch.from_numpy(layout.positions[..., -1:] + 1).to(device)
            spans = sorted({self.decoder.span(self.prompt_length + i) for i in range(request.new_tokens)})
            # one decode graph per span, all captured here so that no capture lands inside a timed step
            self.decodes = {span: GraphedCall(maybe(functools.partial(self._decode, span=span)),
                                              {"token": token, "position": position},
                                              before_capture=lambda: self.decoder.restore(saved), **g)
                            for span in spans}
            self.last_position = layout.positions[..., -1:]

    def _layout_inputs(self, layout: Any, visual: torch.Tensor, finished: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """The prefill's inputs on the device: the host layout's arrays, the visual rows and, for families with
        injected layers, their per-layer inputs."""
        arrays = {"ids": layout.token_ids, "mask": layout.attention_mask, "rows": layout.visual_rows,
                  "positions": layout.positions, "start": layout.image_start}
        out = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.adapter.device) for k, v in arrays.items()}
        out["visual"] = visual
        injected = injected_of(finished)
        if injected is not None:
            out["injected"] = injected.clone()
        return out

    def decode(self, step: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Decode step ``step`` (0 = the first token after the prompt) through its span's graph."""
        return self.decodes[self.decoder.span(self.prompt_length + step)](**inputs)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                 start: torch.Tensor, visual: torch.Tensor, injected: torch.Tensor | None = None):
        return self.decoder.prefill(splice(self.table, ids, visual, rows), mask, positions, start, injected, rows,
                                    padding=self.prompt_padding)

    def _decode(self, token: torch.Tensor, position: torch.Tensor, span: int):
        return self.decoder.decode(self.table[token][:, None], position, span)

    @torch.no_grad()
    def first_token(self) -> torch.Tensor:
        """Vision -> ApET -> projector -> prefill -> argmax, graphs replayed back to back (no host sync)."""
        features = self.vision(**self.vision_inputs)
        tokens, index = self.apet1(x=features)
        visual = self.projector(t=tokens, i=index)[0]
        logits = self.prefill(**{**self.prefill_inputs, "visual": visual})
        return logits.argmax(-1)

    @torch.no_grad()
    def request_logits(self) -> torch.Tensor:
        """The first token's logits of a whole request from the processor's host arrays: the pixels uploaded, the
        kept positions brought to the host, the prompt laid out there and its arrays uploaded, then the prefill.
        :meth:`first_token` starts from pixels on the GPU and a prompt laid out before timing; this is the span
        ONNX Runtime's first token covers (:func:`apet.bench.ort_profile.timed_first_token`), so the two compare
        like for like (:meth:`request_ttft`)."""
        features = self.vision(**_device(self.host_inputs, self.stages.input_names, self.adapter))
        tokens, index = self.apet1(x=features)
        finished = self.stages.named(self.projector(t=tokens, i=index))
        layout = self.make_layout(finished[KEEP_INDEX].cpu().numpy())
        return self.prefill(**self._layout_inputs(layout, finished[VISUAL_EMBEDS], finished))

    def request_first_token(self) -> np.ndarray:
        """:meth:`request_logits`' greedy token on the host, where a user's request gets it."""
        return self.request_logits().argmax(-1).cpu().numpy()

    def request_ttft(self, repeats: int) -> Timing:
        """ms of :meth:`request_first_token` after one untimed call, timed as every stage is (:func:`time_call`):
        the call ends with the token on the host, so its span includes the host work."""
        return time_call(self.request_first_token, device=self.adapter.device, warmup=1, repeats=repeats)

    @torch.no_grad()
    def generate(self) -> tuple[torch.Tensor, list[float]]:
        """TTFT then new_tokens-1 decode steps; returns the tokens and per-step ms (device events)."""
        device = self.adapter.device
        timer = _Timer(device)
        timer.start()
        token = self.first_token()
        steps = [timer.stop()]
        tokens = [token]
        for i in range(self.request.new_tokens - 1):
            position = torch.from_numpy(self.last_position + 1 + i).to(device)
            timer.start()
            token = self.decode(i, token=token, position=position).argmax(-1)
            steps.append(timer.stop())
            tokens.append(token)
        return torch.stack(tokens, 1), steps

    def stage_timings(self, repeats: int) -> dict[str, Timing]:
        device = self.adapter.device
        tokens, index = self.kept
        timings = {
            "vision_tower": time_call(lambda: self.vision(**self.vision_inputs), device=device, repeats=repeats),
            "apet_stage1": time_call(lambda: self.apet1(x=self.features), device=device, repeats=repeats),
            "projector": time_call(lambda: self.projector(t=tokens, i=index), device=device, repeats=repeats),
            "prefill": time_call(lambda: self.prefill(**self.prefill_inputs), device=device, repeats=repeats),
        }
        if self.apet2 is not None:
            timings["apet_stage2"] = time_call(lambda: self.apet2(x=self.apet2_input), device=device,
                                               repeats=repeats)
        return timings

    def cache_lengths(self, context: int) -> list[int]:
        return self.decoder.cache_layout.lengths(context)


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

"""ONNX Runtime over the static-KV form (``apet-export --kv-cache static``): the caches stay on the device and are
written in place; decode runs at fixed shapes, as a CUDA graph on the CUDA execution provider.

How the cache stays put: each layer's cache is one OrtValue [B, kv_heads, capacity, d] on the session's device,
bound as both ``past_*`` (input) and ``present_*`` (output) of both graphs. The graphs write it with
``ScatterElements``, whose ONNX Runtime kernels (CPU and CUDA) skip their input-to-output copy when the two are
the same buffer, so a step writes only the new positions: no copy, no ping-pong, no host round-trip. Decode binds
every input to a device OrtValue that is refilled in place (``update_inplace``) and the logits to a device OrtValue
that is read back: the only host transfer of a step besides its few input bytes.

CUDA graphs (ONNX Runtime's ``enable_cuda_graph``) need every bound address and every shape fixed from the
capturing run on: the decode session of a batch size has its ``batch`` dim fixed by a free-dimension override, so
ONNX Runtime folds every shape computation to a constant (nothing left on the CPU, no Memcpy nodes), and its
bindings are made once. Prefill varies with the prompt length and runs in its own session without CUDA graphs.
Each session holds its own copy of the LLM weights (prefill, and decode per batch size with CUDA graphs).

Attention (``decode_attention``): ``graph`` runs the exported graphs; ``gqa`` runs both rewritten in memory for ONNX
Runtime's GroupQueryAttention (:mod:`.ort_gqa`: the write and the attention over each row's written span in one node
per layer, instead of two scatters, their index arithmetic and an attention over all C positions); ``auto`` takes
``gqa`` on the CUDA execution provider for an fp16/bf16 op-attention artifact and ``graph`` otherwise. A batch with
left-padded rows runs the exported graphs either way (the rewritten ones attend over a prefix of the cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apet.contracts.io import (
    CACHE_POSITION,
    DECODE_ATTENTION,
    LLM_DECODE,
    LLM_PREFILL,
    LOGITS,
    STAGE2_INDEX,
    past_names,
    present_names,
)
from apet.errors import BackendError, InputError, option
from apet.manifest import Manifest
from apet.runtime.backends.ort_gqa import GqaGraph, NotRewritable, load_rewritten
from apet.runtime.backends.ort_options import session_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionSetup:
    """What every session of one backend shares: the onnxruntime module, options, providers, device."""

    ort: Any
    options: Any
    providers: list
    device_type: str  # "cuda" | "cpu": where caches and bound inputs live
    cuda_graphs: bool
    decode_attention: str = "auto"  # auto | gqa | graph (module docstring)

    @property
    def graphs(self) -> bool:
        """Fixed-shape sessions are replayed as CUDA graphs (asked for, on the CUDA execution provider)."""
        return self.cuda_graphs and self.device_type == "cuda"

    def session(self, model: Path | bytes, batch: int | None = None, weights_dir: Path | None = None) -> Any:
        """A session of ``model`` (a file, or a serialized graph whose external weights lie in ``weights_dir``);
        with ``batch`` its batch dim is fixed (and CUDA graphs on, where requested)."""
        source = model if isinstance(model, bytes) else str(model)
        if batch is None and weights_dir is None:
            return self.ort.InferenceSession(source, self.options, providers=self.providers)
        options = session_options(self.ort, self.options.intra_op_num_threads)
        if weights_dir is not None:  # a graph rewritten in memory reads the artifact's weight files where they are
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        if batch is None:
            return self.ort.InferenceSession(source, options, providers=self.providers)
        options.add_free_dimension_override_by_name("batch", batch)
        providers = self.providers
        if self.graphs:
            providers = [(name, {**opts, "enable_cuda_graph": "1"}) if isinstance(name, str) else (name, opts)
                         for name, opts in _with_options(self.providers)]
        return self.ort.InferenceSession(source, options, providers=providers)


def _with_options(providers: list) -> list[tuple[str, dict]]:
    return [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in providers]


class FixedRun:
    """One session at fixed shapes with its bindings made once (CUDA graph replays need every address unchanged):
    device inputs refilled in place, buffers bound as both input and output (the caches, written in place), inputs
    the kernels read on the host (GroupQueryAttention's total length), outputs on the device and read back."""

    def __init__(self, session: Any, setup: SessionSetup, inputs: dict[str, tuple[tuple, Any]],
                 outputs: dict[str, tuple[tuple, Any]], in_place: dict[str, tuple[str, Any]] | None = None,
                 host_constants: dict[str, np.ndarray] | None = None) -> None:
        new = setup.ort.OrtValue.ortvalue_from_shape_and_type
        self.session = session
        self.inputs = {name: new(list(shape), kind, setup.device_type, 0) for name, (shape, kind) in inputs.items()}
        self.outputs = {name: new(list(shape), kind, setup.device_type, 0) for name, (shape, kind) in outputs.items()}
        host = {name: setup.ort.OrtValue.ortvalue_from_numpy(value) for name, value in (host_constants or {}).items()}
        self.binding = session.io_binding()
        for name, value in {**self.inputs, **host}.items():
            self.binding.bind_ortvalue_input(name, value)
        for input_name, (output_name, buffer) in (in_place or {}).items():
            self.binding.bind_ortvalue_input(input_name, buffer)
            self.binding.bind_ortvalue_output(output_name, buffer)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self._host = host  # kept alive: bound by address

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in arrays.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(self.binding)
        return {name: value.numpy() for name, value in self.outputs.items()}


class StaticKV:
    """Prefill and decode of the static-KV graphs; owns the caches of the current batch size."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, setup: SessionSetup, dtype: Any) -> None:
        spec = manifest.model.decoder
        self.manifest, self.setup, self.dtype = manifest, setup, dtype
        self.num_layers, self.max_context = spec.num_layers, manifest.max_context
        self.layout = manifest.cache_layout
        self.prefill_path = artifact_dir / manifest.graphs[LLM_PREFILL].file
        self.decode_path = artifact_dir / manifest.graphs[LLM_DECODE].file
        self.weights_dir = artifact_dir
        self.gqa = self._rewritten(self.decode_path, setup, dtype)
        self.gqa_model = self.gqa.model.SerializeToString() if self.gqa is not None else None
        self.gqa_prompt = self._rewritten(self.prefill_path, setup, dtype, prompt=True) if self.gqa else None
        # the prefill session (rewritten where decode is); the exported one only for left-padded batches then
        self.prefill_session = setup.session(self.gqa_prompt.model.SerializeToString(), None, artifact_dir) \
            if self.gqa_prompt is not None else setup.session(self.prefill_path)
        self.exported_prefill = None if self.gqa_prompt is not None else self.prefill_session
        self.shared: dict[bool, Any] = {}  # gqa? -> the one decode session of every batch (no CUDA graphs)
        self.kv_shape = (spec.num_kv_heads, spec.head_dim)
        self.caches: dict[int, list] = {}  # batch -> [key.0, value.0, ...] OrtValues
        self.steps: dict[tuple[int, bool], FixedRun] = {}  # (batch, gqa?) -> its bound step
        self.batch = 0
        self.length = 0  # positions of group 0 written so far (the full sequence)
        self.stage2_index: np.ndarray | None = None

    def _rewritten(self, path: Path, setup: SessionSetup, dtype: Any, prompt: bool = False) -> GqaGraph | None:
        """The GroupQueryAttention form of the graph at ``path`` where ``decode_attention`` asks for it and it
        applies."""
        manifest, wanted = self.manifest, setup.decode_attention
        if wanted not in DECODE_ATTENTION:
            raise BackendError(f"unknown decode attention {wanted!r}",
                               f"pass {option('decode_attention', '|'.join(DECODE_ATTENTION))}")
        if wanted == "graph" or (wanted == "auto" and (setup.device_type != "cuda" or dtype == np.float32)):
            return None
        reason = None
        if manifest.attention != "op":
            reason = f"the artifact's attention form is {manifest.attention!r}"
        else:
            try:
                return load_rewritten(path, manifest.model.decoder, manifest.cache_layout, manifest.max_context,
                                      prompt)
            except NotRewritable as err:
                reason = str(err)
        if wanted == "gqa":
            raise BackendError(f"GroupQueryAttention does not apply to {path.name}: {reason}",
                               f"re-export with apet-export --attention op --kv-cache static, or pass "
                               f"{option('decode_attention', 'graph')}")
        log.info("%s runs as exported (%s)", path.name, reason)
        return None

    def _caches(self, batch: int) -> list:
        if batch not in self.caches:
            # zeros, not uninitialised memory: masked positions are still multiplied by zero weights (NaN * 0)
            heads, dim = self.kv_shape
            zeros = self.setup.ort.OrtValue.ortvalue_from_numpy
            self.caches[batch] = [zeros(np.zeros((batch, heads, self.layout.capacity(i, self.max_context), dim),
                                                 self.dtype), self.setup.device_type, 0)
                                  for i in range(self.num_layers) for _ in range(2)]
        return self.caches[batch]

    def prefill(self, feeds: dict[str, np.ndarray], batch: int, length: int) -> np.ndarray:
        """The prompt's inputs by name (host arrays) -> logits [B, V]; the caches hold the prompt afterwards."""
        session = self.prefill_session
        if self.gqa_prompt is not None and np.all(feeds["attention_mask"]):
            feeds = {**feeds, **self.gqa_prompt.prompt(tuple(self.layout.present_length(layer, 0, length)
                                                                 for layer in self.gqa_prompt.group_layers), batch)}
        elif self.gqa_prompt is not None:  # left-padded rows: the exported graph
            if self.exported_prefill is None:
                self.exported_prefill = self.setup.session(self.prefill_path)
            session = self.exported_prefill
        binding = session.io_binding()
        wanted = {i.name for i in session.get_inputs()}
        for name, value in feeds.items():
            if name in wanted:  # the rewritten graph reads no mask where it reads no padding
                binding.bind_cpu_input(name, value)
        outputs = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        for name in outputs:  # bound first: get_outputs() lists them in binding order
            binding.bind_output(name, "cpu")
        for past, present, cache in zip(past_names(self.num_layers), present_names(self.num_layers),
                                        self._caches(batch)):
            binding.bind_ortvalue_input(past, cache)
            binding.bind_ortvalue_output(present, cache)
        session.run_with_iobinding(binding)
        values = dict(zip(outputs, binding.get_outputs()))
        self.stage2_index = values[STAGE2_INDEX].numpy() if STAGE2_INDEX in values else None
        self.batch, self.length = batch, length
        return values[LOGITS].numpy()[:, -1].astype(np.float32)

    def decode(self, embeds: np.ndarray, positions: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One token per row: embeddings [B, 1, H], positions, the full mask [B, P+1] -> logits [B, V]."""
        batch, total = attention_mask.shape
        if total > self.max_context:
            raise InputError(f"decoding position {total} exceeds the static cache's {self.max_context} positions",
                             "ask for fewer new tokens, or re-export with a larger apet-export --max-context")
        if batch != self.batch or total != self.length + 1:
            raise InputError(f"a decode step of batch {batch} at position {total - 1} does not follow the cache "
                             f"(batch {self.batch}, {self.length} positions)", "run prefill first")
        arrays = {"inputs_embeds": embeds.astype(self.dtype, copy=False),
                  "position_ids": positions.astype(np.int64, copy=False)}
        gqa = self.gqa is not None and bool(np.all(attention_mask))  # no left padding: each row's span is a prefix
        if gqa:
            lengths = tuple(self.layout.past_length(layer, self.length) for layer in self.gqa.group_layers)
            arrays.update(self.gqa.seqlens(lengths, batch))
        else:
            valid = np.zeros((batch, self.max_context), dtype=np.int64)
            valid[:, :total] = attention_mask
            arrays.update({"attention_mask": valid, CACHE_POSITION: np.array([total - 1], dtype=np.int64)})
        logits = self._step(batch, gqa)(arrays)[LOGITS]
        self.length = total
        return logits[:, -1].astype(np.float32)

    def _step(self, batch: int, gqa: bool) -> FixedRun:
        if (batch, gqa) not in self.steps:
            model, weights = (self.gqa_model, self.weights_dir) if gqa else (self.decode_path, None)
            if self.setup.graphs:
                session = self.setup.session(model, batch, weights)
            else:
                if gqa not in self.shared:
                    self.shared[gqa] = self.setup.session(model, None, weights)
                session = self.shared[gqa]
            spec = self.manifest.model.decoder
            position = (batch, 1) if spec.position_rank == 1 else (spec.position_rank, batch, 1)
            shapes = {"inputs_embeds": ((batch, 1, spec.hidden_size), self.dtype), "position_ids": (position, np.int64)}
            constants = {}
            if gqa:
                shapes.update({name: ((batch,), np.int32) for name in self.gqa.seqlens((0,) * self.gqa.groups, batch)})
                constants = self.gqa.totals()
            else:
                shapes.update({"attention_mask": ((batch, self.max_context), np.int64),
                               CACHE_POSITION: ((1,), np.int64)})
            logits = next(o for o in session.get_outputs() if o.name == LOGITS)  # [B, 1, V] as the graph says
            kind = np.float16 if "float16" in logits.type else np.float32
            in_place = {past: (present, cache) for past, present, cache in
                        zip(past_names(self.num_layers), present_names(self.num_layers), self._caches(batch))}
            self.steps[batch, gqa] = FixedRun(session, self.setup, shapes,
                                              {LOGITS: ((batch, 1, int(logits.shape[-1])), kind)}, in_place, constants)
        return self.steps[batch, gqa]

    def cache_lengths(self) -> list[int]:
        return self.layout.lengths(self.length)

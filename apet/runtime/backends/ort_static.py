"""ONNX Runtime over the static-KV form (``apet-export --kv-cache static``): the caches stay on the device and are
written in place; decode runs at fixed shapes, as a CUDA graph on the CUDA execution provider.

How the cache stays put: each layer's cache is one OrtValue [B, kv_heads, capacity, d] on the session's device,
bound as both ``past_*`` (input) and ``present_*`` (output) of both graphs. The graphs write it with
``ScatterElements``, whose ONNX Runtime kernels (CPU and CUDA) skip their input-to-output copy when the two are
the same buffer, so a step writes only the new positions: no copy, no ping-pong, no host round-trip. Decode binds
every input to a device OrtValue that is refilled in place (``update_inplace``) and the logits to a device OrtValue
that is read back: the only host transfer of a step besides its few input bytes.

CUDA graphs (ONNX Runtime's ``enable_cuda_graph``) need every bound address and every shape fixed from the
capturing run on. The decode steps of every batch size share one session that keeps one CUDA graph per batch size
(a ``gpu_graph_id`` each, its dims left free, the shape values a kernel reads as data given device twins as the
prompt's are), each bound once: every ONNX Runtime session loads its own copy of the LLM weights, and a session per
batch size held one per size (at 7B shapes 61 GiB of device memory after batch sizes 1, 2 and 4, against 33 GiB in
one session; docs/benchmarks.md). Where ONNX Runtime refuses that session, or a capture in it fails, each batch size
gets its own session with its ``batch`` dim fixed by a free-dimension override, where ONNX Runtime folds every shape
computation to a constant (nothing left on the CPU, no Memcpy nodes). Prefill varies with the prompt length and runs
in its own session; in the rewritten form that session holds one CUDA graph per prompt shape
(:mod:`.ort_prompt_graphs`) where ONNX Runtime accepts it. The prefill's session and the decode's hold a copy of the
weights each, unless ``share-weights`` binds one copy to both (:mod:`.ort_bound_weights`). With ``first-token``
(:mod:`.ort_first_token`) the prompt enters a graph that runs the vision graph too, and the prefill's own session is
made only where a prompt cannot take that graph.

Attention (``decode_attention``): ``graph`` runs the exported graphs; ``gqa`` runs both rewritten in memory for ONNX
Runtime's GroupQueryAttention (:mod:`.ort_gqa`: the write and the attention over each row's written span in one node
per layer, instead of two scatters, their index arithmetic and an attention over all C positions); ``auto`` takes
``gqa`` on the CUDA execution provider for an fp16/bf16 op-attention artifact and ``graph`` otherwise. A batch with
left-padded rows runs the exported graphs either way (the rewritten ones attend over a prefix of the cache).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

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
from apet.runtime.backends.ort_bound_weights import BoundWeights
from apet.runtime.backends.ort_device_shapes import to_device
from apet.runtime.backends.ort_first_token import VISUAL_ROWS, FirstTokenRun, VisionPart, compose
from apet.runtime.backends.ort_gqa import (
    GqaGraph,
    NotRewritable,
    feed_packed_qkv,
    load_rewritten,
    load_structure,
)
from apet.runtime.backends.ort_norms import fuse_residual_norms
from apet.runtime.backends.ort_options import FLASH_DECODE_ENVIRONMENT
from apet.runtime.backends.ort_pack import pack_sibling_projections
from apet.runtime.backends.ort_prompt_graphs import PromptGraphs
from apet.runtime.backends.ort_session import FixedRun, GraphSessions, SessionSetup

log = logging.getLogger(__name__)


class StaticKV:
    """Prefill and decode of the static-KV graphs; owns the caches of the current batch size."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, setup: SessionSetup, dtype: Any,
                 vision: VisionPart | None = None) -> None:
        spec = manifest.model.decoder
        self.manifest, self.setup, self.dtype = manifest, setup, dtype
        self.num_layers, self.max_context = spec.num_layers, manifest.max_context
        self.layout = manifest.cache_layout
        self.prefill_path = artifact_dir / manifest.graphs[LLM_PREFILL].file
        self.decode_path = artifact_dir / manifest.graphs[LLM_DECODE].file
        self.weights_dir = artifact_dir
        self.gqa = self._rewritten(self.decode_path, setup, dtype)
        self.gqa_prompt = self._rewritten(self.prefill_path, setup, dtype, prompt=True) if self.gqa else None
        # the weights as inputs bound to one buffer each for both rewritten graphs (share-weights), else in each
        self.decode_weights: dict[str, Any] = {}
        self.prompt_weights: dict[str, Any] = {}
        if "share-weights" in setup.rewrites and self.gqa_prompt is None:
            log.warning("share-weights applies to the graphs rewritten for GroupQueryAttention, which this backend "
                        "does not run (decode attention %r, %s): each session holds its own copy of the weights",
                        setup.decode_attention, setup.device_type)
        elif "share-weights" in setup.rewrites:
            store = BoundWeights(setup.ort, setup.device_type, artifact_dir)
            self.prompt_weights = store.lift(self.gqa_prompt.model)
            self.decode_weights = store.lift(self.gqa.model)
        self.gqa_model = self.gqa.model.SerializeToString() if self.gqa is not None else None
        # the prefill session (rewritten where decode is); the exported one only for left-padded batches then
        self.prompt_graphs: PromptGraphs | None = None
        if self.gqa_prompt is not None and setup.graphs:
            # shape values read as data reach the device without copies (CUDA graphs allow none)
            to_device(self.gqa_prompt.model, self.gqa_prompt.host_inputs)
        # with ``vision`` (first-token) the first tokens run in one graph with the vision graph, and the prefill's own
        # session (another copy of the weights) is made only where a prompt needs it
        self.first: FirstTokenRun | None = None
        if vision is not None:
            try:
                self.first = self._first_token_run(vision)
            except Exception as err:  # noqa: BLE001 - compose() refused the graph or ONNX Runtime the session (an
                # untyped Fail): the two sessions, as without the rewrite
                log.warning("the first-token graph could not be made (%s); vision and prefill run apart",
                            str(err).splitlines()[0])
        self._prefill_session = None if self.first is not None else self._make_prefill_session()
        self.exported_prefill = None  # a left-padded batch's session where the prompt runs rewritten (made then)
        self.shared: dict[bool, Any] = {}  # gqa? -> the one decode session of every batch size, without CUDA graphs
        self.graph_sessions: dict[bool, GraphSessions] = {}  # gqa? -> the decode sessions with CUDA graphs
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
                graph = load_rewritten(path, manifest.model.decoder, manifest.cache_layout, manifest.max_context,
                                       prompt, rotary_inside="gqa-rotary" in setup.rewrites)
            except NotRewritable as err:
                reason = str(err)
            else:
                if "fuse-norms" in setup.rewrites:
                    log.info("%s: %d residual sums and their norms fused", path.name,
                             fuse_residual_norms(graph.model))
                if "pack-projections" in setup.rewrites:
                    log.info("%s: %d projection groups packed, %d attentions read q/k/v packed", path.name,
                             pack_sibling_projections(graph.model), feed_packed_qkv(graph.model))
                return graph
        if wanted == "gqa":
            raise BackendError(f"GroupQueryAttention does not apply to {path.name}: {reason}",
                               f"re-export with apet-export --attention op --kv-cache static, or pass "
                               f"{option('decode_attention', 'graph')}")
        log.info("%s runs as exported (%s)", path.name, reason)
        return None

    @property
    def prefill_session(self) -> Any:
        """The prefill's own session (made on first use where first tokens run in one graph with the vision)."""
        if self._prefill_session is None:
            self._prefill_session = self._make_prefill_session()
        return self._prefill_session

    @property
    def entry_session(self) -> Any:
        """The session a request's prompt enters first: the first-token graph's, else the prefill's."""
        return self.first.session if self.first is not None else self.prefill_session

    def _make_prefill_session(self) -> Any:
        if self.gqa_prompt is not None:
            return self._prompt_session(self.gqa_prompt.model.SerializeToString(), self.weights_dir)
        return self.setup.session(self.prefill_path)

    def _first_token_run(self, vision: VisionPart) -> FirstTokenRun:
        """The first-token graph (:mod:`.ort_first_token`) over the prefill this backend runs; its session with a
        CUDA graph per prompt shape where CUDA graphs are asked for and ONNX Runtime accepts them."""
        prompt = self.gqa_prompt.model if self.gqa_prompt is not None else load_structure(self.prefill_path)
        model = compose(vision.model, prompt).SerializeToString()
        if self.setup.graphs:
            try:
                session = self.setup.session(model, None, self.weights_dir, shape_graphs=True,
                                             disabled_optimizers=vision.disabled_optimizers)
            except Exception as err:  # noqa: BLE001 - ONNX Runtime refuses CUDA graphs with an untyped Fail
                log.warning("the first-token graph runs without CUDA graphs: %s", str(err).splitlines()[0])
            else:
                return FirstTokenRun(session, PromptGraphs(session, self.setup, bound=self.prompt_weights,
                                                           on_device=frozenset({VISUAL_ROWS})))
        return FirstTokenRun(self.setup.session(model, None, self.weights_dir,
                                                disabled_optimizers=vision.disabled_optimizers), None)

    def takes_first_token(self, attention_mask: np.ndarray) -> bool:
        """Whether a prompt with this mask runs in the first-token graph: where there is one, and its prefill reads
        left padding (the rewritten prompt does not: a padded batch runs the exported graph, after the vision's)."""
        return self.first is not None and (self.gqa_prompt is None or bool(np.all(attention_mask)))

    def _prompt_session(self, model: bytes, weights_dir: Path) -> object:
        """The rewritten prefill's session: with a CUDA graph per prompt shape where CUDA graphs are asked for and
        ONNX Runtime accepts them (it refuses a session whose shape computations copy between host and device)."""
        if self.setup.graphs:
            try:
                session = self.setup.session(model, None, weights_dir, shape_graphs=True)
            except Exception as err:  # noqa: BLE001 - ONNX Runtime refuses CUDA graphs with an untyped Fail
                log.warning("the prefill runs without CUDA graphs: %s", str(err).splitlines()[0])
            else:
                self.prompt_graphs = PromptGraphs(session, self.setup, bound=self.prompt_weights)
                return session
        return self.setup.session(model, None, weights_dir)

    def _caches(self, batch: int) -> list:
        if batch not in self.caches:
            # zeros, not uninitialised memory: masked positions are still multiplied by zero weights (NaN * 0)
            heads, dim = self.kv_shape
            zeros = self.setup.ort.OrtValue.ortvalue_from_numpy
            self.caches[batch] = [zeros(np.zeros((batch, heads, self.layout.capacity(i, self.max_context), dim),
                                                 self.dtype), self.setup.device_type, 0)
                                  for i in range(self.num_layers) for _ in range(2)]
        return self.caches[batch]

    def _in_place(self, batch: int) -> dict[str, tuple[str, object]]:
        """Each past input -> (its present output, the cache buffer bound as both): the caches written in place."""
        return {past: (present, cache) for past, present, cache in
                zip(past_names(self.num_layers), present_names(self.num_layers), self._caches(batch))}

    def prefill(self, feeds: dict[str, np.ndarray], batch: int, length: int) -> np.ndarray:
        """The prompt's inputs by name (host arrays) -> logits [B, V]; the caches hold the prompt afterwards."""
        return self._prompt(feeds, batch, length)[LOGITS][:, -1].astype(np.float32)

    def first_token(self, feeds: dict[str, np.ndarray], batch: int, length: int) -> dict[str, np.ndarray]:
        """The first-token graph's inputs by name (the vision's, the splice's, the prefill's but its embeddings;
        :meth:`takes_first_token`) -> every output but the caches: logits, stage 2's and the vision's."""
        self.first.calls += 1
        return self._prompt(feeds, batch, length, first_token=True)

    def _prompt(self, feeds: dict[str, np.ndarray], batch: int, length: int,
                first_token: bool = False) -> dict[str, np.ndarray]:
        host, weights = {}, self.prompt_weights  # bound where the session's graph came from the rewritten prompt
        padded = not np.all(feeds["attention_mask"])
        if first_token:
            session, graphs = self.first.session, self.first.graphs
        elif self.gqa_prompt is not None and padded:  # left-padded rows: the exported graph
            if self.exported_prefill is None:
                self.exported_prefill = self.setup.session(self.prefill_path)
            session, graphs, weights = self.exported_prefill, None, None
        else:
            session, graphs = self.prefill_session, self.prompt_graphs
        if self.gqa_prompt is not None and not padded:
            prompt = self.gqa_prompt.prompt(tuple(self.layout.present_length(layer, 0, length)
                                                  for layer in self.gqa_prompt.group_layers), batch)
            host = {name: value for name, value in prompt.items() if name in self.gqa_prompt.host_inputs}
            feeds = {**feeds, **prompt}
        wanted = {i.name for i in session.get_inputs()}  # the rewritten graph reads no mask where it reads no padding
        device = {name: value for name, value in feeds.items() if name in wanted and name not in host}
        in_place = self._in_place(batch)
        values = graphs.run(device, host) if graphs is not None else None
        if values is None:
            values = self._run_uncaptured(session, {**device, **host}, in_place,
                                          graphs.uncaptured if graphs is not None else None, weights)
            if graphs is not None:
                graphs.add(device, host, values, in_place)
        self.stage2_index = values.get(STAGE2_INDEX)
        self.batch, self.length = batch, length
        return values

    @staticmethod
    def _run_uncaptured(session: object, feeds: dict[str, np.ndarray], in_place: dict[str, tuple[str, object]],
                        run_options: object = None, bound: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """One run with fresh bindings: host inputs, the caches written in place, the other outputs read back
        (``bound``: OrtValues bound as they are, the weights of share-weights)."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in (bound or {}).items():
            binding.bind_ortvalue_input(name, value)
        outputs = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        for name in outputs:  # bound first: get_outputs() lists them in binding order
            binding.bind_output(name, "cpu")
        for past, (present, cache) in in_place.items():
            binding.bind_ortvalue_input(past, cache)
            binding.bind_ortvalue_output(present, cache)
        session.run_with_iobinding(binding, run_options)
        return {name: value.numpy() for name, value in zip(outputs, binding.get_outputs())}

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
        step = self._step(batch, gqa)
        try:
            logits = step(arrays)[LOGITS]
        except Exception as err:  # noqa: BLE001 - ONNX Runtime reports a failed capture as an untyped Fail
            sessions = self.graph_sessions.get(gqa)
            if sessions is None or not sessions.refused(step.session, err):
                raise
            for key in [key for key in self.steps if key[1] == gqa]:
                del self.steps[key]
            logits = self._step(batch, gqa)(arrays)[LOGITS]  # rewrites the same cache positions, same values
        self.length = total
        return logits[:, -1].astype(np.float32)

    @property
    def decode_setup(self) -> SessionSetup:
        """:attr:`setup` with the decode sessions' kernel switches (flash-decode): the prompt's and the vision's
        sessions keep ONNX Runtime's own choice."""
        if "flash-decode" not in self.setup.rewrites:
            return self.setup
        return dataclasses.replace(self.setup, environment=FLASH_DECODE_ENVIRONMENT)

    def _decode_session(self, batch: int, gqa: bool) -> tuple[Any, Any]:
        """The session a decode step of ``batch`` rows runs in, and its run options (the CUDA graph it picks):
        with CUDA graphs the one session of every batch size where it can be had (:class:`GraphSessions`), else
        one session for every batch size, its dims free."""
        model = self.gqa_model if gqa else self.decode_path
        if self.setup.graphs:
            if gqa not in self.graph_sessions:
                self.graph_sessions[gqa] = GraphSessions(self.decode_setup, model, lambda: self._device_shaped(gqa),
                                                         self.weights_dir, what="decode")
            return self.graph_sessions[gqa].session(batch)
        if gqa not in self.shared:  # a file is read with its own options (a profiled backend's included)
            self.shared[gqa] = self.decode_setup.session(model, None, self.weights_dir if gqa else None)
        return self.shared[gqa], None

    @property
    def graphed_shared(self) -> dict[bool, bool]:
        """Per form (rewritten?), whether its decode steps share one session with a CUDA graph per batch size."""
        return {gqa: sessions.shared not in (None, False) for gqa, sessions in self.graph_sessions.items()}

    def _device_shaped(self, gqa: bool) -> bytes:
        """The decode graph with every dim free and the shape values its kernels read as data on the device."""
        if gqa:
            model = onnx.ModelProto()
            model.CopyFrom(self.gqa.model)
        else:
            model = load_structure(self.decode_path)
        twins = to_device(model, self.gqa.host_inputs if gqa else frozenset())
        log.debug("%s: %d shape values given device twins for the shared decode session", self.decode_path.name,
                  twins)
        return model.SerializeToString()

    def _step(self, batch: int, gqa: bool) -> FixedRun:
        if (batch, gqa) not in self.steps:
            session, run_options = self._decode_session(batch, gqa)
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
            self.steps[batch, gqa] = FixedRun(session, self.setup, shapes,
                                              {LOGITS: ((batch, 1, int(logits.shape[-1])), kind)},
                                              self._in_place(batch), constants, run_options,
                                              self.decode_weights if gqa else None)
        return self.steps[batch, gqa]

    def cache_lengths(self) -> list[int]:
        return self.layout.lengths(self.length)

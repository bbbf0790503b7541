"""The static-KV graphs (``llm_decode.onnx`` and ``llm_prefill.onnx``, op attention) rewritten in memory for ONNX
Runtime's ``GroupQueryAttention`` (com.microsoft): one node per layer that writes the new keys/values into the cache
buffer in place and attends over each row's written span only (the prompt causally, at prefill).

Why: the exported decode step writes the cache with two ``ScatterElements`` (plus the index arithmetic) and runs the
standard ``Attention`` op over every cache position under a validity mask; ONNX Runtime's CUDA kernel for that op
reads all C positions (0.62 ms of a 6.4 ms LLaVA-7B step at C = 512, docs/benchmarks.md). ``GroupQueryAttention``
with a shared past/present buffer reads ``seqlens_k + 1`` positions per row (flash decoding) and needs no mask, no
scatter and no index nodes. At prefill it replaces the same scatters, their index arithmetic (a few dozen nodes per
layer that ONNX Runtime runs on the host: the prompt length is dynamic) and the head-major transposes around the
attention, where the prefill's time is host time (docs/benchmarks.md). It is a contrib op: TensorRT does not parse
it, so the artifact keeps the standard graphs and only the ONNX Runtime backend rewrites them when it loads its
sessions (nothing is written next to the artifact, which may sit on a read-only mount).

What it assumes, checked here or by the caller:
- the op attention form (``apet-export --attention op``): per layer one ``Attention`` whose key/value inputs are the
  ``ScatterElements`` writes of ``past_key.i`` / ``past_value.i`` (decode:
  :class:`apet.export.decoder.StaticDecodeGraph`) or the tensors those write (prefill:
  :class:`apet.export.decoder.DecoderGraph` with ``static=True``), q and k rotated by a 4-D ``RotaryEmbedding`` of a
  head-major transpose, the output transposed back and reshaped to [B, T, N·D];
- the rows have no left padding (every cache position up to the one written is valid), so the valid span of a row
  is the prefix ``0..seqlens_k``: the caller uses the exported graph for a batch with padded rows;
- layers of cache group g (:class:`apet.contracts.cache.CacheLayout`: the layers ApET's stage 2 shortened are group
  1) write at ``seqlens_k.g`` = the group's length so far, which is where the exported graph writes too; a prefill
  writes the group's prompt at 0..T_g-1 (T_1 = T - R after stage 2).

The rotary embedding stays where the export put it (on q and k before the write, at the group's positions), so
M-RoPE and the shifted positions of stage 2 are untouched; it rotates in token layout [B, T, N·D] (a 3-D
``RotaryEmbedding`` with ``num_heads``), so no transpose is left around the attention. With ``rotary_inside`` (the
optional rewrite ``gqa-rotary``) the attention rotates q and k itself from position-indexed tables
(:mod:`.ort_rotary`) at the same positions, where the export's rotary chain is the one a table replaces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from apet.contracts.cache import CacheLayout
from apet.contracts.io import past_names, present_names
from apet.contracts.specs import DecoderSpec
from apet.runtime.backends.ort_graph_edit import (
    CONTRIB_DOMAIN,
    HEADS_MAJOR,
    attributes,
    consumer_map,
    drop_dead,
    heads_first,
    perm,
    producer_map,
    use_contrib_domain,
)
from apet.runtime.backends.ort_rotary import RotaryChains

log = logging.getLogger(__name__)


def seqlens_name(group: int) -> str:
    """Input of cache group ``group``: int32 [B], the positions written before this step (= where it writes)."""
    return f"gqa_seqlens_k.{group}"


def total_name(group: int) -> str:
    """Input of cache group ``group``: int32 scalar; the buffer's capacity (a host value ONNX Runtime reads for
    shapes only: with a shared past/present buffer the kernel takes each row's length from ``seqlens_k``)."""
    return f"gqa_total_length.{group}"


class NotRewritable(ValueError):
    """The graph is not the form the rewrite knows (the caller keeps the exported graph)."""


@dataclass(frozen=True)
class GqaGraph:
    """A rewritten graph (decode step or prefill) and what its caller feeds it."""

    model: onnx.ModelProto
    group_layers: tuple[int, ...]  # the first layer of each cache group (two when stage 2 shortened the later ones)
    capacities: tuple[int, ...]  # per group: cache positions (the decode step's constant total_sequence_length)

    @property
    def groups(self) -> int:
        return len(self.group_layers)

    @property
    def host_inputs(self) -> frozenset[str]:
        """The inputs ONNX Runtime reads on the host (each group's total length): bound in host memory."""
        return frozenset(total_name(group) for group in range(self.groups))

    def prompt(self, lengths: tuple[int, ...], batch: int) -> dict[str, np.ndarray]:
        """A prefill's inputs: per group g, a prompt of ``lengths[g]`` positions written at 0..lengths[g]-1."""
        feeds = self.seqlens(tuple(length - 1 for length in lengths), batch)
        feeds.update({total_name(group): np.array(length, dtype=np.int32) for group, length in enumerate(lengths)})
        return feeds

    def seqlens(self, lengths: tuple[int, ...], batch: int) -> dict[str, np.ndarray]:
        """Per group g with ``lengths[g]`` positions written so far (where this step writes): seqlens_k [B]."""
        return {seqlens_name(group): np.full((batch,), length, dtype=np.int32) for group, length in enumerate(lengths)}

    def totals(self) -> dict[str, np.ndarray]:
        """The host-side total-length scalars: each group's capacity, the same at every step (so a CUDA graph
        captured at one step stays right at the next)."""
        return {total_name(group): np.array(capacity, dtype=np.int32) for group, capacity in enumerate(self.capacities)}


def _attention_of(graph: onnx.GraphProto, layer: int) -> onnx.NodeProto:
    prefix = f"/layers.{layer}/"
    found = [n for n in graph.node if n.op_type == "Attention" and n.name.startswith(prefix)]
    if len(found) != 1:
        raise NotRewritable(f"layer {layer} has {len(found)} Attention nodes (the op attention form has one)")
    return found[0]


def _check_attention(node: onnx.NodeProto, head_dim: int) -> float | None:
    """The Attention node's scale if it is the plain softmax(QKᵀ·scale + mask)·V the rewrite can replace."""
    scale = None
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.name == "scale":
            scale = float(value)
        elif attribute.name in ("is_causal", "softcap", "qk_matmul_output_mode") and value:
            raise NotRewritable(f"{node.name}: attribute {attribute.name}={value} is not rewritten")
        elif attribute.name not in ("q_num_heads", "kv_num_heads", "softmax_precision"):
            raise NotRewritable(f"{node.name}: unknown attribute {attribute.name}")
    if len(node.output) != 1 and any(node.output[1:]):
        raise NotRewritable(f"{node.name}: uses Attention's extra outputs")
    default = head_dim ** -0.5
    return None if scale is None or abs(scale - default) <= 1e-6 * default else scale


def _write_of(graph: onnx.GraphProto, tensor: str, buffer: str, prompt: bool) -> onnx.NodeProto:
    """The one ``ScatterElements`` that writes ``buffer``; the attention reads what it wrote (decode: the whole
    buffer) or what it writes (prefill: the prompt's keys/values)."""
    writes = [n for n in graph.node if n.op_type == "ScatterElements" and n.input[0] == buffer]
    if len(writes) != 1 or tensor != (writes[0].input[2] if prompt else writes[0].output[0]):
        raise NotRewritable(f"the attention's input {tensor} is not the in-place write of {buffer}")
    return writes[0]


def _constant(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


class _LayerRewrite:
    """One layer's replacement nodes, in token layout [B, T, heads·D] end to end: q and k rotated by a 3-D
    ``RotaryEmbedding`` (``num_heads`` set: the same cos/sin, the same attributes), v as projected, the output handed
    to the projection without the head-major round trip. Where the graph differs from that chain, the head-major
    tensors are reshaped instead (the same bytes for one token)."""

    def __init__(self, producers: dict[str, onnx.NodeProto], prefix: str, rotary_inside: bool = False) -> None:
        self.producers, self.prefix, self.rotary_inside = producers, prefix, rotary_inside
        self.nodes: list[onnx.NodeProto] = []
        self.rotaries: list[onnx.NodeProto] = []  # with rotary_inside: the q/k rotations left to the attention

    def flat(self, role: str, tensor: str, heads: int, prompt: bool) -> str:
        """``tensor`` (head-major, after rotary for q/k) as [B, T, heads·D] (unrotated where the rotation is left to
        the attention: ``rotary_inside``)."""
        out = f"{self.prefix}{role}"
        rotary = self.producers.get(tensor)
        if rotary is not None and rotary.op_type == "RotaryEmbedding" and len(rotary.input) == 3:
            tokens = heads_first(self.producers, rotary.input[0])
            if tokens is not None and self.rotary_inside:
                self.rotaries.append(rotary)
                return self._merged(tokens, out)
            if tokens is not None:  # rotate in token layout
                self.nodes.append(helper.make_node("RotaryEmbedding", [self._merged(tokens, out), *rotary.input[1:]],
                                                   [out], name=f"{out}_rotary",
                                                   **{**attributes(rotary), "num_heads": heads}))
                return out
        tokens = heads_first(self.producers, tensor) if rotary is None or rotary.op_type != "RotaryEmbedding" \
            else None
        if tokens is None and prompt:  # [B, N, T, D] -> [B, T, N·D] is a copy for T > 1: not this chain
            raise NotRewritable(f"{tensor}: not a head-major transpose or its rotation")
        if tokens is None:  # one token: [B, N, 1, D] and [B, 1, N·D] are the same bytes
            self.nodes.append(helper.make_node("Reshape", [tensor, "gqa/one_token"], [out], name=out))
            return out
        return self._merged(tokens, out)

    def _merged(self, tokens: str, out: str) -> str:
        """``tokens`` [B, T, heads, D] as [B, T, heads·D]: the projection it was split from where it is one (so the
        split's shape arithmetic dies with it), else a Reshape."""
        split = self.producers.get(tokens)
        source = self.producers.get(split.input[0]) if split is not None and split.op_type == "Reshape" else None
        if source is not None and source.op_type == "MatMul":  # q/k/v_proj's [B, T, heads·D]
            return split.input[0]
        self.nodes.append(helper.make_node("Reshape", [tokens, "gqa/to_tokens"], [out + "_tokens"],
                                           name=f"{out}_tokens"))
        return out + "_tokens"


def rewrite(model: onnx.ModelProto, spec: DecoderSpec, layout: CacheLayout, max_context: int,
            prompt: bool = False, rotary_inside: bool = False) -> GqaGraph:
    """``model`` (the decode graph, or with ``prompt`` the prefill graph; weights left external) -> the same graph
    with one GroupQueryAttention per layer; raises :class:`NotRewritable` where it is not the op attention form of
    the static KV cache. With ``rotary_inside`` the attention also rotates q and k (:func:`_rotary_inputs`)."""
    graph = model.graph
    producers = producer_map(graph)
    chains = RotaryChains(graph, producers) if rotary_inside else None
    tables: dict[str, tuple[str, str]] = {}  # cos/sin tensor -> (its table's initializer, the positions)
    consumers = consumer_map(graph)
    group_layers = (0,) if layout.stage2_layer is None or layout.stage2_layer >= spec.num_layers \
        else (0, layout.stage2_layer)
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(Attention) -> the nodes that take its place
    removed: set[int] = set()
    graph.initializer.extend([_constant("gqa/to_tokens", [0, 0, -1]), _constant("gqa/one_token", [0, 1, -1]),
                              _constant("gqa/to_heads", [0, spec.num_heads, 1, spec.head_dim]),
                              _constant("gqa/to_tokens_heads", [0, 0, spec.num_heads, spec.head_dim])])
    pasts, presents = past_names(spec.num_layers), present_names(spec.num_layers)
    for layer in range(spec.num_layers):
        attention = _attention_of(graph, layer)
        scale = _check_attention(attention, spec.head_dim)
        write_k = _write_of(graph, attention.input[1], pasts[2 * layer], prompt)
        write_v = _write_of(graph, attention.input[2], pasts[2 * layer + 1], prompt)
        if (write_k.output[0], write_v.output[0]) != (presents[2 * layer], presents[2 * layer + 1]):
            raise NotRewritable(f"layer {layer}: the cache writes are not the graph's present outputs")
        group = 1 if layout.shortened(layer) else 0
        prefix = f"/layers.{layer}/gqa/"
        rewrite = _LayerRewrite(producers, prefix, rotary_inside)
        query = rewrite.flat("q", attention.input[0], spec.num_heads, prompt)
        key = rewrite.flat("k", write_k.input[2], spec.num_kv_heads, prompt)
        value = rewrite.flat("v", write_v.input[2], spec.num_kv_heads, prompt)
        nodes = rewrite.nodes
        extra: dict[str, object] = {} if scale is None else {"scale": scale}
        rotary: list[str] = []
        if chains is not None:
            rotary, interleaved = _rotary_inputs(graph, chains, tables, rewrite.rotaries, spec.head_dim, max_context)
            extra.update(do_rotary=1, rotary_interleaved=interleaved)
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [query, key, value, pasts[2 * layer], pasts[2 * layer + 1], seqlens_name(group), total_name(group),
             *rotary],
            [f"{prefix}out", presents[2 * layer], presents[2 * layer + 1]],
            name=f"{prefix}GroupQueryAttention", domain=CONTRIB_DOMAIN,
            num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, **extra))
        if not prompt:  # the output as the graph had it, for shape arithmetic that reads it (folded at a fixed batch)
            nodes.append(helper.make_node("Reshape", [f"{prefix}out", "gqa/to_heads"], [attention.output[0]],
                                          name=f"{prefix}heads"))
        for after in consumers.get(attention.output[0], []):
            if after.op_type == "Transpose" and perm(after) == HEADS_MAJOR:
                # back to [B, T, N, D]: the kernel's [B, T, N*D] is those bytes already, no transpose kernel
                merged = [n for n in consumers.get(after.output[0], []) if n.op_type == "Reshape"]
                if merged and len(merged) == len(consumers[after.output[0]]):
                    # each [B, T, N, D] -> [B, T, N·D] is the kernel's output itself (the heads merged)
                    for reshape in merged:
                        nodes.append(helper.make_node("Identity", [f"{prefix}out"], [reshape.output[0]],
                                                      name=f"{reshape.name}/gqa"))
                        removed.add(id(reshape))
                else:
                    nodes.append(helper.make_node("Reshape", [f"{prefix}out", "gqa/to_tokens_heads"],
                                                  [after.output[0]], name=f"{prefix}tokens"))
                removed.add(id(after))
            elif prompt and after.op_type != "Shape":
                raise NotRewritable(f"{attention.name}: its output feeds {after.op_type} {after.name}")
        replaced[id(attention)] = nodes
        removed.update(id(n) for n in (write_k, write_v))
    # each layer's new nodes take its Attention's place: their inputs come before it, their consumers after
    ordered = [new for node in graph.node if id(node) not in removed for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(ordered)
    for group in range(len(group_layers)):
        seqlens = helper.make_tensor_value_info(seqlens_name(group), TensorProto.INT32, [None])
        seqlens.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
        graph.input.append(seqlens)
        graph.input.append(helper.make_tensor_value_info(total_name(group), TensorProto.INT32, []))
    drop_dead(graph)
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        missing = [name for name in node.input if name not in defined]
        if missing:
            raise NotRewritable(f"{node.name} still reads {missing[0]}, which the rewrite replaced")
        defined.update(node.output)
    use_contrib_domain(model)
    return GqaGraph(model, group_layers, tuple(layout.capacity(layer, max_context) for layer in group_layers))


def _rotary_inputs(graph: onnx.GraphProto, chains: RotaryChains, tables: dict[str, tuple[str, str]],
                   rotaries: list[onnx.NodeProto], head_dim: int, max_context: int) -> tuple[list[str], int]:
    """The cos/sin tables and positions GroupQueryAttention rotates q and k with, in place of the two
    ``RotaryEmbedding`` nodes of one layer (each table an initializer, once per cos/sin tensor), and the
    interleaving (tables over the positions below ``max_context``); raises :class:`NotRewritable` where the two
    differ or their chain is not the table form (:mod:`.ort_rotary`)."""
    if len(rotaries) != 2 or list(rotaries[0].input[1:]) != list(rotaries[1].input[1:]):
        raise NotRewritable("q and k are not rotated by the same cos/sin (the rotary stays outside the attention)")
    given = [attributes(node) for node in rotaries]
    if given[0].get("interleaved", 0) != given[1].get("interleaved", 0) or \
            any(a.get("rotary_embedding_dim", 0) not in (0, head_dim) for a in given):
        raise NotRewritable("a partial or mixed rotary embedding (the rotary stays outside the attention)")
    found = []
    for name in rotaries[0].input[1:]:
        if name not in tables:
            table = chains.table(name, max_context)
            if table is None:
                raise NotRewritable(f"{name}: not the rotary chain a table replaces")
            tables[name] = (f"gqa/rotary_table.{len(tables)}", table.positions)
            graph.initializer.append(numpy_helper.from_array(table.table, tables[name][0]))
        found.append(tables[name])
    (cos, positions), (sin, sin_positions) = found
    if positions != sin_positions:
        raise NotRewritable("cos and sin are computed from different positions")
    return [cos, sin, positions], int(given[0].get("interleaved", 0))


def feed_packed_qkv(model: onnx.ModelProto) -> int:
    """Where a GroupQueryAttention that rotates q and k itself reads the three outputs of one ``Split`` of a
    packed projection (:mod:`.ort_pack`), in order and read by nothing else, it reads the packed tensor instead
    (its packed-QKV input form; key and value left empty) and the split goes; returns how many. Rewrites ``model``
    in place."""
    graph = model.graph
    producers, consumers = producer_map(graph), consumer_map(graph)
    fed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or not attributes(node).get("do_rotary"):
            continue
        split = producers.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]) \
                or any(consumers.get(name, []) != [node] for name in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        fed += 1
    if fed:
        drop_dead(graph)
    return fed


SMALL_TENSOR_BYTES = 4096  # external tensors up to this size are read into the rewritten graph


def load_rewritten(path: Path, spec: DecoderSpec, layout: CacheLayout, max_context: int,
                   prompt: bool = False, rotary_inside: bool = False) -> GqaGraph:
    """The graph at ``path`` (structure only: its external weights stay where they are) rewritten; with
    ``rotary_inside`` the attention rotates q and k where the graph's rotary is the table form, else the rotary
    nodes stay.

    Small external tensors are read in: a graph given to ONNX Runtime as bytes cannot read external data while it
    infers shapes, and a shape constant saved externally (any tool's size threshold of 0) would fail there."""
    if rotary_inside:
        try:
            return rewrite(load_structure(path), spec, layout, max_context, prompt, rotary_inside=True)
        except NotRewritable as err:
            log.info("%s: the rotary embedding stays outside the attention: %s", path.name, err)
    return rewrite(load_structure(path), spec, layout, max_context, prompt)


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph at ``path`` without its large external weights (read where they lie by the session), the small
    external tensors read in (shape inference and ONNX Runtime's load from bytes need them)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and _external_length(tensor) <= SMALL_TENSOR_BYTES:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def _external_length(tensor: TensorProto) -> int:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return int(entries.get("length", SMALL_TENSOR_BYTES + 1))

"""Vision, the prompt's splice and the prefill as one ONNX Runtime graph: a request's first token in one session run
(the optional rewrite ``first-token``, :data:`.ort_options.GRAPH_REWRITES`).

Why: the first token otherwise takes two runs with the host in between. The vision run's visual rows come down to
the host, are spliced there into the prompt's embeddings, and the whole prompt goes up again for the prefill's run:
two copies of ~1 MB, a second run with its own overhead and synchronization, and the host's layout between them (at
LLaVA-1.5-7B shapes on the H200, ORT's first token took 11.5 ms where its two graphs take ~8.8 ms of GPU work;
docs/benchmarks.md, "ONNX Runtime CUDA on the static-KV form"). Here the host uploads the pixels and only the
prompt's text rows, and one run (one CUDA graph per prompt shape) does the rest.

How: the vision graph's names are prefixed (:data:`VISION_PREFIX`; its inputs keep theirs), its visual rows
[B, K, H] are flattened and concatenated with the text rows [R, H] the host gathered from the embedding table
(:data:`TEXT_ROWS`), and one ``Gather`` by :data:`SPLICE_INDEX` [B, T] (a visual row's index, or V + the text row's)
puts them in prompt order: that is the prefill's ``inputs_embeds``. The same rows as the host's splice
(:func:`apet.runtime.backends.base.splice_numpy`), in the same dtype: a copy, no arithmetic.

Where: the layout must be known before the vision graph runs, so the family's layout may read only how many rows an
image keeps (``Processor.layout_reads_kept_values`` False), the vision graph must have fixed dims but the batch, and
the LLM no injected inputs: LLaVA-1.5 and Video-LLaVA. (InternVL's layout qualifies, its vision graph does not.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from apet.contracts.io import KEEP_INDEX, VISUAL_EMBEDS

VISION_PREFIX = "vision/"
TEXT_ROWS = "first_token.text_rows"  # [R, H]: the prompt's text rows, in row-major order of their slots
SPLICE_INDEX = "first_token.splice_index"  # int64 [B, T]: each slot's row of concat(visual rows, text rows)
EMBEDS = "inputs_embeds"  # the prefill's input the splice computes
VISION_OUTPUTS = {VISUAL_EMBEDS: VISION_PREFIX + VISUAL_EMBEDS, KEEP_INDEX: VISION_PREFIX + KEEP_INDEX}
VISUAL_ROWS = VISION_OUTPUTS[VISUAL_EMBEDS]  # the output a bound run leaves on the device (DeviceRows)


@dataclass(frozen=True)
class VisionPart:
    """The vision graph as the first-token graph takes it: the form the backend's vision session would run (the
    graphed form on CUDA, :mod:`.ort_vision`), the inputs it casts on the device, the ONNX Runtime optimizers its
    session leaves out (so the vision part computes what that session computes)."""

    model: onnx.ModelProto
    float32_inputs: frozenset[str] = frozenset()
    disabled_optimizers: tuple[str, ...] = ()


@dataclass
class FirstTokenRun:
    """The first-token graph's session, with CUDA graphs its captured runs per prompt shape, and how many times it
    ran (what :class:`DeviceRows` checks)."""

    session: Any
    graphs: Any = None  # ort_prompt_graphs.PromptGraphs (its runs leave the visual rows on the device), or None
    calls: int = 0


class DeviceRows:
    """The first-token graph's visual rows left on the device until read (``np.asarray``): a request never reads
    them (the bench's parity and ``apet check`` do), so a first token does not wait for their copy (0.8 MB at
    LLaVA-1.5-7B shapes). Its buffer is the captured graph's, rewritten by the next first token of the same shape:
    reading rows after that raises instead of returning another request's."""

    def __init__(self, value: Any, run: FirstTokenRun) -> None:
        self.value, self.run, self.call = value, run, run.calls
        self.shape = tuple(value.shape())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.run.calls != self.call:
            raise RuntimeError("these visual rows were overwritten by a later first token; read them (np.asarray) "
                               "before the next request")
        rows = self.value.numpy()
        return rows if dtype is None else rows.astype(dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        return np.asarray(self).reshape(*shape)


def compose(vision: onnx.ModelProto, prefill: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: ``vision``'s nodes (names prefixed, inputs unchanged), the splice, then ``prefill`` with its
    ``inputs_embeds`` computed; outputs: the prefill's and the vision graph's (prefixed names)."""
    vision = _prefixed(vision)
    graph = onnx.GraphProto()
    graph.CopyFrom(prefill.graph)
    embeds = next((i for i in graph.input if i.name == EMBEDS), None)
    if embeds is None:
        raise ValueError(f"the prefill graph takes no {EMBEDS!r}")
    dtype = embeds.type.tensor_type.elem_type
    hidden = embeds.type.tensor_type.shape.dim[2]
    taken = {i.name for i in graph.input}
    graph.input.remove(embeds)
    graph.input.extend(i for i in vision.graph.input if i.name not in taken)
    graph.input.extend([helper.make_tensor_value_info(TEXT_ROWS, dtype, ["text_rows", hidden.dim_param or
                                                                         hidden.dim_value]),
                        helper.make_tensor_value_info(SPLICE_INDEX, TensorProto.INT64, ["batch", "prompt"])])
    graph.initializer.extend(vision.graph.initializer)
    graph.sparse_initializer.extend(vision.graph.sparse_initializer)
    graph.value_info.extend(vision.graph.value_info)
    width = -1 if not hidden.dim_value else hidden.dim_value
    rows_shape = numpy_helper.from_array(np.array([-1, width], dtype=np.int64), "first_token.rows_shape")
    graph.initializer.append(rows_shape)
    splice = [
        helper.make_node("Reshape", [VISION_OUTPUTS[VISUAL_EMBEDS], rows_shape.name], ["first_token.visual_rows"],
                         name="/first_token/Reshape"),
        helper.make_node("Concat", ["first_token.visual_rows", TEXT_ROWS], ["first_token.rows"], axis=0,
                         name="/first_token/Concat"),
        helper.make_node("Gather", ["first_token.rows", SPLICE_INDEX], [EMBEDS], axis=0, name="/first_token/Gather"),
    ]
    nodes = [*vision.graph.node, *splice, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    outputs = {o.name: o for o in vision.graph.output}
    graph.output.extend(outputs[name] for name in VISION_OUTPUTS.values())
    model = helper.make_model(graph, opset_imports=_opsets(vision, prefill), ir_version=max(vision.ir_version,
                                                                                            prefill.ir_version))
    model.producer_name = prefill.producer_name
    model.functions.extend([*prefill.functions, *vision.functions])
    return model


def _prefixed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with :data:`VISION_PREFIX` before every name but its inputs' (which the caller feeds)."""
    if any(attribute.g.node or attribute.graphs for node in model.graph.node for attribute in node.attribute):
        raise ValueError("the vision graph has subgraphs (control flow), which the first-token graph does not take")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph, kept = copy.graph, {i.name for i in model.graph.input}

    def name(value: str) -> str:
        return value if not value or value in kept else VISION_PREFIX + value

    for node in graph.node:
        node.name = VISION_PREFIX + node.name if node.name else node.name
        node.input[:] = [name(value) for value in node.input]
        node.output[:] = [name(value) for value in node.output]
    for entries in (graph.initializer, graph.output, graph.value_info):
        for entry in entries:
            entry.name = name(entry.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name, sparse.indices.name = name(sparse.values.name), name(sparse.indices.name)
    return copy


def _opsets(*models: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    """Each domain at the highest version any of ``models`` imports."""
    versions: dict[str, int] = {}
    for model in models:
        for entry in model.opset_import:
            versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    return [helper.make_opsetid(domain, version) for domain, version in versions.items()]


def splice_feeds(table: np.ndarray, token_ids: np.ndarray, visual_rows: np.ndarray,
                 visual_count: int) -> dict[str, np.ndarray]:
    """The splice's two inputs for a layout: the text slots' rows of ``table`` and every slot's row of
    concat(``visual_count`` visual rows, text rows)."""
    text = visual_rows < 0
    index = np.array(visual_rows, dtype=np.int64, copy=True)
    index[text] = visual_count + np.arange(int(text.sum()), dtype=np.int64)
    return {TEXT_ROWS: np.ascontiguousarray(table[token_ids[text]]), SPLICE_INDEX: index}

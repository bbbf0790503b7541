"""ApET's cost inside ONNX Runtime's graphs, measured apart: each ApET scope of a static-KV artifact (``apet_stage1``
in ``vision.onnx``, ``apet_stage2`` in ``llm_prefill.onnx``) cut out as a graph of its own, fed the tensors the
whole graph hands it on one request, and timed as a CUDA graph (replayed, as the backend runs its graphs) and
without one: wall ms, GPU-busy ms and kernels per call (CUPTI through the PyTorch profiler,
``scripts/ort_gpu_kernels.profile_phase``). The exported vision graph is timed whole the same way, for the share.

Why: the torch path runs each stage in a few fused kernels (0.07 ms for stage 1 and 0.045 ms for stage 2 at
LLaVA-1.5-7B shapes on the H200, docs/benchmarks.md), where ONNX Runtime runs ApET's ~160 and ~190 standard ONNX
nodes one kernel each. This says how much of ORT's first-token gap (issue 28) ApET's nodes make.

Each cut is checked: its outputs on the captured inputs against the whole graph's (``outputs_equal``, the largest
difference), so a cut that dropped a dependency cannot pass for a timing. A value the scope reads that the whole
graph computes from shapes is computed so in the cut too (:func:`cut`), and twinned on the device as the backend's
graphs are, so ONNX Runtime places and captures the cut as it does the whole graph.

    python scripts/ort_apet_graphs.py ARTIFACT --out ort_apet_graphs.json [--calls 30] [--device auto|cuda|cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from apet.atomic import write_atomic

SCRIPTS = Path(__file__).resolve().parent


def _profile_phase() -> Any:
    """scripts/ort_gpu_kernels.profile_phase (a sibling script, not a package module)."""
    spec = importlib.util.spec_from_file_location("ort_gpu_kernels", SCRIPTS / "ort_gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.profile_phase


def with_outputs(model: onnx.ModelProto, names: list[str], types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (typed by ``types``) that it computes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in (*copy.graph.output, *copy.graph.input)}  # a graph input is fed, not returned
    for name in names:
        if name not in have:
            value = helper.make_value_info(name, types[name])
            copy.graph.output.append(value)
    return copy


def cut(model: onnx.ModelProto, scope: str) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """``scope``'s nodes as a model of their own (onnx.utils.Extractor on ``model``, whose large weights may stay
    external: a scope that reads none needs none) -> (model, its inputs, its outputs). A value the scope reads that
    the whole graph computes from tensors' shapes alone (:func:`shape_sources`: stage 2's prompt length) is computed
    the same way in the cut, from the same tensors' shapes: ONNX Runtime then places that arithmetic on the CPU as
    in the whole graph. Fed as an input instead, it stays a device value whatever the binding (ONNX Runtime places
    nodes before inputs are bound), and the index ranges built from it were copied to the host inside the run,
    which refuses the CUDA graph (docs/benchmarks.md, stop 59)."""
    from apet.check.graph import scope_io
    from apet.runtime.backends.ort_graph_edit import producer_map

    inputs, outputs = scope_io(model, scope)
    producers = producer_map(model.graph)  # once for every input's walk
    derived = {name: shape_sources(model, name, producers) for name in inputs}
    shaped = {name: sources for name, sources in derived.items() if sources}
    read = [name for name in inputs if name not in shaped]
    inputs = read + sorted({s for sources in shaped.values() for s in sources} - set(read))
    part = onnx.utils.Extractor(model).extract_model(inputs, outputs)
    return part, inputs, outputs


def shape_sources(model: onnx.ModelProto, name: str,
                  producers: dict[str, onnx.NodeProto] | None = None) -> frozenset[str]:
    """The tensors from whose shapes alone (``Shape``/``Size``, then constants and arithmetic) ``model`` computes
    ``name``; empty where it reads any tensor's values (a graph input's, a computed tensor's) on the way.
    ``producers``: ``model``'s producer map where the caller has it."""
    from apet.runtime.backends.ort_graph_edit import producer_map

    producers = producer_map(model.graph) if producers is None else producers
    initializers = {t.name for t in model.graph.initializer}
    sources: set[str] = set()
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if not current or current in seen or current in initializers:
            continue
        seen.add(current)
        node = producers.get(current)
        if node is None:  # a graph input's values
            return frozenset()
        if node.op_type in ("Shape", "Size"):
            sources.add(node.input[0])
        else:
            pending.extend(node.input)
    return frozenset(sources)


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    return {v.name: v.type for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)}


def _setup(device: str, cuda_graphs: bool) -> Any:
    import onnxruntime as ort

    from apet.runtime.backends.ort_options import cuda_provider, session_options
    from apet.runtime.backends.ort_session import SessionSetup

    providers = [cuda_provider(frozenset(), ort.__version__), "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    return SessionSetup(ort, session_options(ort), providers, device, cuda_graphs)


def time_graph(model: bytes, feeds: dict[str, np.ndarray], device: str, calls: int,
               weights_dir: Path | None = None,
               bound_runs: bool | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One model timed on fixed inputs: without CUDA graphs (plain runs) and, with ``bound_runs`` (default: on
    CUDA), replayed as one (bound once, :class:`apet.runtime.backends.ort_session.FixedRun`; on the CPU the same
    bound runs without a capture, which is how the tests reach this branch) -> (profiles per form, the plain
    run's outputs)."""
    from apet.runtime.backends.ort_session import FixedRun

    profile_phase = _profile_phase()
    batch = int(next(v.shape[0] for v in feeds.values() if v.ndim))  # the graphs' leading dim is the batch
    result: dict[str, Any] = {}
    plain_setup = _setup(device, False)
    plain = plain_setup.session(model, batch, weights_dir)
    names = [o.name for o in plain.get_outputs()]
    outputs = dict(zip(names, plain.run(None, feeds)))
    for _ in range(3):
        plain.run(None, feeds)
    result["ungraphed"] = profile_phase(lambda: plain.run(None, feeds), calls)
    if device == "cuda" if bound_runs is None else bound_runs:
        try:
            setup = _setup(device, True)
            session = setup.session(model, batch, weights_dir)
            bound = FixedRun(session, setup, {n: (v.shape, v.dtype.type) for n, v in feeds.items()},
                             {n: (v.shape, v.dtype.type) for n, v in outputs.items()})
            for _ in range(4):  # warm-up and the capture
                replayed = bound(feeds)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime refuses a capture with an untyped Fail: say so, go on
            result["graphed_refused"] = str(err).splitlines()[0]
        else:
            result["graphed"] = profile_phase(lambda: bound(feeds), calls)
            result["graphed_outputs_equal"] = all(np.array_equal(replayed[n], outputs[n]) for n in names)
    result["nodes"] = len(onnx.load_from_string(model).graph.node)
    return result, outputs


def _compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    """Whether the cut's outputs are the whole graph's, and by how much they differ where they are not."""
    largest = 0.0
    for name, value in got.items():
        if value.dtype.kind == "f":
            largest = max(largest, float(np.max(np.abs(value.astype(np.float64) - want[name].astype(np.float64)))))
    return {"outputs_equal": all(np.array_equal(got[n], want[n]) for n in got), "max_abs_diff": largest}


def request_inputs(artifact: Path) -> dict[str, Any]:
    """One request (seeded media, the family's processor): the vision graph's feeds, and how its prompt is laid out."""
    from apet.bench.ort_profile import artifact_request
    from apet.manifest import read_manifest

    manifest = read_manifest(artifact)
    if manifest.kv_cache != "static":
        raise SystemExit(f"{artifact} is not a static-KV artifact (apet-export --kv-cache static)")
    _, inputs, make_layout = artifact_request(artifact, manifest, 1, (640, 480), 40, 8)
    dtype = np.float16 if manifest.dtype == "fp16" else np.float32
    (arrays,) = inputs.all_runs()
    return {"manifest": manifest, "dtype": dtype, "make_layout": make_layout,
            "vision_feeds": {n: v.astype(dtype) if v.dtype.kind == "f" else v for n, v in arrays.items()}}


def prefill_inputs(artifact: Path, request: dict[str, Any], vision_out: dict[str, np.ndarray]) -> dict[str, Any]:
    """The exported prefill's feeds and zero caches, built from the vision graph's outputs the way the backend
    builds them."""
    from apet.contracts.io import IMAGE_START, KEEP_INDEX, VISUAL_EMBEDS, past_names
    from apet.runtime.backends.base import load_embedding_table, splice_numpy

    manifest, dtype = request["manifest"], request["dtype"]
    layout = request["make_layout"](vision_out[KEEP_INDEX])
    table = load_embedding_table(artifact, manifest)
    embeds = splice_numpy(table, layout.token_ids, vision_out[VISUAL_EMBEDS], layout.visual_rows)
    spec = manifest.model.decoder
    caches = {name: np.zeros((1, spec.num_kv_heads, manifest.cache_layout.capacity(i // 2, manifest.max_context),
                              spec.head_dim), dtype)
              for i, name in enumerate(past_names(spec.num_layers))}
    return {"inputs_embeds": embeds.astype(dtype), "position_ids": layout.positions.astype(np.int64),
            "attention_mask": layout.attention_mask.astype(np.int64),
            IMAGE_START: layout.image_start.astype(np.int64), **caches}


def cut_and_run(model: onnx.ModelProto, scope: str, feeds: dict[str, np.ndarray], device: str,
                weights_dir: Path | None = None) -> tuple[onnx.ModelProto, list[str], list[str], dict[str, np.ndarray]]:
    """``scope`` cut out of ``model`` (:func:`cut`), and one run of the whole model that also returns the tensors at
    the scope's edges -> (cut, its inputs, its outputs, every value of that run: feeds and outputs by name)."""
    part, ins, outs = cut(model, scope)
    whole = with_outputs(model, ins + outs, _types(part))
    session = _setup(device, False).session(whole.SerializeToString(), None, weights_dir)
    fed = {n: v for n, v in feeds.items() if n in {i.name for i in session.get_inputs()}}
    return part, ins, outs, {**fed, **dict(zip([o.name for o in session.get_outputs()], session.run(None, fed)))}


def as_run(part: onnx.ModelProto) -> tuple[bytes, int]:
    """The cut as the backend's graphs run it: the shape values its kernels read as data twinned on the device
    (:func:`apet.runtime.backends.ort_device_shapes.to_device`) -> (model bytes, how many twins). ``part`` is left as
    cut."""
    from apet.runtime.backends.ort_device_shapes import to_device

    run = onnx.ModelProto()
    run.CopyFrom(part)
    twins = to_device(run)
    return run.SerializeToString(), twins


def measure(artifact: Path, device: str, calls: int, bound_runs: bool | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    from apet import scopes
    from apet.runtime.backends.ort_gqa import load_structure

    request = request_inputs(artifact)
    manifest = request["manifest"]
    result: dict[str, Any] = {"artifact": str(artifact), "device": device, "onnxruntime": ort.__version__,
                              "calls": calls}
    # stage 1: one run of the whole vision graph gives the scope's edges and the request's visual rows
    vision = onnx.load(str(artifact / manifest.graphs["vision"].file))
    part, ins, outs, values = cut_and_run(vision, scopes.APET_STAGE1, request["vision_feeds"], device)
    result["apet_stage1"] = _time_cut(scopes.APET_STAGE1, part, ins, outs, values, device, calls, None, bound_runs)
    result["vision_whole"] = _report(*time_graph(vision.SerializeToString(), request["vision_feeds"], device, calls,
                                                 None, bound_runs))
    # stage 2: the exported prefill (weights read where they lie), its caches given as inputs
    prefill_path = artifact / manifest.graphs["llm_prefill"].file
    prefill = load_structure(prefill_path)
    part, ins, outs, values = cut_and_run(prefill, scopes.APET_STAGE2, prefill_inputs(artifact, request, values),
                                          device, prefill_path.parent)
    result["apet_stage2"] = _time_cut(scopes.APET_STAGE2, part, ins, outs, values, device, calls,
                                      prefill_path.parent, bound_runs)
    return result


def _time_cut(scope: str, part: onnx.ModelProto, ins: list[str], outs: list[str], values: dict[str, np.ndarray],
              device: str, calls: int, weights_dir: Path | None, bound_runs: bool | None) -> dict[str, Any]:
    """A cut (:func:`as_run`) timed on the values the whole graph handed it, checked against the whole graph's."""
    from apet.check.graph import scope_of_tensor

    run_bytes, twins = as_run(part)
    timed, outputs = time_graph(run_bytes, {n: values[n] for n in ins}, device, calls, weights_dir, bound_runs)
    own = sum(scope_of_tensor(node.name) == scope for node in part.graph.node)
    facts = {"nodes": own, "nodes_run": timed["nodes"], "shape_nodes": len(part.graph.node) - own,
             "device_twins": twins}  # nodes: the scope's; nodes_run: with the recomputed shape values and twins
    return _report(timed | facts, outputs, {n: values[n] for n in outs})


def _report(timed: dict[str, Any], outputs: dict[str, np.ndarray],
            want: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    return timed | (_compare(outputs, want) if want is not None else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda where ONNX Runtime has its CUDA provider")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        import onnxruntime as ort

        device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    result = measure(args.artifact, device, args.calls)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    for name in ("apet_stage1", "apet_stage2", "vision_whole"):
        row = result[name]
        forms = {form: (row[form]["wall_ms_median"], row[form]["gpu_busy_ms_per_call"],
                        row[form]["count_per_call"].get("kernels")) for form in ("ungraphed", "graphed") if form in row}
        print(name, f"nodes {row['nodes']}", "(wall ms, GPU ms, kernels):", forms,
              {k: row[k] for k in ("outputs_equal", "max_abs_diff", "graphed_outputs_equal", "graphed_refused")
               if k in row})
    return 0


if __name__ == "__main__":
    sys.exit(main())

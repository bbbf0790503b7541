"""``apet inspect DIR``: what an artifact holds — manifest, graph I/O, engines and their profiles — and
whether it is intact: every checksum, the manifest's own digest, graph I/O and engines (:func:`verify`).
Both read the artifact as one :func:`apet.manifest.consistent_read`: an export or build replacing it meanwhile
makes them read again, or raise the retryable ArtifactChangedError, never report a mix as corruption."""

from __future__ import annotations

from pathlib import Path

from apet.contracts.files import ENGINE_FILES, REPORT_NAME, manifest_digest, read_report, sha256_file
from apet.contracts.onnx_graph import graph_io, nodes_by_stage, spec_dict
from apet.errors import ApetError, ArtifactError
from apet.manifest import Manifest, consistent_read, read_manifest
from apet.models.registry import family_of


def _io_lines(title: str, specs: list[dict]) -> list[str]:
    return [f"    {title} {s['name']}: {s.get('dtype', '?')}[{', '.join(str(d) for d in s['shape'])}]" for s in specs]


def _node_counts(path: Path) -> dict[str, int]:
    """Nodes per stage, or nothing for a graph that cannot be read (verification reports why)."""
    try:
        return nodes_by_stage(path)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: describing must not fail on it
        return {}


def _cost_lines(nodes: dict[str, int], parsed: dict[str, int] | None, built: dict[str, int] | None) -> list[str]:
    """Per scope: ONNX nodes, TensorRT layers after parsing, engine layers after fusion (what each unfused
    layer costs on a Jetson: a kernel launch). Decoder layers are summed as "llm layers"."""
    def cell(counts: dict[str, int] | None, stage: str) -> str:
        return "-" if counts is None else str(counts.get(stage, 0))

    stages = list(dict.fromkeys([*nodes, *(parsed or {}), *(built or {})]))
    total = {"nodes": nodes, "parsed": parsed, "built": built}
    lines = ["    scopes     ONNX nodes / TensorRT layers parsed / engine layers after fusion"]
    for stage in [*stages, "total"]:
        row = [cell(counts if stage != "total" or counts is None else {"total": sum(counts.values())}, stage)
               for counts in total.values()]
        lines.append(f"      {stage:<14}{row[0]:>7} /{row[1]:>7} /{row[2]:>7}")
    if parsed is None:
        lines.append("      parsed layers: not recorded (apet-build records them; apet inspect --parse counts them "
                     "now)")
    if built is None:
        lines.append("      engine layers: recorded only by an apet-build on a GPU that runs the plan (the engine "
                     "inspector needs it; an ahead-of-time build on a CPU has none)")
    return lines


def _parsed_now(path: Path) -> dict[str, int] | None:
    """TensorRT layers per scope, parsed now with whichever TensorRT flavour imports (None when none does)."""
    from apet.engines.api import load_api
    from apet.engines.trt import parse_layer_counts

    try:
        api = load_api("auto")
    except ApetError:
        return None
    return parse_layer_counts(api, path)


def _fusion_line(engine: dict) -> str:
    """What TensorRT's parser made of the attention (from the build report)."""
    fused = engine.get("fused_layers")
    if fused is None:
        return "attention  not recorded (built by an older apet; rebuild to see it)"
    line = (f"attention  {fused.get('attention', 0)} TensorRT attention layers, "
            f"{fused.get('rotary_embedding', 0)} rotary-embedding layers in the parsed network")
    if engine.get("attention_form") == "pattern":
        line += " (pattern form: fusion is the builder's choice, see the engine's layer information)"
    return line


def inspect(artifact: Path, verify_files: bool = True, parse: bool = False) -> str:
    """What ``apet inspect`` prints: the description and, with ``verify_files``, the verification line;
    ``parse`` counts TensorRT's parsed layers per scope where no build report records them."""
    def read() -> str:
        return describe(artifact, parse) + ("\n" + verify(artifact) if verify_files else "")

    return consistent_read(artifact, read)


def describe(artifact: Path, parse: bool = False) -> str:
    return consistent_read(artifact, lambda: _describe(Path(artifact), parse))


def _describe(artifact: Path, parse: bool = False) -> str:
    manifest = read_manifest(artifact)
    report = read_report(artifact)
    current = report if report is not None and report.get("manifest_sha256") == manifest_digest(artifact) else None
    m, c = manifest.model, manifest.compression
    lines = [f"artifact {artifact}",
             f"  model      {m.family} from {m.source} ({m.decoder.num_layers} layers, hidden {m.decoder.hidden_size}, "
             f"{m.decoder.num_heads}/{m.decoder.num_kv_heads} q/kv heads, vocab {m.decoder.vocab_size})",
             f"  dtype      {manifest.dtype}, opset {manifest.opset}, max batch {manifest.max_batch}, "
             f"max context {manifest.max_context}",
             f"  weights    LLM {manifest.weights.describe(manifest.dtype)}",
             f"  target     {manifest.target}: {manifest.attention} attention"
             + (" (ONNX Attention + RotaryEmbedding)" if manifest.attention == "op" else " (MatMul-Softmax-MatMul)"),
             f"  ApET       {c.budget_summary(m.n_tokens)} (basis {c.stage1.basis} by "
             f"{c.stage1.method}, {c.basis_placement} placement{', merged' if c.stage1.merge else ''})"
             + (f"; {c.stage2.keep} from LLM layer {c.stage2.layer}" if c.stage2 else "; single stage"),
             f"  visual     {family_of(manifest).visual_summary(manifest)} at the LLM input",
             *[f"  images     {line}" for line in [family_of(manifest).preprocessing_summary(manifest)] if line],
             f"  schema     v{manifest.schema_version}, written by apet {manifest.apet_version} at {manifest.created}"]
    for name, graph in manifest.graphs.items():
        data = f" + {', '.join(graph.external_data)}" if graph.external_data else ""
        size = f" ({graph.weight_bytes / 1e6:.1f} MB of weights)" if graph.weight_bytes else ""
        lines.append(f"  graph {name}: {graph.file}{data}{size}")
        lines += _io_lines("in ", graph.inputs) + _io_lines("out", graph.outputs)
        stages = _node_counts(artifact / graph.file)
        if stages:
            engine = (current or {}).get("engines", {}).get(name) or {}
            parsed = engine.get("parsed_layers") or (_parsed_now(artifact / graph.file) if parse else None)
            lines += _cost_lines(stages, parsed, engine.get("engine_layers"))
    if report is None:
        lines.append("  engines    none (run apet-build)")
        return "\n".join(lines)
    lines.append(f"  engines    built by {report.get('builder')} {report.get('version')} at {report.get('created')}")
    for name, engine in report.get("engines", {}).items():
        lines.append(f"  engine {name}: {engine.get('file')} ({engine.get('bytes', 0) / 1e6:.1f} MB, "
                     f"{engine.get('num_layers')} layers, built in {engine.get('seconds')} s, "
                     f"targets {', '.join(engine.get('compute_capabilities', []))})")
        lines.append(f"    {_fusion_line(engine)}")
        for profile in engine.get("profiles", []):
            lines.append(f"    profile {profile['name']}:")
            for tensor, (low, opt, high) in profile["shapes"].items():
                lines.append(f"      {tensor}: min {low} opt {opt} max {high}")
    return "\n".join(lines)


def _checksum_problems(artifact: Path, manifest: Manifest) -> list[str]:
    problems = [f"{name} is not covered by a checksum in the manifest"
                for name in manifest.files() if name not in manifest.checksums]
    for name, expected in sorted(manifest.checksums.items()):
        path = artifact / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} changed after export (checksum mismatch)")
    return problems


def _io_problems(artifact: Path, manifest: Manifest) -> list[str]:
    problems = []
    for name, graph in manifest.graphs.items():
        try:
            inputs, outputs = graph_io(artifact / graph.file)
        except Exception as exc:  # onnx raises DecodeError, OSError, ... on a truncated or foreign file
            problems.append(f"{graph.file} cannot be read as ONNX ({type(exc).__name__})")
            continue
        for kind, actual, recorded in (("inputs", inputs, graph.inputs), ("outputs", outputs, graph.outputs)):
            if spec_dict(actual) != list(recorded):
                problems.append(f"{graph.file} {kind} differ from the manifest's graphs.{name}.{kind}")
    return problems


def _engine_problems(artifact: Path) -> list[str]:
    plans = [file for file in ENGINE_FILES.values() if (artifact / file).exists()]
    try:
        report = read_report(artifact)
    except ArtifactError as exc:
        return [str(exc)]
    if report is None:
        return [f"{file} is not recorded in any {REPORT_NAME} (a foreign or stale engine)" for file in plans]
    problems = []
    if report.get("manifest_sha256") != manifest_digest(artifact):
        problems.append(f"{REPORT_NAME} belongs to another export of this directory (engines are stale)")
    recorded = {entry.get("file"): entry for entry in report["engines"].values() if isinstance(entry, dict)}
    for file in plans:
        if file not in recorded:
            problems.append(f"{file} is not recorded in {REPORT_NAME} (a foreign or stale engine)")
    for file, entry in recorded.items():
        path = artifact / str(file)
        if not path.is_file():
            problems.append(f"{file} is recorded in {REPORT_NAME} but missing")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{file} changed after apet-build (checksum mismatch)")
    return problems


def verify(artifact: Path) -> str:
    """Check every checksum, the manifest's own digest, graph I/O against the manifest and the engines
    against the build report; raise :class:`ArtifactError` naming every problem found."""
    return consistent_read(artifact, lambda: _verify(Path(artifact)))


def _verify(artifact: Path) -> str:
    manifest = read_manifest(artifact)  # validates the manifest's digest
    export_problems = _checksum_problems(artifact, manifest) + _io_problems(artifact, manifest)
    problems = export_problems + _engine_problems(artifact)
    if problems:
        # stale or changed engines over a sound export need a rebuild only; a damaged export needs both
        rebuild = f"apet-build {artifact} --overwrite"
        fix = (f"re-export the artifact (apet-export ... --out {artifact} --overwrite), then rebuild its engines "
               f"({rebuild})" if export_problems else f"rebuild the engines: {rebuild} (the export itself is intact)")
        raise ArtifactError(f"{artifact} failed verification: " + "; ".join(problems), fix)
    engines = [file for file in ENGINE_FILES.values() if (artifact / file).exists()]
    return (f"  verified   manifest digest, {len(manifest.checksums)} checksums, graph I/O"
            + (f", {', '.join(engines)} against {REPORT_NAME}" if engines else ""))

"""``apet inspect DIR``: what an artifact holds — manifest, graph I/O, engines and their profiles."""

from __future__ import annotations

from pathlib import Path

from apet.contracts.files import read_report
from apet.manifest import read_manifest


def _io_lines(title: str, specs: list[dict]) -> list[str]:
    return [f"    {title} {s['name']}: {s.get('dtype', '?')}[{', '.join(str(d) for d in s['shape'])}]" for s in specs]


def describe(artifact: Path) -> str:
    manifest = read_manifest(artifact)
    m, c = manifest.model, manifest.compression
    lines = [f"artifact {artifact}",
             f"  model      {m.family} from {m.source} ({m.decoder.num_layers} layers, hidden {m.decoder.hidden_size}, "
             f"{m.decoder.num_heads}/{m.decoder.num_kv_heads} q/kv heads, vocab {m.decoder.vocab_size})",
             f"  dtype      {manifest.dtype}, opset {manifest.opset}, max batch {manifest.max_batch}, "
             f"max context {manifest.max_context}",
             f"  ApET       {c.budget_summary(m.n_tokens)} (basis {c.stage1.basis} by "
             f"{c.stage1.method}, {c.basis_placement} placement{', merged' if c.stage1.merge else ''})"
             + (f"; {c.stage2.keep} from LLM layer {c.stage2.layer}" if c.stage2 else "; single stage"),
             f"  schema     v{manifest.schema_version}, written by apet {manifest.apet_version} at {manifest.created}"]
    for name, graph in manifest.graphs.items():
        data = f" + {', '.join(graph.external_data)}" if graph.external_data else ""
        lines.append(f"  graph {name}: {graph.file}{data}")
        lines += _io_lines("in ", graph.inputs) + _io_lines("out", graph.outputs)
    report = read_report(artifact)
    if report is None:
        lines.append("  engines    none (run apet-build)")
        return "\n".join(lines)
    lines.append(f"  engines    built by {report.get('builder')} {report.get('version')} at {report.get('created')}")
    for name, engine in report.get("engines", {}).items():
        lines.append(f"  engine {name}: {engine.get('file')} ({engine.get('bytes', 0) / 1e6:.1f} MB, "
                     f"{engine.get('num_layers')} layers, built in {engine.get('seconds')} s, "
                     f"targets {', '.join(engine.get('compute_capabilities', []))})")
        for profile in engine.get("profiles", []):
            lines.append(f"    profile {profile['name']}:")
            for tensor, (low, opt, high) in profile["shapes"].items():
                lines.append(f"      {tensor}: min {low} opt {opt} max {high}")
    return "\n".join(lines)

"""results.md and the PNG plots of an apet-bench run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apet.atomic import write_atomic

STAGE_ORDER = ("vision_tower", "apet_stage1", "projector", "prefill")


def _ms(timing: dict[str, Any] | None) -> str:
    """The median with the spread of the repeats: ``median [p10–p90]``."""
    if not timing:
        return "–"
    if "p10_ms" not in timing:  # results.json of apet < 0.2 (no p10)
        return f"{timing['median_ms']:.3f}"
    return f"{timing['median_ms']:.3f} [{timing['p10_ms']:.3f}–{timing['p90_ms']:.3f}]"


def _noise(results: dict[str, Any]) -> list[str]:
    noisy = results.get("noisy_timings") or {}
    if not noisy:
        return []
    worst = max(noisy, key=noisy.get)
    return ["", f"**Noisy timings**: {len(noisy)} have a p90 above {results.get('noisy_spread', 1.5)}x their median "
            f"(worst {worst}: {noisy[worst]}x); another process was likely using the device. Rerun on an idle "
            "machine or with more --repeats before comparing these numbers."]


def _stage2(parity: dict[str, Any]) -> str:
    overlap = parity.get("stage2_index_overlap")
    equal = parity["stage2_index_equal"]
    return f"{equal} ({overlap:.0%} shared)" if overlap is not None and not equal else str(equal)


def markdown(results: dict[str, Any]) -> str:
    env, cfg = results["environment"], results["config"]
    lines = [f"# apet-bench: {cfg['model']} on {env['device']}",
             "",
             f"torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}; measured ceilings: "
             f"{env['ceilings']['matmul_tflops']} TFLOP/s matmul, {env['ceilings']['bandwidth_gbs']} GB/s copy. "
             f"Prompt {cfg['prompt_tokens']} text tokens + visual tokens, {cfg['new_tokens']} new tokens, "
             f"{cfg['repeats']} repeats (median [p10–p90] in ms; device-event timings on CUDA).",
             *_noise(results),
             "",
             "| batch | ratio | K1 | K2 (from layer) | visual | vision ms | ApET-1 ms | proj ms | prefill ms "
             "| ApET-2 ms | TTFT ms | decode ms/tok | tok/s | e2e ms | peak MiB | weights |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in results["runs"]:
        s, g, b = run["stages"], run["generation"], run["budgets"]
        decode = g["decode_per_token"]
        tps = f"{1000 / decode['median_ms'] * run['batch']:.1f}" if decode else "–"
        k2 = f"{b['k2']} (L{b['stage2_layer']})" if b["k2"] else "–"
        visual = b.get("visual_tokens", "–")
        visual = f"{visual} ({b['views']} views)" if b.get("views", 1) > 1 else visual
        lines.append(f"| {run['batch']} | {run['ratio']} | {b['k1']} | {k2} | {visual} | "
                     f"{_ms(s.get('vision_tower'))} | {_ms(s.get('apet_stage1'))} | {_ms(s.get('projector'))} | "
                     f"{_ms(s.get('prefill'))} | "
                     f"{_ms(s.get('apet_stage2'))} | {_ms(g['ttft'])} | {_ms(decode)} | {tps} | "
                     f"{_ms(g['end_to_end'])} | {run['peak_memory_mb'] or '–'} | {run.get('weights', 'fp16')} |")
    lines += ["", "## Against the baselines (same run)", "",
              "| batch | ratio | TTFT ms | HF generate TTFT | HF static-cache TTFT | paper-style TTFT | "
              "speedup vs HF | vs HF static | vs paper | TTFT / TTFT(ratio 1) | decode vs HF | decode vs HF static |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        hf = results["baselines"].get("hf_generate", {}).get(str(run["batch"]))
        static = results["baselines"].get("hf_static", {}).get(str(run["batch"]))
        paper = run.get("paper_style")
        sp = run.get("speedup", {})
        lines.append(f"| {run['batch']} | {run['ratio']} | {_ms(run['generation']['ttft'])} | "
                     f"{_ms(hf['ttft']) if hf else '–'} | {_ms(static['ttft']) if static else '–'} | "
                     f"{_ms(paper['ttft']) if paper else '–'} | "
                     f"{sp.get('vs_hf_generate_ttft', '–')} | {sp.get('vs_hf_static_ttft', '–')} | "
                     f"{sp.get('vs_paper_style_ttft', '–')} | {sp.get('ttft_over_ratio_1', '–')} | "
                     f"{sp.get('vs_hf_generate_decode', '–')} | {sp.get('vs_hf_static_decode', '–')} |")
    baselines = [(key, batch, b) for key in ("hf_generate", "hf_static")
                 for batch, b in results["baselines"].get(key, {}).items()]
    if baselines:
        lines += ["", "| baseline | batch | visual tokens | TTFT ms | decode ms/token | warm-up s |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {key} | {batch} | {b['visual_tokens']} | {_ms(b['ttft'])} | {b['decode_ms_per_token']} | "
                  f"{b.get('warmup_s', '–')} |" for key, batch, b in baselines]
    ort = [run for run in results["runs"] if run.get("onnxruntime")]
    if ort:
        form = ort[0]["onnxruntime"].get("attention", "pattern")
        provider = ort[0]["onnxruntime"].get("execution_provider", "CUDA")
        lines += ["", f"## The exported graphs ({form} attention) in ONNX Runtime ({provider} EP) vs the torch path "
                  "(same weights)", "",
                  "ORT's TTFT runs from the processor's host arrays to the logits on the host (pixels uploaded, the "
                  "prompt laid out from the kept positions); the torch TTFT from pixels on the GPU and a prompt laid "
                  "out before timing; \"ORT's span\" times the torch path over ORT's span, host work included.", "",
                  "| batch | ratio | ORT TTFT ms | torch TTFT ms | torch TTFT ms, ORT's span | ORT decode ms/tok | "
                  "torch decode ms/tok | stage-1 index equal | stage-2 index equal | greedy steps equal | "
                  "max abs Δlogit (scale) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
        for run in ort:
            o, p = run["onnxruntime"], run["onnxruntime"]["parity"]
            request = run["generation"].get("request_ttft")
            lines.append(f"| {run['batch']} | {run['ratio']} | {_ms(o['ttft'])} | {_ms(run['generation']['ttft'])} | "
                         f"{_ms(request) if request else '–'} | "
                         f"{_ms(o['decode_per_token'])} | {_ms(run['generation']['decode_per_token'])} | "
                         f"{p['stage1_index_equal']} | {_stage2(p)} | "
                         f"{p['greedy_equal_steps']}/{p['greedy_steps']} | "
                         f"{p['max_abs_logit_diff']} ({p['logit_scale']}) |")
    lines += ["", "## Measured over floor (floor = max(FLOPs / matmul rate, bytes / bandwidth))", "",
              "| batch | ratio | " + " | ".join(STAGE_ORDER + ("apet_stage2", "decode_step")) + " | vision warm-up s |",
              "|---:|---:|" + "---:|" * (len(STAGE_ORDER) + 3)]
    for run in results["runs"]:
        over = run["measured_over_floor"]
        lines.append(f"| {run['batch']} | {run['ratio']} | " +
                     " | ".join(str(over.get(k, "–")) for k in STAGE_ORDER + ("apet_stage2", "decode_step")) +
                     f" | {run.get('vision_warmup_s', '–')} |")
    lines += ["", "## Floors projected onto Jetson (same FLOP/byte counts, weights at their format's bytes; ms)", "",
              "| batch | ratio | device | vision | prefill | decode step | weights | LLM weight MB |",
              "|---:|---:|---|---:|---:|---:|---|---:|"]
    for run in results["runs"]:
        for device, floors in run["jetson_floors_ms"].items():
            lines.append(f"| {run['batch']} | {run['ratio']} | {device} | {floors['vision_tower']} | "
                         f"{floors['prefill']} | {floors['decode_step']} | {run.get('weights', 'fp16')} | "
                         f"{run.get('llm_weight_bytes', 0) / 1e6:.0f} |")
    lines += jetson_apet_lines(results["runs"])
    kernels = {run.get("weights", "fp16"): run.get("kernels") for run in results["runs"] if run.get("kernels")}
    if kernels:
        lines += ["", "Weight-only GEMMs (layers per kernel): " + "; ".join(
            f"{fmt}: " + ", ".join(f"{k} x{v}" for k, v in used.items()) for fmt, used in kernels.items())]
    return "\n".join(lines) + "\n"


def jetson_apet_lines(runs: list[dict[str, Any]]) -> list[str]:
    """ApET's projected cost on each Jetson (its TensorRT layers x an assumed per-layer cost, plus its floor) beside
    what the compression saves at that ratio (prefill + projector floors against ratio 1.0 of the same batch and
    weights): where "net" is positive, ApET pays off on that device."""
    rows = [run for run in runs if run.get("jetson_apet_ms")]
    if not rows:
        return []
    lines = ["", "## ApET on Jetson: projected cost against what it saves (ms; per-layer cost is an assumption, "
                 "apet/bench/flops.py)", "",
             "| batch | ratio | device | ApET layers (parsed) | us per layer | ApET ms | saved ms (prefill + projector "
             "floors vs ratio 1.0) | net ms |", "|---:|---:|---|---:|---:|---:|---:|---:|"]

    def saved_floor(run: dict[str, Any], device: str) -> float:
        floors = run["jetson_floors_ms"][device]
        return floors.get("prefill", 0.0) + floors.get("projector", 0.0)

    for run in rows:
        full = next((r for r in runs if r["batch"] == run["batch"] and r["ratio"] == 1.0
                     and r.get("weights") == run.get("weights")), None)
        for device, stages in run["jetson_apet_ms"].items():
            saved = saved_floor(full, device) - saved_floor(run, device) if full else None
            saved_text = "–" if saved is None else f"{saved:.1f}"
            if not stages and run["ratio"] < 1.0:  # compressed, but no TensorRT parser where the bench ran
                lines.append(f"| {run['batch']} | {run['ratio']} | {device} | not counted (no TensorRT module "
                             f"here) | – | – | {saved_text} | – |")
                continue
            layers = " + ".join(str(v["layers"]) for v in stages.values()) or "0"
            cost = sum(v["ms"] for v in stages.values())
            us = next(iter(stages.values()))["layer_us"] if stages else "–"
            lines.append(f"| {run['batch']} | {run['ratio']} | {device} | {layers} | {us} | {cost:.2f} | "
                         + (f"{saved_text} | {saved - cost:.1f} |" if saved is not None else "– | – |"))
    return lines


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    first = results["runs"][0]
    runs = [r for r in results["runs"] if r["batch"] == first["batch"]
            and r.get("weights", "fp16") == first.get("weights", "fp16")]
    labels = [str(r["ratio"]) for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(runs)
    for stage in STAGE_ORDER:
        values = [r["stages"].get(stage, {}).get("median_ms", 0.0) for r in runs]
        ax.bar(labels, values, bottom=bottom, label=stage.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("ratio (mean retained fraction of visual tokens)")
    ax.set_ylabel("ms")
    ax.set_title(f"Time to first token by stage — {results['config']['model']}, batch {runs[0]['batch']}")
    ax.legend()
    fig.tight_layout()
    written.append(out / "breakdown.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    mode = results["config"].get("compile_mode", "default")
    variant = (", compiled" + (f" ({mode})" if mode != "default" else "")) if results["config"].get("compile") else ""
    variant += ", CUDA graphs" if results["config"]["cuda_graphs"] else ""
    hf_runs = results["baselines"].get("hf_generate", {})
    for batch in sorted({r["batch"] for r in results["runs"]}):
        rows = [r for r in results["runs"] if r["batch"] == batch]
        line, = ax.plot([r["ratio"] for r in rows], [r["generation"]["ttft"]["median_ms"] for r in rows], "o-",
                        label=f"apet batch {batch} (torch, static cache{variant})")
        hf = hf_runs.get(str(batch))
        if hf:  # each batch size against its own baseline, in its colour
            ax.axhline(hf["ttft"]["median_ms"], color=line.get_color(), linestyle=":",
                       label=f"HF generate batch {batch}, all tokens (SDPA)")
    paper = [(r["ratio"], r["paper_style"]["ttft"]["median_ms"]) for r in runs if r.get("paper_style")]
    if paper:
        ax.plot(*zip(*paper), "s--", label="paper-style (HF SDPA + ApET eager)")
    ax.set_xlabel("ratio")
    ax.set_ylabel("TTFT ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Time to first token vs ratio, per batch size — {results['config']['model']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "ttft.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write_report(results: dict[str, Any], out: Path) -> None:
    write_atomic(out / "results.md", markdown(results))
    plot(results, out)

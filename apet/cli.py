"""Command-line entry points. Argument parsing only: each command calls one package function."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from apet.bench.ort_process import ORT_PROCESSES
from apet.contracts.io import DECODE_ATTENTION, KV_CACHE_FORMS, llm_graphs
from apet.contracts.targets import ATTENTION_FORMS, DEFAULT_TARGET, OP_DEFAULT_TARGET, TARGETS
from apet.errors import COMMAND_LINE, UsageError, guarded
from apet.extras import extra_error
from apet.models.registry import family_of
from apet.quiet import quiet_third_party
from apet.runtime.backends.ort_options import GRAPH_REWRITES
from apet.runtime.compiled import COMPILE_MODES


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL",
                   help=_model_help(("tiny", "aliases", "shapes"), "a local checkpoint directory | an org/name hub id "
                                    "(downloaded on first use)"))
    p.add_argument("--ratio", type=float, help="mean retained fraction of visual tokens, in (0, 1]; 0.11 -> 64 of 576")
    p.add_argument("--stages", type=int, choices=(1, 2),
                   help="1: whole budget at the vision output; 2 (paper default for LLaVA): 1.5r at the vision "
                        "output, 0.5r after the middle LLM layer (default: the family's most; one stage only: "
                        f"{_one_stage_families()}; Video-LLaVA's --ratio is the per-frame budget: 0.125 -> 32 of "
                        "256 = 22 error-selected + 10 basis)")
    p.add_argument("--tokens", help="exact budgets instead of --ratio: K or K1,K2")
    p.add_argument("--stage2-layer", type=int, help="LLM layer where stage 2 starts (default: layers/2)")
    p.add_argument("--basis", type=int, default=10, help="basis size k (default 10)")
    p.add_argument("--basis-method", default="fps", choices=("fps", "dpc", "random"),
                   help="how the k basis tokens are picked: farthest-point sampling (the paper), density peaks, "
                        "or random")
    p.add_argument("--seed", type=int, help="seed for the FPS start token / random basis (default: token 0)")
    p.add_argument("--no-merge", action="store_true", help="drop tokens without merging them into kept ones")
    p.add_argument("--basis-placement", default="paper", choices=("paper", "own", "spatial"),
                   help="paper (default): the authors' algorithm (basis vectors written into the slots of error "
                        "ranks K-k+1..K, basis originals merged; Video-LLaVA: appended after the error-selected "
                        "tokens); own: ablation keeping basis tokens at their own positions; spatial: ablation "
                        "putting Video-LLaVA's kept tokens in spatial order (the same as paper elsewhere)")
    _family_export_args(p)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"),
                   help="fp16 for engines (strongly typed), fp32 for CPU parity checks")
    p.add_argument("--target", choices=tuple(TARGETS),
                   help="the TensorRT the graphs are for; picks --attention and --opset: "
                        + "; ".join(f"{t.name}: {t.attention} ({t.builders})" for t in TARGETS.values())
                        + f" (default {DEFAULT_TARGET}, or {OP_DEFAULT_TARGET} with --attention op)")
    p.add_argument("--attention", choices=ATTENTION_FORMS,
                   help="op: ONNX Attention + RotaryEmbedding (opset 23, TensorRT >= 10.15, TensorRT-RTX); "
                        "pattern: MatMul-Softmax-MatMul (every TensorRT); default: the target's")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17 pattern, 23 op; 21 with --weights int8/int4: "
                   "blocked DequantizeLinear)")
    p.add_argument("--weights", default="fp16", choices=("fp16", "int8", "int4"),
                   help="LLM weights: fp16 (as --dtype, default), int8 (per output channel) or int4 (block-wise); "
                        "weight-only, activations stay fp16, the vision graph and ApET are untouched")
    p.add_argument("--group-size", type=int, help="INT4 block size along the input dimension (default 128)")
    p.add_argument("--calibration", choices=("rtn", "awq"),
                   help="rtn: round to nearest; awq: activation-aware scales (default for int4; rtn for int8)")
    p.add_argument("--calib-data", type=Path, help="AWQ calibration pairs: a JSONL in apet-eval's format "
                   "(default: built-in prompts on the demo image, with a warning)")
    p.add_argument("--calib-images", type=Path, help="folder the --calib-data image paths are relative to "
                   "(default: the JSONL's folder)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration pairs used (default 8)")
    p.add_argument("--keep-lm-head", action="store_true", help="leave the LM head in float when quantizing")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the graphs and engines serve")
    p.add_argument("--max-context", type=int, help="KV-cache capacity in tokens (default min(max positions, 2048))")
    p.add_argument("--all-logits", action="store_true", help="llm.onnx returns logits for every position")
    p.add_argument("--kv-cache", default="dynamic", choices=KV_CACHE_FORMS,
                   help="LLM cache form: dynamic = llm.onnx, the cache grows by concatenation (default); static = "
                        "llm_prefill.onnx (stage 2 inside) + llm_decode.onnx (fixed shapes: ONNX Runtime CUDA "
                        "graphs) over caches of --max-context positions written in place (docs/architecture.md)")
    p.add_argument("--split-lm-head", type=int, default=1, metavar="N",
                   help="export the LM head as N vocabulary slices concatenated in the graph (TensorRT on 8 GB "
                        "Jetsons cannot build a ~1 GiB single head, e.g. Qwen's 151,936-token one; try 4)")
    p.add_argument("--device", default="cpu", help="where to trace the model: cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files apet owns in an earlier artifact at --out (what its manifest lists, "
                        "engines, build report, trtexec.sh); your other files there are kept")


def _model_help(kinds: Sequence[str], rest: str) -> str:
    """``--model``'s help from the registry: each family's tiny checkpoint, hub aliases and ``*-shapes`` names
    (``kinds`` picks which), then ``rest``: what else the option takes."""
    from apet.models.registry import families

    parts = []
    for family in families().values():
        names = ([family.tiny] if family.tiny and "tiny" in kinds else []) \
            + (list(family.aliases) if "aliases" in kinds else []) + (list(family.shapes) if "shapes" in kinds else [])
        if names:
            parts.append(f"{family.name}: {' | '.join(names)}")
    return ("; ".join(parts) + f"; or {rest}").replace("%", "%%")


def _one_stage_families() -> str:
    from apet.models.registry import families

    return ", ".join(name for name, family in families().items() if family.max_stages == 1)


def _family_export_options() -> dict[str, list]:
    """Every family's declared export options by flag: [(family name, option), ...] (docs/architecture.md)."""
    from apet.models.registry import families

    options: dict[str, list] = {}
    for family in families().values():
        for option in family.export_options:
            options.setdefault(option.flag, []).append((family.name, option))
    return options


def _family_export_args(p: argparse.ArgumentParser) -> None:
    """One argument per flag some family declares; its value, when passed, reaches the family through
    ``ExportConfig.family_options`` and each family applies its own default otherwise."""
    for flag, declared in _family_export_options().items():
        first = declared[0][1]
        details = "; ".join(f"{name}: {option.describe()}" for name, option in declared)
        choices = [c for c in dict.fromkeys(c for _, option in declared for c in option.choices)] or None
        p.add_argument(flag, dest=first.dest, default=argparse.SUPPRESS, choices=choices, metavar=first.metavar,
                       type=first.kind, help=f"{first.help} ({details})".replace("%", "%%"))


def _family_options(args: argparse.Namespace) -> dict[str, str]:
    """The family options the user passed, by name (absent ones are left to the family's default)."""
    return {declared[0][1].name: getattr(args, declared[0][1].dest)
            for declared in _family_export_options().values() if hasattr(args, declared[0][1].dest)}


def cmd_export(args: argparse.Namespace) -> int:
    from apet.contracts.budget_options import check_budget_options

    check_budget_options(args.ratio, args.tokens, args.basis)  # before torch and the model: typos fail at once
    from apet.export.artifact import ExportConfig, export_artifact

    cfg = ExportConfig(model=args.model, out=args.out, ratio=args.ratio, stages=args.stages, tokens=args.tokens,
                       basis=args.basis, basis_method=args.basis_method, seed=args.seed, merge=not args.no_merge,
                       basis_placement=args.basis_placement, dtype=args.dtype, target=args.target,
                       attention=args.attention, opset=args.opset,
                       max_batch=args.max_batch, max_context=args.max_context,
                       stage2_layer=args.stage2_layer, all_logits=args.all_logits, split_lm_head=args.split_lm_head,
                       kv_cache=args.kv_cache, overwrite=args.overwrite,
                       device=args.device, weights=args.weights,
                       group_size=args.group_size, calibration=args.calibration, calib_data=args.calib_data,
                       calib_images=args.calib_images, calib_samples=args.calib_samples,
                       keep_lm_head=args.keep_lm_head, family_options=_family_options(args))
    manifest = export_artifact(cfg)
    c = manifest.compression
    stage2 = f", {c.stage2.keep} from LLM layer {c.stage2.layer} on" if c.stage2 else ""
    llm = manifest.graphs[llm_graphs(manifest.kv_cache)[0]]
    print(f"wrote {args.out}: {c.budget_summary(manifest.model.n_tokens)}{stage2} "
          f"({family_of(manifest).visual_summary(manifest)}); --target {manifest.target}: {manifest.attention} "
          f"attention, opset {manifest.opset}; LLM weights {manifest.weights.describe(manifest.dtype)}, "
          f"{llm.weight_bytes / 1e6:.1f} MB" + (" (static KV cache)" if manifest.kv_cache == "static" else ""))
    return 0


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="directory written by apet-export")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"),
                   help="auto: TensorRT if importable, else TensorRT-RTX")
    p.add_argument("--max-batch", type=int, help="largest batch of the profiles (default: the manifest's)")
    p.add_argument("--max-context", type=int, help="largest past+new length of the decode profile")
    p.add_argument("--max-prompt", type=int, help="longest prefill (default: visual tokens + 512)")
    p.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit in MiB")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read and updated)")
    p.add_argument("--builder-optimization-level", type=int, help="0..5 (TensorRT default 3)")
    p.add_argument("--compute-capability", default="",
                   help="TensorRT-RTX AOT targets, comma separated (e.g. sm86,sm89,sm120)")
    p.add_argument("--graphs", default="vision,llm", help="which engines to build (comma separated)")
    p.add_argument("--emit-trtexec", action="store_true",
                   help="write trtexec.sh (build + profiling lines) instead of building")
    p.add_argument("--overwrite", action="store_true", help="replace engines built from another export")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="build into DIR instead of the artifact (a read-only volume, a shared store): DIR gets the "
                        "export's files as hard links, else symbolic links, and the engines; run and serve DIR")


def cmd_build(args: argparse.Namespace) -> int:
    from apet.engines.build import BuildConfig, build_artifact
    from apet.engines.build_dir import build_target
    from apet.engines.profiles import ShapeLimits
    from apet.engines.trtexec import write_trtexec_script
    from apet.manifest import read_manifest

    if args.emit_trtexec:
        limits = ShapeLimits.from_manifest(read_manifest(args.artifact), args.max_batch, args.max_context,
                                           args.max_prompt)
        print(f"wrote {write_trtexec_script(build_target(args.artifact, args.out), limits, args.workspace)}")
        return 0
    cfg = BuildConfig(artifact=args.artifact, backend=args.backend, max_batch=args.max_batch,
                      max_context=args.max_context, max_prompt=args.max_prompt, workspace_mb=args.workspace,
                      optimization_level=args.builder_optimization_level,
                      compute_capabilities=tuple(t for t in args.compute_capability.split(",") if t),
                      timing_cache=args.timing_cache, graphs=tuple(args.graphs.split(",")), overwrite=args.overwrite,
                      out=args.out)
    report = build_artifact(cfg)
    for name, engine in report.engines.items():
        print(f"{engine['file']}: {engine['bytes'] / 1e6:.1f} MB in {engine['seconds']:.1f} s "
              f"({report.builder} {report.version})")
    if args.out is not None:
        print(f"{args.out}: the export of {args.artifact} with these engines (run and serve {args.out})")
    return 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="directory written by apet-export (and apet-build)")
    p.add_argument("--no-verify", action="store_true",
                   help="only describe; skip hashing files and checking graphs and engines against the manifest")
    p.add_argument("--parse", action="store_true",
                   help="count the TensorRT layers each graph parses into per scope now, where no build report "
                        "records them (needs apet[rtx] or TensorRT; parsing a 7B graph takes minutes)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from apet.inspect_artifact import inspect

    print(inspect(args.artifact, verify_files=not args.no_verify, parse=args.parse))
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="directory written by apet-export (and apet-build)")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="image file (JPEG/PNG/WebP/...), or @demo for the bundled one")
    media.add_argument("--video", help="video file (MP4/WebM/MKV/AVI/..., needs apet[video]), a directory of "
                       "frame images, or a .npy [T, H, W, 3] array; the artifact's frame count is sampled uniformly")
    p.add_argument("--prompt", required=True, help="the question or instruction about the image or video")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "torch"),
                   help="auto: TensorRT engines when built and a GPU is present, else ONNX Runtime")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda for tensorrt, else cpu)")
    p.add_argument("--checkpoint", help="torch backend: the source checkpoint (default: the manifest's source)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly instead of replaying a CUDA graph "
                   "(torch on a GPU; onnxruntime on CUDA with a --kv-cache static artifact)")
    p.add_argument("--decode-attention", default="auto", choices=DECODE_ATTENTION,
                   help="onnxruntime, --kv-cache static artifact: gqa rewrites the decode step for ONNX Runtime's "
                        "GroupQueryAttention (attends over each row's written span; needs --attention op), graph "
                        "runs the exported graph; auto: gqa on CUDA for fp16 op-attention artifacts")
    p.add_argument("--ort-rewrites", default="default",
                   help="onnxruntime: the optional in-memory rewrites of the GroupQueryAttention LLM graphs and the "
                        f"CUDA-graph vision session, a comma list of {', '.join(GRAPH_REWRITES)}; default: "
                        "what the H200 measured to pay off (docs/architecture.md), also inside a list, as in "
                        "default,vision-skip-norms; none")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (with --temperature)")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature > 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true",
                   help="print TTFT, decode tokens/s, ApET stage-1 ms (onnxruntime: from a profiled run of the "
                        "vision graph on the request's inputs in a session of its own, after the first token, which "
                        "the request reaches by its usual path; torch: timed; tensorrt: see `python -m "
                        "apet.engines.trtexec report`), peak memory")
    p.add_argument("--json", action="store_true", help="print one JSON record (text, token_ids, stats as --stats "
                   "times them)")


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from apet.media.images import load_image

    image = None if args.image is None else load_image(args.image)  # before torch and the model: fails fast
    from apet.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.artifact, backend=args.backend, device=args.device, checkpoint=args.checkpoint,
                             profile_apet=args.stats or args.json, cuda_graphs=not args.no_cuda_graphs,
                             decode_attention=args.decode_attention, ort_rewrites=args.ort_rewrites)
    stream = None if args.json else (lambda row, delta: print(delta, end="", flush=True))
    result = pipeline.generate(image, args.prompt, video=args.video, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop,
                               stream=stream)
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "keep_index": result.keep_index, "stats": result.stats.to_json()}))
        return 0
    print()
    if args.stats:
        s = result.stats
        apet = f"{s.apet_ms:.2f} ms" if s.apet_ms is not None else \
            "not separable in the engine: python -m apet.engines.trtexec report" if s.backend == "tensorrt" else \
            "not measured"
        device_mem = f", device peak {s.peak_device_mb:.0f} MiB" if s.peak_device_mb is not None else ""
        # 0 ms: vision ran inside the prefill's run (ONNX Runtime's first-token graph), whose time holds both
        steps = f"vision {s.vision_ms:.1f} ms (ApET {apet}) | prefill {s.prefill_ms:.1f} ms" if s.vision_ms else \
            f"vision + prefill {s.prefill_ms:.1f} ms (ApET {apet})"
        print(f"[{s.backend}] visual tokens {s.visual_tokens}, prompt {s.prompt_tokens[0]} tokens | {steps} | "
              f"TTFT {s.ttft_ms:.1f} ms | "
              f"decode {s.decode_tokens_per_s:.1f} tokens/s ({s.new_tokens} tokens) | peak RSS "
              f"{s.peak_rss_mb:.0f} MiB{device_mem}", file=sys.stderr)
    return 0


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="directory written by apet-export (and apet-build): the reference")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="image file, or @demo for the bundled one")
    media.add_argument("--video", help="video file, frame directory or .npy (video families)")
    p.add_argument("--prompt", default="Describe the image.", help="the question about the image or video")
    p.add_argument("--backends", default="onnxruntime,torch",
                   help="comma-separated backends run on ARTIFACT (onnxruntime, tensorrt, torch); the first is the "
                        "reference the others are compared with")
    p.add_argument("--against", type=Path, action="append", default=[],
                   help="another export of the same model (e.g. the fp16 one), run with ONNX Runtime and compared "
                        "with the reference (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (ONNX Runtime's CUDA provider with cuda)")
    p.add_argument("--checkpoint", help="torch backend: the source checkpoint (default: the manifest's source)")
    p.add_argument("--steps", type=int, default=8, help="greedy tokens compared")
    p.add_argument("--per-layer", action="store_true",
                   help="mark every tensor of the ONNX graphs as an output (Polygraphy mark-all) and name the first "
                        "node scope that departs")
    p.add_argument("--atol", type=float, help="absolute tolerance (default: 1e-4 fp32, 2e-2 when a runner is fp16)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default: 1e-3 fp32, 2e-2 when a runner is fp16)")
    p.add_argument("--reduce-dir", type=Path,
                   help="write the reduced ONNX of the first departing scope here (with --per-layer)")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest's checksums (a hand-edited copy)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON record")
    p.add_argument("--report", type=Path, help="also write the JSON report to this file (CI, benchmarks)")


def cmd_check(args: argparse.Namespace) -> int:
    import json

    from apet.check import CheckConfig, RunnerSpec, check

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    options = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    specs = [RunnerSpec(b, args.artifact, args.device, options=options if b == "torch" else {}) for b in backends]
    specs += [RunnerSpec("onnxruntime", other, args.device, label=f"onnxruntime:{other}") for other in args.against]
    report = check(CheckConfig(specs, image=args.image, video=args.video,
                               prompt=args.prompt, steps=args.steps, per_layer=args.per_layer, atol=args.atol,
                               rtol=args.rtol, reduce_dir=args.reduce_dir, verify_checksums=not args.no_verify))
    if args.report:
        from apet.atomic import write_atomic

        write_atomic(args.report, json.dumps(report.to_json(), indent=1) + "\n")
    print(json.dumps(report.to_json()) if args.json else report.to_text())
    return 0  # a departure is the report's finding, not a failure of the command (fp16 always departs from fp32)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL",
                   help=_model_help(("tiny", "shapes"), "a checkpoint directory"))
    p.add_argument("--ratios", default="1.0,0.33,0.22,0.11",
                   help="comma-separated retained fractions (video-llava: per-frame budgets, e.g. 1.0,0.125)")
    p.add_argument("--stages", type=int, default=2, choices=(1, 2), help="ApET stages, capped at the family's most")
    p.add_argument("--backends", default="torch",
                   help="torch (static KV cache + CUDA graphs on GPU) and/or onnxruntime (exports the plan's graphs "
                        "and runs them with the CUDA execution provider, with parity against the torch reference); "
                        "engines: use trtexec.sh, see README")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=40, help="text tokens of the synthetic prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (>= 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run eagerly instead of replaying CUDA graphs "
                   "(the torch path, and ONNX Runtime's static-KV decode)")
    p.add_argument("--no-ort-cuda-graphs", action="store_true",
                   help="ONNX Runtime's static-KV decode without CUDA graphs (the torch path keeps them)")
    p.add_argument("--ort-decode-attention", default="auto", choices=DECODE_ATTENTION,
                   help="ONNX Runtime's static-KV decode attention (see apet-run --decode-attention)")
    p.add_argument("--ort-rewrites", default="default", help="ONNX Runtime's optional graph rewrites (see apet-run "
                   "--ort-rewrites)")
    p.add_argument("--ort-process", default="own", choices=ORT_PROCESSES,
                   help="own: time ONNX Runtime in a process of its own that never imports torch, as the device "
                        "runtime runs (default); shared: in the bench's process, beside the torch path")
    p.add_argument("--compile", action="store_true", help="torch.compile every stage before graph capture "
                   "(minutes of compilation per budget; the fastest path)")
    p.add_argument("--compile-mode", choices=tuple(COMPILE_MODES), default=None,
                   help="with --compile (implied): max-autotune times Inductor's GEMM templates against cuBLAS for "
                        "every matmul shape and keeps the fastest (more minutes of compilation)")
    p.add_argument("--baselines", default="hf,hf-static,paper",
                   help="comma list: hf (plain generate), hf-static (static cache, compiled decode), paper "
                        "(the authors' code path); empty for none")
    p.add_argument("--no-baselines", action="store_true", help="same as --baselines ''")
    p.add_argument("--image-size", default="640x480", help="WxH of the synthetic image (families with dynamic "
                   "resolution or tiling see a different number of visual tokens)")
    p.add_argument("--attention", default="pattern", choices=ATTENTION_FORMS,
                   help="form of the graphs --backends onnxruntime exports (see apet-export --attention)")
    p.add_argument("--kv-cache", default="dynamic", choices=KV_CACHE_FORMS,
                   help="LLM cache form --backends onnxruntime exports (see apet-export --kv-cache; static: decode "
                        "replayed as a CUDA graph unless --no-cuda-graphs)")
    p.add_argument("--ort-artifact", type=Path, help="--backends onnxruntime: run this artifact, exported earlier "
                   "from the same --model weights with the same budgets, instead of exporting one (its --attention, "
                   "--kv-cache and --max-context apply)")
    p.add_argument("--weights", default="fp16", help="comma list of LLM weight formats (fp16,int8,int4), each "
                   "benched in turn (round-to-nearest weights; torch weight-only kernels where the build has them)")
    p.add_argument("--group-size", type=int, help="INT4 block size (default 128)")
    p.add_argument("--layer-us", help="cost of one TensorRT layer on the Jetsons the report projects ApET onto: US "
                   "for all, or DEVICE=US,... (default: an assumption of 5 us on AGX Orin, 6.5 us on Orin Nano; "
                   "apet/bench/flops.py says where it comes from)")
    p.add_argument("--out", required=True, type=Path, help="results directory (results.json, results.md, plots)")


def _layer_us(text: str | None) -> dict[str, float] | None:
    """--layer-us: one figure for every device, or DEVICE=US pairs."""
    if not text:
        return None
    from apet.bench.flops import DEVICES

    try:
        if "=" not in text:
            return {device: float(text) for device in DEVICES}
        pairs = dict(item.split("=", 1) for item in text.split(","))
        values = {device: float(us) for device, us in pairs.items()}
    except ValueError as exc:
        raise UsageError(f"--layer-us {text!r} is not US or DEVICE=US,...", "e.g. --layer-us 5 or "
                         "--layer-us jetson-agx-orin-64gb=4,jetson-orin-nano-8gb=6") from exc
    unknown = set(values) - set(DEVICES)
    if unknown:
        raise UsageError(f"--layer-us names unknown devices {sorted(unknown)}", f"use {', '.join(DEVICES)}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from apet.contracts.budget_options import check_ratios

    def numbers(text: str, kind: type) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError as exc:
            raise UsageError(f"cannot parse {text!r} as a comma-separated list", "e.g. --ratios 1.0,0.11") from exc

    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError as exc:
        raise UsageError(f"--image-size {args.image_size!r} is not WxH", "e.g. --image-size 672x672") from exc
    baselines = () if args.no_baselines else tuple(b for b in args.baselines.split(",") if b)
    ratios = numbers(args.ratios, float)
    check_ratios(ratios)  # before torch and the model: typos fail at once
    from apet.bench.run import BenchConfig, run_bench

    cfg = BenchConfig(model=args.model, out=args.out, ratios=ratios, stages=args.stages,
                      batches=numbers(args.batch, int), image_size=(width, height), prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens,
                      repeats=args.repeats, device=args.device, cuda_graphs=not args.no_cuda_graphs,
                      compile=args.compile or args.compile_mode is not None,
                      compile_mode=args.compile_mode or "default", baselines=baselines,
                      backends=tuple(b for b in args.backends.split(",") if b),
                      weights=tuple(w for w in args.weights.split(",") if w), group_size=args.group_size,
                      attention=args.attention, kv_cache=args.kv_cache, ort_artifact=args.ort_artifact,
                      ort_cuda_graphs=not args.no_ort_cuda_graphs, ort_decode_attention=args.ort_decode_attention,
                      ort_rewrites=args.ort_rewrites, ort_process=args.ort_process,
                      layer_us=_layer_us(args.layer_us))
    run_bench(cfg)
    print((args.out / "results.md").read_text())
    return 0


class _Typed(argparse.Action):
    """Stores the value and records that the option was typed, so a command can tell a value the user
    chose from a default (apet-eval warns only about model-source options an artifact ignores)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.typed = frozenset(getattr(namespace, "typed", frozenset())) | {self.option_strings[0]}


def _eval_args(p: argparse.ArgumentParser) -> None:
    from apet.media import dataset as data

    p.epilog = _plain(data.__doc__ or "")
    p.set_defaults(typed=frozenset())
    p.add_argument("source", help="an artifact directory (its fixed budget, any backend) or a model "
                   "(tiny | alias | checkpoint directory: every --methods x --ratios through the torch reference)")
    p.add_argument("--data", required=True, action="append", type=Path, help="data file (repeatable: one benchmark "
                   "per file)")
    p.add_argument("--images", required=True, type=Path,
                   help="directory the data's image (or video) paths are relative to")
    p.add_argument("--format", default="apet", choices=("apet", "llava", "pope", "scienceqa", "vqa"),
                   help="layout of --data (see below)")
    p.add_argument("--annotations", type=Path, help="answers/annotations file for --format llava or vqa")
    p.add_argument("--ratios", default="1.0,0.22,0.11", action=_Typed,
                   help="comma-separated retained fractions (model source)")
    p.add_argument("--methods", default="apet", action=_Typed, help="comma list of rules: apet, random, pool, "
                   "divprune")
    p.add_argument("--stages", type=int, default=1, choices=(1, 2), action=_Typed,
                   help="ApET stages for a model source (an artifact has its own)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "torch"),
                   help="for an artifact source")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--limit", type=int, help="first N questions of each data file (N >= 1)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit")
    p.add_argument("--weights", default="fp16", action=_Typed, help="model sources: comma list of LLM weight "
                   "formats to compare (fp16,int8,int4); quantized ones also report teacher-forced top-1 "
                   "agreement and KL vs fp16")
    p.add_argument("--group-size", type=int, action=_Typed, help="INT4 block size (default 128)")
    p.add_argument("--calibration", choices=("rtn", "awq"), action=_Typed,
                   help="default: awq for int4, rtn for int8")
    p.add_argument("--calib-data", type=Path, action=_Typed,
                   help="AWQ calibration JSONL (default: synthetic prompts)")
    p.add_argument("--calib-images", type=Path, action=_Typed, help="folder of the --calib-data images")
    p.add_argument("--out", required=True, type=Path,
                   help="results directory (predictions.jsonl, report.json/.md, retention.png); resumed if present")


def cmd_eval(args: argparse.Namespace) -> int:
    from apet.contracts.budget_options import check_ratios
    from apet.media.dataset import check_sources

    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
    except ValueError as exc:
        raise UsageError(f"--ratios {args.ratios!r} is not a comma-separated list of numbers",
                         "e.g. --ratios 1.0,0.22,0.11") from exc
    check_ratios(ratios)  # before torch and the model: typos and missing files fail at once
    check_sources(tuple(args.data), args.images)
    from apet.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(source=args.source, data=tuple(args.data), images=args.images, out=args.out, ratios=ratios,
                     methods=tuple(m for m in args.methods.split(",") if m), stages=args.stages, fmt=args.format,
                     annotations=args.annotations, backend=args.backend, device=args.device, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, weights=tuple(w for w in args.weights.split(",") if w),
                     group_size=args.group_size, calibration=args.calibration, calib_data=args.calib_data,
                     calib_images=args.calib_images, passed=args.typed)
    run_eval(cfg)
    print((args.out / "report.md").read_text())
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    from apet.serve.cli import add_arguments

    add_arguments(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from apet.serve.cli import run

    return run(args)


def _triton_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (apet-export --out)")
    p.add_argument("--out", required=True, type=Path, help="model repository to write (a new or empty directory)")
    p.add_argument("--instances", type=int, default=1,
                   help="instances of each model per device (instance_group count)")
    p.add_argument("--max-batch", type=int,
                   help="the vision model's max_batch_size (default: the artifact's max batch)")
    p.add_argument("--gpus", help="GPU ids the models run on, e.g. 0,1 (default: the vision plan and an LLM with "
                   "engines on every GPU, ONNX graphs on the CPU)")
    p.add_argument("--vision-form", default="auto", choices=("auto", "tensorrt_plan", "onnxruntime_onnx", "python"),
                   help="auto: tensorrt_plan when vision.plan is built, else onnxruntime_onnx; python: ONNX Runtime "
                        "in Triton's Python backend (servers without the ONNX Runtime backend)")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime"),
                   help="the generation model's runtime backend (auto: TensorRT engines when built, else ONNX Runtime)")


def _gpu_ids(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--gpus {text!r} is not a list of GPU ids", "pass --gpus 0,1") from None


def cmd_triton(args: argparse.Namespace) -> int:
    from apet.triton.configs import Scaling
    from apet.triton.repository import write_repository

    scaling = Scaling(args.instances, args.max_batch, _gpu_ids(args.gpus))
    report = write_repository(args.artifact, args.out, scaling, args.vision_form, args.backend)
    print(f"wrote {report.path}: {', '.join(report.models)} (vision: {report.vision_form}; {report.linked} files "
          f"hard-linked, {report.copied} copied); serve it with: tritonserver --model-repository {report.path}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "export": ("export a checkpoint to ONNX + manifest", _export_args, cmd_export),
    "build": ("build TensorRT / TensorRT-RTX engines (or trtexec lines) for an artifact", _build_args, cmd_build),
    "inspect": ("show an artifact's manifest, graph I/O and engines", _inspect_args, cmd_inspect),
    "run": ("answer a prompt about an image with an exported artifact", _run_args, cmd_run),
    "bench": ("latency/memory of ApET-compressed inference vs ratio, against HF baselines", _bench_args, cmd_bench),
    "check": ("run one request through several backends and report, stage by stage, where they depart "
              "(NVIDIA Polygraphy)", _check_args, cmd_check),
    "eval": ("accuracy retention of ApET and other rules vs ratio on your data", _eval_args, cmd_eval),
    "serve": ("OpenAI-compatible HTTP server (chat completions with images) over an artifact", _serve_args, cmd_serve),
    "triton": ("write a Triton Inference Server model repository that serves an artifact", _triton_args, cmd_triton),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults next to each option; keep the epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # a help text that names its default in words says it better than "(default: X)" would (once, not
        # twice); "(default: None)" / "(default: False)" say nothing
        if action.help and (re.search(r"\bdefault\b", action.help, re.IGNORECASE) or action.default in (None, False)):
            return action.help
        return super()._get_help_string(action)


def _plain(doc: str) -> str:
    """A module docstring as plain help text (no RST literal markers)."""
    return doc.replace("``", "").replace("::", ":").strip()


def _version(parser: argparse.ArgumentParser) -> None:
    from apet import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    if only is not None:
        help_text, add_args, _ = COMMANDS[only]
        parser = argparse.ArgumentParser(prog=f"apet-{only}", description=help_text, formatter_class=_Formatter)
        add_args(parser)
        _common(parser)
        _version(parser)
        return parser
    parser = argparse.ArgumentParser(prog="apet", description="ApET token compression for VLM deployment",
                                     formatter_class=_Formatter)
    _version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        add_args(p)
        _common(p)
        _version(p)
    return parser


def _run(argv: Sequence[str] | None, only: str | None = None) -> int:
    parser = _parser(only)
    args = parser.parse_args(argv)
    command = only or args.command
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_third_party()
    # messages name this command's flags (apet-serve's errors are HTTP answers: they keep parameter names)
    token = COMMAND_LINE.set(command != "serve")
    try:
        return guarded(lambda: _call(command, args), args.verbose)
    finally:
        COMMAND_LINE.reset(token)


def _call(command: str, args: argparse.Namespace) -> int:
    """The command, with a missing optional package named by the extra that brings it (one line, exit 7)."""
    try:
        return COMMANDS[command][2](args)
    except ModuleNotFoundError as exc:
        error = extra_error(exc, f"apet {command}")
        if error is None:
            raise
        raise error from exc


def main(argv: Sequence[str] | None = None) -> int:
    return _run(argv)


def export_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, "export")


def build_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, "build")


def run_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, "run")


def bench_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, "bench")


def eval_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, "eval")


def serve_main(argv: Sequence[str] | None = None) -> int:
    return _run(argv, "serve")


if __name__ == "__main__":
    raise SystemExit(main())

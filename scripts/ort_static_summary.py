"""The ONNX Runtime CUDA vs torch summary of one apet-bench run (issue 28's targets: ORT TTFT <= 1.5x and decode
<= 1.3x the torch path without --compile, same run), printed and written as JSON.

  python scripts/ort_static_summary.py results/ortstatic/results.json --out ortstatic_summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TTFT_TARGET, DECODE_TARGET = 1.5, 1.3


def summarize(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        ort = run.get("onnxruntime")
        if not ort:
            continue
        torch_ttft = run["generation"]["ttft"]["median_ms"]
        torch_decode = (run["generation"]["decode_per_token"] or {}).get("median_ms")
        ort_ttft, ort_decode = ort["ttft"]["median_ms"], ort["decode_per_token"]["median_ms"]
        ttft_ratio = ort_ttft / torch_ttft
        request_ttft = (run["generation"].get("request_ttft") or {}).get("median_ms")
        decode_ratio = ort_decode / torch_decode if torch_decode else None
        parity = ort["parity"]
        rows.append({
            "ratio": run["ratio"], "batch": run["batch"], "attention": ort["attention"], "kv_cache": ort["kv_cache"],
            "cuda_graphs": ort["cuda_graphs"], "max_context": ort.get("max_context"),
            "decode_attention": ort.get("decode_attention"), "vision_cuda_graph": ort.get("vision_cuda_graph"),
            "prompt_cuda_graph": ort.get("prompt_cuda_graph"),
            "first_token_cuda_graph": ort.get("first_token_cuda_graph"), "rewrites": ort.get("rewrites"),
            "torch_ttft_ms": torch_ttft, "torch_decode_ms": torch_decode,
            "ort_ttft_ms": ort_ttft, "ort_decode_ms": ort_decode,
            "ort_decode_p90_ms": ort["decode_per_token"]["p90_ms"], "ttft_ratio": round(ttft_ratio, 3),
            "decode_ratio": None if decode_ratio is None else round(decode_ratio, 3),
            "ttft_target_met": ttft_ratio <= TTFT_TARGET,
            "decode_target_met": decode_ratio is not None and decode_ratio <= DECODE_TARGET,
            "greedy_equal_steps": f"{parity['greedy_equal_steps']}/{parity['greedy_steps']}",
            "max_abs_logit_diff": parity["max_abs_logit_diff"], "stage2_index_equal": parity["stage2_index_equal"],
            "export_s": ort["export_s"],
            # the first token's steps in the bench's own process (bench runs after 2026-12-04)
            "ort_ttft_parts_ms": {name: part["median_ms"] for name, part in (ort.get("ttft_parts") or {}).items()},
            # the torch path timed over ORT's span, host arrays to a token on the host (bench runs after stop 49)
            "torch_request_ttft_ms": request_ttft,
            "request_ttft_ratio": round(ort_ttft / request_ttft, 3) if request_ttft else None,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    rows = summarize(results)
    print(f"device: {results['environment']['device']}; targets: TTFT <= {TTFT_TARGET}x, decode <= {DECODE_TARGET}x")
    print("| ratio | batch | form | CUDA graphs | torch TTFT / decode ms | ORT TTFT / decode ms | ratios | targets | "
          "greedy equal | max |dlogit| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['batch']} | {r['attention']}, {r['kv_cache']} (C={r['max_context']}), decode "
              f"{r['decode_attention']}, vision graph {r['vision_cuda_graph']}, "
              f"prompt graph {r.get('prompt_cuda_graph')}, first-token graph {r.get('first_token_cuda_graph')}, "
              f"rewrites {','.join(r.get('rewrites') or []) or '-'} | "
              f"{r['cuda_graphs']} | {r['torch_ttft_ms']:.2f} / {r['torch_decode_ms']:.2f} | "
              f"{r['ort_ttft_ms']:.2f} / {r['ort_decode_ms']:.2f} | {r['ttft_ratio']}x / {r['decode_ratio']}x | "
              f"{'met' if r['ttft_target_met'] else 'MISSED'} / {'met' if r['decode_target_met'] else 'MISSED'} | "
              f"{r['greedy_equal_steps']} | {r['max_abs_logit_diff']} |")
    for r in rows:
        if r["request_ttft_ratio"] is not None:
            print("over the same span (host arrays to a token on the host): torch TTFT "
                  f"{r['torch_request_ttft_ms']:.2f} ms, ORT / torch {r['request_ttft_ratio']}x")
        if r["ort_ttft_parts_ms"]:
            print("ORT first token, median ms: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ort_ttft_parts_ms"].items()))
    if not rows:
        print("no onnxruntime results in this run")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "environment": results["environment"]}, indent=1))


if __name__ == "__main__":
    main()

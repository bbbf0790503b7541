"""cuBLAS against apet's skinny-matmul kernel forms (apet.kernels.gemv) on the decode projections of the 7B-shape
models, rows 1 and 4 (run by hand on a CUDA machine, or ``scripts/device_run.sh gemv``): device µs with a cold L2
inside a CUDA graph (apet.kernels.device_timing, as a decode step runs them), TB/s of weight read, the dispatcher's
pick among ``gemv.CONFIGS``, and with ``--sweep`` a wider grid of configurations of both forms (what CONFIGS is
chosen from). With ``--fused``: each one-row projection of a decode layer alone, with its neighbour as its own
kernel, and folded in (apet.kernels.fused_gemv), and one layer's four projections in a row those three ways and
folded with programmatic dependent launch.

  python scripts/gpu_gemv.py --out gemv.json [--sweep | --fused]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from apet.kernels import gemv
from apet.kernels.device_timing import ColdTimer

# (name, out features, in features, bias): LLaVA-1.5-7B (Vicuna) and Qwen2.5-VL-7B decode projections
SHAPES = [("llava.qkv", 12288, 4096, False), ("llava.o", 4096, 4096, False), ("llava.gate_up", 22016, 4096, False),
          ("llava.down", 4096, 11008, False), ("llava.head", 32064, 4096, False),
          ("qwen.qkv", 4608, 3584, True), ("qwen.o", 3584, 3584, False), ("qwen.gate_up", 37888, 3584, False),
          ("qwen.down", 3584, 18944, False), ("qwen.head", 152064, 3584, False)]


def sweep_configs() -> list[gemv.Config]:
    dot = [gemv.Config(n, k, w, s) for n, k, (w, s) in
           itertools.product((16, 32, 64), (128, 256, 512), ((4, 4), (8, 3), (4, 6)))]
    rows = [gemv.Config(n, k, w, s, "rows") for n, k, w, s in
            itertools.product((2, 4, 8, 16), (512, 1024), (4, 8), (2, 3, 4))]
    return [c for c in dot + rows if c not in gemv.CONFIGS]


def fused(out: Path, timer: ColdTimer) -> None:
    """Per model: the layer's projections plain, unfused (neighbour as its own kernel) and folded; then the layer."""
    from apet.kernels import activations, decoder_fused, dependent_launch, fused_gemv

    dependent_launch.ENABLED["value"] = False  # on only for the last layer timing
    report = []
    for model in ("llava", "qwen"):
        dims = {name.split(".")[1]: (n, k, bias) for name, n, k, bias in SHAPES if name.startswith(model)}
        hidden = dims["o"][1]

        def make(n: int, k: int) -> torch.Tensor:
            return torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02

        w = {name: make(n, k) for name, (n, k, _) in dims.items()}
        qkv_bias = torch.randn(dims["qkv"][0], device="cuda", dtype=torch.float16) if dims["qkv"][2] else None
        h = torch.randn(1, 1, hidden, device="cuda", dtype=torch.float16)
        act = torch.randn(1, 1, dims["down"][1], device="cuda", dtype=torch.float16)
        scale = torch.rand(hidden, device="cuda", dtype=torch.float16) + 0.5
        plain = gemv.kernel_matmul
        h2, act2 = h.reshape(1, hidden), act.reshape(1, -1)
        base = {name: gemv.kernel_choice(h2 if name != "down" else act2, w[name], qkv_bias if name == "qkv" else None)
                for name in w}
        eps = 1e-5
        folded_runs = {
            "qkv": ("norm", h, qkv_bias, lambda c: fused_gemv.norm_linear_kernel(h, scale, eps, w["qkv"], qkv_bias, c)),
            "o": ("residual", h, None, lambda c: fused_gemv.linear_residual_kernel(h, w["o"], h, c)),
            "gate_up": ("silu", h, None,
                        lambda c: fused_gemv.norm_gate_up_silu_kernel(h, scale, eps, w["gate_up"], c)),
            "down": ("residual", act, None, lambda c: fused_gemv.linear_residual_kernel(act, w["down"], h, c)),
            "head": ("norm", h, None, lambda c: fused_gemv.norm_linear_kernel(h, scale, eps, w["head"], None, c)),
        }
        cfg = {name: fused_gemv.folded_choice(kind, x, w[name], b, run)
               for name, (kind, x, b, run) in folded_runs.items()}
        variants = {
            "qkv": (lambda: plain(h2, w["qkv"], qkv_bias, base["qkv"]),
                    lambda: plain(decoder_fused.add_rms_norm(h2, scale, eps)[1], w["qkv"], qkv_bias, base["qkv"])),
            "o": (lambda: plain(h2, w["o"], None, base["o"]), lambda: h2 + plain(h2, w["o"], None, base["o"])),
            "gate_up": (lambda: plain(h2, w["gate_up"], None, base["gate_up"]),
                        lambda: activations.silu_mul(plain(decoder_fused.add_rms_norm(h2, scale, eps)[1],
                                                           w["gate_up"], None, base["gate_up"]))),
            "down": (lambda: plain(act2, w["down"], None, base["down"]),
                     lambda: h2 + plain(act2, w["down"], None, base["down"])),
            "head": (lambda: plain(h2, w["head"], None, base["head"]),
                     lambda: plain(decoder_fused.add_rms_norm(h2, scale, eps)[1], w["head"], None, base["head"])),
        }
        for name, (alone, unfused) in variants.items():
            run = folded_runs[name][3]
            times = {label: round(timer.ms(call) * 1e3, 2) for label, call in
                     (("plain", alone), ("unfused", unfused), ("folded", lambda: run(cfg[name])))}
            report.append({"model": model, "projection": name, "plain_config": str(base[name]),
                           "folded_config": str(cfg[name]), **times})
            print(model, name, cfg[name], times, flush=True)

        def layer_unfused() -> torch.Tensor:
            normed = decoder_fused.add_rms_norm(h2, scale, eps)[1]
            plain(normed, w["qkv"], qkv_bias, base["qkv"])
            h1, normed = decoder_fused.add_rms_norm(h2, scale, eps, plain(h2, w["o"], None, base["o"]))
            mid = activations.silu_mul(plain(normed, w["gate_up"], None, base["gate_up"]))
            return h1 + plain(mid, w["down"], None, base["down"])

        def layer_folded() -> torch.Tensor:
            fused_gemv.norm_linear_kernel(h, scale, eps, w["qkv"], qkv_bias, cfg["qkv"])
            h1 = fused_gemv.linear_residual_kernel(h, w["o"], h, cfg["o"])
            mid = fused_gemv.norm_gate_up_silu_kernel(h1, scale, eps, w["gate_up"], cfg["gate_up"])
            return fused_gemv.linear_residual_kernel(mid, w["down"], h1, cfg["down"])

        times = {"unfused": timer.ms(layer_unfused), "folded": timer.ms(layer_folded)}
        dependent_launch.ENABLED["value"] = True
        try:
            times["folded_pdl"] = timer.ms(layer_folded)
        except Exception as exc:  # a Triton or driver without programmatic dependent launch
            print("pdl failed", str(exc)[:300], flush=True)
        finally:
            dependent_launch.ENABLED["value"] = False
        row = {"model": model, "projection": "layer", **{k: round(v * 1e3, 2) for k, v in times.items()}}
        report.append(row)
        print(row, flush=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "triton": triton_version(), "timing": "cold L2, CUDA graph of 20 calls, best of 3",
                                   "rows": report}, indent=1))


def triton_version() -> str:
    import triton

    return triton.__version__


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="also time the wider grid of configurations")
    parser.add_argument("--fused", action="store_true", help="time the folded one-row projections instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = ColdTimer(torch.device("cuda"))
    if args.fused:
        fused(args.out, timer)
        return
    candidates = list(gemv.CONFIGS) + (sweep_configs() if args.sweep else [])
    rows_out = []
    start = time.perf_counter()
    for rows in (1, 4):
        for name, n, k, has_bias in SHAPES:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            b = torch.randn(n, device="cuda", dtype=torch.float16) if has_bias else None
            want = F.linear(x.float(), w.float(), b.float() if b is not None else None)
            cublas = timer.ms(lambda: F.linear(x, w, b))
            configs, errors = {}, {}
            for config in candidates:
                if config.form == "rows" and rows != 1:  # the sweep times the dot form at one row too
                    continue
                try:
                    got = gemv.kernel_matmul(x, w, b, config)
                    configs[config] = timer.ms(lambda c=config: gemv.kernel_matmul(x, w, b, c))
                    errors[config] = float((got.float() - want).abs().max())
                except Exception as exc:  # a configuration this GPU cannot compile
                    print("failed", config, str(exc)[:200], flush=True)
            picked = gemv.choice(x, w, b)
            best = min(configs, key=configs.get)
            gbytes = n * k * 2 / 1e9
            ranked = sorted(configs, key=configs.get)
            row = {"rows": rows, "name": name, "cublas_us": round(cublas * 1e3, 2),
                   "cublas_tbs": round(gbytes / cublas, 2), "best": str(best),
                   "best_us": round(configs[best] * 1e3, 2), "best_tbs": round(gbytes / configs[best], 2),
                   "picked": str(picked),
                   "picked_us": round((cublas if picked is None else configs[picked]) * 1e3, 2),
                   "max_abs_error_best": errors[best],
                   "top": {str(c): round(configs[c] * 1e3, 2) for c in ranked[:8]},
                   "configs_us": {str(c): round(t * 1e3, 2) for c, t in configs.items() if c in gemv.CONFIGS}}
            rows_out.append(row)
            print(rows, name, "cuBLAS", row["cublas_us"], "us", row["cublas_tbs"], "TB/s; best", best,
                  row["best_us"], "us", row["best_tbs"], "TB/s; picked", picked, row["picked_us"], "us",
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                            "timing": "cold L2, CUDA graph of 20 calls, best of 3",
                                            "flush_ms": timer.flush_ms, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()

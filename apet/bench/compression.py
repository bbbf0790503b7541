"""Benchmark of ApET itself: ``python -m apet.bench.compression [--out FILE.json]``.

Times :func:`apet.compression.compress` at LLaVA-1.5 shapes (N=576, D=1024,
k=10) for several budgets and batch sizes, eagerly, as a captured CUDA graph
and through ``torch.compile``, on the CPU and on CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path
from typing import Any, Callable

import torch

from apet.bench.timing import time_call
from apet.compression import compress
from apet.runtime.cuda_graphs import GraphedCall

log = logging.getLogger(__name__)


def _variants(x: torch.Tensor, keep: int, basis: int) -> dict[str, Callable[[], Any]]:
    eager = lambda: compress(x, keep=keep, basis=basis)  # noqa: E731
    variants: dict[str, Callable[[], Any]] = {"eager": eager}
    if x.is_cuda:
        graphed_eager = GraphedCall(lambda t: compress(t, keep=keep, basis=basis), {"t": x})
        variants["cuda_graph"] = lambda: graphed_eager(t=x)
    try:
        compiled = torch.compile(lambda t: compress(t, keep=keep, basis=basis), dynamic=False)
        variants["compile"] = lambda: compiled(x)
        if x.is_cuda:
            graphed = torch.compile(lambda t: compress(t, keep=keep, basis=basis), mode="reduce-overhead",
                                    dynamic=False)
            variants["compile_cuda_graph"] = lambda: graphed(x)
    except Exception as exc:  # torch.compile needs a working compiler toolchain
        log.warning("torch.compile unavailable: %s", exc)
    return variants


def run(devices: list[str], keeps: list[int], batches: list[int], n_tokens: int = 576, dim: int = 1024,
        basis: int = 10, repeats: int = 50, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    rows = []
    for device in devices:
        work_dtype = dtype if device == "cuda" else torch.float32
        for batch in batches:
            x = torch.randn(batch, n_tokens, dim, device=device, dtype=work_dtype)
            for keep in keeps:
                for name, fn in _variants(x, keep, basis).items():
                    try:
                        timing = time_call(fn, device=device, warmup=3, repeats=repeats if device == "cuda" else 5)
                    except Exception as exc:  # report and continue: one broken variant must not hide the rest
                        log.warning("%s/%s batch %d keep %d failed: %s", device, name, batch, keep, exc)
                        continue
                    rows.append({"device": device, "variant": name, "batch": batch, "keep": keep,
                                 "dtype": str(work_dtype).split(".")[-1], **timing.to_json()})
                    log.info("%s %-18s b=%d keep=%d median %.3f ms", device, name, batch, keep, timing.median_ms)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return {"benchmark": "apet.compression", "shape": {"n_tokens": n_tokens, "dim": dim, "basis": basis},
            "environment": env, "results": rows}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'device':6} {'variant':18} {'batch':>5} {'keep':>5} {'median ms':>10} {'p90 ms':>8}"]
    for r in report["results"]:
        lines.append(f"{r['device']:6} {r['variant']:18} {r['batch']:>5} {r['keep']:>5} "
                     f"{r['median_ms']:>10.3f} {r['p90_ms']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apet.bench.compression", description=__doc__)
    parser.add_argument("--keeps", default="192,128,64")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda (auto: both where present)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("compression_bench.json"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else \
        args.devices.split(",")
    report = run(devices, [int(k) for k in args.keeps.split(",")], [int(b) for b in args.batches.split(",")],
                 repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``torch.compile`` after one eager call, so that the kernels' timed choices exist when Dynamo traces.

apet's GPU kernels time their configurations on the device the first time a shape runs
(:mod:`apet.kernels.gemv`, :mod:`apet.kernels.fused_gemv`). Timing needs real tensors, which a trace does not have;
the fold decisions that change the traced graph (:func:`apet.kernels.fused_gemv.folds`) are looked up when Dynamo
traces. One eager call of the same inputs first measures them.

Compile modes (:data:`COMPILE_MODES`): ``default`` is Inductor's default; ``max-autotune`` lets Inductor time its
own GEMM templates against cuBLAS for every matmul shape of a stage and keep the fastest (cuBLAS's own choice ran
Qwen2.5-VL-7B's 2,065-token prefill GEMMs at 82–88 % of the measured matmul ceiling on the H200:
docs/benchmarks/h200-prefill-levers/profile_qwen_r1.0_compile_rotaryonce.json), at the price of minutes of timing
per stage when it is first compiled. Not yet timed on a GPU, so not the default. Inductor's own CUDA graphs stay off
(``max-autotune-no-cudagraphs``): apet captures every stage itself (:mod:`apet.runtime.cuda_graphs`).
"""

from __future__ import annotations

from typing import Any, Callable

from apet.errors import UsageError

COMPILE_MODES: dict[str, str | None] = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}


def check_compile_mode(mode: str) -> str:
    """``mode`` where it is one of :data:`COMPILE_MODES`, else a UsageError listing them."""
    if mode not in COMPILE_MODES:
        raise UsageError(f"compile mode {mode!r} is unknown", f"use one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_measured(fn: Callable[..., Any], mode: str = "default") -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)`` in compile mode ``mode`` whose first call runs ``fn`` eagerly before
    the compiled call (same inputs, same result: the eager call only measures the kernels' choices; a graph's
    warm-up calls it anyway)."""
    import torch

    torch_mode = COMPILE_MODES[check_compile_mode(mode)]
    compiled = torch.compile(fn, dynamic=False, **({"mode": torch_mode} if torch_mode else {}))
    measured = {"done": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        if not measured["done"]:
            fn(*args, **kwargs)
            measured["done"] = True
        return compiled(*args, **kwargs)

    return call

"""``torch.compile`` after one eager call, so that the kernels' timed choices exist when Dynamo traces.

apet's GPU kernels time their configurations on the device the first time a shape runs
(:mod:`apet.kernels.gemv`, :mod:`apet.kernels.fused_gemv`). Timing needs real tensors, which a trace does not have;
the fold decisions that change the traced graph (:func:`apet.kernels.fused_gemv.folds`) are looked up when Dynamo
traces. One eager call of the same inputs first measures them.
"""

from __future__ import annotations

from typing import Any, Callable


def compile_measured(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)`` whose first call runs ``fn`` eagerly before the compiled call (same
    inputs, same result: the eager call only measures the kernels' choices; a graph's warm-up calls it anyway)."""
    import torch

    compiled = torch.compile(fn, dynamic=False)
    measured = {"done": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        if not measured["done"]:
            fn(*args, **kwargs)
            measured["done"] = True
        return compiled(*args, **kwargs)

    return call

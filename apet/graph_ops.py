"""Row gathers and static sub-ranges written so that an exported graph carries one cheap node for each.

Why it matters: TensorRT's ONNX parser turns every ``Slice`` on a tensor with a dynamic batch into ~26 network
layers (clamping its bounds as shape arithmetic), and ``torch.gather`` exports as ``GatherElements`` behind an
``Expand`` whose shape is computed in ~12 more nodes (~36 layers). A ``Gather`` with constant indices or a
``GatherND`` with ``batch_dims=1`` is one node and ~3 layers, and on a Jetson every unfused layer can be a
kernel launch (docs/benchmarks.md, "ApET's cost inside the engines"). Eagerly these are the plain torch ops.
"""

from __future__ import annotations

from typing import Any

import torch


class _GatherRows(torch.autograd.Function):
    """x [B, N, D], index [B, M, 1] -> x[b, index[b, m, 0]] as [B, M, D]; ONNX ``GatherND`` with batch_dims=1."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, index.expand(-1, -1, x.shape[-1]))

    @staticmethod
    def symbolic(g: Any, x: Any, index: Any) -> Any:
        return g.op("GatherND", x, index, batch_dims_i=1)


class _SumOfSquares(torch.autograd.Function):
    """Σ x² over the last dim; ONNX ``ReduceSumSquare`` (one node, in every TensorRT parser; ``ReduceL2`` is not in
    TensorRT 10.3's, and ``Mul`` + ``ReduceSum`` is two nodes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keepdim: bool) -> torch.Tensor:
        return (x * x).sum(-1, keepdim=keepdim)

    @staticmethod
    def symbolic(g: Any, x: Any, keepdim: bool) -> Any:
        if g.opset < 18:  # axes became an input at opset 18
            return g.op("ReduceSumSquare", x, axes_i=[-1], keepdims_i=int(keepdim))
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        return g.op("ReduceSumSquare", x, axes, keepdims_i=int(keepdim))


def sum_of_squares(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """``(x * x).sum(-1, keepdim)``, exactly that eagerly, one ``ReduceSumSquare`` node in a graph."""
    return _SumOfSquares.apply(x, keepdim)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each batch item: x [B, N, D], index [B, M, 1] (int64) -> [B, M, D]. Exact in any dtype."""
    return _GatherRows.apply(x, index)


def take(x: torch.Tensor, dim: int, start: int | torch.Tensor, stop: int | torch.Tensor) -> torch.Tensor:
    """``x`` narrowed to ``start:stop`` along ``dim`` as a ``Gather`` (constant indices when the bounds are
    Python ints, a ``Range`` when they are traced lengths) instead of a ``Slice``."""
    return x.index_select(dim, torch.arange(start, stop, device=x.device))

"""ApET visual-token compression as pure, export-friendly PyTorch (DESIGN §4).

Per image, tokens X [N, D]: pick k basis tokens (farthest-point sampling by
default), reconstruct every token from the basis by least squares, keep the
K-k tokens the basis explains worst plus the k basis tokens, merge every
dropped token into its cosine-nearest error-selected token, and emit the K
kept tokens in ascending original position.

The same function runs eagerly, under CUDA-graph capture / ``torch.compile``
and inside ``torch.onnx.export``: k and K are Python ints (static in the
graph), there is no data-dependent Python control flow, no host sync and no
``torch.linalg`` (see :mod:`apet.linalg`). All math is float32 whatever the
input dtype, because the Gram system is ill-conditioned in fp16.

Two places where the reference code is ambiguous are made deterministic:
the FPS start token is fixed (index 0, or a seeded choice), and basis tokens
are excluded from the error ranking, so the K-k error-selected tokens and the
k basis tokens never overlap (the reference can emit a token twice when a
basis token outranks others on error, which only happens on degenerate
inputs). Ties in the merge assignment go to the lowest position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from apet.errors import InputError, UsageError
from apet.linalg import cholesky_solve

METHODS = ("fps", "dpc", "random")
GRAM_RIDGE = 1e-5
DPC_NEIGHBOURS = 5
_NEG = torch.finfo(torch.float32).min


class Compressed(NamedTuple):
    """Kept tokens [B, K, D] (input dtype) and their original positions [B, K] (int64, ascending)."""

    tokens: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class CompressionConfig:
    """Static settings of one ApET stage; validated against the token count it will see."""

    keep: int
    basis: int = 10
    method: str = "fps"
    merge: bool = True
    seed: int | None = None

    def validate(self, n_tokens: int) -> None:
        if not isinstance(self.basis, int) or self.basis < 1:
            raise UsageError(f"basis={self.basis!r} is invalid; allowed range is [1, {max(n_tokens - 1, 1)}]",
                             "pass --basis 10 (the paper's default) or another positive integer")
        if not isinstance(self.keep, int) or not (self.basis + 1 <= self.keep <= n_tokens):
            raise UsageError(
                f"keep={self.keep!r} is outside the allowed range [{self.basis + 1}, {n_tokens}] "
                f"(basis={self.basis}, {n_tokens} tokens)",
                "keep at least basis+1 tokens and at most all of them",
            )
        if self.method not in METHODS:
            raise UsageError(f"method={self.method!r} is unknown", f"use one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Stage2Config:
    """Second ApET stage: after layer ``layer`` - 1, the K1-token image span becomes ``compression.keep``."""

    layer: int
    span: int  # K1
    compression: CompressionConfig

    @property
    def removed(self) -> int:
        return self.span - self.compression.keep


def stage_configs(stage1_keep: int, stage2: tuple[int, int] | None, basis: int = 10, method: str = "fps",
                  merge: bool = True, seed: int | None = None) -> tuple[CompressionConfig, Stage2Config | None]:
    """The two stages' configs from budgets: K1, and (layer L, K2) or None; both stages share basis settings."""
    def config(keep: int) -> CompressionConfig:
        return CompressionConfig(keep=keep, basis=basis, method=method, merge=merge, seed=seed)

    if stage2 is None:
        return config(stage1_keep), None
    layer, keep = stage2
    return config(stage1_keep), Stage2Config(layer=layer, span=stage1_keep, compression=config(keep))


def _host_checks_allowed() -> bool:
    """Value checks need a host sync: skip them while tracing, compiling or capturing a CUDA graph."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"x must be a 3-D tensor [batch, tokens, dim], got {shape}",
                         "reshape the features to [B, N, D]")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got {x.dtype}", "cast the features to float")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise InputError(f"x has an empty dimension: {tuple(x.shape)}", "pass at least one token per image")
    if _host_checks_allowed() and not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or Inf values", "check the vision tower's output (fp16 overflow?)")


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, M] -> x[b, index[b]] as [B, M, D] (GatherElements in ONNX)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _membership(index: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """index [B, M] -> [B, M, N] float one-hot rows; a matmul-friendly scatter."""
    positions = torch.arange(n_tokens, device=index.device)
    return (index.unsqueeze(-1) == positions).to(torch.float32)


def farthest_point_basis(x: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """k token indices by farthest-point sampling (squared Euclidean), starting at ``start``.

    Tokens already chosen are masked out, so exact duplicates never yield a
    repeated basis index (plain FPS would re-pick token ``start`` once every
    remaining distance is zero).
    """
    sq_norm = (x * x).sum(-1)  # [B, N]
    index = torch.zeros_like(sq_norm[:, 0], dtype=torch.long) + start  # [B]
    positions = torch.arange(x.shape[1], device=x.device)
    chosen = [index]
    taken = positions == index.unsqueeze(-1)
    nearest: torch.Tensor | None = None
    for _ in range(k - 1):
        centre = gather_tokens(x, index.unsqueeze(-1))  # [B, 1, D]
        dist = sq_norm - 2.0 * (x @ centre.transpose(1, 2))[..., 0] + (centre * centre).sum(-1)
        nearest = dist if nearest is None else torch.minimum(nearest, dist)
        index = torch.argmax(nearest.masked_fill(taken, _NEG), dim=1)
        taken = taken | (positions == index.unsqueeze(-1))
        chosen.append(index)
    return torch.stack(chosen, dim=1)


def density_peak_basis(x: torch.Tensor, k: int, neighbours: int = DPC_NEIGHBOURS) -> torch.Tensor:
    """k cluster centres by DPC-kNN: high local density times distance to any denser token."""
    n_tokens, dim = int(x.shape[1]), int(x.shape[2])
    sq_norm = (x * x).sum(-1)
    sq_dist = sq_norm.unsqueeze(2) + sq_norm.unsqueeze(1) - 2.0 * (x @ x.transpose(1, 2))
    dist = torch.sqrt(sq_dist.clamp_min(0.0)) / (dim**0.5)  # [B, N, N]
    m = min(neighbours, n_tokens)
    near = torch.topk(dist, m, dim=-1, largest=False).values
    density = torch.exp(-(near * near).mean(-1))  # [B, N]
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [B, i, j]: rho_j > rho_i
    far = dist.flatten(1).max(-1).values.view(-1, 1, 1)
    delta = torch.where(denser, dist, far.expand_as(dist)).min(-1).values
    return torch.topk(density * delta, k, dim=-1).indices


def _rng(seed: int) -> np.random.Generator:
    """Host-side RNG: its draws become constants in a traced graph and are stable across versions."""
    return np.random.default_rng(int(seed))


def random_basis(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k distinct seeded-random indices, the same for every image (a constant in the graph)."""
    picked = torch.from_numpy(_rng(seed).permutation(int(x.shape[1]))[:k].copy()).to(x.device)
    return torch.zeros_like(x[:, :k, 0], dtype=torch.long) + picked


def select_basis(x: torch.Tensor, k: int, method: str = "fps", seed: int | None = None) -> torch.Tensor:
    """Basis token indices [B, k] (in selection order) by ``method``."""
    if method == "fps":
        start = 0 if seed is None else int(_rng(seed).integers(int(x.shape[1])))
        return farthest_point_basis(x, k, start)
    if method == "dpc":
        return density_peak_basis(x, k)
    if method == "random":
        return random_basis(x, k, 0 if seed is None else seed)
    raise UsageError(f"method={method!r} is unknown", f"use one of {', '.join(METHODS)}")


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Eager calls use LAPACK/cuSOLVER (three kernels instead of ~150 tiny ones); tracing, compiling and
    CUDA-graph capture use the unrolled, exportable solver. A failed factorisation falls back too."""
    if _host_checks_allowed():
        lower, info = torch.linalg.cholesky_ex(gram)
        if not bool(info.any()):
            return torch.cholesky_solve(rhs, lower)
    return cholesky_solve(gram, rhs)


def basis_errors(x: torch.Tensor, basis_index: torch.Tensor) -> torch.Tensor:
    """Per-token least-squares reconstruction error ||x_i - x̂_i||_2 from the basis, float32 [B, N].

    G = S Sᵀ + 1e-5·I, C = G⁻¹ S Xᵀ (solved), X̂ = Cᵀ S.
    """
    x32 = x.to(torch.float32)
    basis = gather_tokens(x32, basis_index)  # [B, k, D]
    k = int(basis_index.shape[1])
    ridge = GRAM_RIDGE * torch.eye(k, dtype=torch.float32, device=x.device)
    gram = basis @ basis.transpose(1, 2) + ridge
    coeffs = _solve(gram, basis @ x32.transpose(1, 2))  # [B, k, N]
    residual = x32 - coeffs.transpose(1, 2) @ basis
    return torch.sqrt((residual * residual).sum(-1))


def _ascending(index: torch.Tensor) -> torch.Tensor:
    """Sort int64 indices ascending along dim 1 (TopK with largest=0: exports where Sort does not)."""
    return torch.topk(index, int(index.shape[1]), dim=1, largest=False, sorted=True).values


def _merge_into(x: torch.Tensor, targets: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Average every dropped token into its most cosine-similar target; returns [B, T, D] float32."""
    n_tokens = int(x.shape[1])
    unit = x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(1e-12)
    similarity = gather_tokens(unit, targets) @ unit.transpose(1, 2)  # [B, T, N]
    nearest = torch.argmax(similarity, dim=1)  # [B, N], first (lowest-position) target on ties
    assigned = _membership(nearest, int(targets.shape[1])) * dropped.unsqueeze(-1)  # [B, N, T]
    members = assigned + _membership(targets, n_tokens).transpose(1, 2)  # each target counts itself
    total = members.transpose(1, 2) @ x  # [B, T, D]
    return total / members.sum(1).unsqueeze(-1)


def compress(
    x: torch.Tensor,
    keep: int,
    basis: int = 10,
    method: str = "fps",
    merge: bool = True,
    seed: int | None = None,
) -> Compressed:
    """Keep ``keep`` of the N tokens of each image by ApET; see the module docstring."""
    _check_input(x)
    n_tokens = int(x.shape[1])
    CompressionConfig(keep=keep, basis=basis, method=method, merge=merge, seed=seed).validate(n_tokens)
    if keep == n_tokens:
        index = torch.zeros_like(x[:, :, 0], dtype=torch.long) + torch.arange(n_tokens, device=x.device)
        return Compressed(x, index)

    x32 = x.to(torch.float32)
    basis_index = _ascending(select_basis(x32, basis, method, seed))
    errors = basis_errors(x32, basis_index)
    is_basis = _membership(basis_index, n_tokens).sum(1) > 0  # [B, N]
    ranked = errors.masked_fill(is_basis, _NEG)
    selected = _ascending(torch.topk(ranked, keep - basis, dim=1).indices)  # error-selected, [B, K-k]

    if merge:
        is_selected = _membership(selected, n_tokens).sum(1) > 0
        dropped = (~(is_basis | is_selected)).to(torch.float32)
        selected_tokens = _merge_into(x32, selected, dropped)
    else:
        selected_tokens = gather_tokens(x32, selected)

    index = torch.cat([selected, basis_index], dim=1)
    tokens = torch.cat([selected_tokens, gather_tokens(x32, basis_index)], dim=1)
    order = torch.topk(index, keep, dim=1, largest=False, sorted=True).indices
    return Compressed(gather_tokens(tokens, order).to(x.dtype), torch.gather(index, 1, order))


class CompressionModule(torch.nn.Module):
    """``compress`` with its static settings bound, for tracing and ONNX export."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        out = compress(x, keep=c.keep, basis=c.basis, method=c.method, merge=c.merge, seed=c.seed)
        return out.tokens, out.index

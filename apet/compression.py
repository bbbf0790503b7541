"""ApET visual-token compression as pure, export-friendly PyTorch (docs/algorithm.md).

Per image, tokens X [N, D] and a budget of K tokens with a basis of k:

1. pick k basis tokens by farthest-point sampling (FPS order kept);
2. reconstruct every token from the basis by least squares (float32, ridge 1e-5)
   and rank all N tokens by their reconstruction error, basis included;
3. ``top`` = the K worst-explained tokens in descending error; the first K-k
   are the *error-selected* tokens, the positions of error ranks K-k+1..K are
   *slots* that receive the basis vectors (their own values are discarded);
4. every token outside ``top`` (the basis originals included) is averaged
   into its cosine-nearest error-selected token;
5. the K rows come out at ``sorted(top)`` with those positions as the index.

How the basis fills the slots differs between the authors' code paths, so it is
a named *placement* (:data:`PLACEMENTS`):

* ``mask``   LLaVA stage 1: the j-th smallest slot position gets basis vector j
             (the reference's boolean-mask assignment);
* ``rank``   LLaVA stage 2 (inside the LLM): slot ``top[K-k+j]`` gets basis vector j
             (advanced-index assignment);
* ``blend``  Qwen2.5-VL: the j-th smallest slot gets 0.5·basis_j + 0.5·its own value;
* ``append`` Video-LLaVA: only the K-k error-selected tokens are ranked; the output is
             [error-selected in descending-error order, basis in FPS order] with
             their positions as the index (not ascending);
* ``append_spatial`` an ablation of ``append``: the same K tokens in position order
             (``--basis-placement spatial``);
* ``own``    an ablation that is *not* the paper: basis tokens are excluded from the
             ranking, keep their own positions and are not merged.

Deliberate differences from the reference, and nowhere else: the FPS start token
is fixed (0, or a seeded choice) where the authors draw a random one; merging is
float32 where the authors merge in fp16/bf16; the least-squares fit uses the
Cholesky factor of the k×k Gram matrix (LAPACK in eager calls; in graphs formed
implicitly by Gram-Schmidt on the ridge-augmented basis, :mod:`apet.linalg`) where
the authors call an LU solve — the same projection in exact arithmetic. Degenerate
inputs where a basis token itself ranks in ``top`` behave as the reference does
(the basis vector then appears twice).

The same function runs eagerly, under CUDA-graph capture / ``torch.compile``
and inside ``torch.onnx.export``: k and K are Python ints (static in the
graph), there is no data-dependent Python control flow, no host sync and no
``torch.linalg`` solver in traced code. All math is float32 whatever the input
dtype, because the Gram system is ill-conditioned in fp16.

What an engine sees is kept small (docs/benchmarks.md, "ApET's cost inside the
engines"): one row gather per FPS step, no Slice (sub-ranges are Gathers,
:mod:`apet.graph_ops`), the merge as one 0/1 membership matrix and one matmul,
and the placements as two sorts and a gather. The membership matrix is also the
result's ``members`` (what a family reuses to merge other features the same way).

Families whose token count N varies per image (Qwen2.5-VL's dynamic resolution)
set ``max_tokens``: the graph is then traced with a symbolic N, and the budget
is either fixed (``keep``) or the authors' per-image ``int(keep_ratio·N)``
(:meth:`CompressionConfig.keep_for`, the one home of that rule). In a graph the
per-image K is looked up in a constant table indexed by N — a shape computation
TensorRT accepts as TopK's K — so the engine reproduces the float64 ``int(r·N)``
of the reference exactly for every N the processor can produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from apet.contracts.compression import DPC_NEIGHBOURS, GRAM_RIDGE, METHODS, CompressionConfig
from apet.errors import InputError, UsageError
from apet.graph_ops import gather_rows, sum_of_squares, take
from apet.linalg import ridge_orthonormal

_NEG = torch.finfo(torch.float32).min
# (targets as one-hot rows [B, T, N], targets as positions [B, T]) -> index of the cosine-nearest target [B, 1, N]
Nearest = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Compressed:
    """Kept tokens [B, K, D] (input dtype) and their original positions [B, K] (int64); iterates as
    ``(tokens, index)``, what a graph returns.

    Where tokens were merged, ``members`` [B, T, N] (float32 0/1) says which of the N input tokens were averaged
    into each of the T error-selected tokens (itself included), whose positions are ``targets`` [B, T]: the merge
    as data, so a family can apply the same merge to another feature map aligned with the tokens
    (``(members @ f) / members.sum(-1, keepdim=True)``, e.g. Qwen3-VL's DeepStack levels). :attr:`assignment`
    is the same per token. Both are None for rules and settings that do not merge.
    """

    tokens: torch.Tensor
    index: torch.Tensor
    members: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.tokens, self.index))

    @property
    def assignment(self) -> torch.Tensor | None:
        """[B, N] int64: for every input token the original position of the error-selected token it was averaged
        into (its own position for an error-selected token), -1 for a token averaged into none (the basis slots'
        own values, and the basis tokens of the ``own`` ablation)."""
        if self.members is None or self.targets is None:
            return None
        owner = (self.targets.to(torch.float32).unsqueeze(1) @ self.members).squeeze(1)  # exact below 2^24
        return torch.where(self.members.sum(1) > 0, owner.to(torch.int64), -1)


@dataclass(frozen=True)
class Basis:
    """The k basis tokens in selection order: their rows [B, k, D] (float32) and positions [B, k] (int64)."""

    rows: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class StageSelector:
    """One stage's settings bound: the ``select`` a family's vision stages call on their features. Stages may
    read ``config`` (a fixed budget lets Qwen's vision graph keep static output shapes)."""

    config: CompressionConfig

    def __call__(self, x: torch.Tensor) -> Compressed:
        return compress_with(self.config, x)


def selector(config: CompressionConfig) -> StageSelector:
    return StageSelector(config)


def compress_with(config: CompressionConfig, x: torch.Tensor) -> Compressed:
    """``compress(x)`` with one stage's settings."""
    return compress(x, keep=config.keep, basis=config.basis, method=config.method, merge=config.merge,
                    seed=config.seed, placement=config.placement, keep_ratio=config.keep_ratio,
                    max_tokens=config.max_tokens)


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
    """x [B, N, D], index [B, M] -> x[b, index[b]] as [B, M, D] (one GatherND in ONNX)."""
    return gather_rows(x, index.unsqueeze(-1))


def _one_hot(index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """index [B, M] -> [B, M, N] float one-hot rows over ``positions`` (arange N): a matmul-friendly gather."""
    return (index.unsqueeze(-1) == positions).to(torch.float32)


def farthest_point_basis(x: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """k token indices [B, k] by plain farthest-point sampling (squared Euclidean) from ``start``."""
    return _farthest_points(x, k, start).index


def _farthest_points(x: torch.Tensor, k: int, start: int) -> Basis:
    """Plain FPS as in the reference: a running minimum of squared distances, next = argmax (first on ties),
    chosen tokens not masked. Each step reads the new centre with one row gather and keeps every tensor in
    the [B, N, 1] layout whose argmax is already a gather index, so a step is five graph nodes."""
    centre = x.index_select(1, torch.tensor([start], device=x.device))  # [B, 1, D]
    rows, picks = [centre], []
    nearest: torch.Tensor | None = None
    for _ in range(k - 1):
        dist = sum_of_squares(x - centre)  # [B, N, 1]
        nearest = dist if nearest is None else torch.minimum(nearest, dist)
        pick = torch.argmax(nearest, dim=1, keepdim=True)  # [B, 1, 1]
        centre = gather_rows(x, pick)
        rows.append(centre)
        picks.append(pick)
    first = (picks[0] * 0 if picks else torch.zeros_like(x[:, :1, :1], dtype=torch.long)) + start
    return Basis(torch.cat(rows, 1), torch.cat([first, *picks], 1).squeeze(-1))


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


def fps_start(n_tokens: int, seed: int | None) -> int:
    """Token 0, or a seeded start (the authors draw a random start per call)."""
    return 0 if seed is None else int(_rng(seed).integers(n_tokens))


def select_basis(x: torch.Tensor, k: int, method: str = "fps", seed: int | None = None) -> Basis:
    """The k basis tokens of float32 ``x`` by ``method``, in selection order."""
    if method == "fps":
        return _farthest_points(x, k, fps_start(int(x.shape[1]), seed))
    if method == "dpc":
        index = density_peak_basis(x, k)
    elif method == "random":
        index = random_basis(x, k, 0 if seed is None else seed)
    else:
        raise UsageError(f"method={method!r} is unknown", f"use one of {', '.join(METHODS)}")
    return Basis(gather_tokens(x, index), index)


def _whiten(basis: torch.Tensor) -> torch.Tensor:
    """Q = L⁻¹ S for S Sᵀ + λI = L Lᵀ. Eager calls use LAPACK/cuSOLVER's Cholesky (two kernels instead of ~70
    tiny ones); tracing, compiling and CUDA-graph capture use the unrolled, exportable form
    (:func:`apet.linalg.ridge_orthonormal`). A failed factorisation falls back too."""
    if _host_checks_allowed():
        ridge = GRAM_RIDGE * torch.eye(int(basis.shape[1]), dtype=torch.float32, device=basis.device)
        lower, info = torch.linalg.cholesky_ex(basis @ basis.transpose(1, 2) + ridge)
        if not bool(info.any()):
            return torch.linalg.solve_triangular(lower, basis, upper=False)
    return ridge_orthonormal(basis, GRAM_RIDGE)


def basis_errors(x: torch.Tensor, basis_index: torch.Tensor) -> torch.Tensor:
    """Per-token least-squares reconstruction error ||x_i - x̂_i||_2 from the basis at ``basis_index``, [B, N]."""
    x32 = x.to(torch.float32)
    return _errors(x32, gather_tokens(x32, basis_index))


def _errors(x32: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """G = S Sᵀ + 1e-5·I, C = G⁻¹ S Xᵀ, X̂ = Cᵀ S — computed as X̂ = (Q Xᵀ)ᵀ Q with Q = L⁻¹ S and G = L Lᵀ,
    which is the same matrix (Sᵀ G⁻¹ S = Qᵀ Q). The basis order does not matter."""
    q = _whiten(basis)  # [B, k, D]
    residual = x32 - (x32 @ q.transpose(1, 2)) @ q
    return torch.sqrt(sum_of_squares(residual, keepdim=False))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(sum_of_squares(x)).clamp_min(1e-12)


def _plain_nearest(x32: torch.Tensor) -> Nearest:
    """Cosine-nearest target of every token from the tokens themselves: the targets' unit rows are read with
    the one-hot rows the merge builds anyway (exact), one matmul gives every similarity."""
    unit = _unit(x32)
    return lambda onehot, _targets: torch.argmax((onehot @ unit) @ unit.transpose(1, 2), dim=1, keepdim=True)


def _merged(x: torch.Tensor, ranked: torch.Tensor, n_selected: int | torch.Tensor, positions: torch.Tensor,
            nearest: Nearest, outside: torch.Tensor | None = None, all_selected: bool = False) -> Compressed:
    """The first ``n_selected`` of ``ranked`` (the error-selected tokens, in the reference's order: ties go to the
    earliest) merged with every token not in ``ranked`` (nor in ``outside`` [B, 1, N]): each becomes
    (itself + Σ assigned) / (1 + count). One batched matmul over a 0/1 membership matrix, no scatter."""
    onehot = _one_hot(ranked, positions)  # [B, R, N]
    kept = onehot.sum(1, keepdim=True)
    dropped = 1.0 - (kept if outside is None else torch.maximum(kept, outside))  # [B, 1, N]
    targets = onehot if all_selected else take(onehot, 1, 0, n_selected)  # [B, T, N]
    selected = ranked if all_selected else take(ranked, 1, 0, n_selected)
    near = nearest(targets, selected)  # [B, 1, N]
    assigned = (torch.arange(n_selected, device=x.device).unsqueeze(-1) == near).to(torch.float32)
    members = assigned * dropped + targets  # each target counts itself
    tokens = (members @ x) / members.sum(-1, keepdim=True)
    return Compressed(tokens, selected, members, selected)


def _selected(x: torch.Tensor, ranked: torch.Tensor, n_selected: int | torch.Tensor, merge: bool,
              positions: torch.Tensor, nearest: Nearest, outside: torch.Tensor | None = None,
              all_selected: bool = False) -> Compressed:
    """The error-selected tokens (the first ``n_selected`` of ``ranked``), merged unless ``merge`` is off."""
    if merge:
        return _merged(x, ranked, n_selected, positions, nearest, outside, all_selected)
    selected = ranked if all_selected else take(ranked, 1, 0, n_selected)
    return Compressed(gather_tokens(x, selected), selected)


def _ascending_order(index: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """The permutation that sorts ``count`` int64 positions ascending (TopK on float32: exact below 2^24, and
    a TopK every TensorRT parses, unlike int64 Sort)."""
    return torch.topk(index.to(torch.float32), count, dim=1, largest=False, sorted=True).indices


def _in_position_order(tokens: torch.Tensor, index: torch.Tensor, count: int | torch.Tensor,
                       merged: Compressed) -> Compressed:
    order = _ascending_order(index, count)
    return Compressed(gather_tokens(tokens, order), torch.gather(index, 1, order), merged.members, merged.targets)


def _paper(x: torch.Tensor, errors: torch.Tensor, basis: Basis, keep: int | torch.Tensor, merge: bool,
           placement: str, positions: torch.Tensor, nearest: Nearest) -> Compressed:
    """The authors' ranking over all tokens, merge set and basis placement (see the module docstring)."""
    k = int(basis.rows.shape[1])
    n_selected = keep - k
    appended = placement in ("append", "append_spatial")
    ranked = torch.topk(errors, n_selected if appended else keep, dim=1).indices  # descending error
    kept = _selected(x, ranked, n_selected, merge, positions, nearest, all_selected=appended)
    if placement == "append":
        return Compressed(torch.cat([kept.tokens, basis.rows], 1), torch.cat([kept.index, basis.index], 1),
                          kept.members, kept.targets)
    if placement == "append_spatial":
        return _in_position_order(torch.cat([kept.tokens, basis.rows], 1), torch.cat([kept.index, basis.index], 1),
                                  keep, kept)
    if placement == "rank":  # slot top[K-k+j] gets basis vector j: the index is ``ranked`` itself
        return _in_position_order(torch.cat([kept.tokens, basis.rows], 1), ranked, keep, kept)
    slots = take(ranked, 1, n_selected, keep)
    slots = torch.gather(slots, 1, _ascending_order(slots, k))  # mask / blend: basis j to the j-th smallest slot
    slot_tokens = basis.rows if placement == "mask" else 0.5 * basis.rows + 0.5 * gather_tokens(x, slots)
    return _in_position_order(torch.cat([kept.tokens, slot_tokens], 1), torch.cat([kept.index, slots], 1), keep, kept)


def _own(x: torch.Tensor, errors: torch.Tensor, basis: Basis, keep: int, merge: bool, positions: torch.Tensor,
         nearest: Nearest) -> Compressed:
    """Ablation: basis excluded from the ranking, kept at its own positions, never merged."""
    k = int(basis.rows.shape[1])
    is_basis = _one_hot(basis.index, positions).amax(1, keepdim=True)  # [B, 1, N]
    ranked = torch.topk(errors.masked_fill(is_basis[:, 0] > 0, _NEG), keep - k, dim=1).indices
    kept = _selected(x, ranked, keep - k, merge, positions, nearest, outside=is_basis, all_selected=True)
    tokens = torch.cat([kept.tokens, basis.rows], 1)
    return _in_position_order(tokens, torch.cat([kept.index, basis.index], 1), keep, kept)


def compress(
    x: torch.Tensor,
    keep: int,
    basis: int = 10,
    method: str = "fps",
    merge: bool = True,
    seed: int | None = None,
    placement: str = "mask",
    keep_ratio: float | None = None,
    max_tokens: int | None = None,
) -> Compressed:
    """Keep ``keep`` of the N tokens of each image by ApET; see the module docstring."""
    _check_input(x)
    config = CompressionConfig(keep=keep, basis=basis, method=method, merge=merge, seed=seed, placement=placement,
                               keep_ratio=keep_ratio, max_tokens=max_tokens)
    if config.per_image:
        return _compress_per_image(x, config)
    n_tokens = int(x.shape[1])
    config.validate(n_tokens)
    if keep == n_tokens:
        return _keep_all(x)
    return _compress(x, config, keep, n_tokens)


def _keep_all(x: torch.Tensor) -> Compressed:
    return Compressed(x, torch.zeros_like(x[:, :, 0], dtype=torch.long) + torch.arange(x.shape[1], device=x.device))


def _compress(x: torch.Tensor, config: CompressionConfig, keep: int | torch.Tensor,
              n_tokens: int | torch.Tensor) -> Compressed:
    """The algorithm for K = ``keep`` of N = ``n_tokens`` (Python ints, or traced 0-d tensors when N is symbolic:
    then ``positions`` is a Range of it, else a constant)."""
    x32 = x.to(torch.float32)
    positions = torch.arange(n_tokens, device=x.device)
    if config.method == "fps" and _fused_available(x32):
        from apet.kernels import apet_fused

        gram = apet_fused.token_gram(x32)
        index, errors = apet_fused.fps_errors(gram, config.basis, fps_start(int(x.shape[1]), config.seed),
                                              GRAM_RIDGE)
        basis = Basis(gather_tokens(x32, index), index)
        nearest: Nearest = lambda _onehot, targets: apet_fused.cosine_nearest(gram, targets).unsqueeze(1)  # noqa: E731
    else:
        basis = select_basis(x32, config.basis, config.method, config.seed)
        errors = _errors(x32, basis.rows)
        nearest = _plain_nearest(x32)
    if config.placement == "own":
        kept = _own(x32, errors, basis, keep, config.merge, positions, nearest)
    else:
        kept = _paper(x32, errors, basis, keep, config.merge, config.placement, positions, nearest)
    return Compressed(kept.tokens.to(x.dtype), kept.index, kept.members, kept.targets)


# The Triton path runs one program per image, so its serial loops grow with N: on the H100 it took 0.17 ms at
# N = 96 (stage 2; the graphed plain path 0.36 ms) but 0.63 ms at N = 576 (stage 1; the plain path 0.34 ms
# compiled + graphed), docs/benchmarks.md. Above ``max_tokens`` the plain path runs. ``enabled = False`` turns it
# off (to compare), ``max_tokens = None`` lifts the size limit (the kernel tests).
FUSED: dict = {"enabled": True, "max_tokens": 256}


def _fused_available(x: torch.Tensor) -> bool:
    """The Triton path of :mod:`apet.kernels.apet_fused`: GPU tensors up to ``FUSED["max_tokens"]`` tokens per
    image, never while exporting to ONNX."""
    if not FUSED["enabled"] or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    if FUSED["max_tokens"] is not None and int(x.shape[1]) > FUSED["max_tokens"]:
        return False
    from apet.kernels import apet_fused

    return apet_fused.available(x)


def _compress_per_image(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """N varies per image: eagerly K = ``keep_for(N)``; traced, K is a shape computation of the symbolic N
    (a constant table lookup) and K = N keeps everything through a Where, so both agree for every N."""
    n_tokens = x.shape[1]
    if config.keep_ratio is not None and config.keep_ratio >= 1.0:
        return _keep_all(x)
    if not isinstance(n_tokens, torch.Tensor):  # eager
        config.validate(n_tokens)
        keep = config.keep_for(n_tokens)
        return _keep_all(x) if keep == n_tokens else _compress(x, config, keep, n_tokens)
    config.validate(config.max_tokens)
    table = torch.tensor([config.keep_for(n) for n in range(config.max_tokens + 1)], device=x.device)
    keep = table[n_tokens.clamp(max=config.max_tokens)] if config.keep_ratio is not None else config.keep
    kept = _compress(x, config, keep, n_tokens)
    everything = n_tokens == keep
    first = torch.arange(keep, device=x.device)  # the first K positions: all of them when K = N
    return Compressed(torch.where(everything, x.index_select(1, first), kept.tokens),
                      torch.where(everything, first, kept.index), kept.members, kept.targets)


class CompressionModule(torch.nn.Module):
    """``compress`` with its static settings bound, for tracing and ONNX export."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = compress_with(self.config, x)
        return out.tokens, out.index

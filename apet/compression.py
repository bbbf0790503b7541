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
result's ``members``.

How the K rows were formed (which tokens were kept, which were merged into which, where the basis
went) is an :class:`Assignment` (:func:`compress_assigned`): the stage's own rows are formed by it, and a
family applies the same assignment to other per-token features of the same image (Qwen3-VL's DeepStack
levels, docs/algorithm.md) instead of recomputing a selection on them. It holds the tensors the stage
computed anyway (the membership matrix, positions, the output order), so applying it costs a matmul, a
division and the row gathers, no Slice.

Families whose token count N varies per image (Qwen2.5-VL's dynamic resolution)
set ``max_tokens``: the graph is then traced with a symbolic N, and the budget
is either fixed (``keep``) or the authors' per-image ``int(keep_ratio·N)``
(:meth:`CompressionConfig.keep_for`, the one home of that rule). In a graph the
per-image K is looked up in a constant table indexed by N — a shape computation
TensorRT accepts as TopK's K — so the engine reproduces the float64 ``int(r·N)``
of the reference exactly for every N the processor can produce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

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
    as data. :attr:`assignment` is the same per token. Both are None for rules and settings that do not merge.
    The whole of how the K rows were formed (merge, basis placement, order) is the :class:`Assignment` that
    :func:`compress_assigned` returns with them; a family forms other features' rows with that.
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
    """The k basis tokens in selection order: their rows [B, k, D] (float32), positions [B, k] (int64) and the
    same positions as a row-gather index [B, k, 1] (FPS's own layout: what forms other features' basis rows)."""

    rows: torch.Tensor
    index: torch.Tensor
    picks: torch.Tensor

    @classmethod
    def at(cls, x: torch.Tensor, index: torch.Tensor) -> Basis:
        picks = index.unsqueeze(-1)
        return cls(gather_rows(x, picks), index, picks)


class Assignment(NamedTuple):
    """How one stage formed its K rows from the N tokens of each image (docs/algorithm.md, steps 3-6), as tensors
    of the traced graph: :meth:`apply` forms the same rows from any per-token features [B, N, D'] of the same
    images (the stage's own rows are ``apply(x)``). ``identity``: every token kept as it is. (A NamedTuple:
    ``torch.compile`` traces it without graph breaks.)"""

    selected: torch.Tensor | None = None  # [B, T] error-selected positions, in error order (the merge targets)
    members: torch.Tensor | None = None  # [B, T, N] 0/1: the tokens averaged into each target (itself included)
    count: torch.Tensor | None = None  # [B, T, 1] members.sum(-1): each target's divisor
    basis: torch.Tensor | None = None  # [B, k, 1] basis positions, selection order (a row-gather index)
    slots: torch.Tensor | None = None  # [B, k] ``blend``: the positions whose own rows blend with basis row j
    order: torch.Tensor | None = None  # [B, K] permutation of [selected rows, basis rows] to the output order
    identity: bool = False
    everything: torch.Tensor | None = None  # traced per-image budget: K == N keeps all (a 0-d bool)
    first: torch.Tensor | None = None  # [K] the first K positions (all of them when ``everything``)
    # formed by the stage kernel instead (an :class:`apet.kernels.apet_stage.StageAssignment`: each token's output
    # row, basis slot and blended slot); the fields above are then unset
    stage: Any = None

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The K rows of ``y`` [B, N, D'] (float32 math, ``y``'s dtype out) formed as the stage formed its own:
        error-selected rows averaged with the rows merged into them, slot rows from the basis rows (blended
        with their own), in the output order."""
        if self.identity:
            return y
        if self.stage is not None:
            return _stage_rows(y, self.stage)
        return self.form(y.to(torch.float32)).to(y.dtype)

    def form(self, y: torch.Tensor, basis_rows: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`apply` in ``y``'s dtype; ``basis_rows``: the basis rows of ``y`` where the stage already read
        them (FPS gathers them anyway)."""
        if self.identity:
            return y
        assert self.selected is not None and self.basis is not None
        if self.members is None:
            rows = gather_tokens(y, self.selected)
        else:
            rows = (self.members @ y) / self.count
        basis = gather_rows(y, self.basis) if basis_rows is None else basis_rows
        if self.slots is not None:
            basis = 0.5 * basis + 0.5 * gather_tokens(y, self.slots)
        rows = torch.cat([rows, basis], 1)
        if self.order is not None:
            rows = gather_tokens(rows, self.order)
        if self.everything is not None:
            rows = torch.where(self.everything, y.index_select(1, self.first), rows)
        return rows


@torch.compiler.disable
def _stage_rows(y: torch.Tensor, stage: Any) -> torch.Tensor:
    """:meth:`Assignment.apply` where the stage kernel formed the rows: its merge launch on ``y`` (eager, like the
    stage itself: :func:`_compress_eagerly`)."""
    return stage.apply(y)


@dataclass(frozen=True)
class StageSelector:
    """One stage's settings bound: the ``select`` a family's vision stages call on their features. Stages may
    read ``config`` (a fixed budget lets Qwen's vision graph keep static output shapes), and a family that
    carries other per-token features along asks for the :class:`Assignment` too (:meth:`assigned`)."""

    config: CompressionConfig

    def __call__(self, x: torch.Tensor) -> Compressed:
        return compress_with(self.config, x)

    def assigned(self, x: torch.Tensor) -> tuple[Compressed, Assignment]:
        return compress_assigned(self.config, x)


def selector(config: CompressionConfig) -> StageSelector:
    return StageSelector(config)


def compress_with(config: CompressionConfig, x: torch.Tensor) -> Compressed:
    """``compress(x)`` with one stage's settings. On the GPU the paper placements run as six Triton launches
    (:mod:`apet.kernels.apet_stage`: the stage's rows and index, without the membership matrix, whose
    ``members``/``targets`` are then None; the torch ops have them)."""
    return compress_assigned(config, x)[0]


def _stage_kernel(config: CompressionConfig, x: torch.Tensor) -> tuple[Compressed, Assignment] | None:
    """The stage in :mod:`apet.kernels.apet_stage` where it applies, else None (the torch ops), with how its rows
    were formed (the per-token :class:`~apet.kernels.apet_stage.StageAssignment`, which a family applies to other
    features of the same tokens: Qwen3-VL's DeepStack levels). Runs eagerly, inside :func:`_compress_eagerly`.
    apet's exporter is the TorchScript one (:mod:`apet.export.onnx_utils`), whose trace runs this function as it
    is: :func:`_stage_kernel_applies` sees the export and answers None, and the torch ops are traced."""
    if not _stage_kernel_applies(config, x):
        return None
    from apet.kernels import apet_stage

    n_tokens = int(x.shape[1])  # K at this N: the fixed keep, or per image int(ratio·N) (config.keep_for)
    stage, index = apet_stage.assign(x, config.keep_for(n_tokens), config.basis, fps_start(n_tokens, config.seed),
                                     GRAM_RIDGE, config.placement)
    return Compressed(stage.apply(x), index), Assignment(stage=stage)


@torch.compiler.disable
def _compress_eagerly(config: CompressionConfig, x: torch.Tensor) -> tuple[Compressed, Assignment]:
    """The stage kernel where it applies, else the torch ops, decided and run eagerly: under ``--compile`` this is
    one graph break, so the kernels run as they are instead of being traced. With the decision traced, the H200's
    torch 2.11 kept Inductor's 76-launch trace of the torch ops (0.195 ms, docs/benchmarks.md, stop 28) where the
    kernel takes six (0.08 ms); ``torch.compiler.is_exporting()`` decides nothing here (torch 2.11 reports it True
    under ``torch.compile``). Where the kernel does not apply the torch ops run here too, so nothing after the graph
    break builds objects in a resumed frame: torch 2.11 failed to reconstruct those (an ``AssertionError`` in
    Dynamo's side effects, on the H200)."""
    kept = _stage_kernel(config, x)
    return kept if kept is not None else _compress_ops(config, x)


def _kernel_candidate(config: CompressionConfig, x: torch.Tensor) -> bool:
    """Whether the stage kernel may apply, asked without a graph break (``--compile`` traces it): it is on (for
    per-image budgets too where they are asked for), and ``x`` lives where its kernels run. Off that, the torch ops
    are traced as they are (no eager detour)."""
    return FUSED["enabled"] and FUSED["stage_kernel"] and (FUSED["per_image"] or not config.per_image) \
        and isinstance(x, torch.Tensor) and (x.is_cuda or _interpreted())


@torch.compiler.assume_constant_result
def _interpreted() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1``): a constant to ``--compile``, so
    reading the environment is no graph break."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _stage_kernel_applies(config: CompressionConfig, x: torch.Tensor) -> bool:
    """Whether :mod:`apet.kernels.apet_stage` computes this stage, asked once :func:`_kernel_candidate` said it may
    (the kernel on, the tensor on its device): FPS with merging, a paper placement, a budget below N (fixed, or per
    image from N: the budget the torch ops take at this N), never while exporting. Invalid settings are left to the
    torch ops' errors."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    if config.method != "fps" or not config.merge or x.dim() != 3 or isinstance(x.shape[1], torch.Tensor):
        return False
    n_tokens = int(x.shape[1])
    try:
        config.validate(n_tokens)
    except (UsageError, InputError):
        return False
    from apet.kernels import apet_stage

    return apet_stage.available(x) and apet_stage.supports(x, config.keep_for(n_tokens), config.basis,
                                                           config.placement)


def compress_assigned(config: CompressionConfig, x: torch.Tensor) -> tuple[Compressed, Assignment]:
    """``compress_with(config, x)`` and how its rows were formed (see :class:`Assignment`; on the GPU, where the
    stage kernel applies, its per-token form, without the membership matrix)."""
    _check_input(x)
    return _compress_eagerly(config, x) if _kernel_candidate(config, x) else _compress_ops(config, x)


def _compress_ops(config: CompressionConfig, x: torch.Tensor) -> tuple[Compressed, Assignment]:
    """The stage as torch ops (what the exporter traces)."""
    if config.per_image:
        return _compress_per_image(x, config)
    n_tokens = int(x.shape[1])
    config.validate(n_tokens)
    if config.keep == n_tokens:
        return _keep_all(x)
    return _compress(x, config, config.keep, n_tokens)


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
    centre = x.index_select(1, torch.full((1,), start, dtype=torch.long, device=x.device))  # [B, 1, D]
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
    index = torch.cat([first, *picks], 1)  # [B, k, 1]
    return Basis(torch.cat(rows, 1), index.squeeze(-1), index)


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
    return Basis.at(x, index)


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


def _targets(ranked: torch.Tensor, n_selected: int | torch.Tensor, merge: bool, positions: torch.Tensor,
             nearest: Nearest, outside: torch.Tensor | None = None, all_selected: bool = False) \
        -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The error-selected tokens (the first ``n_selected`` of ``ranked``, in the reference's order: ties go to the
    earliest) and, merging, who is averaged into each: every token not in ``ranked`` (nor in ``outside``
    [B, 1, N]) joins its cosine-nearest target, which becomes (itself + Σ assigned) / (1 + count). Returns
    (selected [B, T], members [B, T, N], count [B, T, 1]); the merge is then one batched matmul over the 0/1
    membership matrix, no scatter."""
    selected = ranked if all_selected else take(ranked, 1, 0, n_selected)
    if not merge:
        return selected, None, None
    onehot = _one_hot(ranked, positions)  # [B, R, N]
    kept = onehot.sum(1, keepdim=True)
    dropped = 1.0 - (kept if outside is None else torch.maximum(kept, outside))  # [B, 1, N]
    targets = onehot if all_selected else take(onehot, 1, 0, n_selected)  # [B, T, N]
    near = nearest(targets, selected)  # [B, 1, N]
    assigned = (torch.arange(n_selected, device=ranked.device).unsqueeze(-1) == near).to(torch.float32)
    members = assigned * dropped + targets  # each target counts itself
    return selected, members, members.sum(-1, keepdim=True)


def _ascending_order(index: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """The permutation that sorts ``count`` int64 positions ascending (TopK on float32: exact below 2^24, and
    a TopK every TensorRT parses, unlike int64 Sort)."""
    return torch.topk(index.to(torch.float32), count, dim=1, largest=False, sorted=True).indices


def _paper(errors: torch.Tensor, basis: Basis, keep: int | torch.Tensor, merge: bool, placement: str,
           positions: torch.Tensor, nearest: Nearest) -> tuple[torch.Tensor, Assignment]:
    """The authors' ranking over all tokens, merge set and basis placement (see the module docstring):
    the output positions and the :class:`Assignment` that forms their rows."""
    k = int(basis.rows.shape[1])
    n_selected = keep - k
    appended = placement in ("append", "append_spatial")
    ranked = torch.topk(errors, n_selected if appended else keep, dim=1).indices  # descending error
    selected, members, count = _targets(ranked, n_selected, merge, positions, nearest, all_selected=appended)
    formed = Assignment(selected, members, count, basis.picks)
    if placement == "append":
        return torch.cat([selected, basis.index], 1), formed
    slots = None
    if appended:
        index = torch.cat([selected, basis.index], 1)
    elif placement == "rank":  # slot top[K-k+j] gets basis vector j: the index is ``ranked`` itself
        index = ranked
    else:  # mask / blend: basis j to the j-th smallest slot
        slots = take(ranked, 1, n_selected, keep)
        slots = torch.gather(slots, 1, _ascending_order(slots, k))
        index = torch.cat([selected, slots], 1)
    order = _ascending_order(index, keep)
    formed = formed._replace(slots=slots if placement == "blend" else None, order=order)
    return torch.gather(index, 1, order), formed


def _own(errors: torch.Tensor, basis: Basis, keep: int, merge: bool, positions: torch.Tensor,
         nearest: Nearest) -> tuple[torch.Tensor, Assignment]:
    """Ablation: basis excluded from the ranking, kept at its own positions, never merged."""
    k = int(basis.rows.shape[1])
    is_basis = _one_hot(basis.index, positions).amax(1, keepdim=True)  # [B, 1, N]
    ranked = torch.topk(errors.masked_fill(is_basis[:, 0] > 0, _NEG), keep - k, dim=1).indices
    selected, members, count = _targets(ranked, keep - k, merge, positions, nearest, outside=is_basis,
                                        all_selected=True)
    index = torch.cat([selected, basis.index], 1)
    order = _ascending_order(index, keep)
    return torch.gather(index, 1, order), Assignment(selected, members, count, basis.picks, order=order)


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
    config = CompressionConfig(keep=keep, basis=basis, method=method, merge=merge, seed=seed, placement=placement,
                               keep_ratio=keep_ratio, max_tokens=max_tokens)
    return compress_assigned(config, x)[0]


def _keep_all(x: torch.Tensor) -> tuple[Compressed, Assignment]:
    index = torch.zeros_like(x[:, :, 0], dtype=torch.long) + torch.arange(x.shape[1], device=x.device)
    return Compressed(x, index), Assignment(identity=True)


def _plan(x32: torch.Tensor, config: CompressionConfig, keep: int | torch.Tensor,
          n_tokens: int | torch.Tensor) -> tuple[torch.Tensor, Assignment, Basis]:
    """The algorithm for K = ``keep`` of N = ``n_tokens`` (Python ints, or traced 0-d tensors when N is symbolic:
    then ``positions`` is a Range of it, else a constant): the output positions, how the rows are formed, and
    the basis (whose rows FPS has read already)."""
    positions = torch.arange(n_tokens, device=x32.device)
    if config.method == "fps" and _fused_available(x32):
        from apet.kernels import apet_fused

        gram = apet_fused.token_gram(x32)
        index, errors = apet_fused.fps_errors(gram, config.basis, fps_start(int(x32.shape[1]), config.seed),
                                              GRAM_RIDGE)
        basis = Basis.at(x32, index)
        nearest: Nearest = lambda _onehot, targets: apet_fused.cosine_nearest(gram, targets).unsqueeze(1)  # noqa: E731
    else:
        basis = select_basis(x32, config.basis, config.method, config.seed)
        errors = _errors(x32, basis.rows)
        nearest = _plain_nearest(x32)
    if config.placement == "own":
        index, formed = _own(errors, basis, keep, config.merge, positions, nearest)
    else:
        index, formed = _paper(errors, basis, keep, config.merge, config.placement, positions, nearest)
    return index, formed, basis


def _formed(x: torch.Tensor, x32: torch.Tensor, index: torch.Tensor, formed: Assignment,
            basis: Basis) -> tuple[Compressed, Assignment]:
    """The stage's own rows, formed by its assignment (one home for how rows are formed)."""
    tokens = formed.form(x32, basis.rows).to(x.dtype)
    return Compressed(tokens, index, formed.members, formed.selected if formed.members is not None else None), formed


def _compress(x: torch.Tensor, config: CompressionConfig, keep: int,
              n_tokens: int) -> tuple[Compressed, Assignment]:
    x32 = x.to(torch.float32)
    index, formed, basis = _plan(x32, config, keep, n_tokens)
    return _formed(x, x32, index, formed, basis)


# The Triton path runs one program per image, so its serial loops grow with N: on the H100 it took 0.17 ms at
# N = 96 (stage 2; the graphed plain path 0.36 ms) but 0.63 ms at N = 576 (stage 1; the plain path 0.34 ms
# compiled + graphed), docs/benchmarks.md. Above ``max_tokens`` the plain path runs. ``enabled = False`` turns it
# off (to compare), ``max_tokens = None`` lifts the size limit (the kernel tests). ``stage_kernel``: the whole stage
# in :mod:`apet.kernels.apet_stage` for :func:`compress_with` (False: the path above, to compare).
# ``per_image``: the stage kernel for per-image budgets too (Qwen2.5-VL, K = keep_for(N)); on since its merge tiles
# output rows (H200, N = 2025, K = 607: 0.28 ms in 7 kernels against the torch ops' 1.05 ms in 78,
# docs/benchmarks.md); False runs the torch ops, to compare.
FUSED: dict = {"enabled": True, "max_tokens": 256, "stage_kernel": True, "per_image": True}


def _fused_available(x: torch.Tensor) -> bool:
    """The Triton path of :mod:`apet.kernels.apet_fused`: GPU tensors up to ``FUSED["max_tokens"]`` tokens per
    image, never while exporting to ONNX."""
    if not FUSED["enabled"] or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    if FUSED["max_tokens"] is not None and int(x.shape[1]) > FUSED["max_tokens"]:
        return False
    from apet.kernels import apet_fused

    return apet_fused.available(x)


def _compress_per_image(x: torch.Tensor, config: CompressionConfig) -> tuple[Compressed, Assignment]:
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
    x32 = x.to(torch.float32)
    index, formed, basis = _plan(x32, config, keep, n_tokens)
    everything = n_tokens == keep
    first = torch.arange(keep, device=x.device)  # the first K positions: all of them when K = N
    formed = formed._replace(everything=everything, first=first)
    return _formed(x, x32, torch.where(everything, first, index), formed, basis)


class CompressionModule(torch.nn.Module):
    """``compress`` with its static settings bound, for tracing and ONNX export."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = compress_with(self.config, x)
        return out.tokens, out.index

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
float32 where the authors merge in fp16/bf16; the least-squares fit uses a
Cholesky factor of the k×k Gram matrix (unrolled in graphs, :mod:`apet.linalg`;
LAPACK in eager calls) where the authors call an LU solve — the same projection
in exact arithmetic. Degenerate inputs where a basis token
itself ranks in ``top`` behave as the reference does (the basis vector then
appears twice).

The same function runs eagerly, under CUDA-graph capture / ``torch.compile``
and inside ``torch.onnx.export``: k and K are Python ints (static in the
graph), there is no data-dependent Python control flow, no host sync and no
``torch.linalg`` in traced code. All math is float32 whatever the input dtype,
because the Gram system is ill-conditioned in fp16.

Families whose token count N varies per image (Qwen2.5-VL's dynamic resolution)
set ``max_tokens``: the graph is then traced with a symbolic N, and the budget
is either fixed (``keep``) or the authors' per-image ``int(keep_ratio·N)``
(:meth:`CompressionConfig.keep_for`, the one home of that rule). In a graph the
per-image K is looked up in a constant table indexed by N — a shape computation
TensorRT accepts as TopK's K — so the engine reproduces the float64 ``int(r·N)``
of the reference exactly for every N the processor can produce.

How the K rows were formed (which tokens were kept, which were merged into which, where the basis
went) is an :class:`Assignment` (:func:`compress_assigned`): the rows are computed by applying it to
X, and a family applies the same assignment to other per-token features of the same image (Qwen3-VL's
DeepStack levels, docs/algorithm.md) instead of recomputing a selection on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from apet.contracts.compression import DPC_NEIGHBOURS, GRAM_RIDGE, METHODS, CompressionConfig
from apet.errors import InputError, UsageError
from apet.linalg import whiten

_NEG = torch.finfo(torch.float32).min
Nearest = Callable[[torch.Tensor], torch.Tensor]  # targets [B, T] -> index of the cosine-nearest target [B, N]


class Compressed(NamedTuple):
    """Kept tokens [B, K, D] (input dtype) and their original positions [B, K] (int64)."""

    tokens: torch.Tensor
    index: torch.Tensor


class Assignment(NamedTuple):
    """How one stage formed its K rows from the N tokens of each image (docs/algorithm.md, steps 3-6), as
    tensors of the traced graph: :meth:`apply` forms the same rows from any per-token features [B, N, D'] of the
    same images (the stage's own rows are ``apply(x)``). ``identity``: every token kept as it is. (A NamedTuple:
    ``torch.compile`` traces it without graph breaks.)"""

    selected: torch.Tensor | None = None  # [B, S] error-selected positions, in error order (the merge targets)
    nearest: torch.Tensor | None = None  # [B, N] each token's target (index into ``selected``); None: no merge
    dropped: torch.Tensor | None = None  # [B, N] 1.0 for the tokens averaged into their target
    basis: torch.Tensor | None = None  # [B, k] basis positions, FPS order
    slots: torch.Tensor | None = None  # [B, k] positions receiving basis vector j (None: basis at its own place)
    blend: bool = False  # slots get 0.5·basis_j + 0.5·their own value
    order: torch.Tensor | None = None  # [B, K] permutation of [selected, slot/basis rows] to the output order
    identity: bool = False
    everything: torch.Tensor | None = None  # traced per-image budget: K == N keeps all (a 0-d bool)
    keep: int | torch.Tensor | None = None  # that K

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The K rows of ``y`` [B, N, D'] (float32 math, ``y``'s dtype out) formed as the stage formed its own:
        error-selected rows averaged with the rows merged into them, slot rows from the basis rows (blended
        with their own), in the output order."""
        if self.identity:
            return y
        y32 = y.to(torch.float32)
        assert self.selected is not None and self.basis is not None
        if self.nearest is None or self.dropped is None:
            rows = gather_tokens(y32, self.selected)
        else:
            rows = merge_into(y32, self.selected, self.dropped, self.nearest)
        basis = gather_tokens(y32, self.basis)
        if self.slots is not None and self.blend:
            basis = 0.5 * basis + 0.5 * gather_tokens(y32, self.slots)
        rows = torch.cat([rows, basis], 1)
        if self.order is not None:
            rows = gather_tokens(rows, self.order)
        if self.everything is not None:
            rows = torch.where(self.everything, y32[:, :self.keep], rows)
        return rows.to(y.dtype)


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
    """``compress(x)`` with one stage's settings."""
    return compress_assigned(config, x)[0]


def compress_assigned(config: CompressionConfig, x: torch.Tensor) -> tuple[Compressed, Assignment]:
    """``compress_with(config, x)`` and how its rows were formed (see :class:`Assignment`)."""
    _check_input(x)
    if config.per_image:
        return _compress_per_image(x, config)
    n_tokens = int(x.shape[1])
    config.validate(n_tokens)
    if config.keep == n_tokens:
        return _keep_all(x)
    return _compress(x, config, config.keep)


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


def _one_hot(index: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """index [..., M] -> [..., M, N] float one-hot rows; a matmul-friendly scatter."""
    positions = torch.arange(n_tokens, device=index.device)  # n_tokens may be a traced length
    return (index.unsqueeze(-1) == positions).to(torch.float32)


def _members(index: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """index [B, M] -> [B, N] float: 1 where a position is in ``index``."""
    return _one_hot(index, n_tokens).amax(1)


def farthest_point_basis(x: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """k token indices [B, k] by plain farthest-point sampling (squared Euclidean) from ``start``.

    As in the reference: a running minimum of squared distances, next = argmax (first on ties),
    chosen tokens not masked. The centre is picked with a one-hot sum rather than a gather, which
    is exact in any precision and keeps the unrolled graph free of per-step shape arithmetic.
    """
    positions = torch.arange(x.shape[1], device=x.device)
    index = torch.zeros_like(x[:, 0, 0], dtype=torch.long) + start  # [B]
    chosen = [index]
    nearest: torch.Tensor | None = None
    for _ in range(k - 1):
        pick = (positions == index.unsqueeze(-1)).to(x.dtype).unsqueeze(-1)  # [B, N, 1]
        centre = (x * pick).sum(1, keepdim=True)  # [B, 1, D]
        diff = x - centre
        dist = (diff * diff).sum(-1)
        nearest = dist if nearest is None else torch.minimum(nearest, dist)
        index = torch.argmax(nearest, dim=1)
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


def fps_start(n_tokens: int, seed: int | None) -> int:
    """Token 0, or a seeded start (the authors draw a random start per call)."""
    return 0 if seed is None else int(_rng(seed).integers(n_tokens))


def select_basis(x: torch.Tensor, k: int, method: str = "fps", seed: int | None = None) -> torch.Tensor:
    """Basis token indices [B, k] in selection order by ``method``."""
    if method == "fps":
        return farthest_point_basis(x, k, fps_start(int(x.shape[1]), seed))
    if method == "dpc":
        return density_peak_basis(x, k)
    if method == "random":
        return random_basis(x, k, 0 if seed is None else seed)
    raise UsageError(f"method={method!r} is unknown", f"use one of {', '.join(METHODS)}")


def _whiten(gram: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Q = L⁻¹ S for G = L Lᵀ. Eager calls use LAPACK/cuSOLVER (two kernels instead of ~130 tiny ones);
    tracing, compiling and CUDA-graph capture use the unrolled, exportable version. A failed
    factorisation falls back too."""
    if _host_checks_allowed():
        lower, info = torch.linalg.cholesky_ex(gram)
        if not bool(info.any()):
            return torch.linalg.solve_triangular(lower, basis, upper=False)
    return whiten(gram, basis)


def basis_errors(x: torch.Tensor, basis_index: torch.Tensor) -> torch.Tensor:
    """Per-token least-squares reconstruction error ||x_i - x̂_i||_2 from the basis, float32 [B, N].

    G = S Sᵀ + 1e-5·I, C = G⁻¹ S Xᵀ, X̂ = Cᵀ S — computed as X̂ = (Q Xᵀ)ᵀ Q with Q = L⁻¹ S and
    G = L Lᵀ, which is the same matrix (Sᵀ G⁻¹ S = Qᵀ Q) with one triangular solve instead of two.
    The basis order does not matter.
    """
    x32 = x.to(torch.float32)
    basis = gather_tokens(x32, basis_index)  # [B, k, D]
    k = int(basis_index.shape[1])
    ridge = GRAM_RIDGE * torch.eye(k, dtype=torch.float32, device=x.device)
    q = _whiten(basis @ basis.transpose(1, 2) + ridge, basis)  # [B, k, D]
    residual = x32 - (x32 @ q.transpose(1, 2)) @ q
    return torch.sqrt((residual * residual).sum(-1))


def _ascending_order(index: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts int64 positions ascending (TopK on float32: exact below 2^24, and
    a TopK every TensorRT parses, unlike int64 Sort)."""
    return torch.topk(index.to(torch.float32), index.shape[1], dim=1, largest=False, sorted=True).indices


def _ascending(index: torch.Tensor) -> torch.Tensor:
    return torch.gather(index, 1, _ascending_order(index))


def cosine_nearest(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For every token, the index into ``targets`` of its most cosine-similar target, [B, N] (first on ties)."""
    unit = x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(1e-12)
    return torch.argmax(gather_tokens(unit, targets) @ unit.transpose(1, 2), dim=1)


def merge_into(x: torch.Tensor, targets: torch.Tensor, dropped: torch.Tensor,
               nearest: torch.Tensor | None = None) -> torch.Tensor:
    """Average every dropped token into its most cosine-similar target; returns [B, T, D] float32.

    ``targets`` [B, T] in the reference's order (ties go to the earliest target), ``dropped`` [B, N]
    is 1 for tokens to merge, ``nearest`` the assignment if already known (the fused GPU path).
    Each target becomes (itself + Σ assigned) / (1 + count).
    """
    n_tokens = x.shape[1]  # a traced length when N is symbolic
    nearest = cosine_nearest(x, targets) if nearest is None else nearest
    assigned = _one_hot(nearest, targets.shape[1]) * dropped.unsqueeze(-1)  # [B, N, T]
    members = assigned + _one_hot(targets, n_tokens).transpose(1, 2)  # each target counts itself
    total = members.transpose(1, 2) @ x  # [B, T, D]
    return total / members.sum(1).unsqueeze(-1)


def _merge_plan(x: torch.Tensor, selected: torch.Tensor, ranked: torch.Tensor, merge: bool, nearest: Nearest,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(nearest target, dropped) for merging every token outside ``ranked`` (and ``exclude``) into the
    error-selected tokens; (None, None) without merging."""
    if not merge:
        return None, None
    n_tokens = x.shape[1]
    outside = _members(ranked, n_tokens) if exclude is None else \
        torch.maximum(_members(ranked, n_tokens), _members(exclude, n_tokens))
    return nearest(selected), 1.0 - outside


def _formed(x: torch.Tensor, assignment: Assignment, index: torch.Tensor) -> tuple[Compressed, Assignment]:
    return Compressed(assignment.apply(x), index), assignment


def _paper(x: torch.Tensor, errors: torch.Tensor, basis_index: torch.Tensor, keep: int, merge: bool,
           placement: str, nearest: Nearest) -> tuple[Compressed, Assignment]:
    """The authors' ranking over all tokens, merge set and basis placement (see the module docstring)."""
    k = int(basis_index.shape[1])
    appended = placement in ("append", "append_spatial")
    ranked = torch.topk(errors, keep - k if appended else keep, dim=1).indices  # descending error
    selected = ranked[:, : keep - k]
    targets, dropped = _merge_plan(x, selected, ranked, merge, nearest)
    if appended:
        index = torch.cat([selected, basis_index], 1)
        order = _ascending_order(index) if placement == "append_spatial" else None
        assignment = Assignment(selected, targets, dropped, basis_index, order=order)
        return _formed(x, assignment, index if order is None else torch.gather(index, 1, order))
    slots = ranked[:, keep - k:]
    if placement in ("mask", "blend"):
        slots = _ascending(slots)
    index = torch.cat([selected, slots], 1)
    order = _ascending_order(index)
    assignment = Assignment(selected, targets, dropped, basis_index, slots, placement == "blend", order)
    return _formed(x, assignment, torch.gather(index, 1, order))


def _own(x: torch.Tensor, errors: torch.Tensor, basis_index: torch.Tensor, keep: int, merge: bool,
         nearest: Nearest) -> tuple[Compressed, Assignment]:
    """Ablation: basis excluded from the ranking, kept at its own positions, never merged."""
    k = int(basis_index.shape[1])
    is_basis = _members(basis_index, x.shape[1]) > 0
    selected = torch.topk(errors.masked_fill(is_basis, _NEG), keep - k, dim=1).indices
    targets, dropped = _merge_plan(x, selected, selected, merge, nearest, exclude=basis_index)
    index = torch.cat([selected, basis_index], 1)
    order = _ascending_order(index)
    return _formed(x, Assignment(selected, targets, dropped, basis_index, order=order), torch.gather(index, 1, order))


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


def _compress(x: torch.Tensor, config: CompressionConfig, keep: int | torch.Tensor) \
        -> tuple[Compressed, Assignment]:
    """The algorithm for K = ``keep`` (a Python int, or a traced 0-d tensor when N is symbolic)."""
    x32 = x.to(torch.float32)
    if config.method == "fps" and _fused_available(x32):
        from apet.kernels import apet_fused

        gram = apet_fused.token_gram(x32)
        basis_index, errors = apet_fused.fps_errors(gram, config.basis, fps_start(int(x.shape[1]), config.seed),
                                                       GRAM_RIDGE)
        nearest: Nearest = lambda targets: apet_fused.cosine_nearest(gram, targets)  # noqa: E731
    else:
        basis_index = select_basis(x32, config.basis, config.method, config.seed)
        errors = basis_errors(x32, basis_index)
        nearest = lambda targets: cosine_nearest(x32, targets)  # noqa: E731
    if config.placement == "own":
        kept, assignment = _own(x32, errors, basis_index, keep, config.merge, nearest)
    else:
        kept, assignment = _paper(x32, errors, basis_index, keep, config.merge, config.placement, nearest)
    return Compressed(kept.tokens.to(x.dtype), kept.index), assignment


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


def _compress_per_image(x: torch.Tensor, config: CompressionConfig) -> tuple[Compressed, Assignment]:
    """N varies per image: eagerly K = ``keep_for(N)``; traced, K is a shape computation of the symbolic N
    (a constant table lookup) and K = N keeps everything through a Where, so both agree for every N."""
    n_tokens = x.shape[1]
    if config.keep_ratio is not None and config.keep_ratio >= 1.0:
        return _keep_all(x)
    if not isinstance(n_tokens, torch.Tensor):  # eager
        config.validate(n_tokens)
        keep = config.keep_for(n_tokens)
        return _keep_all(x) if keep == n_tokens else _compress(x, config, keep)
    config.validate(config.max_tokens)
    table = torch.tensor([config.keep_for(n) for n in range(config.max_tokens + 1)], device=x.device)
    keep = table[n_tokens.clamp(max=config.max_tokens)] if config.keep_ratio is not None else config.keep
    kept, assignment = _compress(x, config, keep)
    everything = n_tokens == keep
    positions = torch.zeros_like(kept.index) + torch.arange(keep, device=x.device)
    kept = Compressed(torch.where(everything, x[:, :keep], kept.tokens), torch.where(everything, positions, kept.index))
    return kept, assignment._replace(everything=everything, keep=keep)


class CompressionModule(torch.nn.Module):
    """``compress`` with its static settings bound, for tracing and ONNX export."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = compress_with(self.config, x)
        return out.tokens, out.index

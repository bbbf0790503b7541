"""ApET's static settings, torch-free (docs/algorithm.md): what one stage keeps and how it places the basis.

The manifest, the planner, engines and the deployed runtime read these without importing torch; the
torch implementation that applies them is :mod:`apet.compression` (``compress_with(config, x)``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from apet.errors import InputError, UsageError

METHODS = ("fps", "dpc", "random")
PLACEMENTS = ("mask", "rank", "blend", "append", "append_spatial", "own")
# the user's choice; the family and stage turn it into a PLACEMENT (resolve_placement)
BASIS_PLACEMENTS = ("paper", "own", "spatial")
GRAM_RIDGE = 1e-5
DPC_NEIGHBOURS = 5


@dataclass(frozen=True)
class CompressionConfig:
    """Static settings of one ApET stage; validated against the token count it will see."""

    keep: int
    basis: int = 10
    method: str = "fps"
    merge: bool = True
    seed: int | None = None
    placement: str = "mask"
    keep_ratio: float | None = None  # per-image budget int(keep_ratio·N) (Qwen2.5-VL); needs max_tokens
    max_tokens: int | None = None  # N varies per image, up to this (graphs see a symbolic N)

    @property
    def per_image(self) -> bool:
        """Whether N varies per image (dynamic resolution): budgets and graphs are per-image."""
        return self.max_tokens is not None

    def keep_for(self, n_tokens: int) -> int:
        """K for an image of N tokens: ``keep``, or the authors' ``int(keep_ratio·N)`` clamped to
        [basis+1, N] (their code fails below basis+1 kept tokens; docs/algorithm.md, deliberate differences)."""
        if self.keep_ratio is None:
            return min(self.keep, n_tokens)
        if self.keep_ratio >= 1.0:
            return n_tokens
        return min(n_tokens, max(self.basis + 1, int(self.keep_ratio * n_tokens)))

    def validate(self, n_tokens: int) -> None:
        if not isinstance(self.basis, int) or self.basis < 1:
            raise UsageError(f"basis={self.basis!r} is invalid; allowed range is [1, {max(n_tokens - 1, 1)}]",
                             "pass --basis 10 (the paper's default) or another positive integer")
        if self.per_image:
            self._validate_per_image(n_tokens)
        elif self.keep_ratio is not None:
            raise UsageError("keep_ratio needs max_tokens (the largest per-image token count)",
                             "set max_tokens, or use a fixed keep")
        elif not isinstance(self.keep, int) or not (self.basis + 1 <= self.keep <= n_tokens):
            raise UsageError(
                f"keep={self.keep!r} is outside the allowed range [{self.basis + 1}, {n_tokens}] "
                f"(basis={self.basis}, {n_tokens} tokens)",
                "keep at least basis+1 tokens and at most all of them",
            )
        if self.method not in METHODS:
            raise UsageError(f"method={self.method!r} is unknown", f"use one of {', '.join(METHODS)}")
        if self.placement not in PLACEMENTS:
            raise UsageError(f"placement={self.placement!r} is unknown", f"use one of {', '.join(PLACEMENTS)}")

    def _validate_per_image(self, n_tokens: int) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UsageError(f"max_tokens={self.max_tokens!r} is invalid", "pass a positive token count")
        if not 0 < n_tokens <= self.max_tokens:
            raise InputError(f"an image with {n_tokens} tokens is outside this budget's range [1, {self.max_tokens}]",
                             "preprocess images with the artifact's processor (its max_pixels bounds N)")
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not 0.0 < self.keep_ratio <= 1.0:
                raise UsageError(f"keep_ratio={self.keep_ratio!r} is outside (0, 1]", "pass e.g. --ratio 0.3")
        elif not isinstance(self.keep, int) or not self.basis + 1 <= self.keep <= self.max_tokens:
            raise UsageError(f"keep={self.keep!r} is outside the allowed range [{self.basis + 1}, {self.max_tokens}]",
                             "keep at least basis+1 tokens and at most the largest image's")
        elif n_tokens < self.keep:
            raise InputError(f"an image with {n_tokens} tokens is below the fixed budget of {self.keep}",
                             "preprocess images with the artifact's processor (it resizes them to at least K tokens)")
        if self.seed is not None or self.method == "random":
            raise UsageError("a seeded FPS start or a random basis needs a fixed token count",
                             "drop --seed / use --basis-method fps or dpc for dynamic-resolution models")

    def with_keep(self, keep: int) -> "CompressionConfig":
        return replace(self, keep=keep)


@dataclass(frozen=True)
class Stage2Config:
    """Second ApET stage: after layer ``layer`` - 1, the K1-token image span becomes ``compression.keep``."""

    layer: int
    span: int  # K1
    compression: CompressionConfig

    @property
    def keep(self) -> int:
        return self.compression.keep

    @property
    def removed(self) -> int:
        return self.span - self.compression.keep


def resolve_placement(basis_placement: str, paper_placement: str) -> str:
    """The user's ``--basis-placement`` at a stage whose paper semantics are ``paper_placement``: ``paper``;
    ``own`` (ablation: basis kept at its own positions); ``spatial`` (ablation: the paper's tokens in position
    order, which only changes ``append`` — every other placement already outputs position order)."""
    if basis_placement not in BASIS_PLACEMENTS:
        raise UsageError(f"--basis-placement {basis_placement!r} is unknown",
                         "use paper (the authors' algorithm, default), own or spatial (ablations)")
    if basis_placement == "spatial":
        return "append_spatial" if paper_placement == "append" else paper_placement
    return paper_placement if basis_placement == "paper" else "own"


def stage_configs(stage1_keep: int, stage2: tuple[int, int] | None, basis: int = 10, method: str = "fps",
                  merge: bool = True, seed: int | None = None, basis_placement: str = "paper",
                  stage1_placement: str = "mask", keep_ratio: float | None = None,
                  max_tokens: int | None = None) -> tuple[CompressionConfig, Stage2Config | None]:
    """The two stages' configs from budgets: K1, and (layer L, K2) or None; both stages share basis settings.

    ``stage1_placement`` is the family's paper placement at the vision output (LLaVA: mask); the
    second stage always uses the LLM-side ``rank`` placement of the reference's ``layer_prune``.
    ``keep_ratio`` / ``max_tokens`` make stage 1 per-image (see :class:`CompressionConfig`).
    """
    def config(keep: int, paper: str) -> CompressionConfig:
        return CompressionConfig(keep=keep, basis=basis, method=method, merge=merge, seed=seed,
                                 placement=resolve_placement(basis_placement, paper))

    first = replace(config(stage1_keep, stage1_placement), keep_ratio=keep_ratio, max_tokens=max_tokens)
    if stage2 is None:
        return first, None
    layer, keep = stage2
    return first, Stage2Config(layer=layer, span=stage1_keep, compression=config(keep, "rank"))

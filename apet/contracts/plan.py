"""The compression plan: what ApET keeps where, in one type that export, runtime, engines, bench and
eval all read (and the manifest serialises).

Budgets: ``--ratio r`` is the mean retained fraction over the LLM's layers, as the
paper reports it: two stages keep K1 = 1.5·r·N up to layer L = layers/2 and
K2 = 0.5·r·N after it (for r > 2/3, K1 = N and K2 = (2r-1)·N); one stage keeps
r·N at the vision output. Budgets round to the nearest multiple of 8
(tensor-core friendly) and never exceed N; ``--tokens K[,K2]`` sets them exactly.

Dynamic-resolution families (``per_image``: N varies per image, up to ``n_tokens``) follow their
authors instead: ``--ratio r`` keeps ``int(r·N)`` of each image (no rounding, one stage), and
``--tokens K`` a fixed K per image (static shapes for engines; the processor then resizes images
to at least K tokens).

One place where family facts meet budgets: a validated :class:`Budget` (what the user asked for) and
:func:`plan_for` (that budget for one model spec and family). ``plan_compression`` is the arithmetic
underneath, kept for tests and scripts that pin every fact by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Protocol

from apet.contracts.budget_options import check_budget_options  # noqa: F401  (re-exported: one home)
from apet.contracts.budget_options import parse_tokens as _parse_tokens
from apet.contracts.compression import BASIS_PLACEMENTS, CompressionConfig, Stage2Config, stage_configs
from apet.errors import UsageError


@dataclass(frozen=True)
class CompressionPlan:
    """Stage 1 at the vision output, optional stage 2 after LLM layer L-1, and how they were chosen."""

    stage1: CompressionConfig
    stage2: Stage2Config | None = None
    ratio: float | None = None
    basis_placement: str = "paper"
    rule: str = "apet"  # token-selection rule (apet.selection); exported artifacts are always ApET

    # -- derived facts (one home each) -------------------------------------------------------------
    @property
    def stage1_keep(self) -> int:
        """Visual tokens per image (per view / frame) at the LLM input: K1."""
        return self.stage1.keep

    @property
    def removed_at_stage2(self) -> int:
        return 0 if self.stage2 is None else self.stage2.removed

    def mean_tokens(self, num_layers: int) -> float:
        """The per-layer mean of visual tokens the paper reports as its budget."""
        if self.stage2 is None:
            return float(self.stage1_keep)
        after = num_layers - self.stage2.layer
        return (self.stage1_keep * self.stage2.layer + self.stage2.compression.keep * after) / num_layers

    def budget_summary(self, n_tokens: int) -> str:
        """Stage 1 in words for the CLI and ``apet inspect`` (``n_tokens``: per image, or the most per image)."""
        s1 = self.stage1
        if not s1.per_image:
            return f"{n_tokens} -> {s1.keep} visual tokens"
        if s1.keep_ratio is None:
            return f"N <= {n_tokens} per image (resized to N >= {s1.keep}) -> {s1.keep} visual tokens"
        if s1.keep_ratio >= 1.0:
            return f"all N <= {n_tokens} visual tokens per image"
        return f"N <= {n_tokens} per image -> int({s1.keep_ratio:g}*N) visual tokens (<= {s1.keep})"

    def with_rule(self, rule: str) -> "CompressionPlan":
        return replace(self, rule=rule)

    # -- serialisation -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        stage2 = None if self.stage2 is None else {"layer": self.stage2.layer, "span": self.stage2.span,
                                                   **_config_json(self.stage2.compression)}
        return {"ratio": self.ratio, "rule": self.rule, "basis_placement": self.basis_placement,
                "stage1": _config_json(self.stage1), "stage2": stage2}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CompressionPlan":
        """Raises KeyError/TypeError/ValueError on malformed data (the manifest reader turns them into
        ArtifactError)."""
        stage2 = data.get("stage2")
        ratio = data.get("ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise TypeError("compression.ratio is not a number")
        return cls(
            stage1=_config_from_json(data["stage1"]),
            stage2=None if stage2 is None else Stage2Config(layer=_int(stage2["layer"]), span=_int(stage2["span"]),
                                                            compression=_config_from_json(stage2)),
            ratio=None if ratio is None else float(ratio), basis_placement=str(data.get("basis_placement", "paper")),
            rule=str(data.get("rule", "apet")),
        )


def _config_json(config: CompressionConfig) -> dict[str, Any]:
    return {"keep": config.keep, "basis": config.basis, "method": config.method, "merge": config.merge,
            "seed": config.seed, "placement": config.placement, "keep_ratio": config.keep_ratio,
            "max_tokens": config.max_tokens}


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _config_from_json(data: Mapping[str, Any]) -> CompressionConfig:
    seed, ratio, max_tokens = data.get("seed"), data.get("keep_ratio"), data.get("max_tokens")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        raise TypeError("keep_ratio is not a number")
    return CompressionConfig(keep=_int(data["keep"]), basis=_int(data["basis"]), method=str(data["method"]),
                             merge=bool(data["merge"]), seed=None if seed is None else _int(seed),
                             placement=str(data["placement"]), keep_ratio=None if ratio is None else float(ratio),
                             max_tokens=None if max_tokens is None else _int(max_tokens))


def round_to_8(value: float, limit: int) -> int:
    return min(limit, max(8, 8 * int(value / 8 + 0.5)))


def _budgets(n_tokens: int, ratio: float | None, stages: int, tokens: str | None) -> tuple[int, int | None]:
    if tokens is not None:
        values = _parse_tokens(tokens)
        return values[0], (values[1] if len(values) == 2 else None)
    if ratio is None or not (0.0 < ratio <= 1.0):
        raise UsageError(f"--ratio {ratio!r} is outside the allowed range (0, 1]",
                         "pass the mean retained fraction, e.g. --ratio 0.11 (64 of 576 tokens)")
    if stages == 1:
        return round_to_8(ratio * n_tokens, n_tokens), None
    k1 = round_to_8(min(1.5 * ratio, 1.0) * n_tokens, n_tokens)
    k2 = round_to_8((0.5 * ratio if ratio <= 2 / 3 else 2 * ratio - 1) * n_tokens, n_tokens)
    return k1, (None if k2 >= k1 else k2)  # nothing to remove at stage 2 (e.g. ratio 1.0)


def _least_ratio(n_tokens: int, stages: int, basis: int) -> float | None:
    """The smallest ``--ratio`` (in steps of 0.01) whose budgets all keep more than ``basis`` tokens."""
    for step in range(1, 101):
        k1, k2 = _budgets(n_tokens, step / 100, stages, None)
        if all(k is None or k == n_tokens or basis < k <= n_tokens for k in (k1, k2)):
            return step / 100
    return None


def plan_compression(n_tokens: int, num_layers: int, *, ratio: float | None = None, stages: int = 2,
                     tokens: str | None = None, basis: int = 10, method: str = "fps", merge: bool = True,
                     seed: int | None = None, basis_placement: str = "paper", stage1_placement: str = "mask",
                     stage2_layer: int | None = None, rule: str = "apet", per_image: bool = False) -> CompressionPlan:
    """Turn the user's budget options into a validated plan with static keeps (``per_image``: see the module
    docstring; ``n_tokens`` is then the most tokens one image can have)."""
    if stages not in (1, 2):
        raise UsageError(f"--stages {stages} is invalid", "use --stages 1 or --stages 2")
    if basis_placement not in BASIS_PLACEMENTS:
        raise UsageError(f"--basis-placement {basis_placement!r} is unknown",
                         "use paper (the authors' algorithm, default) or own (ablation)")
    if per_image:
        return _per_image_plan(n_tokens, ratio=ratio, stages=stages, tokens=tokens, basis=basis, method=method,
                               merge=merge, seed=seed, basis_placement=basis_placement,
                               stage1_placement=stage1_placement, rule=rule)
    layer = num_layers // 2 if stage2_layer is None else stage2_layer
    k1, k2 = _budgets(n_tokens, ratio, stages, tokens)
    for name, keep in (("K1", k1), ("K2", k2)):
        if keep is not None and keep != n_tokens and not (basis + 1 <= keep <= n_tokens):
            least = None if tokens is not None else _least_ratio(n_tokens, stages, basis)
            raise UsageError(
                f"{name}={keep} tokens is outside [{basis + 1}, {n_tokens}] (basis={basis}, N={n_tokens})",
                "raise --tokens, or lower --basis" if least is None else
                f"pass --ratio {least:g} or more (the least that keeps more than the {basis} basis tokens at "
                f"{'each' if stages == 2 else 'the'} stage of this model), or lower --basis",
            )
    if k2 is not None and k2 >= k1:
        raise UsageError(f"--tokens {tokens}: K2={k2} is not smaller than K1={k1}, so stage 2 would remove nothing",
                         "pass K1,K2 with K2 < K1 (e.g. --tokens 96,32), or one budget for a single stage")
    if k2 is not None and not (1 <= layer < num_layers):
        raise UsageError(f"stage-2 layer {layer} is outside [1, {num_layers - 1}]", "pick a middle decoder layer")
    stage1, stage2 = stage_configs(k1, None if k2 is None else (layer, k2), basis, method, merge, seed,
                                   basis_placement, stage1_placement)
    return CompressionPlan(stage1=stage1, stage2=stage2, ratio=ratio if tokens is None else None,
                           basis_placement=basis_placement, rule=rule)


def _per_image_plan(n_tokens: int, *, ratio: float | None, stages: int, tokens: str | None, basis: int, method: str,
                    merge: bool, seed: int | None, basis_placement: str, stage1_placement: str,
                    rule: str) -> CompressionPlan:
    """One stage; K = int(r·N) of each image (``--ratio``) or a fixed K (``--tokens``)."""
    if stages != 1:
        raise UsageError("this model family has no second ApET stage", "pass --stages 1 (the default for it)")
    keep_ratio = None
    if tokens is not None:
        values = _parse_tokens(tokens)
        if len(values) != 1:
            raise UsageError(f"--tokens {tokens!r} has two budgets but this family has one stage", "pass --tokens K")
        keep = values[0]
        if not basis + 1 <= keep <= n_tokens:
            raise UsageError(f"--tokens {keep} is outside [{basis + 1}, {n_tokens}] (basis={basis}, at most "
                             f"{n_tokens} tokens per image)", "pick a budget in that range, or lower --basis")
    else:
        if ratio is None or not (0.0 < ratio <= 1.0):
            raise UsageError(f"--ratio {ratio!r} is outside the allowed range (0, 1]",
                             "pass the retained fraction of each image's tokens, e.g. --ratio 0.3")
        keep_ratio = ratio
        keep = CompressionConfig(keep=n_tokens, basis=basis, keep_ratio=ratio, max_tokens=n_tokens).keep_for(n_tokens)
    stage1, _ = stage_configs(keep, None, basis, method, merge, seed, basis_placement, stage1_placement,
                              keep_ratio=keep_ratio, max_tokens=n_tokens)
    stage1.validate(keep if keep_ratio is None else n_tokens)
    return CompressionPlan(stage1=stage1, ratio=keep_ratio, basis_placement=basis_placement, rule=rule)


class FamilyFacts(Protocol):
    """What the planner needs of a family (``apet.models.family.Family`` has these as class attributes)."""

    name: str
    max_stages: int
    stage1_placement: str
    dynamic_tokens: bool


class SpecFacts(Protocol):
    """What the planner needs of a model spec (``apet.contracts.specs.ModelSpec``)."""

    n_tokens: int

    @property
    def decoder(self) -> Any: ...


@dataclass(frozen=True)
class Budget:
    """The user's budget options, validated at construction (contradictions refused, never dropped).

    ``stages`` None means the family's most; ``rule`` names the token-selection rule (exported artifacts
    are always ApET, ``apet-eval`` compares others).
    """

    ratio: float | None = None
    tokens: str | None = None
    stages: int | None = None
    basis: int = 10
    method: str = "fps"
    merge: bool = True
    seed: int | None = None
    basis_placement: str = "paper"
    stage2_layer: int | None = None
    rule: str = "apet"

    def __post_init__(self) -> None:
        check_budget_options(self.ratio, self.tokens)
        if self.stages is not None and self.stages not in (1, 2):
            raise UsageError(f"--stages {self.stages} is invalid", "use --stages 1 or --stages 2")
        if self.basis_placement not in BASIS_PLACEMENTS:
            raise UsageError(f"--basis-placement {self.basis_placement!r} is unknown",
                             "use paper (the authors' algorithm, default), own or spatial (ablations)")


def plan_for(spec: SpecFacts, family: FamilyFacts, budget: Budget, *, clamp_stages: bool = False) -> CompressionPlan:
    """``budget`` for one model: the family supplies its stage-1 placement, its number of stages and
    whether N varies per image. ``clamp_stages`` lowers a two-stage budget to the family's one stage
    (benchmarks and eval sweep one setting over every family) instead of refusing it (export)."""
    stages = budget.stages or family.max_stages
    if stages > family.max_stages:
        if not clamp_stages:
            raise UsageError(f"--stages {stages}: the {family.name} family has {family.max_stages} stage(s)",
                             f"pass --stages {family.max_stages}")
        stages = family.max_stages
    injected = getattr(spec.decoder, "injected_layers", 0)
    if stages > 1 and injected:
        if not clamp_stages:
            raise UsageError(f"--stages {stages}: ApET's second stage and the {injected} layers that take injected "
                             f"visual inputs ({family.name}) are not combined yet", "pass --stages 1")
        stages = 1
    return plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=budget.ratio, stages=stages,
                            tokens=budget.tokens, basis=budget.basis, method=budget.method, merge=budget.merge,
                            seed=budget.seed, basis_placement=budget.basis_placement,
                            stage1_placement=family.stage1_placement, stage2_layer=budget.stage2_layer,
                            rule=budget.rule, per_image=family.dynamic_tokens)

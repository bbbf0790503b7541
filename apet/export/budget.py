"""Token budgets: ``--ratio`` / ``--tokens`` / ``--stages`` -> K1 (vision output) and optional (L, K2).

``--ratio r`` is the mean retained fraction over the LLM's layers, as the
paper reports it: two stages keep K1 = 1.5·r·N up to layer L = layers/2 and
K2 = 0.5·r·N after it (for r > 2/3, K1 = N and K2 = (2r-1)·N). Budgets round
to the nearest multiple of 8 (tensor-core friendly) and never exceed N.
"""

from __future__ import annotations

from dataclasses import dataclass

from apet.errors import UsageError


@dataclass(frozen=True)
class Budget:
    stage1_keep: int
    stage2_layer: int | None
    stage2_keep: int | None

    def configs(self, basis: int = 10, method: str = "fps", merge: bool = True, seed: int | None = None):
        """(stage-1 CompressionConfig, Stage2Config | None) for these budgets."""
        from apet.compression import stage_configs

        stage2 = None if self.stage2_keep is None else (int(self.stage2_layer), self.stage2_keep)
        return stage_configs(self.stage1_keep, stage2, basis, method, merge, seed)

    def mean_tokens(self, num_layers: int) -> float:
        if self.stage2_keep is None or self.stage2_layer is None:
            return float(self.stage1_keep)
        layers_after = num_layers - self.stage2_layer
        return (self.stage1_keep * self.stage2_layer + self.stage2_keep * layers_after) / num_layers


def round_to_8(value: float, limit: int) -> int:
    return min(limit, max(8, 8 * int(value / 8 + 0.5)))


def _parse_tokens(tokens: str) -> list[int]:
    try:
        values = [int(t) for t in tokens.split(",")]
    except ValueError as exc:
        raise UsageError(f"--tokens {tokens!r} is not K or K1,K2", "pass e.g. --tokens 64 or --tokens 96,32") from exc
    if not 1 <= len(values) <= 2:
        raise UsageError(f"--tokens {tokens!r} has {len(values)} values", "pass one (K) or two (K1,K2) budgets")
    return values


def check_budget_options(ratio: float | None, tokens: str | None) -> tuple[int, int | None]:
    """Options that contradict each other are refused, never silently dropped; returns the --tokens budgets
    (K1, K2 or None), or (0, None) without --tokens."""
    if ratio is not None and tokens is not None:
        raise UsageError(f"--ratio {ratio} and --tokens {tokens} both set the budget",
                         "pass one of them: --ratio for the paper's mean fraction, --tokens for exact K1[,K2]")
    if tokens is None:
        return 0, None
    values = _parse_tokens(tokens)
    k1, k2 = values[0], (values[1] if len(values) == 2 else None)
    if k2 is not None and k2 >= k1:
        raise UsageError(f"--tokens {tokens}: stage 2 keeps K2={k2}, not fewer than stage 1's K1={k1}",
                         "pass K1,K2 with K2 < K1 (e.g. --tokens 96,32), or one budget K for a single stage")
    return k1, k2


def plan_budget(n_tokens: int, num_layers: int, *, ratio: float | None = None, stages: int = 2,
                tokens: str | None = None, basis: int = 10, stage2_layer: int | None = None) -> Budget:
    """Turn the user's budget options into validated static keeps."""
    if stages not in (1, 2):
        raise UsageError(f"--stages {stages} is invalid", "use --stages 1 or --stages 2")
    layer = num_layers // 2 if stage2_layer is None else stage2_layer
    if tokens is not None:
        k1, k2 = check_budget_options(ratio, tokens)
    else:
        if ratio is None or not (0.0 < ratio <= 1.0):
            raise UsageError(f"--ratio {ratio!r} is outside the allowed range (0, 1]",
                             "pass the mean retained fraction, e.g. --ratio 0.11 (64 of 576 tokens)")
        if stages == 1:
            k1, k2 = round_to_8(ratio * n_tokens, n_tokens), None
        else:
            k1 = round_to_8(min(1.5 * ratio, 1.0) * n_tokens, n_tokens)
            k2 = round_to_8((0.5 * ratio if ratio <= 2 / 3 else 2 * ratio - 1) * n_tokens, n_tokens)
    if k2 is not None and k2 >= k1:
        k2 = None  # --ratio near 1.0: nothing left to remove at stage 2
    for name, keep in (("K1", k1), ("K2", k2)):
        if keep is not None and keep != n_tokens and not (basis + 1 <= keep <= n_tokens):
            raise UsageError(
                f"{name}={keep} tokens is outside [{basis + 1}, {n_tokens}] (basis={basis}, N={n_tokens})",
                "raise --ratio / --tokens, or lower --basis",
            )
    if k2 is not None and not (1 <= layer < num_layers):
        raise UsageError(f"stage-2 layer {layer} is outside [1, {num_layers - 1}]", "pick a middle decoder layer")
    return Budget(stage1_keep=k1, stage2_layer=layer if k2 is not None else None, stage2_keep=k2)

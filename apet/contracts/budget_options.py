"""The budget options (``--ratio``, ``--ratios``, ``--tokens``, ``--basis``) checked without torch.

The commands check what they can from the arguments alone before importing torch or loading a model
(2-17 s), so a typo is answered at once; the checks that need the model (a budget above its N) stay in
:mod:`apet.contracts.plan`. ExportConfig, BenchConfig and EvalConfig call these same functions.
"""

from __future__ import annotations

from typing import Iterable

from apet.errors import UsageError


def parse_tokens(tokens: str) -> list[int]:
    """``--tokens K`` or ``K1,K2`` as integers."""
    try:
        values = [int(t) for t in tokens.split(",")]
    except ValueError as exc:
        raise UsageError(f"--tokens {tokens!r} is not K or K1,K2", "pass e.g. --tokens 64 or --tokens 96,32") from exc
    if not 1 <= len(values) <= 2:
        raise UsageError(f"--tokens {tokens!r} has {len(values)} values", "pass one (K) or two (K1,K2) budgets")
    return values


def check_ratio(ratio: float, option: str = "--ratio") -> None:
    if not (0.0 < ratio <= 1.0):
        raise UsageError(f"{option} {ratio:g} is outside the allowed range (0, 1]",
                         f"pass the retained fraction of the visual tokens, e.g. {option} 0.11")


def check_ratios(ratios: Iterable[float], option: str = "--ratios") -> None:
    for ratio in ratios:
        if not (0.0 < ratio <= 1.0):
            raise UsageError(f"{option}: {ratio:g} is outside the allowed range (0, 1]",
                             f"pass retained fractions, e.g. {option} 1.0,0.22,0.11")


def check_budget_options(ratio: float | None, tokens: str | None, basis: int | None = None) -> None:
    """Options that contradict each other, or budgets no model can have, are refused, never silently dropped."""
    if ratio is not None and tokens is not None:
        raise UsageError(f"--ratio {ratio} and --tokens {tokens} both set the budget",
                         "pass one of them: --ratio for the paper's mean fraction, --tokens for exact K1[,K2]")
    if basis is not None and basis < 1:
        raise UsageError(f"--basis {basis} must be at least 1", "pass the basis size k, e.g. --basis 10 (default)")
    if ratio is not None:
        check_ratio(ratio)
    if tokens is not None:
        values = parse_tokens(tokens)
        if len(values) == 2 and values[1] >= values[0]:
            raise UsageError(f"--tokens {tokens}: K2={values[1]} is not smaller than K1={values[0]}, so stage 2 "
                             "would remove nothing",
                             "pass K1,K2 with K2 < K1 (e.g. --tokens 96,32), or one budget for a single stage")
        low = 1 if basis is None else basis + 1
        for name, keep in zip(("K1", "K2"), values):
            if keep < low:
                raise UsageError(f"--tokens {tokens}: {name}={keep} is below {low}" +
                                 (f" (the {basis} basis tokens and at least one more)" if basis else ""),
                                 f"pass budgets of {low} or more" + (", or lower --basis" if basis else ""))

"""Next-token selection: greedy, temperature and nucleus (top-p) sampling, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from apet.errors import UsageError, option


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer",
                             f"pass {option('max_new_tokens', 1)} or more")
        if not (0.0 <= self.temperature <= 100.0):
            raise UsageError(f"temperature={self.temperature} is outside [0, 100]", "0 means greedy")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"top_p={self.top_p} is outside (0, 1]", "1.0 disables nucleus sampling")


class Sampler:
    """Picks one token per row from float logits [B, V]; the RNG is seeded once per request."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        if self.config.temperature == 0.0:
            return logits.argmax(-1)
        scaled = logits / self.config.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.array([self._draw(row) for row in probs])

    def _draw(self, probs: np.ndarray) -> int:
        if self.config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.config.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(len(probs), p=probs))

"""Token-selection rules behind one signature, so ApET can be compared with simpler rules at the same
budget. Every rule is attention-free (it sees only the tokens), so every rule also runs inside an
engine. A new rule is one function::

    @register("my-rule")
    def my_rule(x: torch.Tensor, config: CompressionConfig) -> Compressed: ...

``x`` is [B, N, D]; the result keeps ``config.keep_for(N)`` tokens in ascending original position (``keep``,
or a per-image budget for dynamic-resolution models). :func:`rule_selector` binds a rule to a stage's settings as
the ``select`` a family's vision stages take; for ApET it also gives the merge assignment (which tokens went into
which kept row), which a family applies to other per-token features (Qwen3-VL's DeepStack levels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from apet.compression import Assignment, Compressed, compress_assigned, compress_with, gather_tokens
from apet.contracts.compression import CompressionConfig
from apet.errors import UsageError

Rule = Callable[[torch.Tensor, CompressionConfig], Compressed]
RULES: dict[str, Rule] = {}


def register(name: str) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return add


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise UsageError(f"token-selection rule {name!r} is unknown", f"use one of {', '.join(sorted(RULES))}")
    return RULES[name]


# rules whose rows are formed by an ApET assignment: the stage settings they run with
ASSIGNED: dict[str, Callable[[CompressionConfig], CompressionConfig]] = {
    "apet": lambda config: config, "apet-own": lambda config: replace(config, placement="own")}


@dataclass(frozen=True)
class RuleSelector:
    """A rule bound to one stage's settings: ``select(x)`` for a family's vision stages; ``assigned(x)`` adds how
    the rows were formed (:class:`~apet.compression.Assignment`, None for rules without one)."""

    rule: str
    config: CompressionConfig

    def __call__(self, x: torch.Tensor) -> Compressed:
        return get_rule(self.rule)(x, self.config)

    def assigned(self, x: torch.Tensor) -> tuple[Compressed, Assignment | None]:
        if self.rule in ASSIGNED:
            return compress_assigned(ASSIGNED[self.rule](self.config), x)
        return self(x), None


def rule_selector(rule: str, config: CompressionConfig) -> RuleSelector:
    get_rule(rule)  # unknown names fail here
    return RuleSelector(rule, config)


def _keep_all(x: torch.Tensor) -> Compressed:
    index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return Compressed(x, index)


def _ascending(x: torch.Tensor, index: torch.Tensor) -> Compressed:
    index = index.sort(dim=1).values
    return Compressed(gather_tokens(x, index), index)


@register("apet")
def apet(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """ApET (docs/algorithm.md): reconstruction error from an FPS basis, merged."""
    return compress_with(config, x)


@register("apet-own")
def apet_own(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """ApET with the ``own`` basis placement (ablation: basis tokens at their own positions, not merged)."""
    return compress_with(replace(config, placement="own"), x)


@register("random")
def random_rule(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """Seeded uniform-random subset (the same positions for every image)."""
    keep = config.keep_for(x.shape[1])
    if keep >= x.shape[1]:
        return _keep_all(x)
    rng = np.random.default_rng(0 if config.seed is None else config.seed)
    picked = torch.from_numpy(np.sort(rng.permutation(x.shape[1])[:keep])).to(x.device)
    return _ascending(x, picked.expand(x.shape[0], -1))


@register("pool")
def uniform_pool(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """Uniform spatial pooling: K contiguous raster-order segments, each averaged (index = its middle)."""
    n, keep = x.shape[1], config.keep_for(x.shape[1])
    if keep >= n:
        return _keep_all(x)
    edges = np.linspace(0, n, keep + 1).round().astype(int)
    owner = torch.from_numpy(np.repeat(np.arange(keep), np.diff(edges))).to(x.device)
    weights = (owner.unsqueeze(0) == torch.arange(keep, device=x.device).unsqueeze(1)).to(torch.float32)
    pooled = (weights / weights.sum(1, keepdim=True)) @ x.to(torch.float32)
    middle = torch.from_numpy((edges[:-1] + edges[1:] - 1) // 2).to(x.device)
    return Compressed(pooled.to(x.dtype), middle.expand(x.shape[0], -1).contiguous())


@register("divprune")
def divprune(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """DivPrune-style max-min diversity: greedy farthest-point selection of K tokens by cosine distance."""
    keep = config.keep_for(x.shape[1])
    if keep >= x.shape[1]:
        return _keep_all(x)
    unit = torch.nn.functional.normalize(x.to(torch.float32), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [B, N, N]
    index = similarity.sum(-1).argmin(dim=1)  # start from the least typical token
    chosen = [index]
    closest = similarity.gather(1, index[:, None, None].expand(-1, 1, x.shape[1]))[:, 0]
    for _ in range(keep - 1):
        index = closest.argmin(dim=1)  # farthest (least similar) from everything chosen
        chosen.append(index)
        row = similarity.gather(1, index[:, None, None].expand(-1, 1, x.shape[1]))[:, 0]
        closest = torch.maximum(closest, row)
        closest = closest.scatter(1, torch.stack(chosen, 1), float("inf"))
    return _ascending(x, torch.stack(chosen, dim=1))

"""The authors' ApET code paths (MaQianKun0/ApET) restated in float64 PyTorch, step for step.

Each function mirrors the *structure* of one reference routine — in-place writes
through a boolean mask or an index list, ``scatter_add_`` merging, a per-sample
loop — so a test can run "what their code does" next to ``apet.compression``.
Only the FPS start is a parameter (they draw it at random), as docs/algorithm.md allows.

* :func:`llava_stage1`  ``LlavaMetaForCausalLM.encode_images`` + ``token_merging`` (llava_arch.py)
* :func:`llava_stage2`  ``layer_prune`` + module-level ``token_merging`` (modeling_llama_x.py)
* :func:`qwen_stage1`   the pruning block of ``qwen2_5_vl_custom.py`` (blend)
* :func:`video_frame`   ``encode_videos`` + its ``token_merging`` (video-llava llava_arch.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fps(x: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """[B, N, D] -> [B, k]: distances initialised at 1e10, min-updated, next = max (no masking)."""
    batch, n, _ = x.shape
    centroids = torch.zeros(batch, k, dtype=torch.long)
    dist = torch.full((batch, n), 1e10, dtype=x.dtype)
    farthest = torch.full((batch,), start, dtype=torch.long)
    for i in range(k):
        centroids[:, i] = farthest
        centroid = x[torch.arange(batch), farthest].unsqueeze(1)
        dist = torch.min(dist, ((x - centroid) ** 2).sum(-1))
        farthest = dist.max(1)[1]
    return centroids


def _errors(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    gram = seeds @ seeds.transpose(-1, -2)
    gram.diagonal(dim1=-2, dim2=-1).add_(1e-5)
    coeffs = torch.linalg.solve(gram, seeds @ x.transpose(-1, -2)).transpose(-1, -2)
    return torch.norm(x - coeffs @ seeds, dim=-1)


def _merge_batched(features: torch.Tensor, top: torch.Tensor, k: int) -> torch.Tensor:
    """llava_arch ``token_merging``: targets = top[:-k] (error order), merged = outside top; written back."""
    batch, n, dim = features.shape
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, top, True)
    merged = torch.stack([features[b][top[b][:-k]] for b in range(batch)])
    others = torch.stack([features[b][~mask[b]] for b in range(batch)])
    if others.shape[1] == 0:
        return features
    nearest = F.cosine_similarity(others.unsqueeze(2), merged.unsqueeze(1), dim=3).argmax(dim=2)
    count = torch.zeros(batch, merged.shape[1], dtype=torch.int64)
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, dim), others)
    count.scatter_add_(1, nearest, torch.ones_like(nearest))
    merged /= 1 + count.unsqueeze(2)
    for b in range(batch):
        features[b, top[b][:-k]] = merged[b]
    return features


def llava_stage1(x: torch.Tensor, keep: int, k: int = 10, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, D] -> (kept rows [B, K, D] in position order, positions [B, K])."""
    features = x.clone().double()
    seeds = features.gather(1, fps(features, k, start).unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    top = torch.topk(_errors(features, seeds), k=keep, dim=1)[1]
    slot_mask = torch.zeros(features.shape[:2], dtype=torch.bool)
    slot_mask.scatter_(1, top[:, -k:], True)
    for b in range(features.shape[0]):
        features[b][slot_mask[b]] = seeds[b]  # boolean mask: ascending positions get seeds in FPS order
    keep_mask = torch.zeros(features.shape[:2], dtype=torch.bool)
    keep_mask.scatter_(1, top, True)
    features = _merge_batched(features, top, k)
    positions = torch.stack([torch.nonzero(keep_mask[b])[:, 0] for b in range(features.shape[0])])
    return torch.stack([features[b][keep_mask[b]] for b in range(features.shape[0])]), positions


def _merge_single(embeds: torch.Tensor, top: torch.Tensor, k: int) -> torch.Tensor:
    """modeling_llama_x ``token_merging`` (one sample, [N, D])."""
    n, dim = embeds.shape
    mask = torch.zeros(n, dtype=torch.bool)
    mask.scatter_(0, top, True)
    retained, others = embeds[top[:-k]], embeds[~mask]
    nearest = F.cosine_similarity(others.unsqueeze(1), retained.unsqueeze(0), dim=2).argmax(dim=1)
    count = torch.zeros(retained.shape[0], dtype=torch.int64)
    merged = retained.clone()
    merged.scatter_add_(0, nearest.unsqueeze(-1).expand(-1, dim), others)
    count.scatter_add_(0, nearest, torch.ones_like(nearest))
    merged /= 1 + count.unsqueeze(1)
    embeds[top[:-k]] = merged
    return embeds


def llava_stage2(span: torch.Tensor, keep: int, k: int = 10, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's image span [N, D] -> (kept [K, D] in position order, positions [K])."""
    embeds = span.clone().double()
    seeds = embeds.unsqueeze(0).gather(1, fps(embeds.unsqueeze(0), k, start).unsqueeze(-1)
                                       .expand(-1, -1, embeds.shape[-1]))[0]
    top = torch.topk(_errors(embeds, seeds), k=keep, dim=0)[1]
    embeds[top[-k:]] = seeds  # advanced index: slot top[K-k+j] gets seed j
    embeds = _merge_single(embeds, top, k)
    order = torch.sort(top)[0]
    return embeds[order], order


def qwen_stage1(tokens: torch.Tensor, keep: int, k: int = 10, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's merged tokens [n, D] -> (kept [K, D] in position order, positions [K])."""
    embeds = tokens.clone().double()
    seeds = embeds.unsqueeze(0).gather(1, fps(embeds.unsqueeze(0), k, start).unsqueeze(-1)
                                       .expand(-1, -1, embeds.shape[-1]))[0]
    top = torch.topk(_errors(embeds, seeds), k=keep, dim=0)[1]
    slot_mask = torch.zeros(embeds.shape[0], dtype=torch.bool)
    slot_mask.scatter_(0, top[-k:], True)
    embeds[slot_mask] = 0.5 * seeds + 0.5 * embeds[slot_mask]
    embeds = _merge_single(embeds, top, k)
    order = torch.sort(top)[0]
    return embeds[order], order


def video_frame(frames: torch.Tensor, selected: int = 22, k: int = 10,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected patch tokens of T frames [T, N, D] (CLS removed) -> ([T, selected + k, D], positions)."""
    features = frames.clone().double()
    basis = fps(features, k, start)
    seeds = features.gather(1, basis.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    top = torch.topk(_errors(features, seeds), k=selected, dim=1)[1]
    batch, n, dim = features.shape
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, top, True)
    merged = torch.stack([features[b][top[b]] for b in range(batch)])
    others = torch.stack([features[b][~mask[b]] for b in range(batch)])
    nearest = F.cosine_similarity(others.unsqueeze(2), merged.unsqueeze(1), dim=3).argmax(dim=2)
    count = torch.zeros(batch, selected, dtype=torch.int64)
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, dim), others)
    count.scatter_add_(1, nearest, torch.ones_like(nearest))
    merged /= 1 + count.unsqueeze(2)
    return torch.cat([merged, seeds], dim=1), torch.cat([top, basis], dim=1)

"""The vision graph of a family as ``features -> select -> finish`` (torch).

``vision.onnx`` is this module traced; the torch backend, the benchmarks and evaluation run the
same module with another selector (an eval rule) or time its stages one by one. Each stage runs
inside a named submodule so exported node names carry a scope (``vision/…``, ``apet_stage1/…``,
``projector/…``) that trtexec's per-layer profiles and Nsight can attribute time to.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Callable, ClassVar

import torch
from torch import nn

from apet.compression import Compressed
from apet.contracts.io import INJECTED_EMBEDS, VISION_OUTPUTS
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.scope import Scope


class VisionStages(nn.Module):
    """features -> select (ApET stage 1, or an eval rule) -> finish.

    A family that declares ``DecoderSpec.injected_layers`` L > 0 lists ``vision_output_names(True)`` as its
    outputs and returns a third one from :meth:`finish`: ``injected_embeds`` [L, N, H], its per-layer inputs
    for the same N rows, in the same order, as ``visual_embeds``."""

    input_names: ClassVar[list[str]]
    output_names: ClassVar[list[str]] = VISION_OUTPUTS

    def __init__(self, adapter: VisionLanguageAdapter, select: Callable[[torch.Tensor], Compressed]) -> None:
        super().__init__()
        self.model = adapter.model  # registered so tracing sees the weights
        self.adapter = adapter
        # attribute names are the node-name scopes of apet.scopes (VISION, APET_STAGE1, PROJECTOR)
        self.vision = Scope(self.features)
        self.apet_stage1 = Scope(lambda x: tuple(select(x)))
        self.projector = Scope(self.finish)

    @abstractmethod
    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The tokens ApET sees, [B', N, D] (B' = images, views or frames)."""

    @abstractmethod
    def finish(self, tokens: torch.Tensor, index: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Kept tokens and positions -> the graph outputs (visual_embeds, keep_index[, injected_embeds])."""

    @abstractmethod
    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Inputs to trace the graph with (batch = images, views or frames as the family counts them)."""

    @abstractmethod
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Symbolic dims of inputs and outputs (their names are what the family's ``vision_dims`` sizes)."""

    def fast_linears(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """(module, names of its linears) that the tower's GPU fast path runs as one matmul
        (:func:`apet.modeling.fast_path.fused_linear`); none by default."""
        return []

    def prepare_fast(self) -> None:
        """Build the fast path's concatenated weights now (memory-neutral: the linears' weights become slices of
        them), so that torch.compile, tracing the stages later, finds them built."""
        from apet.modeling.fast_path import fuse_linears

        for owner, names in self.fast_linears():
            fuse_linears(owner, names)

    def named(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The graph outputs by name (:mod:`apet.contracts.io`)."""
        return dict(zip(self.output_names, outputs))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens, index = self.apet_stage1(self.vision(*inputs))
        return self.projector(tokens, index, *inputs)


def injected_of(outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The per-layer injected inputs of named vision outputs as [L, N, H] rows (None when the family has none)."""
    injected = outputs.get(INJECTED_EMBEDS)
    return None if injected is None else injected.reshape(injected.shape[0], -1, injected.shape[-1])

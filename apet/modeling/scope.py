"""A named module around a function: how exported nodes get their scope (names in :mod:`apet.scopes`)."""

from __future__ import annotations

from typing import Any, Callable

import torch


class Scope(torch.nn.Module):
    """Run ``fn`` as a named submodule so every ONNX node it creates carries the attribute's name.

    The TorchScript exporter names nodes after the module they were traced in
    (``/apet_stage1/TopK``); wrapping a plain function in a Scope registered as
    ``self.apet_stage1`` is what gives ApET, each decoder layer and the towers
    their own prefix, which trtexec's per-layer profile and Nsight then show.
    Scopes hold no parameters: weights stay registered where they were.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self._fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

"""Differences between the transformers versions apet supports (``transformers>=5.0,<6``), in one place.

transformers 5.24 renamed the KV-cache argument of the decoder modules from ``past_key_values`` to
``cache`` and warns on the old name until 5.40, where it is removed. Passing whichever name the
installed version's ``forward`` declares works across the whole range without the warning.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_name(module_type: type) -> str:
    parameters = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the KV-cache argument name ``module.forward`` accepts."""
    return {_cache_name(type(module)): cache}

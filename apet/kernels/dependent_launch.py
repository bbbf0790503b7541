"""Programmatic dependent launch (Hopper and later) for the decode step's Triton kernels: the next kernel is launched
while the current one finishes, does what depends on no earlier kernel (a projection's first weight tile), then waits
(``griddepcontrol.wait``) until every earlier kernel has finished and its writes are visible, before it reads an
activation or writes anything. The CUDA graph a decode step is captured in keeps these edges.

Why: at batch 1 a decode step is ~9 kernels a layer, and an H200 idled 0.2–1.2 µs at each kernel boundary
(docs/benchmarks.md). A kernel launched this way must wait in every program before its first dependent access;
one that is not (cuBLAS, Inductor's kernels) runs after the previous kernel as always.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from apet import switches

try:  # Triton ships with CUDA builds of torch
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    tl = None

log = logging.getLogger(__name__)
ENABLED = {"value": switches.enabled("APET_PDL")}  # 0: every kernel waits for the previous one to end


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    has_gdc = hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
    return has_gdc and torch.cuda.get_device_capability(device_index)[0] >= 9


def applies(device: torch.device) -> bool:
    """Enabled, a CUDA device of compute capability 9 or later, a Triton with the grid-dependency instructions."""
    return ENABLED["value"] and device.type == "cuda" and _capable(device.index or 0)


def launch(kernel: Any, grid: tuple, *args: Any, pdl: bool, **kwargs: Any) -> None:
    """``kernel[grid](*args, PDL=pdl, **kwargs)``, launched as a dependent where ``pdl``. A Triton that compiles the
    instructions but does not take the launch option runs every kernel plain from then on (``griddepcontrol.wait``
    returns at once in a kernel not launched as a dependent)."""
    if pdl:
        try:
            kernel[grid](*args, PDL=True, launch_pdl=True, **kwargs)
            return
        except (TypeError, KeyError) as exc:  # this Triton's launcher has no launch_pdl
            log.warning("programmatic dependent launch is off: %s", exc)
            ENABLED["value"] = False
    kernel[grid](*args, PDL=pdl, **kwargs)

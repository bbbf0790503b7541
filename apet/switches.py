"""The environment switches of the torch GPU path, in one place.

Each kernel or form that replaced a slower one is on by default once it was timed on a GPU (docs/benchmarks.md);
its variable set to 0 turns it off: to compare (``scripts/gpu_profile.py`` flips the same switches per case), or to
step around it on a device the project has not run. Why one home: every module used to read its own variable with
``!= "0"``, so ``APET_GEMV=false`` or ``=off`` left the kernel silently on; here a value is on, off, or refused
with what the variable does. docs/architecture.md lists them (``tests/test_switches.py`` checks that list).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from apet.errors import UsageError

log = logging.getLogger(__name__)
ON_VALUES = ("1", "true", "on", "yes")
OFF_VALUES = ("0", "false", "off", "no")


@dataclass(frozen=True)
class Switch:
    """One variable: what runs while it is on (the default) and what runs instead with it 0."""

    variable: str
    on: str  # what runs by default
    off: str  # what runs with the variable 0
    home: str  # the module that reads it (where its docstring says why)


SWITCHES: dict[str, Switch] = {switch.variable: switch for switch in (
    Switch("APET_FAST_TOWERS", "the vision towers' GPU fast path (packed varlen windows, mask-free flash, fused "
           "norms and projections)", "the graph forms, Hugging Face's modules op by op", "apet.modeling.fast_path"),
    Switch("APET_DECODE_ATTENTION", "flash-decoding over each row's written cache span",
           "SDPA over the whole cache", "apet.kernels.decode_attention"),
    Switch("APET_GEMV", "decode's skinny matmuls in apet's GEMV where it measured faster than cuBLAS", "cuBLAS",
           "apet.kernels.gemv"),
    Switch("APET_FUSED_GEMV", "decode's norms, residual adds and silu·up folded into its projections",
           "each its own kernel", "apet.kernels.fused_gemv"),
    Switch("APET_PDL", "decode's kernels launched as programmatic dependents on Hopper (weights load while the "
           "kernel before finishes)", "each kernel waits for the previous one to end",
           "apet.kernels.dependent_launch"),
    Switch("APET_CACHE_WRITE", "an uncompiled prefill's keys and values written into the static cache by one "
           "vectorized copy kernel", "torch's strided assignment", "apet.kernels.cache_write"),
    Switch("APET_ROTARY_ONCE", "a compiled prefill's rotary tables computed once, not inside every layer",
           "as Inductor decides", "apet.runtime.static_decoder"),
)}


def parse(variable: str, value: str | None) -> bool:
    """Whether a switch whose variable holds ``value`` (None: unset) is on; a value that is neither on nor off
    raises a UsageError naming the variable, the values it takes and what each does."""
    switch = SWITCHES[variable]
    text = (value or "").strip().lower()
    if text in ("", *ON_VALUES):
        return True
    if text in OFF_VALUES:
        return False
    raise UsageError(f"{variable}={value!r} is neither on nor off",
                     f"set {variable} to 1 (the default: {switch.on}) or 0 ({switch.off}), or unset it")


def enabled(variable: str) -> bool:
    """The switch ``variable`` as the environment sets it (read once, when its module is imported)."""
    on = parse(variable, os.environ.get(variable))
    if not on:
        log.info("%s=0: %s instead of %s", variable, SWITCHES[variable].off, SWITCHES[variable].on)
    return on

"""``--device`` values: validated up front so a typo or a missing GPU is a clear error, not a torch assert.

:func:`parse_device` checks the spelling only and imports nothing, so the TensorRT backend (which asks the
CUDA driver through cuda-python, :mod:`apet.runtime.cuda_memory`) never pulls torch in; :func:`check_device`
adds torch's view of the GPU for the paths that run torch.
"""

from __future__ import annotations

import re

from apet.errors import BackendError, UsageError


def parse_device(device: str, *, allow_auto: bool = False) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` where allowed), normalised; anything else (``tpu``,
    ``mps``) would be silently ignored by some paths."""
    text = str(device).strip().lower()
    allowed = "cpu, cuda or cuda:N" + (" (or auto)" if allow_auto else "")
    if (allow_auto and text == "auto") or text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise UsageError(f"--device {device!r} is not supported", f"use {allowed}")


def check_device(device: str, *, allow_auto: bool = False) -> str:
    """:func:`parse_device`, with the CUDA device present as torch sees it.

    A CPU-only torch raises ``AssertionError: Torch not compiled with CUDA enabled`` deep inside the first
    ``.to("cuda")``.
    """
    text = parse_device(device, allow_auto=allow_auto)
    if not text.startswith("cuda"):
        return text
    import torch

    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise BackendError(f"--device {device} needs a CUDA GPU, but this torch {torch.__version__} {why}",
                           "use --device cpu here, or a machine with an NVIDIA GPU and a CUDA build of torch")
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise BackendError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                           f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return text

"""``--device`` values: validated up front so a typo or a missing GPU is a clear error, not a torch assert."""

from __future__ import annotations

import re

from apet.errors import BackendError, UsageError


def check_device(device: str, *, allow_auto: bool = False) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` where allowed), with the CUDA device present.

    A CPU-only torch raises ``AssertionError: Torch not compiled with CUDA enabled`` deep inside the first
    ``.to("cuda")``; anything else (``tpu``, ``mps``) would be silently ignored by some paths.
    """
    text = str(device).strip().lower()
    allowed = "cpu, cuda or cuda:N" + (" (or auto)" if allow_auto else "")
    if allow_auto and text == "auto":
        return text
    if text == "cpu":
        return text
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise UsageError(f"--device {device!r} is not supported", f"use {allowed}")
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

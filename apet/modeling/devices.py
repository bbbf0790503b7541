"""Whether torch can run on a ``--device``: a CPU-only torch raises ``AssertionError: Torch not compiled with
CUDA enabled`` deep inside the first ``.to("cuda")``, so the host-side commands ask first."""

from __future__ import annotations

import torch

from apet.devices import check_device
from apet.errors import BackendError


def check_torch_device(device: str, *, allow_auto: bool = False) -> str:
    """:func:`apet.devices.check_device`, plus: the CUDA device is there for this torch."""
    text = check_device(device, allow_auto=allow_auto)
    if text in ("cpu", "auto"):
        return text
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise BackendError(f"--device {device} needs a CUDA GPU, but this torch {torch.__version__} {why}",
                           "use --device cpu here, or a machine with an NVIDIA GPU and a CUDA build of torch")
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise BackendError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                           f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return text

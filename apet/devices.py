"""``--device`` values: validated up front so a typo or a missing GPU is a clear error, not a torch assert."""

from __future__ import annotations

import re

from apet.errors import UsageError


def check_device(device: str, *, allow_auto: bool = False) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` where allowed), torch-free: anything else (``tpu``, ``mps``)
    would be silently ignored by some paths. Whether torch sees that GPU is :func:`apet.modeling.devices.
    check_torch_device`'s question, asked where torch runs."""
    text = str(device).strip().lower()
    allowed = "cpu, cuda or cuda:N" + (" (or auto)" if allow_auto else "")
    if allow_auto and text == "auto":
        return text
    if text == "cpu":
        return text
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise UsageError(f"--device {device!r} is not supported", f"use {allowed}")
    return text

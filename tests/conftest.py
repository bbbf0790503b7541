"""Shared fixtures: tiny checkpoints and artifacts are built once per session, in temp dirs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def rtx_api():
    """The TensorRT-RTX builder; skipped with a reason only when the wheel cannot be imported."""
    try:
        from apet.engines.api import load_api

        return load_api("tensorrt-rtx")
    except Exception as exc:  # pragma: no cover - CI installs the wheel, so this runs there
        pytest.skip(f"tensorrt_rtx_bindings is not importable here ({exc}); pip install 'apet[rtx]'")

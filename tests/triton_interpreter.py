"""Runs test code under Triton's CPU interpreter, in a subprocess: ``TRITON_INTERPRET`` is read when a kernel is
defined, so a process that imported the kernels compiled cannot switch. The tests directory and the checkout are on
the subprocess's path, so the code can import a test module's checks (``import test_gemv as t``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_interpreted(tmp_path: Path, code: str, timeout: int = 600) -> None:
    """Run ``code`` with ``TRITON_INTERPRET=1``; fail with the tail of its stderr if it fails."""
    script = tmp_path / "run_interpreted.py"
    script.write_text(code)
    path = os.pathsep.join(p for p in (str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]

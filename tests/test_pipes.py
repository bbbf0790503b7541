"""A reader that goes away (``apet inspect DIR | head -2``) ends apet quietly with 141, as Unix tools ended by
SIGPIPE do, instead of a "check the path and the disk" storage error (issue 26, item 5; docs/errors.md)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "apet.cli"]
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, as documented in docs/errors.md


@pytest.fixture(scope="module")
def artifact(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def _into_closed_pipe(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run with standard output a real pipe whose read end is already closed: every write fails with
    EPIPE, deterministically (a `| head` may or may not have exited before the first write)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, env=_env(**env), timeout=300)
    finally:
        os.close(write)


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_inspect_into_a_closed_pipe_is_quiet(artifact: Path, unbuffered: str) -> None:
    """Unbuffered, the first print fails inside the command; buffered, the flush at the end does."""
    done = _into_closed_pipe(CLI + ["inspect", str(artifact)], PYTHONUNBUFFERED=unbuffered)
    assert done.returncode == EXIT_CLOSED_PIPE, done.stderr
    assert done.stderr == ""


def test_inspect_piped_into_head_through_a_shell(artifact: Path) -> None:
    command = " ".join(shlex.quote(a) for a in CLI + ["inspect", str(artifact)])
    done = subprocess.run(["bash", "-c", f"{command} | head -1; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                          text=True, env=_env(PYTHONUNBUFFERED="1"), timeout=300)
    assert done.stdout == f"artifact {artifact}\n"
    assert "error" not in done.stderr.lower() and "Broken pipe" not in done.stderr, done.stderr
    assert done.returncode in (0, EXIT_CLOSED_PIPE)  # 0 when everything fitted in head's first read


def test_run_streaming_into_a_closed_pipe_is_quiet(artifact: Path) -> None:
    done = _into_closed_pipe(CLI + ["run", str(artifact), "--image", "@demo", "--prompt", "What is it?",
                                    "--backend", "onnxruntime", "--max-new-tokens", "3"])
    assert done.returncode == EXIT_CLOSED_PIPE, done.stderr
    assert "error" not in done.stderr.lower() and "Exception ignored" not in done.stderr, done.stderr


def test_a_broken_pipe_to_a_file_is_still_reported(tmp_path: Path) -> None:
    """Only a closed standard output is quiet: EPIPE writing a named FIFO stays a storage error."""
    from apet.errors import guarded

    fifo = tmp_path / "fifo"

    def write_fifo() -> int:
        raise BrokenPipeError(32, "Broken pipe", str(fifo))

    assert guarded(write_fifo, verbose=False) == 6

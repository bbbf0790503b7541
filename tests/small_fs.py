"""Real small, full or read-only file systems for the data-safety tests.

A command runs inside a private mount namespace (``unshare -m``, or ``unshare -rm`` as a user namespace
for non-root) in which a tmpfs of a given size is mounted over a test directory. Nothing outside the
process sees the mount and it disappears with the process, so a crashed test leaves no state behind.
Where the machine allows neither (containers without CAP_SYS_ADMIN or user namespaces), ``available()``
says why and the tests fall back to a documented fault injection instead.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_UNSHARE_VARIANTS = (["unshare", "-m"], ["unshare", "-rm"])


@functools.lru_cache(maxsize=None)
def _unshare() -> tuple[list[str] | None, str]:
    if shutil.which("unshare") is None:
        return None, "util-linux unshare is not installed"
    probe = Path(tempfile.mkdtemp(prefix="apet-fs-probe-"))
    try:
        errors = []
        for variant in _UNSHARE_VARIANTS:
            result = subprocess.run([*variant, "sh", "-c", f"mount -t tmpfs -o size=64k apet-probe {probe} && "
                                     f"touch {probe}/x && mount -o remount,ro {probe}"],
                                    capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                return list(variant), ""
            errors.append(f"{' '.join(variant)}: {result.stderr.strip()[:120]}")
        return None, "no private tmpfs mounts here (" + "; ".join(errors) + ")"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def available() -> str | None:
    """None when real small file systems can be made here, else the reason they cannot
    (``APET_TEST_NO_MOUNT=1`` forces the fault-injection fallback, to test it)."""
    if os.environ.get("APET_TEST_NO_MOUNT"):
        return "disabled by APET_TEST_NO_MOUNT"
    return _unshare()[1] or None


def run(mount_point: Path, size: str, script: str, *, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the bash ``script`` with a fresh tmpfs of ``size`` mounted at ``mount_point`` (``$FS``).

    ``$PY`` is this Python; ``readonly`` (a shell function) remounts ``$FS`` read-only, ``fill`` fills it
    up to the last few KiB. The tmpfs starts empty: copy what the command needs into it first.
    """
    variant, reason = _unshare()
    if variant is None:
        raise RuntimeError(reason)
    mount_point.mkdir(parents=True, exist_ok=True)
    prelude = (f"set -u; mount -t tmpfs -o size={size} apet-test \"$FS\" || exit 97\n"
               "readonly() { mount -o remount,ro \"$FS\"; }\n"
               "fill() { dd if=/dev/zero of=\"$FS/.filler\" bs=4k 2>/dev/null; true; }\n")
    environment = {**os.environ, **(env or {}), "FS": str(mount_point), "PY": sys.executable}
    return subprocess.run([*variant, "bash", "-c", prelude + script], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def q(path: Path | str) -> str:
    return shlex.quote(str(path))

"""Write results so that an interruption at any point leaves the previous complete version or none.

Files: temp file in the same directory, fsync, ``os.replace``. Directories: a scratch directory
next to the target, swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux (two renames
elsewhere). SIGTERM is turned into KeyboardInterrupt while a directory is being written so the
scratch directory is cleaned up; scratch left by SIGKILL is removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from apet.errors import UsageError

_TMP_MARK = ".apet-tmp-"
_RENAME_EXCHANGE = 2


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` in one rename; readers never see a partial file."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:  # a failed write names no file; say which one (disk full, read-only, ...)
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return result == 0


def _replace_directory(new: Path, target: Path) -> None:
    if _exchange(new, target):  # target now holds the new tree, ``new`` the old one
        shutil.rmtree(new, ignore_errors=True)
        return
    trash = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-old"
    target.rename(trash)
    new.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_scratch(out: Path) -> None:
    """Scratch dirs of killed runs (their pid is gone) are deleted; live ones are left alone."""
    for stale in out.parent.glob(f".{out.name}{_TMP_MARK}*"):
        try:
            pid = int(stale.name.split(_TMP_MARK, 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _scratch(out: Path) -> Path:
    """A scratch directory next to ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(out)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{_TMP_MARK}{os.getpid()}-"))
    os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp makes 0700; an artifact is a normal directory
    return scratch


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (main thread only), so ``finally`` blocks clean up scratch."""
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a scratch directory next to ``out``; on success it replaces ``out`` in one rename.

    On any exception, Ctrl-C or SIGTERM the scratch directory is removed and
    ``out`` is left as it was (the previous complete artifact, or nothing).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    scratch = _scratch(out)
    try:
        with _sigterm_as_interrupt():
            yield scratch
            if out.exists():
                _replace_directory(scratch, out)
            else:
                scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: copy instead
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_update(directory: Path) -> Iterator[Path]:
    """Yield a scratch copy of ``directory`` whose files are hard links (no data copied); on success the
    scratch replaces ``directory`` in one exchange, so readers see every new file or none.

    Write new files into the scratch with :func:`write_atomic` (a new inode replaces the link; the
    original stays untouched). On any exception, Ctrl-C or SIGTERM nothing in ``directory`` changes.
    """
    directory = Path(directory)
    scratch = _scratch(directory)
    try:
        with _sigterm_as_interrupt():
            shutil.copytree(directory, scratch, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)
            yield scratch
            _replace_directory(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

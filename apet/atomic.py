"""Write results so that an interruption at any point leaves the previous complete version or none.

Files: temp file in the same directory, fsync, ``os.replace``. A new directory: a scratch directory next to
the target, renamed into place (:func:`atomic_directory`). An existing artifact is never renamed itself (it may
be a mount point or a symlink's target, DESIGN §3): :func:`replace_files` stages the new files in a scratch
directory *inside* it, then moves them in one rename each, the commit file (``manifest.json``,
``build_report.json``) last, and deletes the files the new version no longer has only after that. While the
files move, the staging directory is named ``.apet-commit-*``: readers that see one wait and retry
(:func:`apet.manifest.consistent_read`). SIGTERM is turned into KeyboardInterrupt while a directory is being
written so the scratch directory is cleaned up; the moves themselves are not interrupted. Scratch left by
SIGKILL is removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

from apet.errors import UsageError

log = logging.getLogger(__name__)

_TMP_MARK = ".apet-tmp-"
COMMIT_MARK = ".apet-commit-"  # inside an artifact: a staging directory whose files are being moved in
SCRATCH_PREFIXES = (_TMP_MARK, COMMIT_MARK)  # entries of an artifact directory that are apet's scratch
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


def place_file(source: Path, target: Path, otherwise: Literal["copy", "symlink"]) -> str:
    """Put ``source`` at ``target`` without copying where the filesystem allows: a hard link (the version of the
    file as it is now, whole, while ``source`` may later be replaced by rename), else -- another filesystem, or
    links refused -- ``otherwise``: ``"copy"`` or ``"symlink"`` (to ``source``'s real path). Returns what it did:
    ``"linked"``, ``"copied"`` or ``"symlinked"``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return "linked"
    except OSError:
        if otherwise == "symlink":
            os.symlink(os.path.realpath(source), target)
            return "symlinked"
        shutil.copy2(source, target)
        return "copied"


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


def _remove_stale(candidates: Iterator[Path], mark: str) -> None:
    """Scratch dirs of killed runs (their pid is gone) are deleted; live ones are left alone."""
    for stale in candidates:
        try:
            pid = int(stale.name.split(mark, 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _remove_stale_scratch(out: Path) -> None:
    _remove_stale(out.parent.glob(f".{out.name}{_TMP_MARK}*"), _TMP_MARK)


def _scratch(out: Path, inside: bool = False) -> Path:
    """A scratch directory on ``out``'s file system, so that the final renames are atomic: next to ``out`` for a
    new directory, inside it (``inside``) for an existing one, which may be a mount point or a link's target."""
    if inside:
        for mark in (_TMP_MARK, COMMIT_MARK):
            _remove_stale(out.glob(f"{mark}*"), mark)
        scratch = Path(tempfile.mkdtemp(dir=out, prefix=f"{_TMP_MARK}{os.getpid()}-"))
    else:
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


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the moves are done: an interrupted commit would leave a mix of old and new
    files. The command then ends normally (its results are complete), saying that the signal came too late."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.warning("signal %d arrived while the new files were being moved in; they are complete", received[0])


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staged_files(scratch: Path) -> list[str]:
    return sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class Staging:
    """Where new files go (``path``), and what the caller decides before the block ends: ``files``, the staged
    files to move in (None: all of them), ``remove``, names apet owns that the new version no longer has."""

    path: Path
    target: Path
    last: list[str]
    files: list[str] | None = None
    remove: set[str] = field(default_factory=set)
    moved: list[str] = field(default_factory=list)


def _commit_in_place(stage: Staging) -> None:
    """Move the staged files into ``stage.target`` (each already on disk), the commit files last, then delete
    what the new version no longer has. Only names are renamed, never the target itself."""
    names = stage.files if stage.files is not None else _staged_files(stage.path)
    for name in names:
        _fsync(stage.path / name)
    committing = stage.target / (COMMIT_MARK + stage.path.name[len(_TMP_MARK):])
    stage.path.rename(committing)  # from here until it is gone, readers wait: files are changing
    stage.path = committing
    _fsync(stage.target, directory=True)
    order = [n for n in names if n not in stage.last] + [n for n in stage.last if n in names]
    for name in order:
        if name in stage.last:  # everything the commit file refers to is durable before it is
            _fsync(stage.target, directory=True)
        destination = stage.target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(committing / name, destination)
        stage.moved.append(name)
    for name in sorted(stage.remove - set(names)):  # only once the new version is committed
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            (stage.target / name).unlink()
    shutil.rmtree(committing, ignore_errors=True)
    _fsync(stage.target, directory=True)


def _commit_new(stage: Staging) -> None:
    """A directory that did not exist: drop what is not to be moved, and rename the whole scratch into place."""
    keep = set(stage.files) if stage.files is not None else None
    for name in _staged_files(stage.path):
        if keep is not None and name not in keep:
            (stage.path / name).unlink()
        else:
            _fsync(stage.path / name)
    stage.path.rename(stage.target)
    stage.moved = _staged_files(stage.target)
    _fsync(stage.target.parent, directory=True)


@contextlib.contextmanager
def replace_files(directory: Path, *, last: Sequence[str] = ()) -> Iterator[Staging]:
    """Stage new files for ``directory`` in ``Staging.path``; on success they replace their namesakes.

    ``directory`` may be a symlink (its target is updated, the link stays) or a mount point (it is never
    renamed). A directory that does not exist yet is created in one rename. Files of ``directory`` that are
    neither staged nor in ``Staging.remove`` are left alone (a user's notes, profiling results). On any
    exception, Ctrl-C or SIGTERM before the commit, nothing in ``directory`` changes.
    """
    target = Path(os.path.realpath(directory))
    fresh = not target.exists()
    stage = Staging(_scratch(target, inside=not fresh), target, list(last))
    try:
        with _sigterm_as_interrupt():
            yield stage
        with _signals_held():
            (_commit_new if fresh else _commit_in_place)(stage)
    finally:
        if stage.path != target:
            shutil.rmtree(stage.path, ignore_errors=True)

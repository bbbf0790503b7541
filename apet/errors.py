"""One error hierarchy for the whole tool.

Every failure a user can cause or fix raises a subclass of :class:`ApetError`
whose message says what went wrong *and* how to fix it. The CLI prints these
without a traceback and exits with the class's ``exit_code`` so scripts on a
device can tell a bad argument from a broken artifact from a missing backend.
"""

from __future__ import annotations

import contextvars
import errno
import shlex
import sys
import traceback
from typing import Any, Callable


class ApetError(Exception):
    """Base class: an actionable error. ``fix`` is appended to the message."""

    exit_code = 1

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} — {fix}" if fix else what)


class UsageError(ApetError, ValueError):
    """A command-line or API argument is out of its allowed range."""

    exit_code = 2


class InputError(ApetError, ValueError):
    """User data (image, prompt, tensor) cannot be processed as given."""

    exit_code = 3


class ArtifactError(ApetError):
    """An artifact directory, manifest, ONNX file or engine is missing, stale or corrupt."""

    exit_code = 4


class BackendError(ApetError):
    """An optional package or device needed for the requested backend is unavailable or failed."""

    exit_code = 5


# True while a command-line command runs (apet.cli): messages then name flags, from Python parameter names
COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("apet_command_line", default=False)


def option(name: str, value: Any = None) -> str:
    """How the reader of a message passes parameter ``name``: ``--max-new-tokens 1`` on the command line,
    ``max_new_tokens=1`` in Python (one message text for both interfaces, each in its own words)."""
    if COMMAND_LINE.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is None else f"{flag} {shlex.quote(str(value))}"
    return name if value is None else f"{name}={value!r}"


def check_range(name: str, value: float, low: float, high: float, *, fix: str | None = None) -> None:
    """Raise :class:`UsageError` naming the argument, its value and the allowed closed range."""
    if not (low <= value <= high):
        raise UsageError(
            f"{name}={value!r} is outside the allowed range [{low}, {high}]",
            fix or f"pass a {name} between {low} and {high}",
        )


class StorageError(ApetError):
    """The file system refused a read or write: read-only, full, permission denied, a path through a file."""

    exit_code = 6


_OS_FIXES = {
    errno.EROFS: ("is on a read-only file system", "write to a writable location (another --out)"),
    errno.ENOSPC: ("ran out of space (disk full)", "free some space, or write to another disk"),
    errno.EDQUOT: ("exceeds the disk quota", "free some space, or write to another disk"),
    errno.EACCES: ("is not accessible (permission denied)", "choose a location you can write to, or fix its "
                   "permissions"),
    errno.EPERM: ("is not permitted here", "choose a location you can write to"),
    errno.ENOTDIR: ("goes through a regular file, not a directory", "choose a path whose parents are directories"),
    errno.ENOENT: ("does not exist or cannot be created here", "check the path (pseudo file systems such as /proc "
                   "cannot hold files)"),
    errno.EISDIR: ("is a directory where a file is expected", "pass a file path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
}


def storage_error(exc: OSError) -> StorageError:
    """An OSError from the file system as an actionable :class:`StorageError` naming the path."""
    path = exc.filename if exc.filename is not None else "a file"
    what, fix = _OS_FIXES.get(exc.errno or -1, (f"failed ({exc.strerror or exc})", "check the path and the disk"))
    error = StorageError(f"{path} {what} [{exc.strerror or type(exc).__name__}]", fix)
    error.__cause__ = exc
    return error


def guarded(call: Callable[[], int], verbose: bool) -> int:
    """Run a command the way every entry point does: an :class:`ApetError` or a refused file-system
    operation becomes one line on stderr and its exit code; Ctrl-C / SIGTERM exit 130."""
    try:
        return call()
    except KeyboardInterrupt:
        print("interrupted: outputs were left as they were before the command", file=sys.stderr)
        return 130
    except (ApetError, OSError) as exc:
        error = storage_error(exc) if isinstance(exc, OSError) else exc
        if verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code

"""One error hierarchy for the whole tool.

Every failure a user can cause or fix raises a subclass of :class:`ApetError`
whose message says what went wrong *and* how to fix it. The CLI prints these
without a traceback and exits with the class's ``exit_code`` so scripts on a
device can tell a bad argument from a broken artifact from a missing backend.
"""

from __future__ import annotations

import contextvars
import errno
import os
import select
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


class ArtifactChangedError(ArtifactError):
    """An export or build replaced the artifact's files while they were read; reading again will succeed.

    Readers never combine files of two versions (DESIGN §3): when the files change under them they retry a few
    times, then raise this, so a deploy script can tell "try again" (exit 8) from a broken artifact (exit 4).
    """

    exit_code = 8


class BackendError(ApetError):
    """An optional package or device needed for the requested backend is unavailable or failed."""

    exit_code = 5


class MissingExtraError(ApetError):
    """A command or backend needs an optional part of apet that is not installed (``pip install 'apet[...]'``)."""

    exit_code = 7


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


EXIT_CLOSED_PIPE = 128 + 13  # 141: what a shell reports for a Unix tool ended by SIGPIPE (`yes | head -1`)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``| head``): Linux and macOS report
    POLLERR on the write end of a pipe without readers. Where that cannot be asked, assume yes."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _quiet_closed_stdout() -> int:
    """The reader of our output went away (``apet inspect DIR | head -2``): not an error of apet's, so,
    as Unix tools do, stop without a message. Standard output is pointed at /dev/null so that the
    interpreter's flush at exit does not fail a second time ("Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return EXIT_CLOSED_PIPE


def guarded(call: Callable[[], int], verbose: bool) -> int:
    """Run a command the way every entry point does: an :class:`ApetError` or a refused file-system
    operation becomes one line on stderr and its exit code; Ctrl-C / SIGTERM exit 130; a closed
    standard output (``| head``) ends quietly with 141, as a tool ended by SIGPIPE (docs/errors.md)."""
    try:
        code = call()
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit: a reader that went away is then seen below
        return code
    except KeyboardInterrupt:
        print("interrupted: outputs were left as they were before the command", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if exc.filename is None and _stdout_closed():
            return _quiet_closed_stdout()
        return _report(storage_error(exc), verbose)
    except (ApetError, OSError) as exc:
        return _report(storage_error(exc) if isinstance(exc, OSError) else exc, verbose)


def _report(error: ApetError, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"error: {error}", file=sys.stderr)
    return error.exit_code

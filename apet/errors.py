"""One error hierarchy for the whole tool.

Every failure a user can cause or fix raises a subclass of :class:`ApetError`
whose message says what went wrong *and* how to fix it. The CLI prints these
without a traceback and exits with the class's ``exit_code`` so scripts on a
device can tell a bad argument from a broken artifact from a missing backend.
"""

from __future__ import annotations


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


def check_range(name: str, value: float, low: float, high: float, *, fix: str | None = None) -> None:
    """Raise :class:`UsageError` naming the argument, its value and the allowed closed range."""
    if not (low <= value <= high):
        raise UsageError(
            f"{name}={value!r} is outside the allowed range [{low}, {high}]",
            fix or f"pass a {name} between {low} and {high}",
        )

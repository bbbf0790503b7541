"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal names what was wrong and how to fix it (the limit's flag or field); nothing else ever
reaches a client — an unexpected exception becomes a 500 whose message says the details are in the
server log, so a traceback never leaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apet.errors import ApetError, ArtifactError, BackendError, InputError, UsageError


@dataclass
class ApiError(Exception):
    status: int
    message: str
    code: str = "invalid_request"
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        if self.status < 500:
            return "invalid_request_error"
        return "server_error" if self.status == 500 else "service_unavailable"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, fix: str, *, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, f"{message} — {fix}", code, param)


def from_apet_error(exc: ApetError) -> ApiError:
    """An ApetError raised while serving: the user's data -> 400, the server's set-up -> 500 (its message is
    written for people, so it is safe to pass on)."""
    if isinstance(exc, (InputError, UsageError)):
        return ApiError(400, str(exc), "invalid_input")
    code = "artifact_error" if isinstance(exc, ArtifactError) else "backend_error" if isinstance(
        exc, BackendError) else "server_error"
    return ApiError(500, str(exc), code)


def internal_error() -> ApiError:
    return ApiError(500, "internal server error (the details are in the server log)", "internal_error")

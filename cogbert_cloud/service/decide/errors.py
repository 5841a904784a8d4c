"""Errors of the decision service. Each carries the HTTP status it is answered with, so the
transport never has to guess (and never answers 500 for a request it could not serve)."""

from __future__ import annotations

from cogbert_edge.errors import CogbertError

__all__ = ["DecideError", "BadRequest", "Unauthorized", "Forbidden", "UnknownSession", "TokenError",
           "TooLarge", "RateLimited", "Overloaded", "NotReady", "DeadlineExceeded"]


class DecideError(CogbertError):
    """A request the service refuses; ``status`` is the HTTP status, ``code`` a short word."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def body(self) -> dict:
        b: dict = {"error": self.code, "message": str(self)}
        if self.retry_after is not None:
            b["retry_after"] = self.retry_after
        return b


class BadRequest(DecideError):
    """Malformed body, wrong shapes or types, NaN or Inf in an observation."""


class Unauthorized(DecideError):
    status, code = 401, "unauthorized"


class Forbidden(DecideError):
    status, code = 403, "forbidden"


class UnknownSession(DecideError):
    status, code = 404, "unknown_session"


class TokenError(DecideError):
    """A state token that does not verify: another key, model or session, or altered bytes."""

    status, code = 409, "bad_state_token"


class TooLarge(DecideError):
    status, code = 413, "too_large"


class RateLimited(DecideError):
    status, code = 429, "rate_limited"


class Overloaded(DecideError):
    status, code = 503, "overloaded"


class NotReady(DecideError):
    status, code = 503, "not_ready"


class DeadlineExceeded(DecideError):
    status, code = 503, "deadline_exceeded"

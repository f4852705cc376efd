"""The controller's own exceptions. The API edge turns them into problem+json."""

from __future__ import annotations

from dataclasses import dataclass, field

from botspec.validate import FieldError

__all__ = ["FieldError"]


class TgfleetError(Exception):
    """Base of the errors the API edge knows how to answer."""

    status = 500
    title = "Internal error"
    type_ = "about:blank"

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors: list[FieldError] = errors or []


class InvalidSpec(TgfleetError):
    """Input that does not describe a valid bot (or defaults, or token)."""

    status = 422
    title = "Invalid input"
    type_ = "https://tgfleet.dev/problems/invalid-input"


class BadRequest(TgfleetError):
    """A request that cannot be read at all (malformed JSON, wrong content type)."""

    status = 400
    title = "Bad request"
    type_ = "https://tgfleet.dev/problems/bad-request"


class TooLarge(TgfleetError):
    status = 413
    title = "Content too large"
    type_ = "https://tgfleet.dev/problems/too-large"


class UnsupportedMediaType(TgfleetError):
    status = 415
    title = "Unsupported media type"
    type_ = "https://tgfleet.dev/problems/unsupported-media-type"


class BotNotFound(TgfleetError):
    status = 404
    title = "Bot not found"
    type_ = "https://tgfleet.dev/problems/not-found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no bot named {name!r}")
        self.name = name


class NotFound(TgfleetError):
    status = 404
    title = "Not found"
    type_ = "https://tgfleet.dev/problems/not-found"


class Conflict(TgfleetError):
    """The request is valid but clashes with the current state (taken name, bad transition)."""

    status = 409
    title = "Conflict"
    type_ = "https://tgfleet.dev/problems/conflict"


class HeldElsewhere(Conflict):
    """The bot is held by another host's controller: that one alone acts on its process."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(
            f"{name} runs on host {holder!r}: its controller alone acts on its process; "
            f"ask that host's API (or move the bot here first)"
        )
        self.name = name
        self.holder = holder


class PreconditionFailed(TgfleetError):
    """An If-Match that no longer matches: the bot changed since the client read it."""

    status = 412
    title = "Precondition failed"
    type_ = "https://tgfleet.dev/problems/precondition-failed"


class VersionMismatch(Conflict):
    """A bot's spec changed between the read an update was made from and its write."""

    def __init__(self, name: str, expected: int, current: int) -> None:
        super().__init__(f"{name} is at version {current}, not {expected}")
        self.name = name
        self.expected = expected
        self.current = current


class Unauthorized(TgfleetError):
    """No token, or one that is unknown, revoked, expired or sent where it leaks."""

    status = 401
    title = "Unauthorized"
    type_ = "https://tgfleet.dev/problems/unauthorized"

    def __init__(self, detail: str, reason: str = "missing") -> None:
        super().__init__(detail)
        #: Why, in one bounded word (the label of tgfleet_api_refusals_total).
        self.reason = reason


class Forbidden(TgfleetError):
    """A valid token whose scope does not allow the operation."""

    status = 403
    title = "Forbidden"
    type_ = "https://tgfleet.dev/problems/forbidden"


class TooManyRequests(TgfleetError):
    """Too many failed authentications from one client address."""

    status = 429
    title = "Too many requests"
    type_ = "https://tgfleet.dev/problems/too-many-requests"

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class StoreUnavailable(TgfleetError):
    """PostgreSQL cannot be reached; reads may still be answered from memory."""

    status = 503
    title = "Database unavailable"
    type_ = "https://tgfleet.dev/problems/unavailable"


class SupervisorUnavailable(TgfleetError):
    """circusd did not answer."""

    status = 503
    title = "Supervisor unavailable"
    type_ = "https://tgfleet.dev/problems/unavailable"


@dataclass(frozen=True)
class Problem:
    """An RFC 9457 problem document."""

    status: int
    title: str
    detail: str
    type: str = "about:blank"
    errors: list[FieldError] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        return body

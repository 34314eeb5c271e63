"""Domain exceptions, and the one place they become problem+json (RFC 9457)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from asyncpg.exceptions import (  # type: ignore[import-untyped]
    InsufficientResourcesError,
    OperatorInterventionError,
    PostgresConnectionError,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from service.models import Newsletter

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
INVALID_EMAIL = "Please, enter correct email address"
REQUIRED = "This field is required."
LANGUAGE_TAG = "Language must be a tag like en or uk."


@dataclass
class FieldError:
    field: str
    code: str
    message: str
    detail: str | None = None
    suggestion: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"field": self.field, "code": self.code, "message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        if self.suggestion is not None:
            out["suggestion"] = self.suggestion
        return out


def unknown_newsletters(slugs: list[str]) -> FieldError:
    """The one wording of "no such (public) newsletter", for every way a slug comes in."""
    return FieldError(
        "newsletters",
        "unknown_newsletter",
        "Unknown newsletter: " + ", ".join(slug[:64] for slug in slugs[:5]),
    )


class DomainError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail


class InvalidInput(DomainError):
    status = 422
    code = "invalid_input"

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        # The first error's message is the title: a front-end can show it as is.
        self.title = errors[0].message if errors else "Invalid input"
        super().__init__(None)


class NotFound(DomainError):
    status = 404
    code = "not_found"
    title = "Not found"


class TokenNotFound(NotFound):
    code = "unknown_token"
    title = "This link is not valid"


class ConfirmationExpired(DomainError):
    status = 410
    code = "expired_token"
    title = "This link has expired"


class Conflict(DomainError):
    status = 409
    code = "conflict"
    title = "Conflict"


class UnsubscribedSince(DomainError):
    """A confirm link whose every subscription has ended since it was sent (the reader
    unsubscribed, or the address bounced): the later change wins and nothing is activated.
    A 410, as for an expired link (the contract's answers for a token): the link is spent."""

    status = 410
    code = "unsubscribed_since"
    title = "You have since unsubscribed"

    def __init__(self, newsletters: Sequence[Newsletter]) -> None:
        self.newsletters = list(newsletters)
        super().__init__(
            "Nothing was activated: these subscriptions ended after this link was sent. "
            "Sign up again to receive them."
        )


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"
    title = "A valid API key is required"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"
    title = "This API key may not do that"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class UnsupportedMediaType(DomainError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported content type"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        # Field errors quote what the client sent, and a JSON body may carry a lone surrogate
        # ("\ud800") that UTF-8 cannot encode: it is replaced rather than turning 422 into 500.
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


def problem(
    status: int,
    title: str,
    *,
    code: str | None = None,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"about:blank#{code}" if code else "about:blank",
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)


def domain_error_response(exc: DomainError) -> JSONResponse:
    extra: dict[str, Any] = {}
    if isinstance(exc, InvalidInput):
        extra["errors"] = [e.as_dict() for e in exc.errors]
    if isinstance(exc, UnsubscribedSince):  # the shape of a confirmation's 200 answer
        extra["newsletters"] = [n.slug for n in exc.newsletters]
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return problem(
        exc.status, exc.title, code=exc.code, detail=exc.detail, headers=headers, **extra
    )


UNAVAILABLE = "The service is briefly unavailable"
RETRY_UNAVAILABLE_AFTER = 2  # seconds: a dropped connection or a failover is over by then

# Raised while the database cannot be reached or a connection dies mid-request: a server that
# is down, restarting (failover, an operator's terminate) or out of connections. SQLAlchemy
# does not wrap errors raised while connecting, so the driver's own types are listed too.
_UNREACHABLE: tuple[type[Exception], ...] = (
    OperationalError,  # also SQLite's "database is locked" after its busy timeout
    InterfaceError,
    PoolTimeout,  # every pooled connection busy for pool_timeout seconds
    ConnectionError,
    TimeoutError,
    PostgresConnectionError,
    OperatorInterventionError,  # admin shutdown, "the database system is starting up"
    InsufficientResourcesError,  # too many connections
)


NOT_MIGRATED = "Service not ready: database not migrated"
# Seconds: `newsletter migrate` is usually run as a deployment starts, and is done by then.
RETRY_NOT_MIGRATED_AFTER = 30
UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for "relation ... does not exist"


def schema_missing(exc: BaseException) -> bool:
    """Whether the error is a table that is not there: the database has not been migrated
    (`newsletter migrate` not run yet), not a bug and not an outage."""
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "sqlstate", None) == UNDEFINED_TABLE:  # asyncpg, and SQLAlchemy's wrapper
        return True
    return isinstance(orig, sqlite3.OperationalError) and str(orig).startswith("no such table")


def database_unavailable(exc: BaseException) -> bool:
    """Whether this is the database being out of reach rather than a bug (a retry may work)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _UNREACHABLE)


def first_line(exc: BaseException) -> str:
    """The driver's own message when there is one, its first line, for one log line."""
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DomainError)
        return domain_error_response(exc)

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        phrase = HTTPStatus(exc.status_code).phrase
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
        headers = dict(exc.headers) if exc.headers else None
        return problem(exc.status_code, phrase, detail=detail, headers=headers)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            # Not a field's fault: the body is not JSON at all (the sign-up says 400 too).
            return problem(
                400,
                "The request body could not be read",
                code="malformed_body",
                detail="Malformed JSON.",
            )
        errors = []
        for err in exc.errors():
            loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query")]
            field = ".".join(loc) or "body"
            missing = err.get("type") == "missing"
            errors.append(
                FieldError(
                    field=field,
                    code="required" if missing else "invalid",
                    message=REQUIRED if missing else str(err.get("msg", "Invalid value")),
                ).as_dict()
            )
        title = errors[0]["message"] if errors else "Invalid input"
        return problem(422, title, code="invalid_input", errors=errors)

    async def on_unreachable(_request: Request, exc: Exception) -> Response:
        if schema_missing(exc):
            # Found where the error surfaces, so no request pays for a check up front.
            log.warning("database not migrated: run `newsletter migrate` (%s)", first_line(exc))
            return problem(
                503,
                NOT_MIGRATED,
                code="not_migrated",
                detail="The database has no schema yet. Try again once it has been migrated.",
                headers={"Retry-After": str(RETRY_NOT_MIGRATED_AFTER)},
            )
        if not database_unavailable(exc):
            raise exc  # a real bug: the server error handler logs it and answers 500
        log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc)[:300])
        return problem(
            503,
            UNAVAILABLE,
            code="unavailable",
            detail="The database could not be reached. Try again in a few seconds.",
            headers={"Retry-After": str(RETRY_UNAVAILABLE_AFTER)},
        )

    async def on_server_error(_request: Request, exc: Exception) -> Response:
        # Starlette's last resort answers text/plain; clients parse problem+json everywhere.
        # The exception still reaches the server's log after this answer.
        return problem(500, HTTPStatus.INTERNAL_SERVER_ERROR.phrase, code="internal_error")

    async def on_integrity_error(_request: Request, exc: Exception) -> Response:
        # Two requests creating the same thing at once (the same slug, address or block):
        # each checked first and found nothing, and the database's unique index kept one.
        # Or one changing a row another has just deleted.
        log.info("integrity error answered 409: %s", first_line(exc))
        return problem(
            409,
            Conflict.title,
            code=Conflict.code,
            detail="A concurrent request changed the same thing; look again, then retry.",
        )

    app.add_exception_handler(Exception, on_server_error)
    app.add_exception_handler(IntegrityError, on_integrity_error)
    # The row an update was for was deleted meanwhile (an erasure racing an edit).
    app.add_exception_handler(StaleDataError, on_integrity_error)
    app.add_exception_handler(DomainError, on_domain_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    unreachable: list[type[Exception]] = [DBAPIError, *_UNREACHABLE]
    for kind in unreachable:
        app.add_exception_handler(kind, on_unreachable)

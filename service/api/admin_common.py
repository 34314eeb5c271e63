"""What every admin route shares: error answers for OpenAPI, cursors, the audit actor."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import Path

from service.api.schemas import problem_response
from service.errors import FieldError, InvalidInput
from service.models import ApiKey

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem_response(
        "No valid API key",
        {"type": "about:blank#unauthorized", "title": "A valid API key is required", "status": 401},
    ),
    403: problem_response(
        "Read-only key",
        {"type": "about:blank#forbidden", "title": "This API key may not do that", "status": 403},
    ),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: problem_response(
        "Not found", {"type": "about:blank#not_found", "title": "Not found", "status": 404}
    )
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: problem_response(
        "Invalid input",
        {
            "type": "about:blank#invalid_input",
            "title": "This field is required.",
            "status": 422,
            "errors": [{"field": "name", "code": "required", "message": "This field is required."}],
        },
    )
}
# What every admin route may answer: a body that cannot be decoded is a 400, and any parameter
# or field it refuses a 422 problem, not FastAPI's default validation shape.
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_response(
        "A body that is not JSON (or not UTF-8)",
        {"type": "about:blank", "title": "Bad Request", "status": 400},
    ),
    **AUTH_RESPONSES,
    **INVALID,
}
# The largest ids of the tables: INTEGER (newsletters, keys, blocklist, webhooks, imports) and
# BIGINT (subscribers, events, outbox, deliveries) on PostgreSQL.
INT_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1
# Row ids in paths, of the INTEGER tables: bounded so an id past the column is a 422, not a
# driver overflow (a 500).
RowId = Annotated[int, Path(ge=1, le=INT_MAX)]
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: problem_response(
        "Conflict", {"type": "about:blank#conflict", "title": "Conflict", "status": 409}
    )
}


def actor(key: ApiKey) -> str:
    """How the audit trail names whoever used this key."""
    return f"key:{key.name}"


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, largest: int = BIGINT_MAX) -> int | None:
    """The last id of the page before; `largest` is the most the id column holds (a cursor
    past it was never handed out, and PostgreSQL's driver refuses it)."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw.isdigit() and len(raw) < 19 and int(raw) <= largest:
            return int(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise _invalid_cursor()


def _invalid_cursor() -> InvalidInput:
    return InvalidInput([FieldError("cursor", "invalid_cursor", "This cursor is not valid.")])


def encode_key_cursor(last_key: str) -> str:
    return base64.urlsafe_b64encode(b"k:" + last_key.encode()).decode().rstrip("=")


def decode_any_cursor(cursor: str | None) -> int | str | None:
    """An id cursor, or an address cursor (prefix searches walk addresses in order)."""
    if cursor and len(cursor) <= 600:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raw = ""
        if raw.startswith("k:"):
            if "\x00" in raw:  # no address holds one, and PostgreSQL refuses it
                raise _invalid_cursor()
            return raw[2:]
    return decode_cursor(cursor)


def refuse_nul(field: str, value: str | None, message: str) -> None:
    """A query parameter with a NUL matches nothing, and PostgreSQL refuses it: a 422."""
    if value is not None and "\x00" in value:
        raise InvalidInput([FieldError(field, "invalid", message)])


def next_cursor(ids: list[int], limit: int) -> str | None:
    """A cursor only when the page is full: keyset pagination stays right while rows arrive."""
    return encode_cursor(ids[-1]) if ids and len(ids) == limit else None

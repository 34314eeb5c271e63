"""The admin API's JSON bodies: a size cap and the content type, checked before FastAPI reads.

FastAPI reads a body whole, before any dependency runs (the API key's included), and takes any
content type as possibly JSON: a big body was held in memory before a 401, and a form or text
body came back as a 422 about a "dictionary". This pure ASGI middleware answers 413 and 415
first, and a 400 for JSON nested too deeply to parse safely (see service.json_depth). CSV
imports stream their own large bodies and are left alone.

It also drops the admin API's empty query parameters: design.md writes the search as
`?email=&newsletter=&status=&limit=&cursor=`, as a search form sends it, and an empty one
means "not given" (FastAPI refused an empty `status`, `limit` or date with a 422).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.bodies import TOO_DEEP
from service.errors import problem
from service.json_depth import nests_deeper

ADMIN = "/v1/admin/"
OWN_BODIES = ("/v1/admin/imports",)  # streamed CSV uploads, capped by their own rule
WRITES = frozenset({"POST", "PUT", "PATCH"})
MAX_ADMIN_BODY = 1024 * 1024  # a newsletter, a person or a webhook is a few KiB at most


def _json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def without_empty_params(query: bytes) -> bytes:
    """`a=&b=2&c` → `b=2`: the other pairs byte for byte as they came."""
    return b"&".join(pair for pair in query.split(b"&") if pair.partition(b"=")[2] != b"")


class AdminJSONBody:
    def __init__(self, app: ASGIApp, limit: int = MAX_ADMIN_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(ADMIN) and scope.get("query_string"):
            scope = {**scope, "query_string": without_empty_params(scope["query_string"])}
        if (
            scope["type"] != "http"
            or scope["method"] not in WRITES
            or not path.startswith(ADMIN)
            or path.startswith(OWN_BODIES)
        ):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        has_body = (length is not None and length.strip() not in ("", "0")) or (
            "transfer-encoding" in headers
        )
        if not has_body:
            await self.app(scope, receive, send)
            return
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            answer = problem(
                413,
                "Request body too large",
                code="payload_too_large",
                detail=f"At most {self.limit} bytes.",
            )
            await answer(scope, receive, send)
            return
        if not _json_type(headers.get("content-type", "")):
            answer = problem(
                415,
                "Unsupported content type",
                code="unsupported_media_type",
                detail="Send application/json.",
            )
            await answer(scope, receive, send)
            return

        received = 0
        chunks: list[bytes] = []

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                chunks.append(chunk)
                # HTTPExceptions, as FastAPI turns any other error while it reads a body into
                # a 400 of its own; the handler answers them.
                if received > self.limit:  # a chunked body past the cap
                    raise HTTPException(413, f"At most {self.limit} bytes.")
                if not message.get("more_body", False) and nests_deeper(b"".join(chunks)):
                    raise HTTPException(400, TOO_DEEP)  # see service.json_depth
            return message

        await self.app(scope, capped, send)

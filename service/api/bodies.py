"""Reading request bodies with a size cap, in JSON, urlencoded and multipart form."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import DomainError, PayloadTooLarge, UnsupportedMediaType
from service.json_depth import MAX_JSON_DEPTH, nests_deeper

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
TOO_DEEP = f"Malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels."


class MalformedBody(DomainError):
    status = 400
    code = "malformed_body"
    title = "The request body could not be read"


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def wants_html(request: Request) -> bool:
    return media_type(request) in FORM_TYPES and "text/html" in request.headers.get("accept", "")


async def read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedBody("Invalid Content-Length.")
        if int(declared) > limit:
            raise PayloadTooLarge(f"At most {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"At most {limit} bytes.")
        chunks.append(chunk)
    body = b"".join(chunks)
    # Starlette's form parser reads the cached body instead of the spent stream.
    request._body = body
    return body


def parse_json(body: bytes) -> Any:
    """JSON from a client; too deep to parse safely is malformed (see service.json_depth)."""
    if nests_deeper(body):
        raise MalformedBody(TOO_DEEP)
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError among them
        raise MalformedBody(f"Malformed JSON: {type(exc).__name__}.") from exc


def _json_object(body: bytes) -> dict[str, Any]:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise MalformedBody("The JSON body must be an object.")
    return data


def _collect(pairs: list[tuple[str, Any]], list_fields: tuple[str, ...]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if isinstance(value, UploadFile):
            continue  # files are never part of a sign-up
        if key in list_fields:
            data.setdefault(key, []).append(value)
        elif key not in data:
            data[key] = value
    return data


async def read_fields(
    request: Request, limit: int, list_fields: tuple[str, ...] = ("newsletters",)
) -> dict[str, Any]:
    """Decode a JSON object or a form into a dict; repeated form keys in list_fields are lists."""
    kind = media_type(request)
    if kind not in ("application/json", *FORM_TYPES):
        raise UnsupportedMediaType(
            "Send application/json, application/x-www-form-urlencoded or multipart/form-data."
        )
    body = await read_capped(request, limit)
    if kind == "application/json":
        return _json_object(body)
    if kind == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
            # errors="strict": a percent-escape of invalid UTF-8 is refused like a raw byte,
            # not stored as U+FFFD (which an internationalised address may hold).
            pairs: list[tuple[str, Any]] = parse_qsl(
                text,
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=200,
                errors="strict",
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedBody("Malformed form body.") from exc
        return _collect(pairs, list_fields)
    try:
        # Starlette falls back to Latin-1 for a part that is not UTF-8 and stores mojibake;
        # a sign-up carries no files, so the whole body must be UTF-8, as with the other types.
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody("Malformed multipart body: not UTF-8.") from exc
    try:
        form = await request.form(max_files=0, max_fields=200, max_part_size=limit)
    except Exception as exc:  # multipart errors come in several library types
        if "files" in str(exc):  # Starlette's "Too many files": a file part, max_files=0
            raise MalformedBody("A sign-up takes text fields only, no files.") from exc
        raise MalformedBody("Malformed multipart body.") from exc
    return _collect(list(form.multi_items()), list_fields)

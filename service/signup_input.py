"""The sign-up request: field rules of the public form, shared by JSON and form bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service.addresses import Address, normalise
from service.config import Settings
from service.errors import REQUIRED, FieldError, InvalidInput

MAX_NAME = 200
MAX_LANGUAGE = 16
MAX_SLUG = 64


@dataclass
class SignupInput:
    address: Address
    newsletters: list[str]
    name: str | None = None
    language: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    honeypot: bool = False
    page: str | None = None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.strip()


def _clean_free_text(value: str) -> str:
    # Names end up in mail headers and pages: control characters (CR/LF above all) go.
    return "".join(ch for ch in value if ch.isprintable()).strip()


def parse_signup(data: dict[str, Any], settings: Settings) -> SignupInput:
    """Validate a decoded body; raise InvalidInput with every field error at once."""
    errors: list[FieldError] = []

    raw_email = _text(data.get("email"))
    address: Address | None = None
    if not raw_email:
        errors.append(FieldError("email", "required", REQUIRED))
    else:
        checked = normalise(raw_email)
        if isinstance(checked, FieldError):
            errors.append(checked)
        else:
            address = checked

    raw_slugs = data.get("newsletters")
    if isinstance(raw_slugs, str):
        raw_slugs = [raw_slugs]
    slugs: list[str] = []
    if not raw_slugs:
        errors.append(FieldError("newsletters", "required", REQUIRED))
    elif not isinstance(raw_slugs, list) or not all(isinstance(s, str) for s in raw_slugs):
        errors.append(FieldError("newsletters", "invalid", "Newsletters must be a list of slugs."))
    elif len(raw_slugs) > settings.max_newsletters_per_signup:
        errors.append(
            FieldError(
                "newsletters",
                "too_many",
                f"At most {settings.max_newsletters_per_signup} newsletters per sign-up.",
            )
        )
    else:
        slugs = list(dict.fromkeys(s.strip() for s in raw_slugs if s.strip()))
        if not slugs:
            errors.append(FieldError("newsletters", "required", REQUIRED))

    name = _text(data.get("name"))
    if data.get("name") is not None and name is None:
        errors.append(FieldError("name", "invalid", "Name must be text."))
    elif name is not None:
        name = _clean_free_text(name)
        if len(name) > MAX_NAME:
            errors.append(FieldError("name", "too_long", f"At most {MAX_NAME} characters."))

    language = _text(data.get("language"))
    if language and (len(language) > MAX_LANGUAGE or not language.replace("-", "").isalnum()):
        errors.append(FieldError("language", "invalid", "Language must be a tag like en or uk."))

    attributes = data.get("attributes")
    if attributes is None:
        attributes = {}
    elif not isinstance(attributes, dict):
        errors.append(FieldError("attributes", "invalid", "Attributes must be a JSON object."))
        attributes = {}
    elif len(json.dumps(attributes)) > settings.max_attributes_bytes:
        errors.append(
            FieldError(
                "attributes",
                "too_large",
                f"Attributes must be at most {settings.max_attributes_bytes} bytes of JSON.",
            )
        )

    if errors or address is None:
        raise InvalidInput(errors)
    honeypot = data.get("website")
    return SignupInput(
        address=address,
        newsletters=slugs,
        name=name or None,
        language=language or None,
        attributes=attributes,
        honeypot=bool(honeypot),
    )

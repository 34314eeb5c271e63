"""The sign-up request: field rules of the public form, shared by JSON and form bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service import i18n
from service.addresses import Address, normalise
from service.config import Settings
from service.errors import (
    LANGUAGE_TAG,
    REQUIRED,
    FieldError,
    InvalidInput,
    unknown_newsletters,
)
from service.newsletters import SLUG

MAX_NAME = 200
MAX_SLUG = 64
MAX_ATTRIBUTES_DEPTH = 8


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


def _depth(value: Any) -> int:
    """How deeply objects and lists nest, walked without recursion (the input is untrusted)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_ATTRIBUTES_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def _clean_free_text(value: str) -> str:
    # Names end up in mail headers and pages: control characters (CR/LF above all) go.
    return "".join(ch for ch in value if ch.isprintable()).strip()


NOT_SLUGS = FieldError("newsletters", "invalid", "Newsletters must be a list of slugs.")


def slug_list(value: Any) -> list[str] | None:
    """A `newsletters` field as a list of strings (one bare string allowed), None if it is
    anything else."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def parse_profile(
    data: dict[str, Any], settings: Settings
) -> tuple[str | None, str | None, dict[str, Any]]:
    """Name, language and attributes by the sign-up form's rules (ops edits use them too)."""
    errors: list[FieldError] = []
    profile = _profile(data, settings, errors)
    if errors:
        raise InvalidInput(errors)
    return profile


def _profile(
    data: dict[str, Any], settings: Settings, errors: list[FieldError]
) -> tuple[str | None, str | None, dict[str, Any]]:
    name = _text(data.get("name"))
    if data.get("name") is not None and name is None:
        errors.append(FieldError("name", "invalid", "Name must be text."))
    elif name is not None:
        name = _clean_free_text(name)
        if len(name) > MAX_NAME:
            errors.append(FieldError("name", "too_long", f"At most {MAX_NAME} characters."))

    language = _text(data.get("language"))
    if language and not i18n.is_tag(language):
        errors.append(FieldError("language", "invalid", LANGUAGE_TAG))

    attributes = data.get("attributes")
    if attributes is None:
        attributes = {}
    elif not isinstance(attributes, dict):
        errors.append(FieldError("attributes", "invalid", "Attributes must be a JSON object."))
        attributes = {}
    elif _depth(attributes) > MAX_ATTRIBUTES_DEPTH:
        # Deep nesting is tiny in bytes yet overflows the JSON encoder when stored.
        errors.append(
            FieldError(
                "attributes",
                "too_deep",
                f"Attributes may nest at most {MAX_ATTRIBUTES_DEPTH} levels.",
            )
        )
        attributes = {}
    else:
        try:
            # NaN and Infinity (1e400 decodes to it) are not JSON: PostgreSQL refuses them.
            encoded = json.dumps(attributes, allow_nan=False)
            # A lone surrogate ("\ud800" in the JSON) decodes to a str that no response can
            # encode as UTF-8: stored, it would break every later read of this subscriber.
            json.dumps(attributes, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            errors.append(
                FieldError("attributes", "invalid", "Attributes must be valid Unicode text.")
            )
            attributes = {}
        except ValueError:
            errors.append(
                FieldError("attributes", "invalid", "Attributes may not hold NaN or Infinity.")
            )
            attributes = {}
        else:
            if len(encoded) > settings.max_attributes_bytes:
                errors.append(
                    FieldError(
                        "attributes",
                        "too_large",
                        f"Attributes must be at most {settings.max_attributes_bytes} bytes"
                        " of JSON.",
                    )
                )

    return name or None, language or None, attributes


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

    raw_slugs = slug_list(data.get("newsletters"))
    slugs: list[str] = []
    if not data.get("newsletters"):
        errors.append(FieldError("newsletters", "required", REQUIRED))
    elif raw_slugs is None:
        errors.append(NOT_SLUGS)
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
        # A slug no newsletter can have (a NUL byte breaks PostgreSQL) never reaches a query.
        malformed = [s for s in slugs if len(s) > MAX_SLUG or not SLUG.match(s)]
        if not slugs:
            errors.append(FieldError("newsletters", "required", REQUIRED))
        elif malformed:
            errors.append(unknown_newsletters(malformed))

    name, language, attributes = _profile(data, settings, errors)
    if errors or address is None:
        raise InvalidInput(errors)
    return SignupInput(
        address=address,
        newsletters=slugs,
        name=name,
        language=language,
        attributes=attributes,
        honeypot=honeypot_filled(data),
    )


def honeypot_filled(fields: dict[str, Any]) -> bool:
    """The `website` field, which a person never sees, has something in it."""
    return bool(fields.get("website"))

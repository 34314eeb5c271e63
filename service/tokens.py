"""Confirmation tokens (random, stored hashed) and signed per-subscriber manage tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Sequence


def new_confirmation_token() -> tuple[str, str]:
    """Return (token for the link, SHA-256 hex to store)."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_confirmation_tokens(count: int) -> list[tuple[str, str]]:
    """`count` of what new_confirmation_token() gives: one read of the random source for
    them all (a sign-up batch makes up to 64), not one system call per token."""
    raw = os.urandom(32 * count)
    return [
        (token, hash_token(token))
        for token in (
            base64.urlsafe_b64encode(raw[i : i + 32]).rstrip(b"=").decode()
            for i in range(0, len(raw), 32)
        )
    ]


def new_public_id() -> str:
    return uuid.uuid4().hex


def new_public_ids(count: int) -> list[str]:
    """`count` subscriber public ids, each what new_public_id() gives (uuid4().hex).

    uuid4() reads the system's random source once per id (~5 µs, half of checking an imported
    row); one read for them all, with the version and variant bits set as uuid4 sets them.
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])
    hexed = raw.hex()
    return [hexed[i : i + 32] for i in range(0, len(hexed), 32)]


def _signature(key: str, public_id: str) -> str:
    digest = hmac.digest(key.encode(), b"manage:" + public_id.encode(), "sha256")
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def manage_token(keys: Sequence[str], public_id: str) -> str:
    """The subscriber's manage/unsubscribe token: derivable at any time, signed by the first key."""
    return f"{public_id}.{_signature(keys[0], public_id)}"


def verify_manage_token(keys: Sequence[str], token: str) -> str | None:
    """Return the subscriber's public id if any key signed the token, else None."""
    public_id, _, signature = token.partition(".")
    # compare_digest refuses non-ASCII text with a TypeError: such a token is simply wrong.
    if len(public_id) != 32 or not signature or not signature.isascii():
        return None
    for key in keys:
        if hmac.compare_digest(_signature(key, public_id), signature):
            return public_id
    return None


def _bounce_signature(key: str, outbox_id: int) -> str:
    # Lower-case hex: some mail systems fold the case of local parts; 64 bits is plenty for an
    # address that only lets its holder report a bounce of the one message it names.
    return hmac.new(key.encode(), f"bounce:{outbox_id}".encode(), hashlib.sha256).hexdigest()[:16]


def verp_address(keys: Sequence[str], mail_from: str, outbox_id: int) -> str:
    """The envelope sender (MAIL FROM) of one outbox message: bounces of it come back to
    `<local>+bounce-<outbox id>-<signature>@<domain>`, naming the message they are about."""
    local, _, domain = mail_from.rpartition("@")
    signature = _bounce_signature(keys[0], outbox_id)
    return f"{local or 'newsletter'}+bounce-{outbox_id}-{signature}@{domain}"


def _unsubscribe_signature(key: str, public_id: str) -> str:
    return hmac.new(key.encode(), f"unsubscribe:{public_id}".encode(), hashlib.sha256).hexdigest()[
        :16
    ]


def unsubscribe_tag(keys: Sequence[str], public_id: str) -> str:
    """The tag of the List-Unsubscribe mailto, `u-<id in base32>-<signature>`: 46 characters
    with the `+`, so the local part stays within RFC 5321's 64 for a MAIL_FROM local part of
    up to 18, and lower case, as some mail systems fold the case of local parts. 64 bits of
    signature: the address only lets its holder unsubscribe the one reader it names."""
    try:
        compact = base64.b32encode(bytes.fromhex(public_id)).decode().rstrip("=").lower()
    except ValueError:
        compact = ""
    if len(compact) != 26:  # not a 32-digit hex id (every id the service makes is one)
        return f"unsubscribe-{manage_token(keys, public_id)}"
    return f"u-{compact}-{_unsubscribe_signature(keys[0], public_id)}"


def verify_unsubscribe_tag(keys: Sequence[str], rest: str) -> str | None:
    """The public id of an unsubscribe tag's rest (`<base32 id>-<signature>`), if signed."""
    compact, _, signature = rest.lower().partition("-")
    if not rest.isascii() or len(compact) != 26 or len(signature) != 16:
        return None
    try:
        public_id = base64.b32decode(compact.upper() + "======").hex()
    except ValueError:  # binascii.Error is a ValueError
        return None
    for key in keys:
        if hmac.compare_digest(_unsubscribe_signature(key, public_id), signature):
            return public_id
    return None


def address_tag(address: str) -> tuple[str, str] | None:
    """Split `<local>+<kind>-<rest>@domain` into (kind, rest) for kind u (unsubscribe),
    unsubscribe (the longer form of earlier mail) or bounce."""
    local = address.rpartition("@")[0]
    tag = local.rpartition("+")[2] if "+" in local else ""
    kind, dash, rest = tag.partition("-")
    if not dash or kind.lower() not in ("u", "unsubscribe", "bounce") or not rest:
        return None
    return kind.lower(), rest


def verify_bounce_tag(keys: Sequence[str], rest: str) -> int | None:
    """The outbox id of a VERP tag (`<outbox id>-<signature>`) if any key signed it."""
    outbox_id, _, signature = rest.partition("-")
    if not (outbox_id.isascii() and outbox_id.isdigit()) or len(outbox_id) > 18:
        return None
    if not signature or not signature.isascii():
        return None
    for key in keys:
        if hmac.compare_digest(_bounce_signature(key, int(outbox_id)), signature.lower()):
            return int(outbox_id)
    return None


def new_api_key() -> tuple[str, str, str]:
    """Return (the key shown once, its display prefix, the SHA-256 hex to store)."""
    key = "nl_" + secrets.token_urlsafe(32)
    return key, key[:10], hash_token(key)

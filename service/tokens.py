"""Confirmation tokens (random, stored hashed) and signed per-subscriber manage tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence


def new_confirmation_token() -> tuple[str, str]:
    """Return (token for the link, SHA-256 hex to store)."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_public_id() -> str:
    return uuid.uuid4().hex


def _signature(key: str, public_id: str) -> str:
    digest = hmac.new(key.encode(), b"manage:" + public_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def manage_token(keys: Sequence[str], public_id: str) -> str:
    """The subscriber's manage/unsubscribe token: derivable at any time, signed by the first key."""
    return f"{public_id}.{_signature(keys[0], public_id)}"


def verify_manage_token(keys: Sequence[str], token: str) -> str | None:
    """Return the subscriber's public id if any key signed the token, else None."""
    public_id, _, signature = token.partition(".")
    if len(public_id) != 32 or not signature:
        return None
    for key in keys:
        if hmac.compare_digest(_signature(key, public_id), signature):
            return public_id
    return None


def new_api_key() -> tuple[str, str, str]:
    """Return (the key shown once, its display prefix, the SHA-256 hex to store)."""
    key = "nl_" + secrets.token_urlsafe(32)
    return key, key[:10], hash_token(key)

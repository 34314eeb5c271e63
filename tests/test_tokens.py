"""Random values made in bulk are what their one-at-a-time versions give."""

from __future__ import annotations

import base64
import re
import uuid

from service import tokens


def test_public_ids_in_bulk_are_what_uuid4_gives() -> None:
    ids = tokens.new_public_ids(5000)
    assert len(set(ids)) == 5000
    for public_id in ids:
        parsed = uuid.UUID(hex=public_id)
        assert parsed.hex == public_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    assert tokens.new_public_ids(0) == []


def test_confirmation_tokens_in_bulk_are_what_one_at_a_time_gives() -> None:
    one, one_hash = tokens.new_confirmation_token()
    made = tokens.new_confirmation_tokens(1000)
    assert len({token for token, _ in made}) == 1000
    for token, token_hash in [*made, (one, one_hash)]:
        # token_urlsafe(32): 32 random bytes, base64url without padding.
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert len(base64.urlsafe_b64decode(token + "=")) == 32
        assert token_hash == tokens.hash_token(token)
    assert tokens.new_confirmation_tokens(0) == []

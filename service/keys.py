"""Admin API keys: shown once, stored hashed, scoped."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service import tokens
from service.errors import FieldError, Forbidden, InvalidInput, NotFound, Unauthorized
from service.models import ApiKey, KeyScope, utcnow

# last_used_at is a hint for ops, not an audit record: write it at most once a minute.
LAST_USED_GRANULARITY = timedelta(minutes=1)
MAX_NAME = 100  # the column's length


@dataclass
class CreatedKey:
    key: str
    record: ApiKey


async def create_key(session: AsyncSession, name: str, scope: str) -> CreatedKey:
    """Create a key; the plain key exists only in the return value."""
    if scope not in (KeyScope.admin.value, KeyScope.read.value):
        raise InvalidInput([FieldError("scope", "invalid", "scope is admin or read.")])
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        # The audit trail names whoever used a key by this name.
        raise InvalidInput(
            [FieldError("name", "invalid", f"A key needs a name of 1 to {MAX_NAME} characters.")]
        )
    key, prefix, key_hash = tokens.new_api_key()
    record = ApiKey(name=name, scope=scope, prefix=prefix, key_hash=key_hash, created_at=utcnow())
    session.add(record)
    await session.flush()
    return CreatedKey(key=key, record=record)


async def authenticate(
    session: AsyncSession, key: str | None, need_write: bool, now: datetime | None = None
) -> ApiKey:
    """Return the live key or raise 401; raise 403 when a read key asks to write."""
    now = now or utcnow()
    if not key or len(key) > 200:
        raise Unauthorized()
    record = await session.scalar(
        select(ApiKey).where(ApiKey.key_hash == tokens.hash_token(key), ApiKey.revoked_at.is_(None))
    )
    if record is None:
        raise Unauthorized()
    if need_write and record.scope != KeyScope.admin.value:
        raise Forbidden()
    if record.last_used_at is None or now - record.last_used_at > LAST_USED_GRANULARITY:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == record.id)
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
    return record


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list(await session.scalars(select(ApiKey).order_by(ApiKey.id)))


async def revoke_key(session: AsyncSession, key_id: int, now: datetime | None = None) -> None:
    record = await session.get(ApiKey, key_id)
    if record is None:
        raise NotFound(f"No key {key_id}.")
    if record.revoked_at is None:
        record.revoked_at = now or utcnow()
        await session.flush()

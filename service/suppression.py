"""Suppressions (hashed addresses that may not be imported or added) and the blocklist."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from service import events
from service.addresses import normalise
from service.db import insert_for
from service.driver import Query, Runner, SessionRunner, any_of
from service.errors import Conflict, FieldError, InvalidInput, NotFound
from service.models import BlockedEntry, Suppression, table, utcnow

# Built once (they run on every sign-up batch); lists are bound as one parameter each.
SUPPRESSED = Query(select(Suppression.email_hash).where(any_of(Suppression.email_hash, "hashes")))
# The blocklist entries that refuse one of `keys` (addresses) or `domains`, as one text of
# "kind:value" lines: a scalar that another query can carry (the sign-up batch reads it with
# the newsletters, in one round trip).
_entry = BlockedEntry.kind + ":" + BlockedEntry.value
BLOCKING = (
    # The separator as SQL text (typed as str only): SQLAlchemy renders a str separator into
    # the SQL at execution time, and service.driver compiles a statement once.
    select(func.aggregate_strings(_entry, literal_column("'\n'")))  # type: ignore[arg-type]
    .where(
        or_(
            (BlockedEntry.kind == "address") & any_of(BlockedEntry.value, "keys"),
            (BlockedEntry.kind == "domain") & any_of(BlockedEntry.value, "domains"),
        )
    )
    .scalar_subquery()
)
# PostgreSQL: BLOCKING's rule for one row `r` of a statement, that carries the address as
# `email_key` and its domains (domains_of) as `domains`, a text[]: true when it is refused.
BLOCKS_ROW = (
    f"EXISTS (SELECT 1 FROM {BlockedEntry.__tablename__} AS b "  # noqa: S608 (SQL of ours)
    "WHERE (b.kind = 'address' AND b.value = r.email_key) "
    "OR (b.kind = 'domain' AND b.value = ANY(r.domains)))"
)


def address_hash(email_key: str) -> str:
    """The only trace an erased address leaves: SHA-256 of its lower-cased normal form."""
    return hashlib.sha256(email_key.encode()).hexdigest()


def domains_of(email_key: str) -> list[str]:
    """example.com for a@example.com, and every parent of a subdomain (mail.example.com)."""
    domain = email_key.rpartition("@")[2]
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)] or [domain]


async def suppress(
    session: AsyncSession, email_key: str, reason: str, now: datetime | None = None
) -> None:
    """Record a suppression; repeating it (even concurrently) keeps the first reason."""
    await session.execute(
        insert_for(session)(table(Suppression))
        .values(email_hash=address_hash(email_key), reason=reason, created_at=now or utcnow())
        .on_conflict_do_nothing(index_elements=["email_hash"])
    )


async def lift(session: AsyncSession, email_key: str) -> None:
    """Forget a suppression: the person re-consented through double opt-in."""
    await session.execute(
        delete(Suppression).where(Suppression.email_hash == address_hash(email_key))
    )


async def suppressed(session: AsyncSession, email_keys: Iterable[str]) -> set[str]:
    """Which of these addresses are suppressed."""
    return await suppressed_on(SessionRunner(await session.connection()), email_keys)


async def suppressed_on(runner: Runner, email_keys: Iterable[str]) -> set[str]:
    """suppressed() on a service.driver Runner."""
    by_hash = {address_hash(k): k for k in email_keys}
    if not by_hash:
        return set()
    rows = await runner.rows(SUPPRESSED, {"hashes": list(by_hash)})
    return {by_hash[h] for (h,) in rows}


def blocking_params(email_keys: Iterable[str]) -> dict[str, list[str]]:
    """The parameters of BLOCKING for these addresses."""
    keys = list(email_keys)
    return {"keys": keys, "domains": list({d for k in keys for d in domains_of(k)})}


def refused(email_keys: Iterable[str], blocking: str | None) -> set[str]:
    """Which of these addresses BLOCKING's text refuses, by address or by (parent) domain."""
    if not blocking:
        return set()
    entries = [line.partition(":") for line in blocking.split("\n")]
    addresses = {value for kind, _, value in entries if kind == "address"}
    domains = {value for kind, _, value in entries if kind == "domain"}
    return {k for k in email_keys if k in addresses or any(d in domains for d in domains_of(k))}


async def blocked(session: AsyncSession, email_keys: Iterable[str]) -> set[str]:
    """Which of these addresses the blocklist refuses, by address or by (parent) domain."""
    keys = list(email_keys)
    if not keys:
        return set()
    conn = await session.connection()
    return refused(keys, await conn.scalar(select(BLOCKING), blocking_params(keys)))


async def add_block(
    session: AsyncSession, kind: str | None, value: str, note: str = "", actor: str = "cli"
) -> BlockedEntry:
    """Block an address (normalised) or a domain (and with it its subdomains); without a
    kind, a value with an @ is an address."""
    if kind is None:
        kind = "address" if "@" in value else "domain"
    if kind == "address":
        checked = normalise(value)
        if isinstance(checked, FieldError):
            raise InvalidInput([FieldError("value", checked.code, checked.message, checked.detail)])
        value = checked.key
    elif kind == "domain":
        value = value.strip().lower().rstrip(".")
        labels = value.split(".")
        if (
            len(value) > 253
            or len(labels) < 2
            or not all(
                label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels
            )
        ):
            raise InvalidInput([FieldError("value", "invalid", "Not a domain name.")])
    else:
        raise InvalidInput([FieldError("kind", "invalid", "kind is address or domain.")])
    exists = await session.scalar(
        select(BlockedEntry.id).where(BlockedEntry.kind == kind, BlockedEntry.value == value)
    )
    if exists is not None:
        raise Conflict("Already blocked.")
    entry = BlockedEntry(kind=kind, value=value, note=note[:500], created_at=utcnow())
    session.add(entry)
    await session.flush()
    await _audit(session, "blocklist.added", actor, kind=kind, value=value)
    return entry


async def list_blocks(
    session: AsyncSession, after_id: int | None, limit: int
) -> list[BlockedEntry]:
    query = select(BlockedEntry).order_by(BlockedEntry.id).limit(limit)
    if after_id is not None:
        query = query.where(BlockedEntry.id > after_id)
    return list(await session.scalars(query))


async def get_block(session: AsyncSession, entry_id: int) -> BlockedEntry:
    entry = await session.get(BlockedEntry, entry_id)
    if entry is None:
        raise NotFound("No such blocklist entry.")
    return entry


async def update_block_note(
    session: AsyncSession, entry_id: int, note: str, actor: str = "cli"
) -> BlockedEntry:
    """Change why an entry is there; what it blocks is its identity (delete and add)."""
    entry = await get_block(session, entry_id)
    entry.note = note[:500]
    await session.flush()
    await _audit(session, "blocklist.updated", actor, kind=entry.kind, value=entry.value)
    return entry


async def delete_block(session: AsyncSession, entry_id: int, actor: str = "cli") -> None:
    entry = await get_block(session, entry_id)
    await session.execute(delete(BlockedEntry).where(BlockedEntry.id == entry_id))
    await _audit(session, "blocklist.removed", actor, kind=entry.kind, value=entry.value)


async def _audit(session: AsyncSession, type_: str, actor: str, **data: str) -> None:
    # The audit trail of the blocklist; blocked addresses are policy, not a subscriber's data.

    await events.record(
        session, [events.event_row(type_, None, None, actor, None, utcnow(), **data)]
    )

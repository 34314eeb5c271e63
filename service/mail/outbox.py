"""The transactional outbox: enqueue in the caller's transaction, claim with a lease, finish."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.models import DeliveryAttempt, OutboxMessage, OutboxStatus, table, utcnow

MAIL_TEMPLATES = ("confirmation", "welcome", "already_subscribed")


async def enqueue(
    session: AsyncSession,
    template: str,
    recipient: str,
    subscriber_id: int | None,
    payload: dict[str, Any],
    now: datetime | None = None,
) -> None:
    """Queue one message; it commits (or not) with the caller's state change."""
    now = now or utcnow()
    await session.execute(
        insert(OutboxMessage).values(
            kind="email",
            template=template,
            recipient=recipient,
            subscriber_id=subscriber_id,
            payload=payload,
            status=OutboxStatus.queued.value,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


@dataclass
class ClaimedMessage:
    id: int
    kind: str
    template: str
    recipient: str | None
    payload: dict[str, Any] | None
    attempts: int
    created_at: datetime


async def claim(
    session: AsyncSession, owner: str, limit: int, lease: timedelta, now: datetime | None = None
) -> list[ClaimedMessage]:
    """Lease up to `limit` due messages to `owner`: queued ones, and expired leases of the dead."""
    now = now or utcnow()
    due = or_(
        and_(
            OutboxMessage.status == OutboxStatus.queued.value,
            OutboxMessage.next_attempt_at <= now,
        ),
        and_(
            OutboxMessage.status == OutboxStatus.sending.value,
            OutboxMessage.leased_until < now,
        ),
    )
    candidates = select(OutboxMessage.id).where(due).order_by(OutboxMessage.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        # Live workers skip each other's rows instead of queueing behind them.
        candidates = candidates.with_for_update(skip_locked=True)
    stmt = (
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(candidates.scalar_subquery()))
        .values(
            status=OutboxStatus.sending.value,
            leased_until=now + lease,
            lease_owner=owner,
            attempts=OutboxMessage.attempts + 1,
        )
        .returning(
            OutboxMessage.id,
            OutboxMessage.kind,
            OutboxMessage.template,
            OutboxMessage.recipient,
            OutboxMessage.payload,
            OutboxMessage.attempts,
            OutboxMessage.created_at,
        )
        .execution_options(synchronize_session=False)
    )
    rows = (await session.execute(stmt)).all()
    return sorted((ClaimedMessage(*row) for row in rows), key=lambda m: m.id)


_outbox = table(OutboxMessage)
# One statement for every delivery: compiled once, run through the connection, not the ORM.
MARK_SENT = (
    update(_outbox)
    .where(_outbox.c.id == bindparam("row_id"), _outbox.c.lease_owner == bindparam("owner"))
    .values(
        status=OutboxStatus.sent.value,
        sent_at=bindparam("now"),
        payload=None,
        leased_until=None,
        last_error=None,
        message_id=bindparam("header_id"),
    )
)


async def _connection(session: AsyncSession | AsyncConnection) -> AsyncConnection:
    return await session.connection() if isinstance(session, AsyncSession) else session


async def mark_sent(
    session: AsyncSession | AsyncConnection,
    owner: str,
    sent: list[tuple[int, str]],
    now: datetime | None = None,
) -> None:
    """Record delivery and scrub the body (it holds a token); metadata stays."""
    if not sent:
        return
    now = now or utcnow()
    conn = await _connection(session)
    await conn.execute(
        MARK_SENT,
        [{"row_id": i, "owner": owner, "now": now, "header_id": h} for i, h in sent],
    )


_attempts = table(DeliveryAttempt)
_sent_ids = bindparam("ids", type_=ARRAY(BigInteger))
# On PostgreSQL, recording a group as sent and logging its attempts is one statement: in
# autocommit it needs no BEGIN and COMMIT, one round trip where the pair of statements in a
# transaction takes four. The UPDATE in the WITH runs whatever the INSERT reads, and the log
# rows come from the input, as with the two statements: a send is logged even when the row's
# lease was lost meanwhile.
_header_ids = (
    func.unnest(_sent_ids, bindparam("header_ids", type_=ARRAY(String)))
    .table_valued("id", "header_id")
    .render_derived()
)
_marked = (
    update(_outbox)
    .where(
        _outbox.c.id == _header_ids.c.id,
        _outbox.c.lease_owner == bindparam("owner"),
    )
    .values(
        status=OutboxStatus.sent.value,
        sent_at=bindparam("now", type_=_outbox.c.sent_at.type),
        payload=None,
        leased_until=None,
        last_error=None,
        message_id=_header_ids.c.header_id,
    )
    .returning(_outbox.c.id)
    .cte("marked")
)
_sent_rows = (
    func.unnest(_sent_ids, bindparam("attempt_numbers", type_=ARRAY(Integer)))
    .table_valued("outbox_id", "attempt")
    .render_derived()
)
MARK_SENT_AND_LOG_PG = (
    insert(_attempts)
    .from_select(
        ["outbox_id", "attempt", "result", "error", "worker", "created_at"],
        select(
            _sent_rows.c.outbox_id,
            _sent_rows.c.attempt,
            literal("sent"),
            null(),
            bindparam("owner"),
            bindparam("now", type_=_outbox.c.sent_at.type),
        ),
    )
    .add_cte(_marked)
)


async def record_sent(
    conn: AsyncConnection,
    owner: str,
    sent: Sequence[tuple[int, str, int]],
    now: datetime | None = None,
) -> None:
    """Mark (outbox id, header id, attempt) sent and log the attempts: mark_sent and
    log_attempts, in one statement on PostgreSQL (the caller may run it in autocommit)."""
    if not sent:
        return
    now = now or utcnow()
    if conn.dialect.name != "postgresql":
        await mark_sent(conn, owner, [(i, h) for i, h, _ in sent], now)
        await log_attempts(conn, owner, [(i, n, "sent", None) for i, _, n in sent], now)
        return
    await conn.execute(
        MARK_SENT_AND_LOG_PG,
        {
            "ids": [i for i, _, _ in sent],
            "header_ids": [h for _, h, _ in sent],
            # Not "attempts": a parameter named as a column would join the UPDATE's SET.
            "attempt_numbers": [n for _, _, n in sent],
            "owner": owner,
            "now": now,
        },
    )


async def release(
    session: AsyncSession,
    owner: str,
    message_ids: list[int],
    now: datetime | None = None,
    delay: timedelta = timedelta(0),
    error: str | None = None,
) -> None:
    """Hand claimed messages back untried, the attempt not counted: due again after `delay`
    (an unreachable server defers the rest of a batch without using up its attempts)."""
    if not message_ids:
        return
    now = now or utcnow()
    await session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.id.in_(message_ids),
            OutboxMessage.lease_owner == owner,
            OutboxMessage.status == OutboxStatus.sending.value,
        )
        .values(
            status=OutboxStatus.queued.value,
            leased_until=None,
            next_attempt_at=now + delay,
            attempts=OutboxMessage.attempts - 1,
            last_error=error if error is not None else OutboxMessage.last_error,
        )
        .execution_options(synchronize_session=False)
    )


def backoff(attempts: int, base: float, maximum: float) -> timedelta:
    """Exponential backoff with full jitter, so retries of a failed batch spread out."""
    ceiling = min(maximum, base * (2 ** max(0, attempts - 1)))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))  # noqa: S311


async def mark_failed(
    session: AsyncSession,
    owner: str,
    message_id: int,
    error: str,
    retry_in: timedelta | None,
    now: datetime | None = None,
) -> None:
    """Put a message back in the queue for later, or mark it dead when retry_in is None."""
    now = now or utcnow()
    values: dict[str, Any] = {"last_error": error[:2000], "leased_until": None}
    if retry_in is None:
        values["status"] = OutboxStatus.dead.value
    else:
        values["status"] = OutboxStatus.queued.value
        values["next_attempt_at"] = now + retry_in
    await session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == message_id, OutboxMessage.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


async def status_counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(
        select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)
    )
    counts = {s.value: 0 for s in OutboxStatus}
    counts.update({status: int(n) for status, n in rows.all()})
    return counts


async def oldest_queued_age(session: AsyncSession, now: datetime | None = None) -> float:
    """Seconds since the oldest still-queued message was written (0 when none is)."""
    oldest = await session.scalar(
        select(func.min(OutboxMessage.created_at)).where(
            OutboxMessage.status == OutboxStatus.queued.value
        )
    )
    if oldest is None:
        return 0.0
    if isinstance(oldest, str):  # SQLite's min() loses the column type
        oldest = datetime.fromisoformat(oldest).replace(tzinfo=UTC)
    return max(0.0, ((now or utcnow()) - oldest).total_seconds())


async def retry_dead(
    session: AsyncSession, message_ids: list[int] | None = None, now: datetime | None = None
) -> int:
    """Give dead messages (all, or these) a fresh set of attempts; return how many."""
    query = (
        update(OutboxMessage)
        .where(OutboxMessage.status == OutboxStatus.dead.value)
        .values(
            status=OutboxStatus.queued.value,
            attempts=0,
            next_attempt_at=now or utcnow(),
            leased_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    if message_ids:
        query = query.where(OutboxMessage.id.in_(message_ids))
    result = await session.execute(query)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def log_attempts(
    session: AsyncSession | AsyncConnection,
    worker: str,
    attempts: Sequence[tuple[int, int, str, str | None]],
    now: datetime | None = None,
) -> None:
    """Append (outbox id, attempt number, result, error) rows to the attempt log."""
    if not attempts:
        return
    now = now or utcnow()
    await (await _connection(session)).execute(
        insert(table(DeliveryAttempt)),
        [
            {
                "outbox_id": i,
                "attempt": n,
                "result": result,
                "error": (error or None) and error[:2000],
                "worker": worker,
                "created_at": now,
            }
            for i, n, result, error in attempts
        ],
    )


def attempts_of(message_ids: Any) -> Any:
    """The attempt log rows of these outbox rows (for erasure and purging)."""
    return delete(DeliveryAttempt).where(DeliveryAttempt.outbox_id.in_(message_ids))

"""Sign-up: the hot path, written for many sign-ups per transaction.

`subscribe_many` applies a batch of validated sign-ups with a handful of Core statements
(one multi-row statement per table, whatever the batch size), so concurrent requests can share
one transaction and one commit. `subscribe` is the same for one sign-up. On PostgreSQL the
batcher first hands a batch to `subscribe_new`, which writes its new addresses in one
statement outside a transaction, and gives the rest to `subscribe_on`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, literal_column, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service import bulk, events, suppression, tokens
from service.config import Settings
from service.driver import Query, Runner, SessionRunner, any_of
from service.errors import InvalidInput, unknown_newsletters
from service.models import (
    Confirmation,
    Newsletter,
    OptIn,
    OutboxMessage,
    OutboxStatus,
    Status,
    Subscriber,
    Subscription,
    UTCDateTime,
    table,
    utcnow,
)
from service.signup_input import SignupInput

CAPPED_TEMPLATES = ("confirmation", "already_subscribed")


@dataclass(frozen=True)
class Consent:
    """Where a sign-up came from: kept with each subscription it touches."""

    source: str
    ip: str | None = None
    user_agent: str | None = None
    page: str | None = None
    actor: str | None = None  # who acted, for the event log, when not the reader (a key)
    # The reader must confirm even on single opt-in lists: ops added them without a note
    # saying where their consent came from.
    confirm: bool = False

    def columns(self, now: datetime) -> dict[str, Any]:
        return {
            "consent_source": self.source,
            "consent_ip": self.ip,
            "consent_user_agent": _printable(self.user_agent)[:500] or None,
            "consent_page": _printable(self.page)[:2000] or None,
            "consent_at": now,
        }


def _printable(value: str | None) -> str:
    """Header text as stored: a client may send control characters (PostgreSQL refuses NUL)."""
    if not value or value.isprintable():
        return value or ""
    return "".join(ch for ch in value if ch.isprintable())


@dataclass
class SignupResult:
    all_single_opt_in: bool
    newsletters: list[Newsletter]
    mail_queued: str | None = None  # which template, if any

    @property
    def status(self) -> str:
        return Status.active.value if self.all_single_opt_in else Status.pending.value

    @property
    def redirect_url(self) -> str | None:
        return self.newsletters[0].redirect_after_signup if self.newsletters else None


# The hot path's statements, built once (building a SQL expression costs more CPU than
# running it) and run on a service.driver Runner. Lists are bound as one parameter each.
_newsletters = table(Newsletter)


def _newsletters_by_slug(extra: Any) -> Query:
    """The newsletters (not archived) of the slugs bound as `slugs`, with one more column."""
    return Query(
        select(_newsletters, extra).where(
            any_of(_newsletters.c.slug, "slugs"), _newsletters.c.archived_at.is_(None)
        )
    )


# With each newsletter row, the blocklist entries that refuse one of the batch's addresses.
NEWSLETTERS_BY_SLUG = _newsletters_by_slug(suppression.BLOCKING.label("extra"))
# PostgreSQL: with each newsletter row its fingerprint, for NewsletterCache.
NEWSLETTER_PRINTS = _newsletters_by_slug(
    func.md5(literal_column("newsletters::text")).label("extra")
)
# subscribe_new's condition on each new subscriber's row: each of its newsletters is still
# as cached (not archived, same fingerprint), and the blocklist refuses neither the address
# nor one of its domains.
NEW_ONLY = bulk.Only(
    extra=(("domains", "text[]"), ("expected", "json")),
    sql=(
        "NOT EXISTS (SELECT 1 FROM json_to_recordset(r.expected) AS e(id integer, print text) "  # noqa: S608
        "LEFT JOIN newsletters AS n ON n.id = e.id AND n.archived_at IS NULL "
        f"WHERE n.id IS NULL OR md5(n::text) <> e.print) AND NOT {suppression.BLOCKS_ROW}"
    ),
)


async def _read_newsletters(
    runner: Runner, query: Query, params: dict[str, Any]
) -> list[tuple[Newsletter, Any]]:
    """A _newsletters_by_slug query's newsletters, each with its extra column's value."""
    found = []
    for row in await runner.rows(query, params):
        columns = dict(zip(query.columns, row, strict=True))
        extra = columns.pop("extra")
        found.append((Newsletter(**columns), extra))
    return found


_subscribers = table(Subscriber)
KNOWN_SUBSCRIBERS = Query(
    select(_subscribers.c.id, _subscribers.c.public_id, _subscribers.c.email_key).where(
        any_of(_subscribers.c.email_key, "keys")
    )
)
_subs = table(Subscription)
SUBSCRIPTIONS_OF = Query(
    select(_subs.c.subscriber_id, _subs.c.newsletter_id, _subs.c.id, _subs.c.status).where(
        any_of(_subs.c.subscriber_id, "ids")
    )
)
_outbox = table(OutboxMessage)
RECENT_CAPPED_MAIL = Query(
    select(_outbox.c.subscriber_id, func.count(), func.max(_outbox.c.created_at))
    .where(
        any_of(_outbox.c.subscriber_id, "ids"),
        _outbox.c.created_at > bindparam("since", type_=UTCDateTime()),
        or_(*(_outbox.c.template == template for template in CAPPED_TEMPLATES)),
    )
    .group_by(_outbox.c.subscriber_id)
)
_CONSENT_COLUMNS = ("consent_source", "consent_ip", "consent_user_agent", "consent_page")
# One executemany for every known subscription a batch asks for again.
RESUBSCRIBE = Query(
    update(_subs)
    .where(_subs.c.id == bindparam("sid"))
    .values(
        status=bindparam("new_status"),
        updated_at=bindparam("changed_at"),
        pending_at=func.coalesce(bindparam("pending_stamp"), _subs.c.pending_at),
        confirmed_at=func.coalesce(bindparam("confirmed_stamp"), _subs.c.confirmed_at),
        consent_at=bindparam("changed_at"),
        **{name: bindparam(f"new_{name}") for name in _CONSENT_COLUMNS},
    )
)


@dataclass
class _Work:
    """One sign-up being applied, with what the batch learns about it."""

    data: SignupInput
    consent: Consent
    newsletters: list[Newsletter]
    result: SignupResult
    subscriber_id: int = 0
    public_id: str = ""
    created: bool = False
    index: int = 0  # of its request in the batch
    pending: list[Newsletter] = field(default_factory=list)
    activated: list[Newsletter] = field(default_factory=list)


def consent_event(
    type_: str,
    subscriber_id: int | None,
    newsletter_id: int | None,
    consent: Consent,
    now: datetime,
    **data: Any,
) -> dict[str, Any]:
    return events.event_row(
        type_,
        subscriber_id,
        newsletter_id,
        consent.actor or consent.source,
        consent.ip,
        now,
        **data,
    )


def mail_payload(subscriber_public_id: str, newsletters: Sequence[Newsletter]) -> dict[str, Any]:
    return {"subscriber": subscriber_public_id, "newsletters": [n.id for n in newsletters]}


def outbox_row(
    template: str, recipient: str, subscriber_id: int, payload: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "kind": "email",
        "template": template,
        "recipient": recipient,
        "subscriber_id": subscriber_id,
        "payload": payload,
        "status": OutboxStatus.queued.value,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def _ttl(settings: Settings, newsletters: Sequence[Newsletter]) -> timedelta:
    ttls = [
        timedelta(seconds=n.confirmation_ttl_seconds)
        for n in newsletters
        if n.confirmation_ttl_seconds
    ]
    return min(ttls) if ttls else settings.confirmation_ttl


async def subscribe(
    session: AsyncSession,
    settings: Settings,
    data: SignupInput,
    consent: Consent,
    now: datetime | None = None,
) -> SignupResult:
    """Sign one person up; raise InvalidInput for an unknown or archived newsletter."""
    [outcome] = await subscribe_many(session, settings, [(data, consent)], now)
    if isinstance(outcome, InvalidInput):
        raise outcome
    return outcome


async def subscribe_many(
    session: AsyncSession,
    settings: Settings,
    requests: Sequence[tuple[SignupInput, Consent]],
    now: datetime | None = None,
) -> list[SignupResult | InvalidInput]:
    """Apply sign-ups in the session's transaction; one outcome per request, in order."""
    return await subscribe_on(SessionRunner(await session.connection()), settings, requests, now)


async def subscribe_on(
    runner: Runner,
    settings: Settings,
    requests: Sequence[tuple[SignupInput, Consent]],
    now: datetime | None = None,
) -> list[SignupResult | InvalidInput]:
    """Apply sign-ups in the runner's transaction; one outcome per request, in order.

    Double opt-in newsletters become pending and one confirmation mail covers them; single
    opt-in ones become active at once (an active subscription stays active); someone with
    nothing new to confirm gets an "already subscribed" mail. Mail per address is capped.
    A filled honeypot is answered like a success and changes nothing.
    """
    now = now or utcnow()
    slugs = {slug for data, _ in requests for slug in data.newsletters}
    keys = {data.address.key for data, _ in requests if not data.honeypot}
    rows = await _read_newsletters(
        runner,
        NEWSLETTERS_BY_SLUG,
        {"slugs": list(slugs), **suppression.blocking_params(keys)},
    )
    blocking = rows[0][1] if rows else None  # the same on every row
    outcomes, accepted = _works(requests, {n.slug: n for n, _ in rows})
    # A blocked address or domain is answered like everyone else and changes nothing.
    refused = suppression.refused({w.data.address.key for w in accepted}, blocking)
    for batch in await _rounds(runner, [w for w in accepted if w.data.address.key not in refused]):
        await _apply(runner, settings, list(batch.values()), now)
    return outcomes


class NewsletterCache:
    """The newsletters sign-ups ask for, by slug, each with its row's fingerprint (the MD5 of
    the row as text), for subscribe_new. An entry is only trusted by a statement that checks
    the fingerprint against the row as it is then: a newsletter changed or archived since it
    was read is never applied as it was."""

    def __init__(self) -> None:
        self.newsletters: dict[str, Newsletter] = {}
        self.prints: dict[int, str] = {}  # by newsletter id

    async def load(self, runner: Runner, slugs: set[str]) -> None:
        """Read these slugs' newsletters (those not archived; a slug not found stays out)."""
        for newsletter, fingerprint in await _read_newsletters(
            runner, NEWSLETTER_PRINTS, {"slugs": list(slugs)}
        ):
            self.newsletters[newsletter.slug] = newsletter
            self.prints[newsletter.id] = fingerprint

    def forget(self, slugs: Sequence[str]) -> None:
        for slug in slugs:
            newsletter = self.newsletters.pop(slug, None)
            if newsletter is not None:
                self.prints.pop(newsletter.id, None)


async def subscribe_new(
    runner: Runner,
    settings: Settings,
    requests: Sequence[tuple[SignupInput, Consent]],
    cache: NewsletterCache,
    now: datetime | None = None,
) -> list[SignupResult | InvalidInput | None]:
    """PostgreSQL, outside a transaction: the requests whose address is new, signed up in one
    statement (which commits alone, all of it or nothing), with the newsletters as `cache`
    has them. One outcome per request, in order; None for one left to subscribe_on: an
    address already known or blocked, a newsletter changed since it was cached (its entry
    is dropped), the same address a second time.

    subscribe_on's statements for a batch of new addresses are a look-up of the newsletters
    and the blocklist, then one insert; here the insert itself checks both (NEW_ONLY), so a
    batch is one round trip to the database where it was four with BEGIN and COMMIT.
    """
    now = now or utcnow()
    missing = {s for data, _ in requests for s in data.newsletters} - cache.newsletters.keys()
    if missing:
        await cache.load(runner, missing)
    answered, accepted = _works(requests, cache.newsletters)
    outcomes: list[SignupResult | InvalidInput | None] = list(answered)
    rounds = await _rounds(runner, accepted)
    for later in rounds[1:]:
        for work in later.values():
            outcomes[work.index] = None
    if not rounds:
        return outcomes
    for work in await _apply_new(runner, settings, list(rounds[0].values()), now, cache):
        outcomes[work.index] = None
        cache.forget(work.data.newsletters)  # perhaps changed: read again by the next batch
    return outcomes


def _works(
    requests: Sequence[tuple[SignupInput, Consent]], found: dict[str, Newsletter]
) -> tuple[list[SignupResult | InvalidInput], list[_Work]]:
    """Each request's outcome, and the work of those to apply (not unknown, not honeypot)."""
    outcomes: list[SignupResult | InvalidInput] = []
    accepted: list[_Work] = []
    for index, (data, consent) in enumerate(requests):
        unknown = [slug for slug in data.newsletters if slug not in found]
        if unknown:
            outcomes.append(InvalidInput([unknown_newsletters(unknown)]))
            continue
        newsletters = [found[slug] for slug in data.newsletters]
        result = SignupResult(
            all_single_opt_in=all(n.opt_in == OptIn.single.value for n in newsletters),
            newsletters=newsletters,
        )
        outcomes.append(result)
        if not data.honeypot:
            accepted.append(_Work(data, consent, newsletters, result, index=index))
    return outcomes, accepted


async def _rounds(runner: Runner, accepted: list[_Work]) -> list[dict[str, _Work]]:
    """The works in rounds of distinct addresses, each round applied after the one before
    (the same address twice in one batch is applied in order)."""
    # A suppressed address (bounced, complained, erased) comes back only through double
    # opt-in: single opt-in lists are not mailed or activated for it.
    single = [w for w in accepted if any(_activates(w, n) for n in w.newsletters)]
    held = await suppression.suppressed_on(runner, {w.data.address.key for w in single})
    rounds: list[dict[str, _Work]] = []
    for work in accepted:
        if work.data.address.key in held:
            work.newsletters = [n for n in work.newsletters if not _activates(work, n)]
            if not work.newsletters:
                continue
        target = next((r for r in rounds if work.data.address.key not in r), None)
        if target is None:
            target = {}
            rounds.append(target)
        target[work.data.address.key] = work
    return rounds


def _activates(work: _Work, newsletter: Newsletter) -> bool:
    """Whether this sign-up makes the newsletter active at once (single opt-in)."""
    return newsletter.opt_in == OptIn.single.value and not work.consent.confirm


async def _apply(runner: Runner, settings: Settings, batch: list[_Work], now: datetime) -> None:
    if runner.dialect.name == "postgresql":
        batch = await _apply_new(runner, settings, batch, now)
        if not batch:
            return
        await _find_known(runner, batch)
    else:
        await _upsert_subscribers(runner, batch, now)
    existing = await _existing_subscriptions(runner, [w for w in batch if not w.created])
    new_rows, again, new_events = _subscription_writes(batch, existing, now)
    await runner.many(RESUBSCRIBE, again)
    # Someone with nothing new to confirm hears "already subscribed" instead; both kinds of
    # mail share the per-address cap, so the form cannot be used to bomb an inbox.
    allowed = await _under_cap(
        runner,
        settings,
        [w.subscriber_id for w in batch if _wants_mail(w) and not w.created],
        now,
    )
    confirmations, mails = _mail(settings, batch, allowed, now)
    await events.record_on(
        runner,
        new_events,
        along=[
            (table(Subscription), new_rows),
            (table(Confirmation), confirmations),
            (table(OutboxMessage), mails),
        ],
    )


async def _apply_new(
    runner: Runner,
    settings: Settings,
    batch: list[_Work],
    now: datetime,
    cache: NewsletterCache | None = None,
) -> list[_Work]:
    """PostgreSQL: every row of the batch's new addresses in one statement, written as if
    each address were new; a known one's rows are dropped by the statement (see
    bulk.insert_family). Returns the works whose address was known, to apply as such.
    With `cache`, the newsletters it has: the statement also drops the rows of an address
    the blocklist refuses or whose newsletters are no longer as cached (NEW_ONLY).

    One statement where there were two (the subscribers', then the rest, which needs their
    ids): a round trip less for every batch."""
    for number, work in enumerate(batch, start=1):
        work.subscriber_id, work.created = -number, True  # placeholders: no id is negative
    rows = _subscriber_rows(batch, now)
    if cache is not None:
        for row, work in zip(rows, batch, strict=True):
            row["domains"] = suppression.domains_of(work.data.address.key)
            row["expected"] = [
                # Forgotten meanwhile (by another batch): never matches, the row is left out.
                {"id": n.id, "print": cache.prints.get(n.id, "")}
                for n in work.result.newsletters
            ]
    new_rows, _, new_events = _subscription_writes(batch, {}, now)
    confirmations, mails = _mail(settings, batch, set(), now)
    written = await events.record_with_new_subscribers(
        runner,
        rows,
        [w.subscriber_id for w in batch],
        new_events,
        along=[
            (table(Subscription), new_rows),
            (table(Confirmation), confirmations),
            (table(OutboxMessage), mails),
        ],
        only=NEW_ONLY if cache is not None else None,
    )
    known = []
    for work in batch:
        subscriber_id = written.get(work.subscriber_id)
        if subscriber_id is not None:
            work.subscriber_id = subscriber_id
            continue
        work.subscriber_id, work.created = 0, False
        work.pending, work.activated, work.result.mail_queued = [], [], None
        known.append(work)
    return known


def _subscriber_rows(batch: list[_Work], now: datetime) -> list[dict[str, Any]]:
    """Name, language and attributes are only set on creation: an unauthenticated form must
    not rewrite what a reader gave."""
    public_ids = tokens.new_public_ids(len(batch))
    for work, public_id in zip(batch, public_ids, strict=True):
        work.public_id = public_id
    return [
        {
            "public_id": w.public_id,
            "email": w.data.address.email,
            "email_key": w.data.address.key,
            "name": w.data.name,
            "language": w.data.language,
            "attributes": w.data.attributes,
            "created_at": now,
            "updated_at": now,
        }
        for w in batch
    ]


async def _upsert_subscribers(runner: Runner, batch: list[_Work], now: datetime) -> None:
    """Create the new subscribers, find the known ones."""
    created = await bulk.insert_rows(
        runner,
        table(Subscriber),
        _subscriber_rows(batch, now),
        on_conflict_do_nothing="email_key",
        returning=("id", "public_id", "email_key"),
    )
    by_key = {w.data.address.key: w for w in batch}
    for subscriber_id, public_id, key in created:
        work = by_key[key]
        work.subscriber_id, work.public_id, work.created = subscriber_id, public_id, True
    await _find_known(runner, [w for w in batch if not w.created])


async def _find_known(runner: Runner, known: list[_Work]) -> None:
    if not known:
        return
    by_key = {w.data.address.key: w for w in known}
    for subscriber_id, public_id, key in await runner.rows(
        KNOWN_SUBSCRIBERS, {"keys": list(by_key)}
    ):
        by_key[key].subscriber_id, by_key[key].public_id = subscriber_id, public_id


def _subscription_writes(
    batch: list[_Work], existing: dict[tuple[int, int], tuple[int, str]], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The new subscriptions, the known ones asked for again (RESUBSCRIBE's parameters) and
    the events; sets each work's pending and activated newsletters."""
    new_rows: list[dict[str, Any]] = []
    again: list[dict[str, Any]] = []
    new_events: list[dict[str, Any]] = []
    for work in batch:
        consent = work.consent.columns(now)
        resubscribed = {f"new_{name}": consent[name] for name in _CONSENT_COLUMNS}
        for newsletter in work.newsletters:
            current = existing.get((work.subscriber_id, newsletter.id))
            if current is not None and current[1] == Status.active.value:
                continue
            single = _activates(work, newsletter)
            target = Status.active if single else Status.pending
            (work.activated if single else work.pending).append(newsletter)
            new_events.append(
                consent_event(
                    "subscription.confirmed" if single else "subscription.pending",
                    work.subscriber_id,
                    newsletter.id,
                    work.consent,
                    now,
                    **({"opt_in": "single"} if single else {}),
                )
            )
            if current is None:
                new_rows.append(
                    {
                        "subscriber_id": work.subscriber_id,
                        "newsletter_id": newsletter.id,
                        "status": target.value,
                        "created_at": now,
                        "updated_at": now,
                        "pending_at": None if single else now,
                        "confirmed_at": now if single else None,
                        **consent,
                    }
                )
            else:
                again.append(
                    {
                        "sid": current[0],
                        "new_status": target.value,
                        "pending_stamp": None if single else now,
                        "confirmed_stamp": now if single else None,
                        "changed_at": now,
                        **resubscribed,
                    }
                )
    return new_rows, again, new_events


async def _existing_subscriptions(
    runner: Runner, known: list[_Work]
) -> dict[tuple[int, int], tuple[int, str]]:
    if not known:
        return {}
    rows = await runner.rows(SUBSCRIPTIONS_OF, {"ids": [w.subscriber_id for w in known]})
    return {(sub, nl): (sid, status) for sub, nl, sid, status in rows}


async def _under_cap(
    runner: Runner, settings: Settings, subscriber_ids: list[int], now: datetime
) -> set[int]:
    """Which of these known subscribers may be sent another confirmation-type mail now."""
    if not subscriber_ids:
        return set()
    rows = await runner.rows(
        RECENT_CAPPED_MAIL,
        {"ids": subscriber_ids, "since": now - timedelta(days=1)},
    )
    capped = {
        sub
        for sub, count, latest in rows
        if count >= settings.confirmation_mail_daily_cap
        or (latest is not None and now - _aware(latest) < settings.confirmation_mail_interval)
    }
    return set(subscriber_ids) - capped


def _aware(value: datetime | str) -> datetime:
    # SQLite's max() can hand back text; the column type is lost in the aggregate.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def _wants_mail(work: _Work) -> bool:
    """Something to confirm, or nothing new at all (then "already subscribed")."""
    return bool(work.pending or not work.activated)


def _mail(
    settings: Settings, batch: list[_Work], allowed: set[int], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The confirmation and outbox rows of the mail this batch sends (each work's
    result.mail_queued says which). `allowed`: the known subscribers under the mail cap."""
    mails: list[dict[str, Any]] = []
    confirmations: list[dict[str, Any]] = []
    fresh_tokens = iter(tokens.new_confirmation_tokens(sum(1 for w in batch if w.pending)))
    for work in batch:
        email = work.data.address.email
        if work.activated:
            work.result.mail_queued = "welcome"
            mails.append(
                outbox_row(
                    "welcome",
                    email,
                    work.subscriber_id,
                    mail_payload(work.public_id, work.activated),
                    now,
                )
            )
        if not _wants_mail(work) or not (work.created or work.subscriber_id in allowed):
            continue
        if work.pending:
            token, token_hash = next(fresh_tokens)
            confirmations.append(
                {
                    "token_hash": token_hash,
                    "subscriber_id": work.subscriber_id,
                    "newsletter_ids": [n.id for n in work.pending],
                    "created_at": now,
                    "expires_at": now + _ttl(settings, work.pending),
                }
            )
            payload = mail_payload(work.public_id, work.pending) | {"token": token}
            work.result.mail_queued = "confirmation"
        else:
            payload = mail_payload(work.public_id, work.newsletters)
            work.result.mail_queued = "already_subscribed"
        mails.append(outbox_row(work.result.mail_queued, email, work.subscriber_id, payload, now))
    return confirmations, mails

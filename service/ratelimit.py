"""Per-client rate limits on sign-ups, counted by the `limits` library (fixed windows).

Where the counters live (docs/abuse.md has the measurements behind this choice):
- Redis, when REDIS_URL is set: one count shared by every API process and host.
- In memory, for SQLite without Redis: the embedded default is one process, so memory is exact,
  and a database write per request would queue behind the sign-up batches on SQLite's single
  writer.
- A table (`rate_limit_windows`, UNLOGGED), for PostgreSQL without Redis, so several API
  processes share the count: each counts in memory and syncs with the table at most every
  RATE_LIMIT_SYNC_SECONDS, in the background (see DatabaseStorage); a write per request would
  cost the sign-up path a statement that its group commit had saved.

The client is the direct peer, or, when that peer is a trusted proxy, the right-most address of
X-Forwarded-For that is not a trusted proxy. IPv6 clients count per /64: one host usually has a
whole /64 to pick addresses from. Counters are keyed by an HMAC of that, never the address.
A storage that fails lets sign-ups through, with a warning in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from sqlalchemy import case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db import Database
from service.models import RateLimitWindow, table

log = logging.getLogger(__name__)

RATE_LIMITED = "Too many attempts. Please try again later."
SIGNUP_SCOPE = "signup"
# Expired windows are deleted by the first request after this many seconds.
SWEEP_INTERVAL = 60.0
# A storage outage is logged at most this often: the limiter lets sign-ups through meanwhile.
OUTAGE_LOG_INTERVAL = 60.0
# A storage that does not answer in this time is treated as down (the sign-up goes through).
STORAGE_TIMEOUT = 2.0
KEY_CACHE_SIZE = 10_000  # client addresses whose counter key is remembered

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_windows = table(RateLimitWindow)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The trusted proxies setting as networks; a bare address is a /32 or /128."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values)


# Parsing an address is most of finding the client; the same few clients come back.
@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "198.51.100.7:443"
        text = text.split(":", 1)[0]
    try:
        found = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped
    return found


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]
) -> bool:
    return any(address.version == net.version and address in net for net in nets)


def client_ip(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies the client is the right-most X-Forwarded-For entry that is not a
    trusted proxy itself; everything left of it was written by the client and proves nothing.
    """
    if peer is None:
        return None
    current = _address(peer)
    if current is None or not trusted or not _trusted(current, trusted):
        return _text(current) if current is not None else peer
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            break  # garbage: the last proxy we trust is as far as we can see
        current = found
        if not _trusted(found, trusted):
            break
    return str(current)


@functools.lru_cache(maxsize=4096)
def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(address)


def limit_key(ip: str) -> str:
    """What one client's counter is keyed by: the address, or its /64 for IPv6."""
    found = _address(ip)
    if isinstance(found, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((found, 64), strict=False))
    return str(found) if found is not None else ip


@dataclass
class _Increment:
    key: str
    expiry: int
    amount: int
    future: asyncio.Future[int]


@dataclass
class _Window:
    """A process's view of one shared window (synced mode)."""

    hits: int  # the shared count as last read, plus this process's hits since
    pending: int  # this process's hits not yet written
    expires_at: float
    expiry: int


class DatabaseStorage(Storage):
    """Fixed-window counters in the `rate_limit_windows` table, for `limits`' fixed window.

    Writes are upserts that start a new window when the old one has expired and return the
    count, in autocommit: they never wait for, or hold up, a sign-up transaction. Two modes:

    - synced (`sync_interval` > 0, the default): a process counts in memory, exactly for its
      own requests, and at most every `sync_interval` seconds (when a request comes, and when
      it stops) writes what it counted and reads back the shared counts, in one statement in
      the background. Requests never wait for the database; other processes' hits are seen
      one sync late.
    - exact (`sync_interval` = 0): every increment is written before the request goes on;
      concurrent ones share one statement (a group commit, as sign-ups do).
    """

    STORAGE_SCHEME = None
    DEPENDENCIES: list[str] = []

    def __init__(self, db: Database, sync_interval: float = 1.0) -> None:
        super().__init__(None, wrap_exceptions=True)
        engine: AsyncEngine = db.engine
        self.postgresql = engine.dialect.name == "postgresql"
        # SQLite keeps its BEGIN IMMEDIATE transactions (service.db); PostgreSQL needs none.
        self.engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if self.postgresql else engine
        )
        self.insert: Any = postgresql.insert if self.postgresql else sqlite.insert
        self.sync_interval = sync_interval
        self.swept_at = time.monotonic()
        self.queue: list[_Increment] = []
        self.flusher: asyncio.Task[None] | None = None
        self.windows: dict[str, _Window] = {}
        self.syncer: asyncio.Task[None] | None = None
        self.synced_at = time.monotonic()
        self._failure_logged_at = -math.inf

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SQLAlchemyError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Count `amount` more in the key's window; return the window's count after it."""
        if self.sync_interval <= 0:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.queue.append(_Increment(key, expiry, amount, future))
            if self.flusher is None or self.flusher.done():
                self.flusher = asyncio.create_task(self._flush())
            return await future
        now = time.time()
        window = self.windows.get(key)
        if window is None or window.expires_at <= now:
            window = self.windows[key] = _Window(0, 0, now + expiry, expiry)
        window.hits += amount
        window.pending += amount
        if time.monotonic() - self.synced_at >= self.sync_interval and (
            self.syncer is None or self.syncer.done()
        ):
            # Requests drive the syncing: nothing runs, or waits to run, between them.
            self.synced_at = time.monotonic()
            self.syncer = asyncio.create_task(self.sync())
        return window.hits

    # ------------------------------------------------------------ exact mode

    async def _flush(self) -> None:
        while self.queue:
            batch, self.queue = self.queue, []
            try:
                shared = await self._upsert(
                    [(item.key, item.amount, item.expiry) for item in batch], time.time()
                )
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            # Each increment's count as if the batch had been applied one by one, in order.
            running = {key: hits for key, (hits, _) in shared.items()}
            for item in reversed(batch):
                if not item.future.done():  # the request may have gone away meanwhile
                    item.future.set_result(running[item.key])
                running[item.key] -= item.amount

    # ------------------------------------------------------------ synced mode

    async def sync(self) -> None:
        """Write this process's pending hits and read back the shared counts."""
        now = time.time()
        for key in [k for k, w in self.windows.items() if w.expires_at <= now and not w.pending]:
            del self.windows[key]
        due = {key: window for key, window in self.windows.items() if window.pending}
        if not due:
            return
        sent = {key: window.pending for key, window in due.items()}
        try:
            shared = await self._upsert(
                [(key, sent[key], window.expiry) for key, window in due.items()], now
            )
        except (SQLAlchemyError, OSError) as exc:
            # Counting goes on in memory; the hits are written with the next sync.
            if time.monotonic() - self._failure_logged_at > OUTAGE_LOG_INTERVAL:
                self._failure_logged_at = time.monotonic()
                log.warning("writing rate-limit counts failed, retrying: %r", exc)
            return
        for key, (hits, expires_at) in shared.items():
            window = self.windows.get(key)
            if window is not due[key]:
                continue  # the window ended meanwhile and a new one began here
            window.pending -= sent[key]
            window.hits = hits + window.pending
            window.expires_at = expires_at

    # ------------------------------------------------------------ both

    async def _upsert(
        self, increments: list[tuple[str, int, int]], now: float
    ) -> dict[str, tuple[int, float]]:
        """Add (key, amount, expiry) increments in one statement; the windows after it."""
        totals: dict[str, int] = {}
        expiries: dict[str, int] = {}
        for key, amount, expiry in increments:
            totals[key] = totals.get(key, 0) + amount
            expiries.setdefault(key, expiry)
        # Sorted keys: two processes' statements lock rows in the same order, no deadlock.
        rows = [
            {"key": key, "hits": totals[key], "expires_at": now + expiries[key]}
            for key in sorted(totals)
        ]
        stmt = self.insert(_windows).values(rows)
        expired = _windows.c.expires_at <= now
        stmt = stmt.on_conflict_do_update(
            index_elements=[_windows.c.key],
            set_={
                "hits": case(
                    (expired, stmt.excluded.hits), else_=_windows.c.hits + stmt.excluded.hits
                ),
                "expires_at": case(
                    (expired, stmt.excluded.expires_at), else_=_windows.c.expires_at
                ),
            },
        ).returning(_windows.c.key, _windows.c.hits, _windows.c.expires_at)
        async with self.engine.begin() as conn:
            result = await conn.execute(stmt)
            shared = {key: (int(hits), float(expires)) for key, hits, expires in result.all()}
            if time.monotonic() - self.swept_at > SWEEP_INTERVAL:
                self.swept_at = time.monotonic()
                await conn.execute(delete(_windows).where(_windows.c.expires_at <= now))
        return shared

    async def _window(self, key: str) -> tuple[int, float]:
        now = time.time()
        local = self.windows.get(key)
        if local is not None and local.expires_at > now:
            return local.hits, local.expires_at
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(_windows.c.hits, _windows.c.expires_at).where(_windows.c.key == key)
                )
            ).first()
        if row is None or row.expires_at <= now:
            return 0, now
        return int(row.hits), float(row.expires_at)

    async def get(self, key: str) -> int:
        return (await self._window(key))[0]

    async def get_expiry(self, key: str) -> float:
        return (await self._window(key))[1]

    async def check(self) -> bool:
        try:
            await self._window("health")
        except SQLAlchemyError:
            return False
        return True

    async def reset(self) -> int | None:
        self.windows.clear()
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(_windows))
        return int(result.rowcount)

    async def clear(self, key: str) -> None:
        self.windows.pop(key, None)
        async with self.engine.begin() as conn:
            await conn.execute(delete(_windows).where(_windows.c.key == key))

    async def close(self) -> None:
        """Write what is still pending, then stop the background work."""
        for task in (self.syncer, self.flusher):
            if task is not None and not task.done():
                await asyncio.gather(task, return_exceptions=True)
        await self.sync()


def storage_kind(settings: Settings) -> str:
    """Which storage `auto` means for these settings (see the module docstring)."""
    if settings.rate_limit_storage != "auto":
        return settings.rate_limit_storage
    if settings.redis_url:
        return "redis"
    return "memory" if settings.is_sqlite else "database"


def _redis_uri(url: str) -> str:
    return url if url.startswith("async+") else "async+" + url


class SignupLimiter:
    """The per-client limits of POST /v1/subscriptions."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.items: list[RateLimitItem] = (
            parse_many(settings.signup_rate_limit) if settings.signup_rate_limit else []
        )
        self.trusted = parse_networks(settings.trusted_proxies)
        self.pepper = (settings.secret_keys[0] if settings.secret_keys else "").encode()
        self._keys: dict[str, tuple[str, list[str]]] = {}
        self.kind = storage_kind(settings) if self.items else "off"
        self.storage: Storage | None = None
        if self.kind == "redis":
            if not settings.redis_url:
                raise ValueError("NEWSLETTER_RATE_LIMIT_STORAGE=redis needs NEWSLETTER_REDIS_URL")
            self.storage = RedisStorage(
                _redis_uri(settings.redis_url),
                wrap_exceptions=True,
                key_prefix=settings.rate_limit_key_prefix,
            )
        elif self.kind == "database":
            self.storage = DatabaseStorage(db, settings.rate_limit_sync_seconds)
        elif self.kind == "memory":
            self.storage = MemoryStorage(wrap_exceptions=True)
        self.limiter = FixedWindowRateLimiter(self.storage) if self.storage is not None else None
        self._outage_logged_at = -math.inf

    def client_ip(self, peer: str | None, forwarded_for: Sequence[str]) -> str | None:
        return client_ip(peer, forwarded_for, self.trusted)

    async def retry_after(self, ip: str | None) -> int | None:
        """Count one sign-up of this client; None if allowed, else seconds until it may retry.

        A storage outage lets the sign-up through (and is logged): the limiter guards the
        service, it must not become the reason the service is down.
        """
        if self.limiter is None or ip is None:
            return None
        key, counters = self._key(ip)
        # Only a storage across the network can hang: the memory and database ones count in
        # this process (the database one syncs in the background) and need no timer.
        deadline = None if self.kind == "redis" else contextlib.nullcontext()
        try:
            async with deadline or asyncio.timeout(STORAGE_TIMEOUT):
                passed = await self._hit_all(counters)
                refused = [item for item, ok in zip(self.items, passed, strict=True) if not ok]
                if refused:
                    # The client may come back when every window it is over has ended.
                    resets = [
                        (await self.limiter.get_window_stats(item, SIGNUP_SCOPE, key)).reset_time
                        for item in refused
                    ]
                    return max(1, math.ceil(max(resets) - time.time()))
        except (StorageError, OSError, TimeoutError) as exc:
            if time.monotonic() - self._outage_logged_at > OUTAGE_LOG_INTERVAL:
                self._outage_logged_at = time.monotonic()
                cause = exc.storage_error if isinstance(exc, StorageError) else exc
                log.warning("rate-limit storage (%s) failed, not limiting: %r", self.kind, cause)
        return None

    def _key(self, ip: str) -> tuple[str, list[str]]:
        """Counters are keyed by a keyed hash: no client address is stored, not even briefly.
        Remembered per address, with the storage key of each window (a busy client is hashed
        once, and its keys built once, not on every request)."""
        found = self._keys.get(ip)
        if found is None:
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.clear()
            key = hmac.new(self.pepper, limit_key(ip).encode(), hashlib.sha256).hexdigest()[:32]
            counters = [item.key_for(SIGNUP_SCOPE, key) for item in self.items]
            found = self._keys[ip] = (key, counters)
        return found

    async def _hit_all(self, counters: list[str]) -> list[bool]:
        """Count the sign-up in every window as FixedWindowRateLimiter.hit does (one storage
        increment, compared with the window's amount), on the remembered keys. The exact
        database storage gets them at once, to write them in one statement instead of one
        per window."""
        assert self.storage is not None
        storage = self.storage
        windows = list(zip(self.items, counters, strict=True))
        if isinstance(storage, DatabaseStorage) and storage.sync_interval <= 0:
            counts = await asyncio.gather(*(storage.incr(c, i.get_expiry()) for i, c in windows))
        else:
            counts = [await storage.incr(c, i.get_expiry()) for i, c in windows]
        return [count <= item.amount for (item, _), count in zip(windows, counts, strict=True)]

    async def close(self) -> None:
        if isinstance(self.storage, DatabaseStorage):
            await self.storage.close()
        elif isinstance(self.storage, MemoryStorage):
            timer = self.storage.timer
            if timer is not None and not timer.done():
                timer.cancel()
                await asyncio.gather(timer, return_exceptions=True)
        elif isinstance(self.storage, RedisStorage):
            client: Any = getattr(self.storage.bridge, "storage", None)
            pool = getattr(client, "connection_pool", None)
            if pool is not None:
                pool.disconnect()

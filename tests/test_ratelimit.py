"""Per-client rate limits on POST /v1/subscriptions (design: "429 with Retry-After")."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service import ratelimit
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.models import OutboxMessage, Subscriber
from service.ratelimit import SignupLimiter, client_ip, limit_key, parse_networks
from tests.conftest import free_port, make_newsletter
from tests.test_admin import make_key
from tests.test_signup_api import PENDING, count, problem, signup, statuses

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PEER = "203.0.113.7"  # the test client's address, as in conftest
BROWSER = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
RATE_LIMITED = "Too many attempts. Please try again later."


@dataclass
class Service:
    """The service built with other settings, on the test database, and a client of it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    def client_from(self, peer: str) -> httpx.AsyncClient:
        """Another client of the same service, connecting from `peer`."""
        transport = httpx.ASGITransport(app=self.app, client=(peer, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@asynccontextmanager
async def service_with(
    settings: Settings, *, peer: str = PEER, **changes: Any
) -> AsyncIterator[Service]:
    changed = settings.model_copy(update=changes)
    application = create_app(changed)
    transport = httpx.ASGITransport(app=application, client=(peer, 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Service(application, http, changed)
    finally:
        # What the lifespan does when the server stops (ASGITransport runs no lifespan).
        await application.state.signups.stop()
        await application.state.limiter.close()
        await application.state.challenge.close()
        await application.state.db.dispose()


def redis_or_skip() -> None:
    host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        message = f"Redis at {host}:{port} unreachable: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


async def consent_ip(client: httpx.AsyncClient, db: Database, email: str) -> str | None:
    """The client address ops see in the consent record of someone's first subscription."""
    headers = await make_key(db, "read")
    found = await client.get("/v1/admin/subscribers", params={"email": email}, headers=headers)
    [item] = found.json()["items"]
    detail = await client.get(f"/v1/admin/subscribers/{item['id']}", headers=headers)
    ip: str | None = detail.json()["subscriptions"][0]["consent"]["ip"]
    return ip


def retry_after(answer: httpx.Response) -> int:
    seconds = int(answer.headers["retry-after"])
    assert 1 <= seconds <= 60
    return seconds


# ---------------------------------------------------------------- the limit


async def test_signups_over_the_limit_get_429_with_retry_after_and_nothing_is_stored(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, signup_rate_limit="2/minute") as service:
        first = await signup(service.client, "one@example.com", "weekly")
        second = await signup(service.client, "two@example.com", "weekly")
        third = await signup(service.client, "three@example.com", "weekly")

        assert [first.status_code, second.status_code] == [202, 202]
        body = problem(third, 429)
        assert body["title"] == RATE_LIMITED
        assert "seconds" in body["detail"]
        retry_after(third)
        assert await statuses(service.client, db) == {
            "one@example.com": {"weekly": "pending"},
            "two@example.com": {"weekly": "pending"},
        }
    assert await count(db, Subscriber) == 2
    assert await count(db, OutboxMessage) == 2


async def test_the_limit_is_counted_where_the_backend_default_says(
    db: Database, settings: Settings
) -> None:
    async with service_with(settings) as service:
        expected = "memory" if settings.is_sqlite else "database"
        assert service.app.state.limiter.kind == expected


@pytest.mark.parametrize(("storage", "sync"), [("auto", 1.0), ("database", 1.0), ("database", 0)])
async def test_concurrent_signups_get_exactly_the_limit(
    db: Database, settings: Settings, storage: str, sync: float
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(
        settings,
        signup_rate_limit="5/minute",
        rate_limit_storage=storage,
        rate_limit_sync_seconds=sync,
    ) as service:
        answers = await asyncio.gather(
            *(signup(service.client, f"r{i}@example.com", "weekly") for i in range(8))
        )
    assert sorted(a.status_code for a in answers) == [202] * 5 + [429] * 3
    assert await count(db, Subscriber) == 5


async def test_an_hourly_limit_holds_after_the_minute_one_passes(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, signup_rate_limit="5/minute;2/hour") as service:
        answers = [await signup(service.client, f"r{i}@example.com", "weekly") for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    # The hour's window refused it: most of an hour remains.
    assert 3000 < int(answers[2].headers["retry-after"]) <= 3600


async def test_browser_form_over_the_limit_gets_a_readable_429_page(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, signup_rate_limit="1/minute") as service:
        fields = {"email": "reader@example.com", "newsletters": "weekly"}
        ok = await service.client.post("/v1/subscriptions", data=fields, headers=BROWSER)
        refused = await service.client.post(
            "/v1/subscriptions",
            data={"email": "other@example.com", "newsletters": "weekly"},
            headers=BROWSER,
        )

    assert ok.status_code == 200 and "Thank you" in ok.text
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("text/html")
    assert RATE_LIMITED in refused.text
    retry_after(refused)
    # The embedded form's plain post shows its answer in the frame.
    assert "x-frame-options" not in refused.headers
    assert await count(db, Subscriber) == 1


async def test_an_empty_limit_setting_switches_the_limit_off(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, signup_rate_limit="") as service:
        codes = [
            (await signup(service.client, f"r{i}@example.com", "weekly")).status_code
            for i in range(4)
        ]
    assert codes == [202] * 4


# ---------------------------------------------------------------- who the client is


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, signup_rate_limit="1/minute") as service:
        first = await service.client.post(
            "/v1/subscriptions",
            json={"email": "one@example.com", "newsletters": ["weekly"]},
            headers={"x-forwarded-for": "198.51.100.1"},
        )
        second = await service.client.post(
            "/v1/subscriptions",
            json={"email": "two@example.com", "newsletters": ["weekly"]},
            headers={"x-forwarded-for": "198.51.100.2"},
        )
        assert first.status_code == 202
        problem(second, 429)
        assert await consent_ip(service.client, db, "one@example.com") == PEER


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(
        settings, signup_rate_limit="1/minute", trusted_proxies=[PEER]
    ) as service:

        async def from_client(email: str, forwarded: str) -> httpx.Response:
            return await service.client.post(
                "/v1/subscriptions",
                json={"email": email, "newsletters": ["weekly"]},
                headers={"x-forwarded-for": forwarded},
            )

        one = await from_client("one@example.com", "198.51.100.1")
        two = await from_client("two@example.com", "198.51.100.2")
        again = await from_client("three@example.com", "198.51.100.1")

        assert (one.status_code, two.status_code) == (202, 202)
        problem(again, 429)
        assert await consent_ip(service.client, db, "one@example.com") == "198.51.100.1"
        assert await consent_ip(service.client, db, "two@example.com") == "198.51.100.2"


async def test_addresses_the_client_wrote_before_the_proxy_are_not_believed(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(
        settings, signup_rate_limit="1/minute", trusted_proxies=["203.0.113.0/24", "10.0.0.0/8"]
    ) as service:
        # The client 198.51.100.9 made up the left-most entry each time; two proxies of ours
        # (10.1.2.3, then the peer) appended what they saw.
        first = await service.client.post(
            "/v1/subscriptions",
            json={"email": "one@example.com", "newsletters": ["weekly"]},
            headers={"x-forwarded-for": "192.0.2.1, 198.51.100.9, 10.1.2.3"},
        )
        second = await service.client.post(
            "/v1/subscriptions",
            json={"email": "two@example.com", "newsletters": ["weekly"]},
            headers={"x-forwarded-for": "192.0.2.2, 198.51.100.9, 10.1.2.3"},
        )
        assert first.status_code == 202
        problem(second, 429)
        assert await consent_ip(service.client, db, "one@example.com") == "198.51.100.9"


async def test_ipv6_clients_are_counted_per_64(db: Database, settings: Settings) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(
        settings, signup_rate_limit="1/minute", peer="2001:db8:1:2::1"
    ) as service:
        first = await signup(service.client, "one@example.com", "weekly")
        async with service.client_from("2001:db8:1:2:ffff::7") as same_64:
            second = await signup(same_64, "two@example.com", "weekly")
        async with service.client_from("2001:db8:1:3::1") as other_64:
            third = await signup(other_64, "three@example.com", "weekly")
    assert first.status_code == 202
    problem(second, 429)
    assert third.status_code == 202


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        ("203.0.113.7", [], [], "203.0.113.7"),
        ("203.0.113.7", ["198.51.100.1"], [], "203.0.113.7"),
        ("10.0.0.5", ["198.51.100.1"], ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.5", ["1.2.3.4, 198.51.100.1"], ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.5", ["198.51.100.1", "10.9.9.9"], ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.5", ["10.0.0.9"], ["10.0.0.0/8"], "10.0.0.9"),  # only proxies: the first
        ("10.0.0.5", ["not-an-ip, 198.51.100.1"], ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.5", ["198.51.100.1, garbage"], ["10.0.0.0/8"], "10.0.0.5"),
        ("10.0.0.5", [], ["10.0.0.0/8"], "10.0.0.5"),
        ("::ffff:10.0.0.5", ["[2001:db8::1]:4711"], ["10.0.0.0/8"], "2001:db8::1"),
        ("10.0.0.5", ["198.51.100.1:4711"], ["10.0.0.5"], "198.51.100.1"),
    ],
)
def test_the_client_is_the_right_most_forwarded_address_not_of_a_trusted_proxy(
    peer: str, forwarded: list[str], trusted: list[str], client: str
) -> None:
    assert client_ip(peer, forwarded, parse_networks(trusted)) == client


def test_limit_keys_group_ipv6_by_64_and_keep_ipv4() -> None:
    assert limit_key("198.51.100.1") == "198.51.100.1"
    assert limit_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"


# ---------------------------------------------------------------- shared counts


async def test_two_processes_share_one_limit_in_redis(db: Database, settings: Settings) -> None:
    redis_or_skip()
    await make_newsletter(db, "weekly")
    shared = {
        "signup_rate_limit": "3/minute",
        "redis_url": REDIS_URL,
        "rate_limit_key_prefix": f"test-{uuid.uuid4().hex}",
    }
    async with service_with(settings, **shared) as one, service_with(settings, **shared) as two:
        assert one.app.state.limiter.kind == two.app.state.limiter.kind == "redis"
        answers = [
            await signup(one.client, "a@example.com", "weekly"),
            await signup(two.client, "b@example.com", "weekly"),
            await signup(one.client, "c@example.com", "weekly"),
            await signup(two.client, "d@example.com", "weekly"),
            await signup(one.client, "e@example.com", "weekly"),
        ]
    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429]
    retry_after(answers[3])
    assert await count(db, Subscriber) == 3


async def test_another_key_prefix_is_another_count_in_redis(
    db: Database, settings: Settings
) -> None:
    redis_or_skip()
    await make_newsletter(db, "weekly")
    async with (
        service_with(
            settings,
            signup_rate_limit="1/minute",
            redis_url=REDIS_URL,
            rate_limit_key_prefix=f"test-{uuid.uuid4().hex}",
        ) as one,
        service_with(
            settings,
            signup_rate_limit="1/minute",
            redis_url=REDIS_URL,
            rate_limit_key_prefix=f"test-{uuid.uuid4().hex}",
        ) as two,
    ):
        assert (await signup(one.client, "a@example.com", "weekly")).json() == PENDING
        assert (await signup(two.client, "b@example.com", "weekly")).json() == PENDING


async def test_two_processes_share_one_exact_limit_in_the_database(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    shared = {
        "signup_rate_limit": "2/minute",
        "rate_limit_storage": "database",
        "rate_limit_sync_seconds": 0,
    }
    async with service_with(settings, **shared) as one, service_with(settings, **shared) as two:
        assert one.app.state.limiter.kind == "database"
        answers = [
            await signup(one.client, "a@example.com", "weekly"),
            await signup(two.client, "b@example.com", "weekly"),
            await signup(one.client, "c@example.com", "weekly"),
            await signup(two.client, "d@example.com", "weekly"),
        ]
    assert [a.status_code for a in answers] == [202, 202, 429, 429]
    retry_after(answers[2])
    assert await count(db, Subscriber) == 2


async def test_an_unreachable_redis_lets_signups_through_with_a_log_line(
    db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    await make_newsletter(db, "weekly")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="service.ratelimit"):
        async with service_with(settings, signup_rate_limit="1/minute", redis_url=dead) as s:
            answers = [await signup(s.client, f"r{i}@example.com", "weekly") for i in range(2)]
    assert [a.status_code for a in answers] == [202, 202]
    assert any("rate-limit storage (redis) failed" in r.getMessage() for r in caplog.records)


async def test_processes_syncing_through_the_database_learn_each_others_counts(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    shared = {
        "signup_rate_limit": "2/minute",
        "rate_limit_storage": "database",
        "rate_limit_sync_seconds": 0.1,
    }
    async with service_with(settings, **shared) as one, service_with(settings, **shared) as two:
        first = [await signup(one.client, f"r{i}@example.com", "weekly") for i in range(3)]
        await asyncio.sleep(0.3)
        # A request after the sync interval: `one` writes its hits in the background.
        first.append(await signup(one.client, "r3@example.com", "weekly"))
        await asyncio.sleep(0.3)
        # `two` has not heard of this client yet: it counts on its own until it syncs.
        unheard = await signup(two.client, "r4@example.com", "weekly")
        await asyncio.sleep(0.3)
        later = await signup(two.client, "r5@example.com", "weekly")
    assert [a.status_code for a in first] == [202, 202, 429, 429]
    assert unheard.status_code == 202
    problem(later, 429)
    retry_after(later)
    assert await count(db, Subscriber) == 3


async def test_counts_not_yet_synced_are_written_when_the_service_stops(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    limit = {"signup_rate_limit": "1/minute", "rate_limit_storage": "database"}
    async with service_with(settings, **limit, rate_limit_sync_seconds=3600) as one:
        assert (await signup(one.client, "a@example.com", "weekly")).status_code == 202
    # `one` synced nothing while it ran (an hour's interval): it wrote its count on stopping.
    async with service_with(settings, **limit, rate_limit_sync_seconds=0) as two:
        problem(await signup(two.client, "b@example.com", "weekly"), 429)
    assert await count(db, Subscriber) == 1


async def test_counter_keys_are_remembered_without_changing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limiter = SignupLimiter(Settings(secret_keys=["k"], signup_rate_limit="5/minute"), None)
    monkeypatch.setattr(ratelimit, "KEY_CACHE_SIZE", 2)
    try:
        first = limiter._key("2001:db8::1")
        assert limiter._key("2001:db8::2") == first  # one /64, one counter
        other = limiter._key("198.51.100.7")
        assert other != first and "198.51.100.7" not in other  # a keyed hash, not the address
        assert len(limiter._keys) <= 2
        assert limiter._key("2001:db8::1") == first  # recomputed after the cache was emptied
        fresh = SignupLimiter(Settings(secret_keys=["k"], signup_rate_limit="5/minute"), None)
        assert fresh._key("198.51.100.7") == other  # the same key in every process
        await fresh.close()
    finally:
        await limiter.close()

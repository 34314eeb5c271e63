"""Address quality at sign-up: typo domains, disposable domains and deliverability (DNS), with
a DNS server of our own on loopback (design: "a DNS outage must not reject everyone")."""

from __future__ import annotations

import html
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dnslib import MX, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from service import address_quality
from service.address_quality import suggest_domain
from service.config import Settings
from service.db import Database
from service.models import OutboxMessage, Subscriber
from tests.conftest import make_newsletter
from tests.test_ratelimit import BROWSER, service_with
from tests.test_signup_api import INVALID_EMAIL, PENDING, count, field_errors, statuses
from tests.test_signup_pages import input_value

DISPOSABLE_DETAIL = "Addresses at disposable email services are not accepted."

# The zone our DNS server knows; every other name does not exist.
ZONE: dict[str, list[tuple[str, Any]]] = {
    "deliverable-news.org": [("MX", MX("mx.deliverable-news.org", 10))],
    "a-only-news.org": [("A", A("93.184.215.14"))],
    "private-a-news.org": [("A", A("10.0.0.1"))],
    "nullmx-news.org": [("MX", MX(".", 0))],
    "nomail-news.org": [("TXT", TXT("nothing here"))],
    "gmail.com": [("MX", MX("gmail-smtp-in.l.google.com", 5))],
}
SERVFAIL = "servfail-news.org"


# ---------------------------------------------------------------- a DNS server on loopback


@dataclass
class Zone(BaseResolver):  # type: ignore[misc]
    queries: list[tuple[str, str]] = field(default_factory=list)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        kind = QTYPE[request.q.qtype]
        self.queries.append((name, kind))
        if name == SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
        elif name not in ZONE:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for rtype, rdata in ZONE[name]:
                if rtype == kind:
                    reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=60))
        return reply


@dataclass
class DNS:
    address: str
    zone: Zone


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNS]:
    zone = Zone()
    port = free_udp_port()
    quiet = DNSLogger(log="-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)
    server = DNSServer(zone, port=port, address="127.0.0.1", logger=quiet)
    server.start_thread()
    yield DNS(f"127.0.0.1:{port}", zone)
    server.stop()


@pytest.fixture
def dns(dns_server: DNS) -> DNS:
    dns_server.zone.queries.clear()
    return dns_server


def checking(dns: DNS, **more: Any) -> dict[str, Any]:
    return {"check_deliverability": True, "dns_resolver": dns.address, "dns_timeout": 2.0, **more}


async def nothing_stored(db: Database) -> None:
    assert await count(db, Subscriber) == 0
    assert await count(db, OutboxMessage) == 0


# ---------------------------------------------------------------- deliverability


@pytest.mark.parametrize("domain", ["deliverable-news.org", "a-only-news.org"])
async def test_a_domain_that_takes_mail_passes(
    db: Database, settings: Settings, dns: DNS, domain: str
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **checking(dns)) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": f"reader@{domain}", "newsletters": ["weekly"]}
        )
        assert answer.json() == PENDING
        assert await statuses(service.client, db) == {f"reader@{domain}": {"weekly": "pending"}}
    assert (domain, "MX") in dns.zone.queries


@pytest.mark.parametrize(
    ("domain", "detail"),
    [
        ("missing-news.org", "The domain name missing-news.org does not exist."),
        ("nullmx-news.org", "The domain name nullmx-news.org does not accept email."),
        ("nomail-news.org", "The domain name nomail-news.org does not accept email."),
        ("private-a-news.org", "The domain name private-a-news.org does not accept email."),
    ],
)
async def test_a_domain_that_dns_says_takes_no_mail_is_refused(
    db: Database, settings: Settings, dns: DNS, domain: str, detail: str
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **checking(dns)) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": f"reader@{domain}", "newsletters": ["weekly"]}
        )
    assert field_errors(answer)["email"] == {
        "field": "email",
        "code": "invalid_email",
        "message": INVALID_EMAIL,
        "detail": detail,
    }
    await nothing_stored(db)


async def test_a_dns_server_failure_lets_the_signup_through_with_a_log_line(
    db: Database, settings: Settings, dns: DNS, caplog: pytest.LogCaptureFixture
) -> None:
    await make_newsletter(db, "weekly")
    with caplog.at_level(logging.WARNING, logger="service.address_quality"):
        async with service_with(settings, **checking(dns)) as service:
            answer = await service.client.post(
                "/v1/subscriptions",
                json={"email": f"reader@{SERVFAIL}", "newsletters": ["weekly"]},
            )
    assert answer.json() == PENDING
    assert await count(db, Subscriber) == 1
    assert (SERVFAIL, "MX") in dns.zone.queries
    assert any(
        f"deliverability check of {SERVFAIL} failed" in r.getMessage() for r in caplog.records
    )


async def test_a_dead_resolver_lets_the_signup_through_with_a_log_line(
    db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    await make_newsletter(db, "weekly")
    nobody = f"127.0.0.1:{free_udp_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="service.address_quality"):
        async with service_with(
            settings, check_deliverability=True, dns_resolver=nobody, dns_timeout=0.5
        ) as service:
            answer = await service.client.post(
                "/v1/subscriptions",
                json={"email": "reader@missing-news.org", "newsletters": ["weekly"]},
            )
            assert answer.json() == PENDING
            assert await statuses(service.client, db) == {
                "reader@missing-news.org": {"weekly": "pending"}
            }
    assert any("accepting the address" in r.getMessage() for r in caplog.records)


async def test_without_the_deliverability_setting_dns_is_not_asked(
    db: Database, settings: Settings, dns: DNS
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, dns_resolver=dns.address) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={"email": "reader@missing-news.org", "newsletters": ["weekly"]},
        )
    assert answer.json() == PENDING
    assert dns.zone.queries == []


async def test_a_filled_honeypot_costs_no_dns_lookup(
    db: Database, settings: Settings, dns: DNS
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **checking(dns)) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={
                "email": "reader@missing-news.org",
                "newsletters": ["weekly"],
                "website": "https://spam.example",
            },
        )
    assert answer.json() == PENDING
    assert dns.zone.queries == []
    await nothing_stored(db)


# ---------------------------------------------------------------- disposable domains


@pytest.mark.parametrize("email", ["reader@mailinator.com", "reader@inbox.mailinator.com"])
async def test_a_disposable_domain_is_refused(db: Database, settings: Settings, email: str) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
        )
    assert field_errors(answer)["email"] == {
        "field": "email",
        "code": "disposable_email",
        "message": INVALID_EMAIL,
        "detail": DISPOSABLE_DETAIL,
    }
    await nothing_stored(db)


async def test_a_disposable_domain_in_a_browser_form_shows_the_form_again(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings) as service:
        page = await service.client.post(
            "/v1/subscriptions",
            data={"email": "reader@yopmail.com", "newsletters": "weekly"},
            headers=BROWSER,
        )
    assert page.status_code == 422
    assert page.headers["content-type"].startswith("text/html")
    assert input_value(page.text, "email") == "reader@yopmail.com"
    await nothing_stored(db)


async def test_disposable_domains_pass_when_the_setting_is_off(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, reject_disposable=False) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={"email": "reader@mailinator.com", "newsletters": ["weekly"]},
        )
    assert answer.json() == PENDING


async def test_ops_add_and_take_off_disposable_domains_with_a_file_read_when_it_changes(
    db: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(address_quality, "FILE_CHECK_INTERVAL", 0.0)
    await make_newsletter(db, "weekly")
    listed = tmp_path / "disposable.txt"
    listed.write_text("# ours\nthrowaway-news.org\n!mailinator.com\n")

    async with service_with(settings, disposable_domains_file=listed) as service:

        async def code(email: str) -> str | None:
            answer = await service.client.post(
                "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
            )
            if answer.status_code == 202:
                return None
            return field_errors(answer)["email"]["code"]

        assert await code("a@throwaway-news.org") == "disposable_email"
        assert await code("b@mailinator.com") is None  # taken off the package's list
        assert await code("c@yopmail.com") == "disposable_email"  # the package's list

        listed.write_text("another-throwaway.org\n")
        stamp = listed.stat().st_mtime + 5
        os.utime(listed, (stamp, stamp))  # a new mtime, whatever the file system's resolution
        assert await code("d@another-throwaway.org") == "disposable_email"
        assert await code("e@throwaway-news.org") is None
        assert await code("f@mailinator.com") == "disposable_email"


# ---------------------------------------------------------------- typo domains


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("gmial.com", "gmail.com"),
        ("gamil.com", "gmail.com"),
        ("gmail.con", "gmail.com"),
        ("hotmial.com", "hotmail.com"),
        ("yaho.com", "yahoo.com"),
        ("yahoo.cmo", "yahoo.com"),
        ("outlok.com", "outlook.com"),
        ("icluod.com", "icloud.com"),
        ("aol.con", "aol.com"),
    ],
)
async def test_a_typo_of_a_popular_domain_is_refused_with_a_suggestion(
    db: Database, settings: Settings, typed: str, meant: str
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={"email": f"Reader.Name@{typed}", "newsletters": ["weekly"]},
        )
    assert field_errors(answer)["email"] == {
        "field": "email",
        "code": "invalid_email",
        "message": INVALID_EMAIL,
        "detail": f"Did you mean Reader.Name@{meant}?",
        "suggestion": f"Reader.Name@{meant}",
    }
    await nothing_stored(db)


async def test_a_typo_suggestion_shows_in_a_browser_form_as_an_address_error(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings) as service:
        page = await service.client.post(
            "/v1/subscriptions",
            data={"email": "reader@gmail.con", "newsletters": "weekly"},
            headers=BROWSER,
        )
    assert page.status_code == 422
    assert INVALID_EMAIL in html.unescape(page.text)
    assert input_value(page.text, "email") == "reader@gmail.con"


async def test_typo_suggestions_can_be_switched_off(db: Database, settings: Settings) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, suggest_domain_typos=False) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": "reader@gmail.con", "newsletters": ["weekly"]}
        )
    assert answer.json() == PENDING


async def test_a_popular_domain_itself_passes_every_check(
    db: Database, settings: Settings, dns: DNS
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **checking(dns)) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": "reader@gmail.com", "newsletters": ["weekly"]}
        )
    assert answer.json() == PENDING


@pytest.mark.parametrize(
    "domain",
    [
        "gmail.com",
        "googlemail.com",
        "ymail.com",
        "mail.com",
        "email.com",
        "gmx.com",
        "cloud.com",
        "wahoo.com",
        "me.com",
        "aol.com",
        "live.com",
        "hotmail.co.uk",
        "hotmail.fr",
        "yahoo.co.jp",
        "yahoo.ca",
        "outlook.de",
        "gmail.net",
        "example.com",
        "university.edu",
    ],
)
def test_real_domains_are_never_taken_for_typos(domain: str) -> None:
    assert suggest_domain(domain) is None

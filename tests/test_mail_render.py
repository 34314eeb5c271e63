"""The cached rendering path gives the message a full Jinja2 + email-package render gives."""

from __future__ import annotations

import email
import re
from email.header import decode_header, make_header
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from service import tokens
from service.config import Settings
from service.mail.render import MailRenderer, OutgoingMail
from service.mail.transports import wire_data
from service.models import Newsletter

HOSTILE_NAMES = [
    "Weekly",
    "Щотижневик «Новини» — випуск",
    'Ada "the <b>Countess</b>" & Co; <script>alert(1)</script>',
    "Line\nbreak\r\nand\ttab =?utf-8?q?x?= " + "long " * 30,
    "x" * 200,
    ".\n.dot at line start",
    "Émile, Zoë; 日本語のニュースレター",
]


def newsletter(**fields: Any) -> Newsletter:
    values: dict[str, Any] = {
        "id": 1,
        "slug": "weekly",
        "name": "Weekly",
        "description": "",
        "opt_in": "double",
        "from_name": "",
        "from_email": None,
        "reply_to": None,
        "language": "en",
        "allowed_origins": [],
    }
    values.update(fields)
    return Newsletter(**values)


@pytest.fixture
def renderer(tmp_path: Path) -> MailRenderer:
    settings = Settings(
        data_dir=tmp_path,
        base_url="https://news.example.org",
        secret_keys=["render-test"],
        mail_from="news@example.org",
    )
    return MailRenderer(settings)


def parsed(mail: OutgoingMail) -> Message:
    return email.message_from_bytes(mail.data)


def headers(message: Message) -> dict[str, str]:
    """Header values unfolded (RFC 5322: the line breaks go, the white space stays) and
    decoded, the boundary left out (random per message). compat32 may fold a long value
    right after the colon, leaving white space at the start: it is not part of the value."""
    out: dict[str, str] = {}
    for name, value in message.items():
        # A UTF-8 header (an SMTPUTF8 recipient) comes back from compat32 as a Header.
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", str(value)).strip()
        try:
            text = str(make_header(decode_header(unfolded)))
        except LookupError:  # a name that looks like an encoded word in a made-up charset
            text = unfolded
        out[name] = re.sub(r'boundary="[^"]*"', "", text)
    return out


def parts(message: Message) -> list[tuple[dict[str, str], str]]:
    found = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((headers(part), payload.decode("utf-8")))
    return found


def assert_same(fast: OutgoingMail, full: OutgoingMail) -> None:
    assert (fast.sender, fast.recipient) == (full.sender, full.recipient)
    a, b = parsed(fast), parsed(full)
    # Rendered a moment apart: the clock may have ticked over between them.
    when = [parsedate_to_datetime(str(m["Date"])) for m in (a, b)]
    assert abs((when[0] - when[1]).total_seconds()) <= 2
    assert {**headers(a), "Date": ""} == {**headers(b), "Date": ""}
    assert list(a.keys()) == list(b.keys())  # the same headers in the same order
    assert parts(a) == parts(b)
    for mail in (fast, full):
        # ASCII but for a recipient that only SMTPUTF8 carries, in To as it is (RFC 6532).
        assert mail.data.isascii() or not mail.recipient.isascii()
        assert max(len(line) for line in mail.data.split(b"\n")) <= 998


@pytest.mark.parametrize("template", ["confirmation", "welcome", "already_subscribed"])
@pytest.mark.parametrize("language", ["en", "uk"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_cached_render_matches_full_render(
    renderer: MailRenderer, template: str, language: str, name: str
) -> None:
    lists = [
        newsletter(name=name, language=language, from_name=name, reply_to="reply@example.org"),
        newsletter(id=2, slug="daily-news", name=name[::-1] or "Daily", language=language),
    ]
    for count in (1, 2):
        for i, payload in enumerate(
            [
                {"subscriber": "pub1", "token": "tok-" + "A" * 43, "newsletters": [1]},
                {"subscriber": "p" * 32, "newsletters": [1]},  # no token: no confirm link
            ]
        ):
            args = (template, f"reader{i}+tag@example.com", lists[:count], payload, f"<{i}.1@x>")
            fast, full = renderer.render(*args), renderer.render_full(*args)
            assert_same(fast, full)
            # The second one comes from the cache, with another reader's values.
            again = renderer.render(template, "other@example.net", lists[:count], payload, "<9@x>")
            assert parsed(again)["To"] == "other@example.net"
            assert parsed(again)["Message-ID"] == "<9@x>"
    assert renderer._skeletons, "the cached path was not taken"
    assert all(s is not None for s in renderer._skeletons.values())


def test_links_are_the_readers_own(renderer: MailRenderer) -> None:
    news = [newsletter(language="uk", name="Новини")]
    token = "t0k_en-" + "z" * 36
    mail = renderer.render(
        "confirmation", "a@example.com", news, {"subscriber": "abc", "token": token}, "<1@x>"
    )
    (_, text), (_, html) = parts(parsed(mail))
    confirm = f"https://news.example.org/confirm/{token}"
    assert confirm in text
    assert f'href="{confirm}"' in html
    welcome = renderer.render("welcome", "b@example.com", news, {"subscriber": "def"}, "<2@x>")
    manage = tokens.manage_token(["render-test"], "def")
    message = parsed(welcome)
    assert f"https://news.example.org/manage/{manage}" in parts(message)[0][1]
    assert message["List-Unsubscribe"].startswith(
        f"<https://news.example.org/unsubscribe/{manage}?newsletter=weekly>,"
    )
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Content-Language"] == "uk"


def test_newsletter_edit_is_seen_at_once(renderer: MailRenderer) -> None:
    payload = {"subscriber": "abc", "token": "t"}
    before = renderer.render("confirmation", "a@example.com", [newsletter()], payload, "<1@x>")
    renamed = newsletter(name="Monthly")
    after = renderer.render("confirmation", "a@example.com", [renamed], payload, "<1@x>")
    assert "Weekly" in parsed(before)["Subject"]
    assert "Monthly" in parsed(after)["Subject"]


@pytest.mark.parametrize(
    "recipient",
    [
        "x" * 64 + "@" + "long-domain-" * 5 + "example.com",  # compat32 would fold it
        '"odd, local"@example.com',
        "юзер@приклад.укр",
    ],
)
def test_unusual_recipients_fall_back_to_the_full_render(
    renderer: MailRenderer, recipient: str
) -> None:
    args = ("welcome", recipient, [newsletter()], {"subscriber": "abc"}, "<1@x>")
    mail = renderer.render(*args)
    assert_same(mail, renderer.render_full(*args))
    to = email.message_from_bytes(mail.data, policy=email.policy.default)["To"]
    assert str(to) == recipient


def test_wire_form_is_crlf_and_dot_stuffed(renderer: MailRenderer) -> None:
    news = [newsletter(name=".\n.dot", from_name=".")]
    mail = renderer.render("welcome", "a@example.com", news, {"subscriber": "abc"}, "<1@x>")
    wire = wire_data(mail.data)
    assert wire.endswith(b"\r\n.\r\n")
    assert b"\n" not in wire.replace(b"\r\n", b"")
    body = wire[: -len(b".\r\n")]
    assert b"\r\n.\r\n" not in body
    unstuffed = re.sub(rb"(?m)^\.\.", b".", body).replace(b"\r\n", b"\n")
    assert unstuffed == mail.data if mail.data.endswith(b"\n") else mail.data + b"\n"

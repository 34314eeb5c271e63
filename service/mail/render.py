"""Mail rendering: Jinja2 text + HTML templates into a multipart/alternative message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime, formataddr
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from service import i18n, tokens
from service.config import Settings
from service.models import Newsletter, utcnow


@dataclass(frozen=True)
class Links:
    """Absolute URLs a reader may be sent, all built from BASE_URL."""

    settings: Settings

    def url(self, path: str) -> str:
        return self.settings.base_url.rstrip("/") + path

    def confirm(self, token: str) -> str:
        return self.url(f"/confirm/{token}")

    def manage(self, public_id: str) -> str:
        return self.url(f"/manage/{tokens.manage_token(self.settings.secret_keys, public_id)}")

    def unsubscribe(self, public_id: str, newsletter_slug: str | None = None) -> str:
        token = tokens.manage_token(self.settings.secret_keys, public_id)
        suffix = f"?newsletter={quote(newsletter_slug)}" if newsletter_slug else ""
        return self.url(f"/unsubscribe/{token}{suffix}")

    def unsubscribe_mailto(self, public_id: str) -> str:
        token = tokens.manage_token(self.settings.secret_keys, public_id)
        local, _, domain = self.settings.mail_from.rpartition("@")
        return f"mailto:{local or 'newsletter'}+unsubscribe-{token}@{domain}?subject=unsubscribe"


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable source, unlike base64, and 7-bit safe


@dataclass(frozen=True)
class OutgoingMail:
    """A rendered message: envelope addresses and the bytes to send."""

    sender: str
    recipient: str
    data: bytes


def _text_part(text: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype, charset="utf-8")
    part.set_payload(text, _UTF8_QP)
    return part


def _header(value: str) -> str | Header:
    """Non-ASCII header text as RFC 2047 encoded words (folded by the generator)."""
    return value if value.isascii() else Header(value, "utf-8")


def _one_line(value: str) -> str:
    """Header text on one line, whatever a newsletter's name holds."""
    return " ".join(value.split())


class MailRenderer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.links = Links(settings)
        self.text_env = Environment(
            loader=FileSystemLoader(settings.templates_dir / "mail"),
            autoescape=False,  # noqa: S701 - plain-text parts are not HTML
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.html_env = Environment(
            loader=FileSystemLoader(settings.templates_dir / "mail"),
            autoescape=select_autoescape(default=True),
            undefined=StrictUndefined,
        )
        i18n.install(self.text_env)
        i18n.install(self.html_env)

    def render(
        self,
        template: str,
        recipient: str,
        newsletters: Sequence[Newsletter],
        payload: dict[str, Any],
        message_id: str,
    ) -> OutgoingMail:
        """Build one message in the newsletter's language, ready to send.

        Every template gets the same, fully server-made context: nothing a sign-up typed (a
        name, attributes) ever reaches a message, so the form cannot carry someone's words.
        """
        first = newsletters[0]
        language = i18n.supported(first.language) or i18n.DEFAULT_LANGUAGE
        public_id = str(payload["subscriber"])
        single = first.slug if len(newsletters) == 1 else None
        context: dict[str, Any] = {
            "newsletters": newsletters,
            "newsletter": first,
            "sender_name": first.from_name or first.name,
            "manage_url": self.links.manage(public_id),
            "unsubscribe_url": self.links.unsubscribe(public_id, single),
            "confirm_url": self.links.confirm(payload["token"]) if "token" in payload else None,
            "base_url": self.settings.base_url,
            "lang": language,
        }
        subject = _one_line(self.text_env.get_template(f"{template}.subject.txt").render(context))
        sender = first.from_email or self.settings.mail_from
        headers: list[tuple[str, str | Header]] = [
            ("Subject", _header(subject)),
            ("From", formataddr((_one_line(context["sender_name"]), sender), charset="utf-8")),
            ("To", recipient),
            *([("Reply-To", first.reply_to)] if first.reply_to else []),
            ("Date", format_datetime(utcnow())),
            ("Message-ID", message_id),
            (
                "List-Id",
                formataddr(
                    (_one_line(first.name), f"{first.slug}.{self.settings.site_domain}"),
                    charset="utf-8",
                ),
            ),
            ("Auto-Submitted", "auto-generated"),
            ("Content-Language", language),
        ]
        if template != "confirmation":
            https = self.links.unsubscribe(public_id, single)
            headers.append(
                ("List-Unsubscribe", f"<{https}>, <{self.links.unsubscribe_mailto(public_id)}>")
            )
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        # The compat32 MIME classes build and flatten a message several times faster than
        # EmailMessage's header registry: rendering is most of the worker's time per mail.
        message = MIMEMultipart("alternative")
        for name, value in headers:
            message[name] = value  # type: ignore[assignment]  # compat32 takes Header objects
        text = self.text_env.get_template(f"{template}.txt").render(context)
        html = self.html_env.get_template(f"{template}.html").render(context)
        message.attach(_text_part(text, "plain"))
        message.attach(_text_part(html, "html"))
        return OutgoingMail(sender=sender, recipient=recipient, data=message.as_bytes())

    def message_id(self, outbox_id: int, created_at_ts: float) -> str:
        # Stable across retries, so a receiver can drop a duplicate of an at-least-once send.
        return f"<{outbox_id}.{int(created_at_ts)}@{self.settings.site_domain}>"

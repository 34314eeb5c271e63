"""Mail rendering: Jinja2 text + HTML templates into a multipart/alternative message."""

from __future__ import annotations

import re
import secrets
from binascii import b2a_qp
from collections import OrderedDict
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
from markupsafe import escape
from sqlalchemy import JSON
from sqlalchemy import inspect as sa_inspect

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
        tag = tokens.unsubscribe_tag(self.settings.secret_keys, public_id)
        local, _, domain = self.settings.mail_from.rpartition("@")
        return f"mailto:{local or 'newsletter'}+{tag}@{domain}?subject=unsubscribe"


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


_SAFE_HEADER_VALUE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
# Where a UTF-8 To goes in a message flattened by compat32 (see _assemble).
_UTF8_TO = "utf8-recipient@invalid"
# compat32 folds header lines past this length; shorter ones it writes as they are.
_HEADER_LINE = 78


@dataclass
class _Skeleton:
    """One template for one set of newsletters, rendered once with numbered markers where
    each recipient's values go: the header block, the two decoded bodies, the glue between.

    Pieces alternate literal and slot number (as re.split with one group leaves them)."""

    sender: str
    slots: frozenset[int]  # the recipient's values it holds
    head: list[str]
    text: list[str]
    html: list[str]
    middle: bytes
    tail: bytes
    boundary: bytes


def _fill(pieces: list[str], values: Sequence[str]) -> str:
    out = pieces[:]
    for i in range(1, len(out), 2):
        out[i] = values[int(out[i])]
    return "".join(out)


def _header_value(name: str, value: str) -> str | None:
    """`value` as compat32 would write it after `name: `, or None when it would fold or
    encode it (the caller then renders the whole message the slow way)."""
    if len(name) + 2 + len(value) <= _HEADER_LINE:
        return value if _SAFE_HEADER_VALUE.fullmatch(value) else None
    if name == "List-Unsubscribe":
        # compat32 breaks a long list after its comma, and leaves each item whole.
        items = value.split(", ")
        if all(_SAFE_HEADER_VALUE.fullmatch(item) for item in items):
            return ",\n ".join(items)
    return None


class MailRenderer:
    """Renders mail from the templates in templates/mail.

    `render` renders a template once per set of newsletters and language with markers where
    the recipient's values go, caches that, and fills it in for each message: the Jinja2
    and MIME work of one message costs as much as dozens of filled-in copies. `render_full`
    renders one message from scratch; the cached form is checked against it in the tests.
    """

    # Per-recipient slots: context values first, then header values.
    _MANAGE, _UNSUBSCRIBE, _CONFIRM, _TO, _DATE, _MESSAGE_ID, _LIST_UNSUBSCRIBE = range(7)
    _CONTEXT_SLOTS = ("manage_url", "unsubscribe_url", "confirm_url")
    _CACHE_SIZE = 256

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
        # A marker no template text or newsletter field will hold by chance.
        self._marker = f"zq{secrets.token_hex(6)}s"
        self._slot = re.compile(re.escape(self._marker) + r"(\d)z")
        self._skeletons: OrderedDict[tuple[Any, ...], _Skeleton | None] = OrderedDict()
        self._date = (0, "")

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
        skeleton = self._skeleton(template, newsletters, "token" in payload)
        if skeleton is not None:
            values = self._values(
                template, recipient, newsletters, payload, message_id, skeleton.slots
            )
            mail = self._fill_in(skeleton, recipient, values)
            if mail is not None:
                return mail
        return self.render_full(template, recipient, newsletters, payload, message_id)

    def render_full(
        self,
        template: str,
        recipient: str,
        newsletters: Sequence[Newsletter],
        payload: dict[str, Any],
        message_id: str,
    ) -> OutgoingMail:
        """`render` without the cache: Jinja2 and the email package for this one message."""
        values = self._values(template, recipient, newsletters, payload, message_id)
        return self._render(template, newsletters, values)

    def _values(
        self,
        template: str,
        recipient: str,
        newsletters: Sequence[Newsletter],
        payload: dict[str, Any],
        message_id: str,
        slots: frozenset[int] | None = None,
    ) -> list[Any]:
        """The recipient's own values, in slot order; of `slots` only, when given (the
        links each cost a signature; a confirmation has none but its confirm link)."""
        public_id = str(payload["subscriber"])
        single = newsletters[0].slug if len(newsletters) == 1 else None
        wanted = slots if slots is not None else frozenset(range(7))
        unsubscribe = (
            self.links.unsubscribe(public_id, single)
            if wanted & {self._UNSUBSCRIBE, self._LIST_UNSUBSCRIBE}
            else None
        )
        list_unsubscribe = (
            None
            if template == "confirmation"
            else f"<{unsubscribe}>, <{self.links.unsubscribe_mailto(public_id)}>"
        )
        return [
            self.links.manage(public_id) if self._MANAGE in wanted else None,
            unsubscribe,
            self.links.confirm(payload["token"]) if "token" in payload else None,
            recipient,
            self._now(),
            message_id,
            list_unsubscribe,
        ]

    def _now(self) -> str:
        """The Date header: formatted once a second, not once a message."""
        now = utcnow()
        second = int(now.timestamp())
        if self._date[0] != second:
            self._date = (second, format_datetime(now.replace(microsecond=0)))
        return self._date[1]

    def _render(
        self, template: str, newsletters: Sequence[Newsletter], values: Sequence[Any]
    ) -> OutgoingMail:
        sender, headers, text, html = self._compose(template, newsletters, values)
        return OutgoingMail(sender, values[self._TO], _assemble(headers, text, html))

    def _compose(
        self, template: str, newsletters: Sequence[Newsletter], values: Sequence[Any]
    ) -> tuple[str, list[tuple[str, str | Header]], str, str]:
        """The envelope sender, the headers and the two bodies of one message."""
        first = newsletters[0]
        language = i18n.supported(first.language) or i18n.DEFAULT_LANGUAGE
        context: dict[str, Any] = {
            "newsletters": newsletters,
            "newsletter": first,
            "sender_name": first.from_name or first.name,
            **dict(zip(self._CONTEXT_SLOTS, values, strict=False)),
            "base_url": self.settings.base_url,
            "lang": language,
        }
        subject = _one_line(self.text_env.get_template(f"{template}.subject.txt").render(context))
        sender = first.from_email or self.settings.mail_from
        headers: list[tuple[str, str | Header]] = [
            ("Subject", _header(subject)),
            ("From", formataddr((_one_line(context["sender_name"]), sender), charset="utf-8")),
            ("To", values[self._TO]),
            *([("Reply-To", first.reply_to)] if first.reply_to else []),
            ("Date", values[self._DATE]),
            ("Message-ID", values[self._MESSAGE_ID]),
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
        if values[self._LIST_UNSUBSCRIBE] is not None:
            headers.append(("List-Unsubscribe", values[self._LIST_UNSUBSCRIBE]))
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        text = self.text_env.get_template(f"{template}.txt").render(context)
        html = self.html_env.get_template(f"{template}.html").render(context)
        return sender, headers, text, html

    def _skeleton(
        self, template: str, newsletters: Sequence[Newsletter], has_token: bool
    ) -> _Skeleton | None:
        # Keyed on every column of the newsletters, so an edit is seen at once.
        key = (template, has_token, *(_fingerprint(n) for n in newsletters))
        if key in self._skeletons:
            self._skeletons.move_to_end(key)
            return self._skeletons[key]
        skeleton = self._build_skeleton(template, newsletters, has_token)
        self._skeletons[key] = skeleton
        if len(self._skeletons) > self._CACHE_SIZE:
            self._skeletons.popitem(last=False)
        return skeleton

    def _build_skeleton(
        self, template: str, newsletters: Sequence[Newsletter], has_token: bool
    ) -> _Skeleton | None:
        """Render with markers, then cut the message at them; None when cutting would not
        give back what a full render gives (a marker changed by a filter, or encoded)."""
        markers: list[str | None] = [f"{self._marker}{slot}z" for slot in range(7)]
        if not has_token:
            markers[self._CONFIRM] = None
        if template == "confirmation":
            markers[self._LIST_UNSUBSCRIBE] = None
        sender, headers, text, html = self._compose(template, newsletters, markers)
        by_value = {"To", "Date", "Message-ID", "List-Unsubscribe"}
        if any(self._marker in str(v) for name, v in headers if name not in by_value):
            return None
        # The bodies are quoted-printable encoded per message: they go in as markers here.
        body_marks = (f"{self._marker}textz", f"{self._marker}htmlz")
        data = _assemble(headers, *body_marks).decode("ascii")
        head, _, rest = data.partition(body_marks[0])
        middle, _, tail = rest.partition(body_marks[1])
        pieces = [self._slot.split(part) for part in (head, text, html)]
        if any(self._marker in literal for p in pieces for literal in p[::2]):
            return None
        header_slots = sorted(int(n) for n in pieces[0][1::2])
        if header_slots != [s for s in range(self._TO, 7) if markers[s] is not None]:
            return None
        if any(int(n) >= self._TO for p in pieces[1:] for n in p[1::2]):
            return None
        boundary = re.search(r'boundary="([^"]+)"', head)
        if boundary is None or self._marker in middle + tail:
            return None
        return _Skeleton(
            sender=sender,
            slots=frozenset(int(n) for p in pieces for n in p[1::2]),
            head=pieces[0],
            text=pieces[1],
            html=pieces[2],
            middle=middle.encode(),
            tail=tail.encode(),
            boundary=boundary.group(1).encode(),
        )

    def _fill_in(
        self, skeleton: _Skeleton, recipient: str, values: list[Any]
    ) -> OutgoingMail | None:
        """The skeleton with this recipient's values; None when a header value is one
        compat32 would fold or encode (a very long or non-ASCII address)."""
        head_values: list[str] = [""] * 7
        for slot, name in (
            (self._TO, "To"),
            (self._DATE, "Date"),
            (self._MESSAGE_ID, "Message-ID"),
            (self._LIST_UNSUBSCRIBE, "List-Unsubscribe"),
        ):
            if values[slot] is not None:
                written = _header_value(name, values[slot])
                if written is None:
                    return None
                head_values[slot] = written
        text_values = [v or "" for v in values[: self._TO]]
        html_values = [str(escape(v)) for v in text_values]
        text = _quoted_printable(_fill(skeleton.text, text_values))
        html = _quoted_printable(_fill(skeleton.html, html_values))
        if skeleton.boundary in text or skeleton.boundary in html:
            return None  # cannot happen (quoted-printable writes "=" as "=3D"); to be sure
        data = b"".join(
            (
                _fill(skeleton.head, head_values).encode("ascii"),
                text,
                skeleton.middle,
                html,
                skeleton.tail,
            )
        )
        return OutgoingMail(skeleton.sender, recipient, data)

    def message_id(self, outbox_id: int, created_at_ts: float) -> str:
        # Stable across retries, so a receiver can drop a duplicate of an at-least-once send.
        # The creation time to the microsecond: SQLite gives a deleted last row's id to the
        # next row (an erase deletes outbox rows), which may come within the same second.
        return f"<{outbox_id}.{round(created_at_ts * 1_000_000)}@{self.settings.site_domain}>"


def _assemble(headers: list[tuple[str, str | Header]], text: str, html: str) -> bytes:
    # The compat32 MIME classes build and flatten a message several times faster than
    # EmailMessage's header registry.
    message = MIMEMultipart("alternative")
    utf8_to = None
    for name, value in headers:
        if name == "To" and isinstance(value, str) and not value.isascii():
            # A non-ASCII part before the @ goes out over SMTPUTF8, whose headers are UTF-8
            # as they are (RFC 6532): compat32 would write an encoded-word, not an address.
            utf8_to, value = value, _UTF8_TO
        message[name] = value  # type: ignore[assignment]  # compat32 takes Header objects
    message.attach(_text_part(text, "plain"))
    message.attach(_text_part(html, "html"))
    data = message.as_bytes()
    if utf8_to is not None:
        data = data.replace(b"\nTo: " + _UTF8_TO.encode() + b"\n", f"\nTo: {utf8_to}\n".encode(), 1)
    return data


def _quoted_printable(text: str) -> bytes:
    """What the email package's quoted-printable body encoder gives, decoded alike, from C:
    it too takes a lone carriage return (a hostile newsletter name) for a line break."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return b2a_qp(text.encode(), istext=True)


def _fingerprint(newsletter: Newsletter) -> tuple[Any, ...]:
    # Straight from the instance's dict: the attribute descriptors cost more than the rest.
    values = list(map(newsletter.__dict__.get, _NEWSLETTER_COLUMNS))
    for index in _UNHASHABLE_COLUMNS:
        values[index] = repr(values[index])
    return tuple(values)


_NEWSLETTER_COLUMNS = tuple(c.key for c in sa_inspect(Newsletter).column_attrs)
_UNHASHABLE_COLUMNS = tuple(
    i
    for i, c in enumerate(sa_inspect(Newsletter).column_attrs)
    if isinstance(c.columns[0].type, JSON)
)

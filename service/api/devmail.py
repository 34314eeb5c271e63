"""Development mailbox: the embedded default's Maildir as pages with clickable links."""

from __future__ import annotations

import asyncio
import mailbox
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from service.api.deps import SettingsDep
from service.api.pages import not_found, render

router = APIRouter(include_in_schema=False)
LINK = re.compile(r"https?://[^\s<>\"']+")
KEY = re.compile(r"^[A-Za-z0-9._,:=-]{1,200}$")


@dataclass
class StoredMail:
    key: str
    subject: str
    to: str
    sender: str
    date: str
    text: str
    html: str
    links: list[str]

    @property
    def has_html(self) -> bool:
        return bool(self.html)


def _load(path: Path, key: str | None = None) -> list[StoredMail]:
    box = mailbox.Maildir(path, create=True)
    parser = BytesParser(policy=policy.default)
    found: list[tuple[float, StoredMail]] = []
    keys = [key] if key is not None else list(box.keys())
    for k in keys:
        try:
            raw = box.get_bytes(k)
        except KeyError:
            continue
        message = parser.parsebytes(raw)
        assert isinstance(message, EmailMessage)
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        html_part = message.get_body(preferencelist=("html",))
        html = html_part.get_content() if html_part is not None else ""
        found.append(
            (
                box.get_message(k).get_date(),
                StoredMail(
                    key=k,
                    subject=str(message["Subject"] or ""),
                    to=str(message["To"] or ""),
                    sender=str(message["From"] or ""),
                    date=str(message["Date"] or ""),
                    text=text,
                    html=html,
                    links=list(dict.fromkeys(LINK.findall(text))),
                ),
            )
        )
    return [mail for _, mail in sorted(found, key=lambda pair: pair[0], reverse=True)]


@router.get("/dev/mailbox")
async def mailbox_page(request: Request, settings: SettingsDep) -> Response:
    path = settings.maildir_path
    if not settings.show_dev_mailbox or path is None:
        return not_found(request)
    mails = await asyncio.to_thread(_load, path)
    return render(request, "mailbox.html", {"mails": mails[:200]}, lang="en")


@router.get("/dev/mailbox/{key}")
async def mail_page(key: str, request: Request, settings: SettingsDep) -> Response:
    path = settings.maildir_path
    if not settings.show_dev_mailbox or path is None or not KEY.match(key):
        return not_found(request)
    mails = await asyncio.to_thread(_load, path, key)
    if not mails:
        return not_found(request)
    return render(request, "mail.html", {"mail": mails[0]}, lang="en")


@router.get("/dev/mailbox/{key}/html")
async def mail_html(key: str, request: Request, settings: SettingsDep) -> Response:
    """The HTML part alone, for the mail page's sandboxed frame: no scripts, no requests."""
    path = settings.maildir_path
    if not settings.show_dev_mailbox or path is None or not KEY.match(key):
        return not_found(request)
    mails = await asyncio.to_thread(_load, path, key)
    if not mails or not mails[0].html:
        return not_found(request)
    return HTMLResponse(
        mails[0].html,
        headers={
            "Content-Security-Policy": (
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                "frame-ancestors 'self'; sandbox"
            ),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )

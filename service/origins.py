"""Web origins a newsletter trusts: for CORS, for framing its form, and for redirects.

A newsletter's `allowed_origins` are the sites that embed its form. Its redirect URLs (after
sign-up, after confirmation) are set by ops and taken as they are, when they are absolute
http(s) URLs: no URL from a request is ever redirected to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import Newsletter

DEFAULT_PORTS = {"http": 80, "https": 443}
# What may stand in a host once IDNA-encoded: it is written into CSP headers as is.
HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
)
IPV6 = re.compile(r"^[0-9a-f:.]+$")


def origin_of(url: object) -> str | None:
    """`scheme://host[:port]` of an absolute http(s) URL, normalised; None for anything else."""
    if not isinstance(url, str) or len(url) > 2000:
        return None
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None:
        return None  # https://trusted.example@evil.example/ reads as trusted to people
    host = parts.hostname.lower()
    if IPV6.match(host) and ":" in host:
        host = f"[{host}]"
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
        if not HOST.match(host):
            return None
    origin = f"{scheme}://{host}"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        origin += f":{port}"
    return origin


def normalise(values: Iterable[object]) -> frozenset[str]:
    """The valid origins among configured values; anything else (typos, `*`) is ignored."""
    return frozenset(o for o in (origin_of(v) for v in values) if o is not None)


def safe_redirect(url: str | None) -> str | None:
    """A newsletter's redirect URL if it is an absolute http(s) URL that reads as what it is
    (no credentials, no white space or control characters), else None."""
    if not url or origin_of(url) is None:
        return None
    return url


async def allowed_by_any_newsletter(session: AsyncSession) -> frozenset[str]:
    """Every origin some non-archived newsletter allows (the CORS allow-list)."""
    rows = await session.scalars(
        select(Newsletter.allowed_origins).where(Newsletter.archived_at.is_(None))
    )
    return normalise(value for origins in rows for value in (origins or []))

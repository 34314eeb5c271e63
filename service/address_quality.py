"""Address quality beyond syntax: typo domains, disposable domains, deliverability (DNS).

- Typos: a domain that is a near miss of a popular mail provider (gmial.com, hotmial.com,
  gmail.con) is refused with a suggestion (`"suggestion": "reader@gmail.com"` in the problem's
  error), even though such a domain may exist: it exists to catch the mail of people who
  mistyped, and a reader who meant it is far rarer than one who did not. Only a short list of
  big providers is matched, with the first letter kept, one edit for short names and two for
  long ones, and a list of real neighbours (mail.com, ymail.com, cloud.com ...) never matches.
- Disposable domains: the maintained list of the `disposable-email-domains` package, plus
  DISPOSABLE_DOMAINS_FILE (one per line; `!domain` takes one off the list), re-read when it
  changes. A subdomain of a listed domain is disposable too.
- Deliverability, when CHECK_DELIVERABILITY is on: MX, else A/AAAA with a public address.
  Refused only on an answer that says no: NXDOMAIN, a null MX, no MX and no address. When DNS
  itself fails (timeout, SERVFAIL, no nameserver) the address passes with a warning in the log:
  a DNS outage must not refuse everyone.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import time
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver
from disposable_email_domains import blocklist as PACKAGE_DISPOSABLE

from service.addresses import Address
from service.config import Settings
from service.errors import INVALID_EMAIL, FieldError

log = logging.getLogger(__name__)

DISPOSABLE_CODE = "disposable_email"
DISPOSABLE_DETAIL = "Addresses at disposable email services are not accepted."
# How often the extra domains file is looked at for changes.
FILE_CHECK_INTERVAL = 5.0

# Providers a typo is matched against: second-level name and suffix.
POPULAR = {
    "gmail": "com",
    "googlemail": "com",
    "yahoo": "com",
    "hotmail": "com",
    "outlook": "com",
    "icloud": "com",
    "protonmail": "com",
}
# Too short to match by edit distance; only a mistyped suffix is suggested for these.
SHORT_POPULAR = {"aol": "com", "live": "com", "msn": "com"}
# Real mail domains near a popular one: never a typo.
REAL_NEIGHBOURS = frozenset(
    {
        "mail.com",
        "email.com",
        "ymail.com",
        "gmx.com",
        "cloud.com",
        "me.com",
        "mac.com",
        "proton.me",
        "pm.me",
        "hotmail.co",
    }
)
# Common slips of ".com".
COM_TYPOS = frozenset(
    {"con", "cmo", "cm", "om", "comm", "vom", "xom", "ocm", "cpm", "cim", "clm", "coom", "cok"}
)
# Typos the rules above cannot see (the first letter lost).
CURATED_TYPOS = {
    "ahoo.com": "yahoo.com",
    "otmail.com": "hotmail.com",
    "utlook.com": "outlook.com",
    "mail.con": "mail.com",
}


def _distance(a: str, b: str, limit: int) -> int:
    """Edit distance with adjacent transpositions (optimal string alignment), capped."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return previous[-1]


def _near(label: str, popular: str) -> bool:
    if label == popular or label[:1] != popular[:1]:
        return label == popular
    return _distance(label, popular, 2) <= (1 if len(popular) < 7 else 2)


@functools.lru_cache(maxsize=8192)  # a few domains make most sign-ups: compare them once
def suggest_domain(domain: str) -> str | None:
    """The popular domain this one is a typo of, or None (never for a popular one itself)."""
    domain = domain.lower().rstrip(".")
    if domain in CURATED_TYPOS:
        return CURATED_TYPOS[domain]
    if domain in REAL_NEIGHBOURS or "." not in domain:
        return None
    label, suffix = domain.split(".", 1)
    for name, right in (POPULAR | SHORT_POPULAR).items():
        if label == name and suffix == right:
            return None  # the real thing
    for name, right in SHORT_POPULAR.items():
        if label == name and suffix in COM_TYPOS:
            return f"{name}.{right}"
    if suffix != "com" and suffix not in COM_TYPOS:
        return None
    for name, right in POPULAR.items():
        if _near(label, name):
            return f"{name}.{right}"
    return None


def _read_domains(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(added, removed) domains of an ops file: one a line, `#` comments, `!` to take off."""
    added: set[str] = set()
    removed: set[str] = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip().lower().rstrip(".")
        if line.startswith("!"):
            if line[1:].strip():
                removed.add(line[1:].strip())
        elif line:
            added.add(line)
    return frozenset(added), frozenset(removed)


@functools.lru_cache(maxsize=4096)
def _suffixes(domain: str) -> tuple[str, ...]:
    """mail.example.com, example.com for mail.example.com, in ASCII (IDNA). Cached: every
    sign-up asks, and most come from a few domains."""
    domain = domain.lower().rstrip(".")
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")
    labels = domain.split(".")
    return tuple(".".join(labels[start:]) for start in range(len(labels) - 1))


def _global_address(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def parse_resolver(value: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or a bare host (port 53)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port else 53
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, 53


class AddressQuality:
    """The checks of one app: lists loaded once, the resolver made on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.extra_file = settings.disposable_domains_file
        self._extra: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._extra_mtime: float | None = None
        self._extra_checked_at = -FILE_CHECK_INTERVAL - 1.0
        self._resolver: dns.asyncresolver.Resolver | None = None

    # ------------------------------------------------------------ local checks

    def _extra_domains(self) -> tuple[frozenset[str], frozenset[str]]:
        if self.extra_file is None:
            return self._extra
        now = time.monotonic()
        if now - self._extra_checked_at < FILE_CHECK_INTERVAL:
            return self._extra
        self._extra_checked_at = now
        try:
            mtime = self.extra_file.stat().st_mtime
            if mtime != self._extra_mtime:
                self._extra = _read_domains(self.extra_file)
                self._extra_mtime = mtime
                log.info(
                    "disposable domains file read: %d added, %d taken off",
                    len(self._extra[0]),
                    len(self._extra[1]),
                )
        except (OSError, UnicodeError) as exc:
            log.warning("disposable domains file %s unreadable: %s", self.extra_file, exc)
        return self._extra

    def is_disposable(self, domain: str) -> bool:
        """True for a listed domain or a subdomain of one."""
        added, removed = self._extra_domains()
        for candidate in _suffixes(domain):
            if candidate in removed:
                return False
            if candidate in added or candidate in PACKAGE_DISPOSABLE:
                return True
        return False

    def check(self, address: Address) -> FieldError | None:
        """The local checks (no I/O): a typo of a popular domain, then a disposable domain."""
        local, domain = address.email.rsplit("@", 1)
        if self.settings.suggest_domain_typos:
            better = suggest_domain(domain)
            if better is not None:
                return FieldError(
                    "email",
                    "invalid_email",
                    INVALID_EMAIL,
                    f"Did you mean {local}@{better}?",
                    suggestion=f"{local}@{better}",
                )
        if self.settings.reject_disposable and self.is_disposable(domain):
            return FieldError("email", DISPOSABLE_CODE, INVALID_EMAIL, DISPOSABLE_DETAIL)
        return None

    # ------------------------------------------------------------ DNS

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.settings.dns_resolver:
                host, port = parse_resolver(self.settings.dns_resolver)
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [host]
                resolver.port = port
            else:
                resolver = dns.asyncresolver.Resolver()
            resolver.lifetime = self.settings.dns_timeout
            resolver.timeout = self.settings.dns_timeout
            resolver.cache = dns.resolver.LRUCache(10_000)
            self._resolver = resolver
        return self._resolver

    async def _has_address(self, resolver: dns.asyncresolver.Resolver, domain: str) -> bool:
        for kind in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(domain, kind)
            except dns.resolver.NoAnswer:
                continue
            if any(_global_address(record.to_text()) for record in answer):
                return True
        return False

    async def check_deliverable(self, address: Address) -> FieldError | None:
        """Refuse a domain that DNS says takes no mail; pass when DNS cannot tell."""
        domain = address.email.rsplit("@", 1)[1]
        try:
            resolver = self._make_resolver()
            try:
                answer = await resolver.resolve(domain, "MX")
            except dns.resolver.NoAnswer:
                if await self._has_address(resolver, domain):
                    return None
                return self._undeliverable(f"The domain name {domain} does not accept email.")
            exchanges = [str(record.exchange).rstrip(".") for record in answer]
            if not any(exchanges):  # RFC 7505: only a null MX
                return self._undeliverable(f"The domain name {domain} does not accept email.")
            return None
        except dns.resolver.NXDOMAIN:
            return self._undeliverable(f"The domain name {domain} does not exist.")
        except (dns.exception.DNSException, OSError) as exc:
            # Timeout, SERVFAIL from every server, no nameserver configured, a socket error.
            log.warning(
                "deliverability check of %s failed (%s), accepting the address",
                domain,
                type(exc).__name__,
            )
            return None

    @staticmethod
    def _undeliverable(detail: str) -> FieldError:
        return FieldError("email", "invalid_email", INVALID_EMAIL, detail)

"""Email address validation and normalisation (email-validator does the real work)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import email_validator
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from service.errors import INVALID_EMAIL, FieldError

MAX_ADDRESS_LENGTH = 320

# The fast path: a plain ASCII address (dot-atom local part, letter-digit-hyphen labels, an
# alphabetic top-level domain) that email-validator would accept unchanged but for the case of
# its domain. It costs ~1 µs where email-validator costs ~35 µs, which is what lets an import
# check millions of rows; anything it does not recognise goes to email-validator.
_ATEXT = r"[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]+"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_PLAIN_ADDRESS = re.compile(
    rf"({_ATEXT}(?:\.{_ATEXT})*)@((?:{_LABEL}\.)+[a-zA-Z]{{2,63}})\Z", re.ASCII
)
# email-validator's own limit on the whole address, in octets (RFC 3696 errata 1690).
_EMAIL_MAX_OCTETS = 254
_DOMAIN_MAX_OCTETS = 253
_LOWER_CASE_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


@dataclass(frozen=True)
class Address:
    email: str  # normalised by email-validator, case of the local part kept
    key: str  # the case-insensitive identity: the normalised address lower-cased


@functools.lru_cache(maxsize=4)
def _special_suffixes(names: tuple[str, ...]) -> tuple[str, ...]:
    # email-validator reads its list at call time (a site may extend it), so this does too.
    return tuple("." + name for name in names)


def _plain(text: str) -> Address | None:
    """The address normalised as email-validator would, if it is a plain ASCII one; else None."""
    if len(text) > _EMAIL_MAX_OCTETS:
        return None
    match = _PLAIN_ADDRESS.match(text)
    if match is None:
        return None
    local, domain = match.group(1), match.group(2).lower()
    if (
        len(domain) > _DOMAIN_MAX_OCTETS
        # "ab--" starts an R-LDH label, "xn--" a Punycode one: email-validator decides those.
        or "--" in domain
        or local.lower() in _LOWER_CASE_MAILBOXES
        or ("." + domain).endswith(
            _special_suffixes(tuple(email_validator.SPECIAL_USE_DOMAIN_NAMES))
        )
    ):
        return None
    email = f"{local}@{domain}"
    return Address(email=email, key=email.lower())


def normalise(raw: str) -> Address | FieldError:
    """Validate the syntax of an address and return it normalised, or the field error."""
    if len(raw) > MAX_ADDRESS_LENGTH:
        return FieldError("email", "invalid_email", INVALID_EMAIL, "The address is too long.")
    text = raw.strip()
    plain = _plain(text)
    if plain is not None:
        return plain
    try:
        result = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        return FieldError("email", "invalid_email", INVALID_EMAIL, str(exc))
    return Address(email=result.normalized, key=result.normalized.lower())


def ascii_form(email: str) -> str | None:
    """The address as a mail server without SMTPUTF8 takes it: an internationalised domain in
    its ASCII (IDNA) form, as email-validator writes it; None when the part before the @ is
    not ASCII, which only SMTPUTF8 can carry."""
    if email.isascii():
        return email
    try:
        return validate_email(email, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return None

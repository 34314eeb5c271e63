"""Email address validation and normalisation (email-validator does the real work)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from email_validator import EmailNotValidError, EmailUndeliverableError, validate_email

from service.errors import INVALID_EMAIL, FieldError

log = logging.getLogger(__name__)

MAX_ADDRESS_LENGTH = 320


@dataclass(frozen=True)
class Address:
    email: str  # normalised by email-validator, case of the local part kept
    key: str  # the case-insensitive identity: the normalised address lower-cased


def normalise(raw: str) -> Address | FieldError:
    """Validate the syntax of an address and return it normalised, or the field error."""
    if len(raw) > MAX_ADDRESS_LENGTH:
        return FieldError("email", "invalid_email", INVALID_EMAIL, "The address is too long.")
    try:
        result = validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        return FieldError("email", "invalid_email", INVALID_EMAIL, str(exc))
    return Address(email=result.normalized, key=result.normalized.lower())


async def check_deliverable(address: Address) -> FieldError | None:
    """Check the domain accepts mail (MX, else A/AAAA); fail open when DNS itself fails."""
    try:
        await asyncio.to_thread(validate_email, address.email, check_deliverability=True)
    except EmailUndeliverableError as exc:
        return FieldError("email", "invalid_email", INVALID_EMAIL, str(exc))
    except Exception:  # a DNS outage must not reject every sign-up
        log.warning("deliverability check failed; accepting the address", exc_info=True)
    return None

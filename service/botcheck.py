"""Bot checks of the sign-up beyond the honeypot: a minimum form-fill time and a challenge.

Minimum fill time: our form pages carry `form_ts`, a timestamp signed with the first secret
key; JSON clients fetch one from GET /v1/form-token. With MIN_FILL_SECONDS > 0, a sign-up whose
form_ts is missing, forged or younger than that is answered like a filled honeypot: the same
success, nothing stored or sent. It stops scripts that post at once, not a patient one that
reuses a token; the rate limits and the challenge are for those.

Challenge (Turnstile, hCaptcha and the like): with CHALLENGE_VERIFY_URL and CHALLENGE_SECRET
set, every sign-up carries the widget's token, which the provider's siteverify endpoint must
accept. A verifier that cannot be reached fails closed (503): a challenge that lets everyone
through while it is down is no challenge for the bot that waits for that moment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from service.config import Settings
from service.errors import DomainError, FieldError, InvalidInput

log = logging.getLogger(__name__)

FORM_TS_FIELD = "form_ts"
# The widget's own field names are accepted too, so a provider's widget in a plain form works.
CHALLENGE_FIELDS = ("challenge_token", "cf-turnstile-response", "h-captcha-response")
CHALLENGE_MESSAGE = "Please complete the challenge."
MAX_CHALLENGE_TOKEN = 4096
# Another API process's clock may run a little ahead of ours.
CLOCK_SKEW_SECONDS = 5.0
_PURPOSE = b"newsletter form_ts v1|"


class ChallengeUnavailable(DomainError):
    status = 503
    code = "challenge_unavailable"
    title = "The challenge could not be checked. Please try again."


def _signature(key: str, stamp: str) -> str:
    digest = hmac.new(key.encode(), _PURPOSE + stamp.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def form_token(settings: Settings, now: float | None = None) -> str:
    """A signed timestamp (milliseconds) for a form to carry as `form_ts`."""
    stamp = str(int((time.time() if now is None else now) * 1000))
    return f"{stamp}.{_signature(settings.secret_keys[0], stamp)}"


def form_token_age(settings: Settings, token: object, now: float | None = None) -> float | None:
    """Seconds since a form token was issued; None if it is missing, forged or from the future.

    Any of the secret keys verifies, so a key rotation does not turn open forms into bots.
    """
    if not isinstance(token, str) or len(token) > 100 or "." not in token:
        return None
    stamp, signature = token.split(".", 1)
    if not stamp.isdigit() or not stamp.isascii():
        return None
    if not any(
        hmac.compare_digest(_signature(key, stamp), signature) for key in settings.secret_keys
    ):
        return None
    age = (time.time() if now is None else now) - int(stamp) / 1000
    return age if age >= -CLOCK_SKEW_SECONDS else None


def filled_too_fast(
    settings: Settings, fields: Mapping[str, Any], now: float | None = None
) -> bool:
    """True when the minimum fill time is on and this sign-up does not show it was kept."""
    if settings.min_fill_seconds <= 0:
        return False
    age = form_token_age(settings, fields.get(FORM_TS_FIELD), now)
    return age is None or age < settings.min_fill_seconds


def challenge_token(fields: Mapping[str, Any]) -> str | None:
    for name in CHALLENGE_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def challenge_failed() -> InvalidInput:
    return InvalidInput([FieldError("challenge", "challenge_failed", CHALLENGE_MESSAGE)])


@dataclass(frozen=True)
class ChallengeWidget:
    """What a form page needs to show the provider's widget (see _signup_form.html)."""

    site_key: str
    css_class: str
    script_url: str


class ChallengeVerifier:
    """Asks the provider's siteverify endpoint about each sign-up's challenge token."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.challenge_verify_url
        self.secret = settings.challenge_secret
        self.enabled = bool(self.url and self.secret)
        self.client = (
            httpx.AsyncClient(timeout=settings.challenge_timeout, follow_redirects=False)
            if self.enabled
            else None
        )
        self.widget = (
            ChallengeWidget(
                settings.challenge_site_key,
                settings.challenge_widget_class,
                settings.challenge_script_url,
            )
            if self.enabled and settings.challenge_site_key
            else None
        )

    async def verify(self, fields: Mapping[str, Any], remote_ip: str | None) -> None:
        """Return if the challenge passed; raise InvalidInput (failed) or ChallengeUnavailable."""
        if self.client is None:
            return
        token = challenge_token(fields)
        if token is None or len(token) > MAX_CHALLENGE_TOKEN:
            raise challenge_failed()
        form = {"secret": self.secret, "response": token}
        if remote_ip:
            form["remoteip"] = remote_ip
        try:
            answer = await self.client.post(self.url, data=form)
            answer.raise_for_status()
            verdict = answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("challenge verifier unavailable: %r", exc)
            raise ChallengeUnavailable() from exc
        if not isinstance(verdict, dict):
            log.warning("challenge verifier answered something else than an object")
            raise ChallengeUnavailable()
        if verdict.get("success") is not True:
            codes = verdict.get("error-codes") or []
            if any("secret" in str(code) for code in codes):
                # Our configuration is wrong, not the reader: say so loudly.
                log.error("challenge verifier refused our secret: %s", codes)
            else:
                log.info("challenge failed: %s", codes)
            raise challenge_failed()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

"""Inbound webhooks from mail providers: bounce and complaint reports."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from service import bounces, keys
from service.api.bodies import parse_json, read_capped
from service.api.deps import DbDep, SettingsDep
from service.api.schemas import problem_response
from service.errors import Unauthorized

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/hooks", tags=["hooks"])

# An SNS notification is at most 256 KiB; Postmark may carry the bounced message's content.
MAX_HOOK_BODY = 1024 * 1024


class HookSecretRequired(Unauthorized):
    title = "A valid webhook secret or admin API key is required"


class BounceCounts(BaseModel):
    """What the body held, by kind; the same whether or not anyone had the address."""

    received: int = Field(examples=[1])
    hard_bounces: int = Field(examples=[1])
    soft_bounces: int = Field(examples=[0])
    complaints: int = Field(examples=[0])
    ignored: int = Field(examples=[0])
    sns_subscription: Literal["logged", "confirmed", "failed"] | None = Field(
        default=None, description="Set when the body was an Amazon SNS SubscriptionConfirmation."
    )


def _offered_secrets(request: Request) -> list[str]:
    """Bearer, Basic (the password; for providers that only take credentials in the URL)
    and ?token= (for those that cannot set headers at all)."""
    offered = request.query_params.getlist("token")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(value.strip())
    elif scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            offered.append(
                base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            )
    return offered


async def _check_secret(request: Request, settings: SettingsDep, db: DbDep) -> None:
    """The provider's shared secret (BOUNCE_WEBHOOK_SECRET, when set) or, as on the admin
    API, `Authorization: Bearer` with an admin-scope key (a read key is 403)."""
    secret = settings.bounce_webhook_secret
    if secret:
        expected = secret.encode()
        if any(hmac.compare_digest(o.encode(), expected) for o in _offered_secrets(request)):
            return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        async with db.transaction() as session:
            # Only the header: a key in ?token= would end up in proxies' access logs.
            with contextlib.suppress(Unauthorized):
                await keys.authenticate(session, value.strip(), need_write=True)
                return
    raise HookSecretRequired()


HookSecret = Annotated[None, Depends(_check_secret)]

HOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_response(
        "Not JSON",
        {"type": "about:blank#malformed_body", "title": "The request body could not be read"},
    ),
    401: problem_response(
        "Neither the webhook secret nor an admin API key",
        {
            "type": "about:blank#unauthorized",
            "title": HookSecretRequired.title,
            "status": 401,
        },
    ),
    403: problem_response(
        "A read-scope API key",
        {"type": "about:blank#forbidden", "title": "This API key may not do that", "status": 403},
    ),
    413: problem_response(
        "Body too large",
        {"type": "about:blank#payload_too_large", "title": "Request body too large"},
    ),
    422: problem_response(
        "Not a report of a known shape",
        {
            "type": "about:blank#invalid_input",
            "title": "email must be a non-empty string.",
            "status": 422,
            "errors": [
                {
                    "field": "email",
                    "code": "required",
                    "message": "email must be a non-empty string.",
                }
            ],
        },
    ),
}


@router.post(
    "/bounces",
    response_model=BounceCounts,
    responses=HOOK_RESPONSES,
    summary="Bounce and complaint intake (generic JSON, Amazon SES via SNS, Postmark)",
)
async def bounce_intake(
    request: Request, _secret: HookSecret, db: DbDep, settings: SettingsDep
) -> BounceCounts:
    """Hard bounces mark every live subscription of the address `bounced`, complaints
    unsubscribe it; both suppress the address. Any content type: SNS posts JSON as text."""
    body = await read_capped(request, MAX_HOOK_BODY)
    data = parse_json(body)
    intake = bounces.parse_notification(data)
    sns: Literal["logged", "confirmed", "failed"] | None = None
    if intake.subscribe_url:
        sns = "logged"
        log.warning("Amazon SNS asks to confirm a subscription: %s", intake.subscribe_url)
        if settings.bounce_sns_autoconfirm:
            confirmed = await bounces.confirm_sns_subscription(intake.subscribe_url)
            sns = "confirmed" if confirmed else "failed"
    async with db.transaction() as session:
        counts = await bounces.apply_reports(session, settings, intake.reports)
    counts.ignored = intake.ignored
    counts.received += intake.ignored
    return BounceCounts(**asdict(counts), sns_subscription=sns)

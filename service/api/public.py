"""The public JSON API used by front-ends."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from service import subscriptions
from service.addresses import check_deliverable
from service.api import pages
from service.api.bodies import read_fields, wants_html
from service.api.deps import DbDep, SettingsDep, SignupsDep, consent_from, wake_worker
from service.api.schemas import (
    SIGNUP_BODY,
    SIGNUP_RESPONSES,
    SUBSCRIBED,
    THANK_YOU,
    TOKEN_RESPONSES,
    ConfirmationOut,
    NewsletterOut,
    SignupAccepted,
)
from service.errors import InvalidInput
from service.signup import SignupResult
from service.signup_input import parse_signup

router = APIRouter(tags=["public"])


def _signup_answer(result: SignupResult) -> dict[str, str]:
    if result.all_single_opt_in:
        return {"status": "active", "message": SUBSCRIBED}
    return {"status": "pending", "message": THANK_YOU}


@router.post(
    "/v1/subscriptions",
    status_code=202,
    response_model=SignupAccepted,
    responses=SIGNUP_RESPONSES,
    openapi_extra=SIGNUP_BODY,
    summary="Sign up to one or more newsletters",
)
async def create_subscription(
    request: Request, db: DbDep, settings: SettingsDep, signups: SignupsDep
) -> Response:
    """Answers the same for a new, pending, active or unsubscribed address."""
    html = wants_html(request)
    fields: dict[str, Any] = {}
    try:
        fields = await read_fields(request, settings.max_body_bytes)
        data = parse_signup(fields, settings)
        if settings.check_deliverability and not data.honeypot:
            problem = await check_deliverable(data.address)
            if problem is not None:
                raise InvalidInput([problem])
        consent = consent_from(request, "form" if html else "api")
        result = await signups.submit(data, consent)
    except InvalidInput as exc:
        if html:
            return await pages.signup_form_again(request, db, fields, exc)
        raise
    if result.mail_queued:
        wake_worker(request)
    if html:
        if result.redirect_url:
            return RedirectResponse(result.redirect_url, status_code=303)
        return pages.render(
            request, "thanks.html", {"result": result, "message": _signup_answer(result)["message"]}
        )
    return JSONResponse(
        _signup_answer(result), status_code=200 if result.all_single_opt_in else 202
    )


@router.get("/v1/newsletters", response_model=list[NewsletterOut], summary="Public newsletters")
async def list_newsletters(db: DbDep) -> list[NewsletterOut]:
    async with db.transaction() as session:
        found = await subscriptions.public_newsletters(session)
    return [
        NewsletterOut(slug=n.slug, name=n.name, description=n.description, opt_in=n.opt_in)
        for n in found
    ]


@router.post(
    "/v1/confirmations/{token}",
    response_model=ConfirmationOut,
    responses=TOKEN_RESPONSES,
    summary="Confirm a sign-up (for front-ends that draw their own page)",
)
async def confirm_subscription(token: str, request: Request, db: DbDep) -> ConfirmationOut:
    async with db.transaction() as session:
        result = await subscriptions.confirm(session, token, consent_from(request, "api"))
    wake_worker(request)
    return ConfirmationOut(newsletters=[n.slug for n in result.newsletters])

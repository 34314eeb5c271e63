"""Reader pages: confirm, unsubscribe, preference centre, and the sign-up form's answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from service import subscriptions
from service.api.bodies import read_fields
from service.api.deps import DbDep, SettingsDep, consent_from, wake_worker
from service.db import Database
from service.errors import ConfirmationExpired, InvalidInput, NotFound, TokenNotFound

router = APIRouter(include_in_schema=False)


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    templates: Jinja2Templates = request.app.state.templates
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    # Pages carry tokens in their URL: never leak them to other sites or caches.
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def not_found(request: Request) -> HTMLResponse:
    return render(request, "not_found.html", {}, status_code=404)


async def signup_form_again(
    request: Request, db: Database, fields: dict[str, Any], error: InvalidInput
) -> HTMLResponse:
    """A browser form post with errors: the form again, messages by the fields, values kept."""
    async with db.transaction() as session:
        newsletters = await subscriptions.public_newsletters(session)
    chosen = fields.get("newsletters") or []
    return render(
        request,
        "signup.html",
        {
            "newsletters": [n for n in newsletters if n.slug in chosen] or newsletters,
            "chosen": chosen,
            "email": fields.get("email") if isinstance(fields.get("email"), str) else "",
            "errors": {e.field: e.message for e in error.errors},
        },
        status_code=422,
    )


async def _confirmed_page(request: Request, db: Database, token: str) -> Response:
    async with db.transaction() as session:
        result = await subscriptions.confirm(session, token, consent_from(request, "form"))
    wake_worker(request)
    if result.redirect_url:
        return RedirectResponse(result.redirect_url, status_code=303)
    return render(request, "confirmed.html", {"newsletters": result.newsletters})


@router.get("/confirm/{token}")
async def confirm_page(token: str, request: Request, db: DbDep, settings: SettingsDep) -> Response:
    try:
        if settings.confirm_on_get:
            return await _confirmed_page(request, db, token)
        async with db.transaction() as session:
            pending = await subscriptions.inspect_confirmation(session, token)
    except TokenNotFound:
        return not_found(request)
    except ConfirmationExpired:
        return render(request, "expired.html", {"token": token}, status_code=410)
    if pending.confirmed:
        return render(request, "confirmed.html", {"newsletters": pending.newsletters})
    return render(request, "confirm.html", {"newsletters": pending.newsletters, "token": token})


@router.post("/confirm/{token}")
async def confirm_post(token: str, request: Request, db: DbDep) -> Response:
    try:
        return await _confirmed_page(request, db, token)
    except TokenNotFound:
        return not_found(request)
    except ConfirmationExpired:
        return render(request, "expired.html", {"token": token}, status_code=410)


@router.post("/confirm/{token}/resend")
async def resend_post(token: str, request: Request, db: DbDep, settings: SettingsDep) -> Response:
    try:
        async with db.transaction() as session:
            result = await subscriptions.resend_confirmation(
                session, settings, token, consent_from(request, "form")
            )
    except NotFound:
        return not_found(request)
    wake_worker(request)
    return render(request, "thanks.html", {"result": result, "message": None})


@router.get("/unsubscribe/{token}")
async def unsubscribe_page(
    token: str, request: Request, db: DbDep, settings: SettingsDep, newsletter: str | None = None
) -> Response:
    try:
        async with db.transaction() as session:
            subscriber = await subscriptions.subscriber_by_token(
                session, settings.secret_keys, token
            )
            prefs = await subscriptions.preferences(session, subscriber)
    except TokenNotFound:
        return not_found(request)
    target = next((p.newsletter for p in prefs.items if p.newsletter.slug == newsletter), None)
    return render(request, "unsubscribe.html", {"token": token, "newsletter": target})


@router.post("/unsubscribe/{token}")
async def unsubscribe_post(
    token: str, request: Request, db: DbDep, settings: SettingsDep, newsletter: str | None = None
) -> Response:
    """The button of the page and the RFC 8058 one-click target: 200, never a redirect."""
    try:
        async with db.transaction() as session:
            subscriber = await subscriptions.subscriber_by_token(
                session, settings.secret_keys, token
            )
            await subscriptions.unsubscribe(
                session, subscriber, newsletter or None, consent_from(request, "form")
            )
            prefs = await subscriptions.preferences(session, subscriber)
    except NotFound:
        return not_found(request)
    return render(request, "unsubscribed.html", {"token": token, "prefs": prefs})


@router.get("/manage/{token}")
async def manage_page(token: str, request: Request, db: DbDep, settings: SettingsDep) -> Response:
    try:
        async with db.transaction() as session:
            subscriber = await subscriptions.subscriber_by_token(
                session, settings.secret_keys, token
            )
            prefs = await subscriptions.preferences(session, subscriber)
    except TokenNotFound:
        return not_found(request)
    return render(request, "manage.html", {"token": token, "prefs": prefs, "saved": False})


@router.post("/manage/{token}")
async def manage_post(token: str, request: Request, db: DbDep, settings: SettingsDep) -> Response:
    fields = await read_fields(request, settings.max_body_bytes)
    wanted = (
        set()
        if fields.get("action") == "unsubscribe_all"
        else set(s for s in fields.get("newsletters", []) if isinstance(s, str))
    )
    try:
        async with db.transaction() as session:
            subscriber = await subscriptions.subscriber_by_token(
                session, settings.secret_keys, token
            )
            prefs = await subscriptions.save_preferences(
                session, subscriber, wanted, consent_from(request, "form")
            )
    except TokenNotFound:
        return not_found(request)
    return render(request, "manage.html", {"token": token, "prefs": prefs, "saved": True})


@router.get("/subscribe/{slug}")
async def signup_page(slug: str, request: Request, db: DbDep) -> Response:
    """A plain sign-up form for one newsletter (no JS needed)."""
    async with db.transaction() as session:
        newsletters = [n for n in await subscriptions.public_newsletters(session) if n.slug == slug]
    if not newsletters:
        return not_found(request)
    return render(
        request,
        "signup.html",
        {"newsletters": newsletters, "chosen": [slug], "email": "", "errors": {}},
    )

"""Reader pages: confirm, unsubscribe, preference centre, and the sign-up form's answers."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from service import i18n, subscriptions
from service.api.bodies import read_fields
from service.api.deps import DbDep, SettingsDep, consent_from, wake_worker
from service.config import PROJECT_ROOT, Settings
from service.db import Database
from service.errors import (
    ConfirmationExpired,
    InvalidInput,
    NotFound,
    TokenNotFound,
    UnsubscribedSince,
)
from service.mail.render import Links
from service.models import Newsletter, Subscriber
from service.origins import normalise, origin_of, safe_redirect
from service.signup_input import NOT_SLUGS, slug_list

router = APIRouter(include_in_schema=False)
STATIC_DIR = PROJECT_ROOT / "static"
INLINE_BLOCK = re.compile(rb"<(script|style)>(.*?)</(?:script|style)>", re.S)

# The sign-up form and its answers may be shown in a frame on the newsletter's own sites (the
# no-JS post of the embedded form lands on them); every other page refuses to be framed, so
# nobody can overlay a confirm or unsubscribe button with their own page.
FRAMEABLE = frozenset({"signup.html", "thanks.html", "embed.html", "form_not_found.html"})
# The fields the sign-up form shows an error next to (templates/pages/_signup_form.html).
FORM_FIELDS = frozenset({"email", "newsletters", "name", "challenge", "form"})


@lru_cache(maxsize=1)
def subscribe_script() -> Markup:
    """static/subscribe.js, for the embedded form to carry inline (one request, nothing else)."""
    source = (STATIC_DIR / "subscribe.js").read_text(encoding="utf-8")
    return Markup(source.replace("</", "<\\/"))  # noqa: S704 - our own file, never input


def page_templates(settings: Settings) -> Jinja2Templates:
    """The pages' Jinja2 environment: autoescaped, translated per render (see service.i18n)."""
    env = Environment(
        loader=FileSystemLoader(settings.templates_dir / "pages"),
        autoescape=select_autoescape(default=True),
    )
    i18n.install(env)
    env.globals["links"] = Links(settings)
    env.globals["subscribe_script"] = subscribe_script
    return Jinja2Templates(env=env)


def _newsletters_in(context: dict[str, Any]) -> list[Newsletter]:
    """The newsletters a page is about, wherever its context carries them."""
    found: Any = context.get("newsletters")
    if found is None and context.get("newsletter") is not None:
        found = [context["newsletter"]]
    if found is None and context.get("result") is not None:
        found = getattr(context["result"], "newsletters", None)
    return [n for n in found or [] if isinstance(n, Newsletter)]


def page_language(
    request: Request, newsletters: Sequence[Newsletter], subscriber: Subscriber | None = None
) -> str:
    """A newsletter's page speaks its language; other pages the reader's or the browser's."""
    if newsletters:
        return i18n.supported(newsletters[0].language) or i18n.DEFAULT_LANGUAGE
    if subscriber is not None and (language := i18n.supported(subscriber.language)):
        return language
    return i18n.negotiate(request.headers.get("accept-language"))


def inline_hashes(body: bytes) -> dict[str, list[str]]:
    """CSP hashes of the page's own inline <script> and <style> blocks, by element.

    Hashes rather than nonces keep a page byte-for-byte the same for the same answer (the
    honeypot's answer must not differ from a real one). Readers' text cannot open such a
    block: autoescaping turns its `<` into `&lt;`.
    """
    found: dict[str, list[str]] = {"script": [], "style": []}
    for kind, content in INLINE_BLOCK.findall(body):
        source = _csp_hash(content)
        if source not in found[kind.decode()]:
            found[kind.decode()].append(source)
    return found


@lru_cache(maxsize=64)
def _csp_hash(content: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(content).digest()).decode() + "'"


def security_headers(
    hashes: dict[str, list[str]],
    allowed_origins: Iterable[str],
    *,
    frameable: bool,
    challenge_origin: str | None = None,
) -> dict[str, str]:
    """No third-party anything but the challenge provider when one is configured: only the
    page's own inline style and scripts run."""
    allowed = sorted(allowed_origins)
    provider = [challenge_origin] if challenge_origin else []
    policy = [
        "default-src 'none'",
        "style-src " + (" ".join(hashes["style"]) or "'none'"),
        "script-src " + (" ".join([*hashes["script"], *provider]) or "'none'"),
        "img-src 'self' data:",
        " ".join(["connect-src 'self'", *provider]),
        " ".join(["frame-src 'self'", *provider]),
        # A form may be answered by a redirect to the newsletter's own site.
        " ".join(["form-action 'self'", *allowed]),
        "base-uri 'none'",
        "frame-ancestors " + ((" ".join(allowed) or "*") if frameable else "'none'"),
    ]
    headers = {
        "Content-Security-Policy": "; ".join(policy),
        "X-Content-Type-Options": "nosniff",
        # Pages carry tokens in their URL: never leak them to other sites or caches.
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    if not frameable:
        headers["X-Frame-Options"] = "DENY"
    return headers


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    status_code: int = 200,
    *,
    lang: str | None = None,
    subscriber: Subscriber | None = None,
) -> HTMLResponse:
    """Render a page in its language, with its CSP and framing rules."""
    templates: Jinja2Templates = request.app.state.templates
    newsletters = _newsletters_in(context)
    language = lang or page_language(request, newsletters, subscriber)
    response = templates.TemplateResponse(
        request, template, {**context, "lang": language}, status_code=status_code
    )
    allowed = normalise(o for n in newsletters for o in (n.allowed_origins or []))
    settings: Settings = request.app.state.settings
    response.headers.update(
        security_headers(
            inline_hashes(bytes(response.body)),
            allowed,
            frameable=template in FRAMEABLE,
            challenge_origin=origin_of(settings.challenge_script_url),
        )
    )
    response.headers["Content-Language"] = language
    return response


def not_found(request: Request) -> HTMLResponse:
    return render(request, "not_found.html", {}, status_code=404)


def form_not_found(request: Request) -> HTMLResponse:
    """The sign-up form of an unknown or archived newsletter: no link from a mail is involved,
    and an embedded one says so inside the site's frame (the page has nothing to click)."""
    return render(request, "form_not_found.html", {}, status_code=404)


def field_errors(error: InvalidInput) -> dict[str, Any]:
    """The first error of each field, for the form to show next to it."""
    found: dict[str, Any] = {}
    for item in error.errors:
        found.setdefault(item.field, item)
    return found


async def signup_form_again(
    request: Request, db: Database, fields: dict[str, Any], error: InvalidInput
) -> HTMLResponse:
    """A browser form post with errors: the form again, messages by the fields, values kept."""
    async with db.transaction() as session:
        newsletters = await subscriptions.public_newsletters(session)
    raw = fields.get("newsletters")
    chosen = [s for s in (raw if isinstance(raw, list) else [raw]) if isinstance(s, str)]
    email, name, language = (fields.get(f) for f in ("email", "name", "language"))
    shown = [n for n in newsletters if n.slug in chosen]
    errors = field_errors(error)
    if unplaced := [e for f, e in errors.items() if f not in FORM_FIELDS]:
        # A field the form has no place for (a bad language, attributes): said above the
        # button, and not sent again, so the next press can succeed.
        errors.setdefault("form", unplaced[0])
    context = {
        "newsletters": shown or newsletters,
        "chosen": chosen,
        "email": email if isinstance(email, str) else "",
        "name": name if isinstance(name, str) else "",
        "language": language if isinstance(language, str) and "language" not in errors else "",
        "errors": errors,
    }
    if fields.get("embed") == "1" and len(shown) == 1:
        # The no-JS post of the embedded form: answer in the frame with the same small form.
        return render(request, "embed.html", {**context, "newsletter": shown[0]}, 422)
    return render(request, "signup.html", context, status_code=422)


async def _confirmed_page(request: Request, db: Database, token: str) -> Response:
    async with db.transaction() as session:
        result = await subscriptions.confirm(session, token, consent_from(request, "form"))
    wake_worker(request)
    target = safe_redirect(result.redirect_url)
    if target:
        return RedirectResponse(target, status_code=303)
    return render(
        request,
        "confirmed.html",
        {"newsletters": result.newsletters, "unsubscribed_since": result.unsubscribed_since},
    )


def unsubscribed_since(request: Request, exc: UnsubscribedSince) -> HTMLResponse:
    """A confirm link clicked after the reader unsubscribed: the same 410 the API answers."""
    return render(request, "unsubscribed_since.html", {"newsletters": exc.newsletters}, exc.status)


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
    except UnsubscribedSince as exc:
        return unsubscribed_since(request, exc)
    if pending.confirmed:
        return render(
            request,
            "confirmed.html",
            {"newsletters": pending.newsletters, "unsubscribed_since": pending.unsubscribed_since},
        )
    return render(request, "confirm.html", {"newsletters": pending.newsletters, "token": token})


@router.post("/confirm/{token}")
async def confirm_post(token: str, request: Request, db: DbDep) -> Response:
    try:
        return await _confirmed_page(request, db, token)
    except TokenNotFound:
        return not_found(request)
    except ConfirmationExpired:
        return render(request, "expired.html", {"token": token}, status_code=410)
    except UnsubscribedSince as exc:
        return unsubscribed_since(request, exc)


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
            target = (
                await subscriptions.link_newsletter(session, subscriber, newsletter)
                if newsletter
                else None
            )
    except TokenNotFound:
        return not_found(request)
    if newsletter and target is None:
        # A link for a list that is gone must not turn into "unsubscribe from everything".
        return not_found(request)
    receiving = [p.newsletter for p in prefs.items if p.status in ("active", "pending")]
    return render(
        request,
        "unsubscribe.html",
        {"token": token, "newsletter": target, "receiving": receiving},
        subscriber=subscriber,
    )


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
            target = (
                await subscriptions.link_newsletter(session, subscriber, newsletter)
                if newsletter
                else None
            )
    except NotFound:
        return not_found(request)
    return render(
        request,
        "unsubscribed.html",
        {"token": token, "prefs": prefs, "newsletter": target},
        subscriber=subscriber,
    )


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
    return render(
        request,
        "manage.html",
        {"token": token, "prefs": prefs, "saved": False},
        subscriber=subscriber,
    )


@router.post("/manage/{token}")
async def manage_post(token: str, request: Request, db: DbDep, settings: SettingsDep) -> Response:
    fields = await read_fields(request, settings.max_body_bytes)
    chosen = slug_list(fields.get("newsletters", []))
    if chosen is None:  # malformed input must never read as "untick everything"
        raise InvalidInput([NOT_SLUGS])
    consent = consent_from(request, "form")
    try:
        async with db.transaction() as session:
            subscriber = await subscriptions.subscriber_by_token(
                session, settings.secret_keys, token
            )
            if fields.get("action") == "unsubscribe_all":
                prefs = await subscriptions.unsubscribe_from_all(session, subscriber, consent)
            else:
                prefs = await subscriptions.save_preferences(
                    session, subscriber, set(chosen), consent
                )
    except TokenNotFound:
        return not_found(request)
    return render(
        request,
        "manage.html",
        {"token": token, "prefs": prefs, "saved": True},
        subscriber=subscriber,
    )


@router.get("/subscribe/{slug}")
async def signup_page(slug: str, request: Request, db: DbDep) -> Response:
    """A plain sign-up form for one newsletter (no JS needed)."""
    async with db.transaction() as session:
        newsletters = [n for n in await subscriptions.public_newsletters(session) if n.slug == slug]
    if not newsletters:
        return form_not_found(request)
    return render(
        request,
        "signup.html",
        {"newsletters": newsletters, "chosen": [slug], "email": "", "errors": {}},
    )

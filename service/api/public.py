"""The public JSON API used by front-ends."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from service import botcheck, subscriptions
from service.address_quality import AddressQuality
from service.api import pages
from service.api.bodies import MalformedBody, read_fields, wants_html
from service.api.deps import DbDep, SettingsDep, client_ip, consent_from, wake_worker
from service.api.routes import DirectRoute
from service.api.schemas import (
    SIGNUP_BODY,
    SIGNUP_RESPONSES,
    SUBSCRIBED,
    THANK_YOU,
    TOKEN_RESPONSES,
    ConfirmationOut,
    NewsletterOut,
    SignupAccepted,
    problem_response,
)
from service.botcheck import ChallengeUnavailable, ChallengeVerifier
from service.config import Settings
from service.db import Database
from service.errors import (
    FieldError,
    InvalidInput,
    PayloadTooLarge,
    problem,
    unknown_newsletters,
)
from service.observability import SIGNUPS
from service.origins import safe_redirect
from service.ratelimit import RATE_LIMITED, SignupLimiter
from service.signup import SignupResult
from service.signup_batcher import SignupBatcher
from service.signup_input import honeypot_filled, parse_signup, slug_list

router = APIRouter(tags=["public"])
# Most newsletters a refused sign-up has looked up (parse_signup refuses more than the
# setting allows; this bounds the query whatever it is).
MAX_LOOKUP = 100

# Every answer of the sign-up endpoint, counted (children bound once: this is the hot path).
SIGNUP_OUTCOMES = {
    outcome: SIGNUPS.labels(outcome)
    for outcome in ("accepted", "bot", "invalid", "rate_limited", "unavailable")
}

SIGNUP_ABUSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SIGNUP_RESPONSES,
    429: problem_response(
        "Too many sign-ups from this client; Retry-After says when to try again",
        {
            "type": "about:blank#rate_limited",
            "title": RATE_LIMITED,
            "status": 429,
            "detail": "Too many sign-ups from this address. Try again in 42 seconds.",
        },
    ),
    503: problem_response(
        "The challenge verifier could not be reached (the challenge fails closed)",
        {
            "type": "about:blank#challenge_unavailable",
            "title": ChallengeUnavailable.title,
            "status": 503,
        },
    ),
}


def _rate_limited(request: Request, html: bool, retry_after: int) -> Response:
    """429, with nothing read or done: a readable page for a browser form, else problem+json."""
    headers = {"Retry-After": str(retry_after)}
    if not html:
        return problem(
            429,
            RATE_LIMITED,
            code="rate_limited",
            detail=f"Too many sign-ups from this address. Try again in {retry_after} seconds.",
            headers=headers,
        )
    page = pages.render(request, "rate_limited.html", {"retry_after": retry_after}, 429)
    # The answer to the embedded form's plain post lands in its frame: let it show there.
    page.headers.update(
        pages.security_headers(pages.inline_hashes(bytes(page.body)), (), frameable=True)
    )
    del page.headers["X-Frame-Options"]
    page.headers.update(headers)
    return page


def _challenge_down(exc: ChallengeUnavailable) -> FieldError:
    return FieldError("challenge", exc.code, exc.title)


async def _with_unknown_newsletters(
    db: Database, fields: dict[str, Any], error: InvalidInput
) -> InvalidInput:
    """Every wrong field at once: newsletters are looked up while the sign-up is taken, after
    the other fields passed; a refused one is looked up here too (off the hot path)."""
    if any(e.field == "newsletters" for e in error.errors):
        return error
    slugs = list(dict.fromkeys(s.strip() for s in slug_list(fields.get("newsletters")) or []))
    slugs = [s for s in slugs if s]
    if not slugs or len(slugs) > MAX_LOOKUP:
        return error
    async with db.transaction() as session:
        unknown = await subscriptions.unknown_slugs(session, slugs)
    if not unknown:
        return error
    # In the order of the form: the address, the newsletters, then the rest.
    at = sum(1 for e in error.errors if e.field == "email")
    return InvalidInput([*error.errors[:at], unknown_newsletters(unknown), *error.errors[at:]])


# A sign-up's answer, by whether every newsletter asked for is single opt-in; the JSON is
# rendered once, as JSONResponse renders it: it never varies.
_MESSAGES = {True: SUBSCRIBED, False: THANK_YOU}
_JSON_ANSWERS = {
    True: (200, bytes(JSONResponse({"status": "active", "message": SUBSCRIBED}).body)),
    False: (202, bytes(JSONResponse({"status": "pending", "message": THANK_YOU}).body)),
}


def _signup_json(result: SignupResult) -> Response:
    status, body = _JSON_ANSWERS[result.all_single_opt_in]
    return Response(body, status_code=status, media_type="application/json")


async def create_subscription(request: Request) -> Response:
    """Answers the same for a new, pending, active or unsubscribed address."""
    # The hot path takes its parts from app.state rather than as dependencies: FastAPI solves
    # each dependency with a nested pass of its own, a fifth of this route's CPU.
    state = request.app.state
    db: Database = state.db
    settings: Settings = state.settings
    signups: SignupBatcher = state.signups
    html = wants_html(request)
    limiter: SignupLimiter = state.limiter
    ip = client_ip(request)
    retry_after = await limiter.retry_after(ip)
    if retry_after is not None:
        SIGNUP_OUTCOMES["rate_limited"].inc()
        return _rate_limited(request, html, retry_after)
    quality: AddressQuality = state.address_quality
    challenge: ChallengeVerifier = state.challenge
    fields: dict[str, Any] = {}
    try:
        fields = await read_fields(request, settings.max_body_bytes)
        data = parse_signup(fields, settings)
        issue = quality.check(data.address)
        if issue is not None:
            raise InvalidInput([issue])
        await challenge.verify(fields, ip)
        if botcheck.filled_too_fast(settings, fields):
            data.honeypot = True  # answered like the honeypot: nothing stored or sent
        if settings.check_deliverability and not data.honeypot:
            issue = await quality.check_deliverable(data.address)
            if issue is not None:
                raise InvalidInput([issue])
        consent = consent_from(request, "form" if html else "api", ip=ip)
        result = await signups.submit(data, consent)
    except InvalidInput as exc:
        if honeypot_filled(fields):
            # A bot hears what a person would, whatever else it got wrong: its field errors
            # would teach it what to fix.
            SIGNUP_OUTCOMES["bot"].inc()
            return _accepted(request, html, SignupResult(all_single_opt_in=False, newsletters=[]))
        SIGNUP_OUTCOMES["invalid"].inc()
        every = await _with_unknown_newsletters(db, fields, exc)
        if html:
            return await pages.signup_form_again(request, db, fields, every)
        raise every from None
    except (PayloadTooLarge, MalformedBody) as exc:
        if html:  # a browser form post gets a page, with the status a script would get
            error = FieldError("form", exc.code, f"{exc.title}: {exc.detail or exc.code}")
            page = await pages.signup_form_again(request, db, {}, InvalidInput([error]))
            page.status_code = exc.status
            return page
        raise
    except ChallengeUnavailable as exc:
        SIGNUP_OUTCOMES["unavailable"].inc()
        if html:
            page = await pages.signup_form_again(
                request, db, fields, InvalidInput([_challenge_down(exc)])
            )
            page.status_code = exc.status
            return page
        raise
    SIGNUP_OUTCOMES["bot" if data.honeypot else "accepted"].inc()
    if result.mail_queued:
        wake_worker(request)
    return _accepted(request, html, result)


def _accepted(request: Request, html: bool, result: SignupResult) -> Response:
    """The success answer: JSON, the thank-you page, or 303 to the newsletter's own page."""
    if html:
        target = safe_redirect(result.redirect_url)  # set by ops, never by the request
        if target:
            return RedirectResponse(target, status_code=303)
        message = _MESSAGES[result.all_single_opt_in]
        return pages.render(request, "thanks.html", {"result": result, "message": message})
    return _signup_json(result)


router.add_api_route(
    "/v1/subscriptions",
    create_subscription,
    methods=["POST"],
    status_code=202,
    response_model=SignupAccepted,
    responses=SIGNUP_ABUSE_RESPONSES,
    openapi_extra=SIGNUP_BODY,
    summary="Sign up to one or more newsletters",
    route_class_override=DirectRoute,
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


@router.get(
    "/v1/form-token",
    summary="A signed timestamp for a sign-up to carry as form_ts (minimum fill time)",
)
async def form_token(settings: SettingsDep) -> JSONResponse:
    """Fetch it when the form is shown, send it with the sign-up; it proves nothing else."""
    return JSONResponse(
        {"form_ts": botcheck.form_token(settings)},
        # Not a secret and no credential: any page may read it, nothing may cache it.
        headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"},
    )

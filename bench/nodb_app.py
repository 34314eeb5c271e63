"""The framework's ceiling: the sign-up endpoint's parsing and answer, with no database.

Same body reading (service.api.bodies.read_fields), same field rules
(service.signup_input.parse_signup), same error handlers and the same 202 answer as
POST /v1/subscriptions; it stops where the real handler hands the sign-up to the database.
Settings are read from app.state on the event loop, as the service's (async) dependencies do:
a plain `def` dependency would run in FastAPI's thread pool, a hop per request that is a cost
of how an app is written, not of the framework, so the ceiling leaves it out.

    uvicorn bench.nodb_app:create_app --factory
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service.api.bodies import read_fields, wants_html
from service.api.deps import consent_from
from service.api.schemas import SIGNUP_BODY, SIGNUP_RESPONSES, THANK_YOU, SignupAccepted
from service.config import Settings
from service.errors import install_error_handlers
from service.ratelimit import SignupLimiter
from service.signup_input import parse_signup


def create_app() -> FastAPI:
    app = FastAPI(title="Sign-up endpoint without a database (benchmark baseline)")
    app.state.settings = Settings()
    # The limiter also resolves the client's address (trusted proxies), as in the service.
    app.state.limiter = SignupLimiter(Settings(signup_rate_limit=""), None)
    install_error_handlers(app)

    @app.post(
        "/v1/subscriptions",
        status_code=202,
        response_model=SignupAccepted,
        responses=SIGNUP_RESPONSES,
        openapi_extra=SIGNUP_BODY,
    )
    async def create_subscription(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        wants_html(request)
        fields = await read_fields(request, settings.max_body_bytes)
        parse_signup(fields, settings)
        consent_from(request, "api")
        return JSONResponse({"status": "pending", "message": THANK_YOU}, status_code=202)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app

"""The embeddable sign-up form: GET /embed/{slug}, a page meant for an iframe on other sites.

The page is self-contained: its style and script are inline (the script is static/subscribe.js,
the same one other sites load), so it fetches nothing else. It works without scripts too, as a
plain form post that the sign-up endpoint answers with a page.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service import subscriptions
from service.api.deps import DbDep
from service.api.pages import form_not_found, render
from service.errors import InvalidInput

router = APIRouter(include_in_schema=False)


@router.get("/embed/{slug}")
async def embed_page(slug: str, request: Request, db: DbDep) -> Response:
    """The sign-up form of one newsletter, framed by the sites in its allowed origins."""
    try:
        async with db.transaction() as session:
            [newsletter] = await subscriptions.newsletters_by_slug(session, [slug])
    except InvalidInput:
        return form_not_found(request)
    return render(
        request,
        "embed.html",
        {
            "newsletter": newsletter,
            "newsletters": [newsletter],
            "chosen": [newsletter.slug],
            "email": "",
            "errors": {},
        },
    )

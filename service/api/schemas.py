"""Response shapes and OpenAPI examples of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.errors import INVALID_EMAIL, REQUIRED

THANK_YOU = "Thank you for signing up for this newsletter. We've sent you a confirmation email."
SUBSCRIBED = "Successfully subscribed"


class SignupAccepted(BaseModel):
    status: Literal["pending", "active"] = Field(examples=["pending"])
    message: str = Field(examples=[THANK_YOU])


class NewsletterOut(BaseModel):
    slug: str = Field(examples=["weekly"])
    name: str = Field(examples=["The Weekly"])
    description: str = Field(examples=["One email every Friday."])
    opt_in: Literal["double", "single"] = Field(examples=["double"])


class ConfirmationOut(BaseModel):
    status: Literal["active"] = "active"
    newsletters: list[str] = Field(examples=[["weekly"]])


class ProblemField(BaseModel):
    field: str
    code: str
    message: str
    detail: str | None = None
    suggestion: str | None = None


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[ProblemField] | None = None
    newsletters: list[str] | None = None  # a confirmation's 410: those unsubscribed since


def problem_response(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/problem+json": {"schema": Problem.model_json_schema(), "example": example}
        },
    }


SIGNUP_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["email", "newsletters"],
                    "properties": {
                        "email": {"type": "string", "maxLength": 320},
                        "newsletters": {
                            "type": "array",
                            "items": {"type": "string"},
                            "minItems": 1,
                        },
                        "name": {"type": "string", "maxLength": 200},
                        "language": {"type": "string", "maxLength": 16},
                        "attributes": {"type": "object"},
                        "website": {"type": "string", "description": "Honeypot: leave empty."},
                    },
                },
                "example": {
                    "email": "reader@example.com",
                    "newsletters": ["weekly"],
                    "name": "Ada",
                    "attributes": {"plan": "free"},
                },
            },
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["email", "newsletters"],
                    "properties": {
                        "email": {"type": "string"},
                        "newsletters": {"type": "array", "items": {"type": "string"}},
                        "name": {"type": "string"},
                        "language": {"type": "string"},
                        "website": {"type": "string"},
                    },
                },
                "example": {"email": "reader@example.com", "newsletters": ["weekly"]},
            },
        },
    }
}

SIGNUP_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": SignupAccepted,
        "description": "Every newsletter asked for is single opt-in.",
        "content": {"application/json": {"example": {"status": "active", "message": SUBSCRIBED}}},
    },
    400: problem_response(
        "Malformed body",
        {
            "type": "about:blank#malformed_body",
            "title": "The request body could not be read",
            "status": 400,
        },
    ),
    413: problem_response(
        "Body too large",
        {"type": "about:blank#payload_too_large", "title": "Request body too large", "status": 413},
    ),
    415: problem_response(
        "Unsupported content type",
        {
            "type": "about:blank#unsupported_media_type",
            "title": "Unsupported content type",
            "status": 415,
        },
    ),
    422: problem_response(
        "Field errors",
        {
            "type": "about:blank#invalid_input",
            "title": INVALID_EMAIL,
            "status": 422,
            "errors": [
                {
                    "field": "email",
                    "code": "invalid_email",
                    "message": INVALID_EMAIL,
                    "detail": "An email address must have an @-sign.",
                },
                {"field": "newsletters", "code": "required", "message": REQUIRED},
            ],
        },
    ),
}

TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: problem_response(
        "Unknown token",
        {"type": "about:blank#unknown_token", "title": "This link is not valid", "status": 404},
    ),
    410: problem_response(
        'Expired token; or (type about:blank#unsubscribed_since, title "You have since'
        ' unsubscribed", with `newsletters`) every subscription the link covers was'
        " unsubscribed or bounced since: nothing was activated",
        {"type": "about:blank#expired_token", "title": "This link has expired", "status": 410},
    ),
}

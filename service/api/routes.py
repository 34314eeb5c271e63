"""Route classes for the hot path."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, cast

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DirectRoute(APIRoute):
    """An endpoint that takes only the Request and returns a Response, called as it is.

    FastAPI's handler solves the dependencies of every route on every request, even of one
    that has none: it parses the query string and the cookies and builds a spare Response
    (measured: a tenth of the sign-up request's own CPU). The route is still an APIRoute, so
    OpenAPI, matching and the error handlers are unchanged.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        extra = (
            dependant.path_params
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
            or dependant.dependencies
            or dependant.response_param_name
            or dependant.background_tasks_param_name
        )
        if extra or dependant.request_param_name is None:
            raise TypeError(f"{self.path}: a DirectRoute endpoint takes only the Request")
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)

"""Errors → HTTP: every failure answers `{"error": {code, message, field, retryable}}` (tokencredit.types.ErrorResponse)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.executor import ClientGone, NotReady, Overloaded, Unavailable
from tokencredit.types import ErrorDetail, ErrorResponse
from workers.engine import InvalidField, PayloadTooLarge

__all__ = ["install_error_handlers", "error_response", "field_path"]

log = logging.getLogger("tokencredit.errors")


def error_response(status: int, code: str, message: str, field: str | None = None, retryable: bool = False, headers=None):
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field, retryable=retryable))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def field_path(loc) -> str:
    """('body', 'items', 2, 'response') → 'items[2].response' (the path a caller can find in its own JSON)."""
    parts = [p for p in loc if p != "body"] or ["body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _validation_handler(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    loc = tuple(first.get("loc", ("body",)))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        # loc is ('body', <character position>): report the body, not a fake index.
        position = loc[-1] if len(loc) > 1 else "?"
        reason = (first.get("ctx") or {}).get("error", "")
        loc, message = ("body",), f"invalid JSON at character {position}" + (f" ({reason})" if reason else "")
    # Pydantic reports `extra="forbid"` violations at the unknown key: name it so typos are obvious.
    field = field_path(loc)
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {loc[-1]!r}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return error_response(422, "invalid_request", f"{field}: {message}{more}", field=field)


def _allowed_methods(request: Request) -> list:
    """Every method that some route of this path answers."""
    from starlette.routing import Match

    methods = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None) or ()
        if any(route.matches({**request.scope, "method": m})[0] is Match.FULL for m in route_methods):
            methods |= set(route_methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(request: Request, exc: PayloadTooLarge):
        return error_response(413, exc.code, f"{exc.field}: {exc.message}", field=exc.field)

    @app.exception_handler(InvalidField)
    async def _invalid(request: Request, exc: InvalidField):
        return error_response(exc.status, exc.code, f"{exc.field}: {exc.message}", field=exc.field)

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady):
        return error_response(503, "not_ready", str(exc), retryable=True, headers={"Retry-After": "5"})

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable):
        # Redis (the broker) is down: retry shortly; services reconnect by themselves when it is back.
        return error_response(503, "broker_unavailable", str(exc), retryable=True, headers={"Retry-After": "2"})

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        # Nobody reads it (nginx's "client closed request"); it only shows in the metrics and the access log.
        return error_response(499, "client_gone", str(exc), retryable=True)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        # Retry-After: the seconds the backlog needs to make room at the measured drain rate (service/batching.py).
        retry_after = str(getattr(exc, "retry_after", 1))
        return error_response(429, "overloaded", str(exc), retryable=True, headers={"Retry-After": retry_after})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status, message, headers = exc.status_code, str(exc.detail), dict(getattr(exc, "headers", None) or {})
        code = {400: "invalid_body", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large"}.get(status, "http_error")
        field = "body" if status in (400, 413) else None
        if status == 400:
            # FastAPI's answer to a body it cannot decode (bytes that are not UTF-8 JSON); JSON syntax errors are 422.
            message = f"body: cannot be read as JSON ({message.lower()}); send UTF-8 JSON"
        if status == 405:
            # Starlette's Allow names the first route of the path only (GET /admin/v1/shaping hides its PUT).
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(status, code, message, field=field, headers=headers or None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # A bug, not bad input: log it with the traceback, answer without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the server log", retryable=True)

"""Admin API: versioned shaping weights (`/admin/v1/shaping`), behind a bearer token (`TOKENCREDIT_ADMIN_TOKEN`).

PUT is optimistic concurrency: `If-Match: "v<version>"` (the GET's ETag) or 428; a stale ETag answers 412 and
nothing is written (the store's compare-and-set is atomic, so of two writers with the same ETag exactly one wins).
Versions belong to this server's deployment (`[name/]rm@revision`, named in every answer); weights that give a
component this RM cannot compute (`prefix` on an encoder) are a 422. Until the RM is loaded every route is 503.
"""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.errors import error_response
from service.shaping_store import StaleVersion
from tokencredit.types import ErrorResponse, ShapingHistory, ShapingUpdate, ShapingVersion, etag, version_of_if_match

__all__ = ["router", "AdminError", "handle_admin_error"]

_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="TOKENCREDIT_ADMIN_TOKEN")


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


async def handle_admin_error(request: Request, exc: AdminError):
    return error_response(exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers)


def require_admin(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    token = request.app.state.settings.admin_token
    disabled = token is None or not token.get_secret_value()
    if credentials is None:
        # No credentials is 401 whether or not the API is on (RFC 9110; the schema says so); 403 is for a caller
        # who did authenticate, to a server whose admin API is off.
        note = " (and this server's admin API is disabled: set TOKENCREDIT_ADMIN_TOKEN to enable it)" if disabled else ""
        raise AdminError(401, "unauthorized", "missing bearer token" + note, headers={"WWW-Authenticate": "Bearer"})
    if disabled:
        raise AdminError(403, "admin_disabled", "the admin API is disabled: set TOKENCREDIT_ADMIN_TOKEN to enable it")
    given = credentials.credentials
    # Constant time; neither token ever goes into a message or a log line.
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise AdminError(401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 412, 422, 428, 503)}
router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS)


def _answer(record: ShapingVersion, response: Response) -> ShapingVersion:
    response.headers["ETag"] = record.etag
    return record


@router.get("/shaping", response_model=ShapingVersion)
async def get_shaping(request: Request, response: Response) -> ShapingVersion:
    """This deployment's current shaping weights, their version (also as the ETag), when and by whom they were set."""
    state = request.app.state.shaping
    store = state.store
    return _answer(await run_in_threadpool(store.current), response)


@router.put("/shaping", response_model=ShapingVersion)
async def put_shaping(
    update: ShapingUpdate, request: Request, response: Response, if_match: Optional[str] = Header(None)
) -> ShapingVersion:
    """New weights as a new version, if `If-Match` holds the current ETag (412 if stale, 428 if absent)."""
    if not if_match:
        raise AdminError(428, "precondition_required", 'If-Match is required: send the ETag of GET /admin/v1/shaping (e.g. "v3")', field="If-Match")
    expected = version_of_if_match(if_match)
    if expected is None:
        raise AdminError(412, "precondition_failed", f'If-Match {if_match!r} is not an ETag of the form "v<version>"', field="If-Match")
    state = request.app.state.shaping
    store = state.store
    uncomputable = state.deployment.uncomputable(update.weights)
    if uncomputable:
        name = uncomputable[0]
        raise AdminError(
            422, "invalid_request",
            f"weights.{name}: {state.deployment.model} cannot compute the {name} component "
            f"(it computes {', '.join(state.deployment.components)}); nothing was written",
            field=f"weights.{name}",
        )
    try:
        if expected == -1:
            expected = (await run_in_threadpool(store.current)).version
        record = await run_in_threadpool(store.put, update.weights, expected, update.updated_by)
    except StaleVersion as exc:
        raise AdminError(
            412, "precondition_failed", f"stale ETag {if_match}: the current version is {exc.current}; GET it and retry",
            field="If-Match", headers={"ETag": etag(exc.current)},
        ) from None
    return _answer(record, response)


@router.get("/shaping/history", response_model=ShapingHistory)
async def shaping_history(request: Request) -> ShapingHistory:
    """Every version of this deployment, oldest first, with who set it and when."""
    state = request.app.state.shaping
    store = state.store
    return ShapingHistory(versions=await run_in_threadpool(store.history), deployment=state.deployment.key)

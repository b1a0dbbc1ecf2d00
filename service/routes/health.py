"""Liveness, readiness and `/v1/info`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.deps import ExecutorDep, ShapingDep
from service.errors import error_response
from service.security import require_api_token
from tokencredit.types import ErrorResponse, InfoResponse
from workers.registry import computable_components
from workers.shaping import NORMALIZATIONS

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(executor: ExecutorDep):
    """The reward model is loaded and warmed up."""
    if not executor.ready:
        message = executor.load_error or "the reward model is still loading"
        return error_response(503, "not_ready", message, retryable=executor.load_error is None, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "model": executor.engine.model_info().model_dump()})


@router.get("/v1/info", response_model=InfoResponse, responses={code: {"model": ErrorResponse} for code in (401, 503)},
            dependencies=[Depends(require_api_token)])
async def info(executor: ExecutorDep, shaping: ShapingDep):
    """The model, the components, the request limits and the current shaping weights."""
    if not executor.ready:
        return error_response(503, "not_ready", executor.load_error or "the reward model is still loading", retryable=True, headers={"Retry-After": "5"})
    engine = executor.engine
    return InfoResponse(
        model=engine.model_info(),
        components=computable_components(engine.model),
        limits=engine.limits,
        shaping=shaping.info(),
        normalization=NORMALIZATIONS[0],
    )

"""`POST /v1/dense_rewards`: per-token rewards that sum to the RM score."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service.deps import ExecutorDep
from tokencredit.types import DenseRewardsRequest, DenseRewardsResponse, ErrorResponse, Usage
from workers.engine import InvalidField

router = APIRouter(tags=["rewards"])

_ERRORS = {code: {"model": ErrorResponse} for code in (413, 422, 429, 503)}


@router.post("/v1/dense_rewards", response_model=DenseRewardsResponse, responses=_ERRORS)
async def dense_rewards(
    request: DenseRewardsRequest, executor: ExecutorDep, http: Request
) -> DenseRewardsResponse:
    """Explain the RM on each item and return one reward per policy token (Σ = score)."""
    started = time.perf_counter()
    if request.weights is not None and request.shaping_version is not None:
        raise InvalidField("shaping_version", "give either weights or shaping_version, not both")
    if request.weights is not None:
        weights, info = request.weights, http.app.state.shaping.request_weights(request.weights).info()
    elif request.shaping_version is not None:
        # The store is read only for what the request uses (in broker mode every read is a Redis round trip).
        pinned = await http.app.state.shaping.pinned(request.shaping_version)
        if pinned is None:
            current = await http.app.state.shaping.current()
            raise InvalidField("shaping_version", f"unknown shaping version {request.shaping_version} (current: {current.version})")
        weights, info = pinned.weights, pinned.info()
    else:
        shaping = await http.app.state.shaping.current()
        weights, info = shaping.weights, shaping.info()
    output = await executor.run(request, weights)
    metrics = http.app.state.metrics
    metrics.rm_rows.inc(output.rm_rows)
    if not getattr(executor, "observes_batches", False):
        metrics.batch_items.observe(len(request.items))  # embedded: each request is one engine batch
    return DenseRewardsResponse(
        model=executor.engine.model_info(),
        shaping=info,
        results=output.results,
        usage=Usage(
            rm_rows=output.rm_rows,
            latency_ms=round((time.perf_counter() - started) * 1000.0, 3),
            shap_exact_items=sum(r.shap_estimator == "exact" for r in output.results),
        ),
    )

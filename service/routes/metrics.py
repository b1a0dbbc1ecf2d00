"""`GET /metrics`: Prometheus text format (see `service/metrics.py` for what is measured)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Request counts and latency by endpoint and status, queue depth, batch sizes, RM rows, cache, worker failures."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

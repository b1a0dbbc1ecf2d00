"""BO studies for the web page: `tokencredit bo run --service URL` reports, `/ui` reads.

`PUT /admin/v1/bo/studies/{name}` takes the whole study (admin token: only a tuner that may change the weights
may say what it tried); `GET /v1/bo/studies[/{name}]` answer without a token, like `/v1/info`, which already
shows the weights. Studies live in memory (`service/bo_reports.py`).
"""

from __future__ import annotations

from typing import List

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel

from service.bo_reports import StoredStudy, StudyReport, StudySummary
from service.errors import error_response
from service.routes.admin import require_admin
from tokencredit.types import ErrorResponse

__all__ = ["router", "admin_router"]

# As deployment names: it is shown in the page and used in its URLs.
_NAME = Path(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the study's name (its file's stem)")

router = APIRouter(prefix="/v1/bo", tags=["bo"])
admin_router = APIRouter(
    prefix="/admin/v1/bo", tags=["admin"], dependencies=[Depends(require_admin)],
    responses={code: {"model": ErrorResponse} for code in (401, 403, 422)},
)


class StudyList(BaseModel):
    studies: List[StudySummary]


@admin_router.put("/studies/{name}", response_model=StoredStudy)
async def report_study(report: StudyReport, request: Request, name: str = _NAME) -> StoredStudy:
    """Replace what this server shows of study `name` with the controller's current view of it."""
    return request.app.state.bo_reports.put(name, report)


@router.get("/studies", response_model=StudyList)
async def list_studies(request: Request) -> StudyList:
    """Studies reported to this server process, most recently reported first."""
    return StudyList(studies=request.app.state.bo_reports.summaries())


@router.get("/studies/{name}", response_model=StoredStudy, responses={404: {"model": ErrorResponse}})
async def get_study(request: Request, name: str = _NAME):
    """A study's trials, target, state and the controller's best trial, as last reported."""
    study = request.app.state.bo_reports.get(name)
    if study is None:
        return error_response(404, "not_found", f"no study {name!r} has been reported to this server", field="name")
    return study

"""`GET /ui`: the web page (explain heatmaps, shaping weights and history, BO progress, live load).

Plain files in `service/ui/` (package data): no build step, no framework, nothing fetched from elsewhere. The
page talks to the same public API as any client; the admin token it is given lives in a JS variable only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from service.security import api_token_enabled

__all__ = ["router", "mount_static", "UI_DIR"]

UI_DIR = Path(__file__).resolve().parents[1] / "ui"

# Everything from this origin, nothing inline: the page cannot be made to run or load anything else.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A fresh page after an upgrade; the static files revalidate by ETag.
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui")
async def ui_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/ui/")
async def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/config.json")
async def ui_config(request: Request) -> JSONResponse:
    """What the page needs to know before asking anything: whether the admin API is on (so it never has to
    provoke a 403 to find out), whether the data plane needs a token, and whether a result cache exists (Celery mode)."""
    settings = request.app.state.settings
    token = settings.admin_token
    return JSONResponse({
        "admin_enabled": bool(token is not None and token.get_secret_value()),
        # The data plane asks for TOKENCREDIT_API_TOKEN: the page asks its user for it before explaining anything.
        "api_token_required": api_token_enabled(settings),
        "mode": "celery" if settings.broker_url else "embedded",
    }, headers={"Cache-Control": "no-store"})


def mount_static(app: FastAPI) -> None:
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")

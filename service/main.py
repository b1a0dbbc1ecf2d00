"""Assembles the FastAPI app: settings, executor, error handlers, routers. No logic lives here."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI
from starlette.exceptions import HTTPException
from fastapi.routing import APIRoute

from service.config import Settings
from service.errors import error_response, install_error_handlers
from service.batching import DisconnectWatch
from service.executor import EmbeddedExecutor
from service.metrics import Metrics, MetricsMiddleware
from service.bo_reports import StudyReports
from service.routes import admin, bo, compat, health, metrics, rewards, ui
from service.openapi import app_schema
from service.security import TokenizerDirs, log_data_plane_access, require_api_token
from service.shaping_state import ShapingState

__all__ = ["create_app"]

VERSION = "0.1.0"


class BodyLimit:
    """413 for bodies over `max_bytes`: by Content-Length up front, and by counting for chunked bodies."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode()
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, send, f"body of {length} bytes exceeds the limit of {self.max_bytes}")
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading; the handler answers 413.
                    raise HTTPException(413, f"body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _reject(scope, send, message: str):
        response = error_response(413, "payload_too_large", message, field="body")
        await response(scope, None, send)


def _operation_id(route: APIRoute) -> str:
    # Stable operation ids ("rewards-dense_rewards") keep openapi.yaml diffs meaningful.
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: Optional[Settings] = None, *, load_model: bool = True) -> FastAPI:
    """Build the app. With load_model=False nothing is loaded (used to render the OpenAPI schema)."""
    settings = settings or Settings()
    app_metrics = Metrics()
    # Durable, versioned weights (SQLite file embedded, Redis with a broker), scoped to this deployment: the
    # executor binds them to the RM as soon as it is loaded; nothing is opened before.
    shaping = ShapingState.for_settings(settings)
    if settings.broker_url:
        # Celery path (workers over Redis); the import stays lazy so the embedded default needs no celery.
        from service.dispatch import CeleryExecutor

        executor = CeleryExecutor(settings, app_metrics, on_model=shaping.bind_model)
    else:
        executor = EmbeddedExecutor(settings, app_metrics, on_model=shaping.bind_model)
        # The Celery path sets the gauge as items come and go; the embedded one's count is read at scrape time.
        app_metrics.scrape_hooks.append(lambda: app_metrics.queue_depth.set(executor.pending_items))
        app_metrics.scrape_hooks.append(lambda: app_metrics.observe_credit(executor.credit))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(executor.start()) if load_model else None
        yield
        if task is not None:
            task.cancel()
        executor.shutdown()

    app = FastAPI(
        title="TokenCredit",
        version=VERSION,
        description="Dense, explainable per-token rewards from a sequence-level reward model.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.executor = executor
    app.state.metrics = app_metrics
    app.state.shaping = shaping
    app.state.bo_reports = StudyReports()
    app.state.tokenizer_dirs = TokenizerDirs.parse(settings.tokenizer_dirs)
    if load_model:
        log_data_plane_access(settings, app.state.tokenizer_dirs)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # A request whose client disconnects while it is queued is dropped from the queue (service/batching.py).
    app.add_middleware(DisconnectWatch)
    # Outermost, so 413s from BodyLimit and error-handler answers are counted too.
    app.add_middleware(MetricsMiddleware, metrics=app_metrics)
    install_error_handlers(app)
    app.add_exception_handler(admin.AdminError, admin.handle_admin_error)
    # The data plane (/v1/*, the shims) asks for TOKENCREDIT_API_TOKEN when one is set; probes, /metrics and the
    # page's files never do (/v1/info carries its own dependency, in service/routes/health.py).
    data_plane = [Depends(require_api_token)]
    app.include_router(health.router)
    app.include_router(rewards.router, dependencies=data_plane)
    app.include_router(metrics.router)
    app.include_router(compat.router, dependencies=data_plane)
    app.include_router(admin.router)
    app.include_router(bo.router, dependencies=data_plane)
    app.include_router(bo.admin_router)
    app.include_router(ui.router)
    ui.mount_static(app)
    app.openapi = lambda: app_schema(app, settings)
    return app


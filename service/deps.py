"""FastAPI dependencies: the executor, settings and current shaping weights live on `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.executor import EmbeddedExecutor
from service.shaping_state import ShapingSnapshot

__all__ = ["ExecutorDep", "SettingsDep", "ShapingDep"]


def get_executor(request: Request) -> EmbeddedExecutor:
    return request.app.state.executor


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_shaping(request: Request) -> ShapingSnapshot:
    # A snapshot of this deployment's current version from the durable store (service.shaping_store), cheap per request.
    return await request.app.state.shaping.current()


ExecutorDep = Annotated[EmbeddedExecutor, Depends(get_executor)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ShapingDep = Annotated[ShapingSnapshot, Depends(get_shaping)]

"""`load_engine(settings)`: the one way a process gets a ready engine (HTTP server's embedded executor, Celery worker).

Both paths must give bit-identical numbers, so they share this loader: torch threads, `RewardModel.load` with the
settings' dtype, explain dtype, masking and layout, the check that the initial weights are computable, and warm-up.
"""

from __future__ import annotations

from typing import Callable, Optional

from workers.engine import Engine
from workers.evaluator import set_torch_threads
from workers.model import RewardModel
from workers.registry import uncomputable
from workers.settings import EngineSettings

__all__ = ["load_engine"]


def load_engine(settings: EngineSettings, on_model: Optional[Callable[[RewardModel], None]] = None) -> Engine:
    """Load the RM of `settings.model` and build its engine, warmed up unless `settings.warmup` is off.

    Args:
        settings: the engine's settings (the server's `Settings` are a subclass).
        on_model: called with the loaded model before warm-up (the server scopes its shaping state to the RM there).

    Raises whatever the load raises (a missing directory, an unusable config), and ValueError when the initial
    weights (`TOKENCREDIT_WEIGHTS`) give a component this RM cannot compute a weight.
    """
    set_torch_threads(settings.torch_threads)
    model = RewardModel.load(settings.model, **settings.model_kwargs())
    refused = uncomputable(settings.shaping_weights(), model)
    if refused:
        raise ValueError(f"TOKENCREDIT_WEIGHTS gives the {refused[0]} component a weight, but it needs a causal RM")
    if on_model is not None:
        on_model(model)
    engine = Engine(model, settings.limits(), chunk_size=settings.chunk_size)
    if settings.warmup:
        engine.warmup_seconds = engine.warmup()
    return engine

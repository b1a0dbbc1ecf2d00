"""`POST /v1/dense_rewards`: per-token rewards that sum to the RM score."""

from __future__ import annotations

import asyncio
import time
from typing import List, Optional, Tuple

from fastapi import APIRouter, Request

from service.deps import ExecutorDep
from tokencredit.types import DenseRewardsRequest, DenseRewardsResponse, ErrorResponse, StepReward, Usage
from workers import shaping as shaping_math
from workers.engine import InvalidField

router = APIRouter(tags=["rewards"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 503)}


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
    # Steps depend only on the texts: cut before any RM time is spent, so a bad regex costs nothing.
    steps = None if request.aggregate is None else await asyncio.to_thread(_step_spans_of, request)
    if request.policy_tokenizer is not None:
        # Only tokenizers the operator offers (TOKENCREDIT_TOKENIZER_DIRS), as their real directory: the engine
        # (here or in a Celery worker) then loads a vetted path, and the cache keys on it.
        real = http.app.state.tokenizer_dirs.resolve(request.policy_tokenizer)
        request = request.model_copy(update={"policy_tokenizer": real})
    output = await executor.run(request, weights)
    if steps is not None:
        for result, spans in zip(output.results, steps):
            if result.token_rewards is not None and result.spans is not None:
                result.steps = [StepReward(span=span, tokens=tokens, reward=reward) for span, tokens, reward
                                in shaping_math.step_rewards(result.token_rewards, result.spans, spans)]
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


# A step regex runs on caller-controlled text: the `regex` module's timeout bounds catastrophic backtracking, so
# a pattern such as (a+)+$ answers 422 instead of holding a thread. Budget for all the items of one request.
_STEP_REGEX_BUDGET_S = 1.0


def _step_spans_of(request: DenseRewardsRequest) -> List[List[Tuple[int, int]]]:
    """Each item's step spans (`aggregate.steps`); InvalidField naming `aggregate.steps.regex` on a bad pattern."""
    import regex

    cfg = request.aggregate.steps
    pattern: Optional[object] = None
    if cfg.regex is not None:
        try:
            pattern = regex.compile(cfg.regex)
        except regex.error as exc:
            raise InvalidField("aggregate.steps.regex", f"not a valid regular expression: {exc}") from None
    deadline = time.monotonic() + _STEP_REGEX_BUDGET_S
    out = []
    for i, item in enumerate(request.items):
        if pattern is None:
            out.append(shaping_math.step_spans(item.response, separator=cfg.separator))
            continue
        bounded = _Bounded(pattern, max(deadline - time.monotonic(), 0.001))
        try:
            out.append(shaping_math.step_spans(item.response, pattern=bounded))
        except TimeoutError:
            raise InvalidField(
                "aggregate.steps.regex",
                f"matching took more than {_STEP_REGEX_BUDGET_S:g} s on the request's responses (items[{i}]); simplify the pattern",
            ) from None
    return out


class _Bounded:
    """A compiled `regex` pattern whose `finditer` stops with TimeoutError after `timeout` seconds."""

    def __init__(self, pattern, timeout: float):
        self.pattern, self.timeout = pattern, timeout

    def finditer(self, text: str):
        return list(self.pattern.finditer(text, timeout=self.timeout))

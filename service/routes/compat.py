"""Scalar shims for stacks that already speak another reward protocol (tier S: the RM score, nothing dense).

- `POST /openrlhf/get_reward`: OpenRLHF's remote-RM protocol (`--reward.remote_url`, `--remote_rm_url` before
  v0.10.2) exactly: `{"query", "prompts", "labels"}` in, `{"rewards", "scores", "extra_logs"}` out, lists parallel
  to `query`. Empty lists get 200 with empty lists: OpenRLHF ≥ v0.9.1 sends one sample per request and gives the
  extra servers of a multi-URL flag empty lists (its own `serve_rm.py` answers those with a 500).
- `POST /classify`: vLLM's classification shape, `probs` = `[raw score]`, which verl's discriminative-RM path
  reads as `data[-1]["probs"][-1]`.

Scores come from one RM forward per item (weights `sparse=1` explain nothing), so these routes are cheap.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Dict, List, Optional, Union

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from service.deps import ExecutorDep
from service.errors import error_response
from tokencredit.types import DenseRewardItem, DenseRewardsRequest, ErrorResponse, ShapingWeights

router = APIRouter(tags=["compat"])

_SCALAR = ShapingWeights(sparse=1.0)
_ERRORS = {code: {"model": ErrorResponse} for code in (413, 422, 429, 500, 503)}


class OpenRLHFRewardRequest(BaseModel):
    """OpenRLHF's request: full texts (prompt + response, chat template included), prompts and labels."""

    # Extra fields are ignored: OpenRLHF versions differ in what else they send.
    model_config = ConfigDict(extra="ignore")
    query: List[str]
    prompts: Optional[List[str]] = None
    labels: Optional[List[Any]] = None


class OpenRLHFRewardResponse(BaseModel):
    """Lists parallel to `query`; each `extra_logs` value holds one plain number per sample (OpenRLHF wraps each
    in `torch.tensor([value])`, so vectors would break it)."""

    rewards: List[float]
    scores: List[float]
    extra_logs: Dict[str, List[float]]


class ClassifyRequest(BaseModel):
    """vLLM's `/classify` body. The whole input is scored as a response with an empty prompt."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    input: Union[str, List[str]]
    # False (what verl sends): the raw score; True: its sigmoid.
    use_activation: bool = False


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: List[float]
    num_classes: int


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: List[ClassificationData]
    usage: ClassifyUsage


def _response_text(query: str, prompt: Optional[str]) -> tuple[str, str]:
    # OpenRLHF's query is decode(prompt + response) and its prompt the formatted prompt: the response is the rest.
    if prompt and query.startswith(prompt):
        return prompt, query[len(prompt):]
    return "", query


async def _scores(executor, pairs: List[tuple[str, str]]):
    """RM scores of (prompt, response) pairs, in chunks within the item limit; an error response on failure."""
    scores: List[float] = []
    tokens = 0
    limit = executor.engine.limits.max_items if executor.engine is not None else max(1, len(pairs))
    for start in range(0, len(pairs), limit):
        part = pairs[start:start + limit]
        items = []
        for k, (p, r) in enumerate(part):
            try:
                items.append(DenseRewardItem(id=str(start + k), prompt=p, response=r))
            except ValueError as exc:  # pydantic: e.g. an empty response
                message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                where = f"query[{start + k}]"
                return None, error_response(422, "invalid_request", f"{where}: {message}", field=where)
        request = DenseRewardsRequest(items=items, weights=_SCALAR)
        output = await executor.run(request, _SCALAR)
        for k, result in enumerate(output.results):
            if result.error is not None or result.score is None:
                code, message = (result.error.code, result.error.message) if result.error else ("explain_failed", "no score")
                return None, error_response(500, code, f"query[{start + k}]: {message}", field=f"query[{start + k}]", retryable=True)
            scores.append(float(result.score))
            tokens += result.rm_tokens or 0
    return (scores, tokens), None


@router.post("/openrlhf/get_reward", response_model=OpenRLHFRewardResponse, responses=_ERRORS)
async def openrlhf_get_reward(request: OpenRLHFRewardRequest, executor: ExecutorDep):
    """OpenRLHF remote reward: `rewards` = `scores` = the RM score of each `query`."""
    n = len(request.query)
    for name in ("prompts", "labels"):
        value = getattr(request, name)
        if value is not None and len(value) != n:
            return error_response(422, "invalid_request", f"{name}: {len(value)} entries for {n} queries; the lists must be parallel", field=name)
    if n == 0:
        return OpenRLHFRewardResponse(rewards=[], scores=[], extra_logs={"rm_score": []})
    prompts = request.prompts or [None] * n
    done, error = await _scores(executor, [_response_text(q, p) for q, p in zip(request.query, prompts)])
    if error is not None:
        return error
    scores, _ = done
    return OpenRLHFRewardResponse(rewards=scores, scores=scores, extra_logs={"rm_score": scores})


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(request: ClassifyRequest, executor: ExecutorDep):
    """vLLM-style classification: one `probs` entry per input, holding the raw RM score."""
    texts = [request.input] if isinstance(request.input, str) else list(request.input)
    if not texts:
        return error_response(422, "invalid_request", "input: give at least one text", field="input")
    done, error = await _scores(executor, [("", t) for t in texts])
    if error is not None:
        return error.__class__(status_code=error.status_code, content=_rename(error.body, "query", "input"))
    scores, tokens = done
    if request.use_activation:
        scores = [1.0 / (1.0 + math.exp(-s)) for s in scores]
    name = request.model or executor.engine.model_info().name
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=name,
        data=[ClassificationData(index=i, label="score", probs=[s], num_classes=1) for i, s in enumerate(scores)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _rename(body: bytes, old: str, new: str) -> Dict[str, Any]:
    # The shared scorer names OpenRLHF's field; /classify callers sent `input`.
    import json

    data = json.loads(body)
    for key in ("message", "field"):
        if isinstance(data["error"].get(key), str):
            data["error"][key] = data["error"][key].replace(f"{old}[", f"{new}[")
    return data

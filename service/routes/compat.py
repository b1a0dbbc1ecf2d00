"""Scalar shims for stacks that already speak another reward protocol (tier S: the RM score, nothing dense).

- `POST /openrlhf/get_reward`: OpenRLHF's remote-RM protocol (`--reward.remote_url`, `--remote_rm_url` before
  v0.10.2) exactly: `{"query", "prompts", "labels"}` in, `{"rewards", "scores", "extra_logs"}` out, lists parallel
  to `query`. Empty lists get 200 with empty lists: OpenRLHF ≥ v0.9.1 sends one sample per request and gives the
  extra servers of a multi-URL flag empty lists (its own `serve_rm.py` answers those with a 500).
- `POST /classify`: vLLM's classification shape, `probs` = `[raw score]`, which verl's discriminative-RM path
  reads as `data[-1]["probs"][-1]`.

Scores come from one RM forward per item (weights `sparse=1` explain nothing), so these routes are cheap.

Long inputs are cut, never refused (a refusal becomes a `None` reward that crashes the trainer's step): the end
of a long response, as OpenRLHF's own RM server does, and a long prompt from the left. Each cut is counted in
`tokencredit_truncated_total{endpoint, part}` and flagged in the answer (`extra_logs.truncated`, `truncated`).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StrictBool

from service.deps import ExecutorDep
from service.errors import error_response
# The SDK's split of OpenRLHF's query into (prompt, response): the file-loaded reward function and this route agree.
from tokencredit.adapters.openrlhf import response_of
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
    # `rm_score` (the score) and `truncated` (1.0 when the query was cut to fit the RM, else 0.0).
    extra_logs: Dict[str, List[float]]


class ClassifyRequest(BaseModel):
    """vLLM's `/classify` body. The whole input is scored as a response with an empty prompt."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    input: Union[str, List[str]]
    # False (what verl sends): the raw score; True: its sigmoid.
    use_activation: StrictBool = False


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: List[float]
    num_classes: int
    # TokenCredit's addition (vLLM readers ignore it): the input was cut to fit the RM.
    truncated: bool = False


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


def _fit_response(engine, response: str) -> Tuple[str, bool]:
    """The start of `response` that fits the engine's limits (characters, then RM tokens), and whether it was cut.

    OpenRLHF's own RM server tokenizes the whole query with `truncation=True, max_length=--max_len` and the
    tokenizer's default right side (`openrlhf/cli/serve_rm.py`), so it scores the start of a long response; so do
    these shims, up to `max_response_tokens` RM tokens. A long prompt is cut from the left by the engine, as on
    `/v1/dense_rewards` (OpenRLHF would cut the response away instead).
    """
    limits, tokenizer = engine.limits, engine.model.tokenizer
    cut = len(response) > limits.max_response_chars
    response = response[: limits.max_response_chars]
    keep = limits.max_response_tokens
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    while len(offsets) > limits.max_response_tokens and keep > 0:
        # Re-tokenizing a cut text can merge differently at the cut: one token fewer until it fits.
        response, cut, keep = response[: offsets[keep - 1][1]], True, keep - 1
        offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return response, cut


def _fit_all(engine, pairs: List[Tuple[str, str]]) -> Tuple[List[Tuple[str, str]], List[bool], List[int]]:
    fitted, cut, counts = [], [], []
    for prompt, response in pairs:
        text, was_cut = _fit_response(engine, response)
        fitted.append((prompt, text))
        cut.append(was_cut)
        counts.append(engine.model.count_response_tokens(text))
    return fitted, cut, counts


async def _scores(executor, pairs: List[Tuple[str, str]], metrics=None, endpoint: str = ""):
    """RM scores of (prompt, response) pairs, in chunks within the item and token limits, each long response cut to
    fit (`_fit_response`): ((scores, RM tokens, truncated flags), None), or (None, an error response)."""
    if executor.engine is None:  # not ready: the executor raises the 503 (with Retry-After) that says so
        await executor.run(DenseRewardsRequest(items=[DenseRewardItem(prompt="", response="x")], weights=_SCALAR), _SCALAR)
    engine = executor.engine
    pairs, response_cut, counts = await executor.on_prepare_thread(_fit_all, engine, pairs)
    limits = engine.limits
    scores: List[float] = []
    truncated: List[bool] = []
    tokens = 0
    start = 0
    while start < len(pairs):
        stop, total = start, 0
        while stop < len(pairs) and stop - start < limits.max_items and (stop == start or total + counts[stop] <= limits.max_total_tokens):
            total += counts[stop]
            stop += 1
        items = []
        for k in range(start, stop):
            p, r = pairs[k]
            try:
                items.append(DenseRewardItem(id=str(k), prompt=p, response=r))
            except ValueError as exc:  # pydantic: e.g. an empty response
                message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                where = f"query[{k}]"
                return None, error_response(422, "invalid_request", f"{where}: {message}", field=where)
        output = await executor.run(DenseRewardsRequest(items=items, weights=_SCALAR), _SCALAR)
        for k, result in zip(range(start, stop), output.results):
            if result.error is not None or result.score is None:
                code, message = (result.error.code, result.error.message) if result.error else ("explain_failed", "no score")
                return None, error_response(500, code, f"query[{k}]: {message}", field=f"query[{k}]", retryable=True)
            scores.append(float(result.score))
            tokens += result.rm_tokens or 0
            truncated.append(response_cut[k] or result.prompt_truncated)
            if metrics is not None:
                for part, was_cut in (("response", response_cut[k]), ("prompt", result.prompt_truncated)):
                    if was_cut:
                        metrics.truncated.labels(endpoint, part).inc()
        start = stop
    return (scores, tokens, truncated), None


@router.post("/openrlhf/get_reward", response_model=OpenRLHFRewardResponse, responses=_ERRORS)
async def openrlhf_get_reward(request: OpenRLHFRewardRequest, executor: ExecutorDep, http: Request):
    """OpenRLHF remote reward: `rewards` = `scores` = the RM score of each `query`; a query longer than the RM
    takes is cut (`extra_logs.truncated` = 1), never refused."""
    n = len(request.query)
    for name in ("prompts", "labels"):
        value = getattr(request, name)
        if value is not None and len(value) != n:
            return error_response(422, "invalid_request", f"{name}: {len(value)} entries for {n} queries; the lists must be parallel", field=name)
    if n == 0:
        return OpenRLHFRewardResponse(rewards=[], scores=[], extra_logs={"rm_score": [], "truncated": []})
    prompts = request.prompts or [None] * n
    pairs = [response_of(q, p) for q, p in zip(request.query, prompts)]
    done, error = await _scores(executor, pairs, http.app.state.metrics, "/openrlhf/get_reward")
    if error is not None:
        return error
    scores, _, truncated = done
    return OpenRLHFRewardResponse(
        rewards=scores, scores=scores, extra_logs={"rm_score": scores, "truncated": [float(t) for t in truncated]}
    )


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(request: ClassifyRequest, executor: ExecutorDep, http: Request):
    """vLLM-style classification: one `probs` entry per input, holding the raw RM score; an input longer than the
    RM takes is cut (`truncated: true`), never refused."""
    texts = [request.input] if isinstance(request.input, str) else list(request.input)
    if not texts:
        return error_response(422, "invalid_request", "input: give at least one text", field="input")
    done, error = await _scores(executor, [("", t) for t in texts], http.app.state.metrics, "/classify")
    if error is not None:
        return error.__class__(status_code=error.status_code, content=_rename(error.body, "query", "input"))
    scores, tokens, truncated = done
    if request.use_activation:
        scores = [1.0 / (1.0 + math.exp(-s)) for s in scores]
    name = request.model or executor.engine.model_info().name
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=name,
        data=[
            ClassificationData(index=i, label="score", probs=[s], num_classes=1, truncated=t)
            for i, (s, t) in enumerate(zip(scores, truncated))
        ],
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

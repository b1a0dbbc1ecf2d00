"""Everything the clients do that needs no socket: items, chunking, retry decisions, parsing and checks.

The request logic is written once, as generators ("flows") that *yield* what they need (`Send` a request, `Sleep`,
`Gather` sub-flows to run concurrently) and receive the answer; the sync faces (`Client`, `AdminClient`) drive them
with blocking calls and the async faces (`AsyncClient`, `AsyncAdminClient`) with awaits. So every client retries,
splits, falls back and validates identically, and the logic is testable without a network.

`HTTPCore` is what every client of the service holds (base URL, timeouts, headers, the one-request flow);
`BaseClient` adds the dense-rewards flows.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Generator, List, Mapping, Optional, Sequence, Tuple, Union

from pydantic import ValidationError

from tokencredit._config import API_TOKEN_ENV, DEFAULT_MAX_IN_FLIGHT, DEFAULT_RETRY, DEFAULT_TIMEOUTS, Retry, Timeouts
from tokencredit.errors import (
    InvalidRequestError,
    ItemFailedError,
    PayloadTooLargeError,
    ResponseInvariantError,
    TokenCreditError,
    error_from_response,
)
from tokencredit.results import Attribution, DenseReward, Step
from tokencredit.tokens import PolicyTokens, policy_tokens
from tokencredit.types import DenseRewardItem, DenseRewardsRequest, InfoResponse, Limits, ShapingWeights, response_of_messages

__all__ = ["HTTPCore", "BaseClient", "Send", "Sleep", "Gather", "Answer", "ON_ERROR", "USER_AGENT"]

ON_ERROR = ("raise", "skip", "fallback")
USER_AGENT = "tokencredit-python/0.1.0"
# `scores` and the on_error="fallback" resubmission: the plain RM score on the last token (one forward pass).
SCALAR_WEIGHTS = {"sparse": 1.0}
# Estimated RM tokens per response character, to chunk before the server's token count is known; an estimate
# that is too low costs one 413 and a split, never a wrong answer.
_CHARS_PER_TOKEN = 3.0
_ITEM_FIELD_PREFIX = "items["
Outcome = Union["DenseReward", TokenCreditError]


@dataclass
class Send:
    method: str
    path: str
    body: Optional[dict] = None
    headers: Dict[str, str] = field(default_factory=dict)


@dataclass
class Sleep:
    seconds: float


@dataclass
class Gather:
    """Run these flows concurrently (at most `max_in_flight` requests at a time); the answer is their results, in order."""

    flows: List[Generator]


@dataclass
class Answer:
    """An HTTP answer as the flows see it: status, lower-cased headers, decoded JSON (or text)."""

    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass
class _Prepared:
    """One item ready to send, with what is needed to check and map back its answer."""

    index: int
    item: DenseRewardItem
    n_tokens: Optional[int]  # expected number of rewards (None: the server's RM tokens)
    est_tokens: int
    policy: Optional[PolicyTokens] = None


def _item_id(raw: Any, index: int) -> str:
    value = raw.get("id") if isinstance(raw, Mapping) else getattr(raw, "id", None)
    return str(index) if value is None else str(value)


class HTTPCore:
    """What every client of the service holds, with no socket: base URL, timeouts, headers, and one plain request.

    Args:
        base_url (`str`): the TokenCredit service.
        api_key (`str`, *optional*): sent as `Authorization: Bearer ...` (never in a message, a `repr` or a log).
        timeout (`Timeouts | float | None`): per-phase timeouts (a number sets every phase).
        max_in_flight (`int`): concurrent requests of one call that `Gather`s sub-flows.
        transport (`httpx.BaseTransport | httpx.AsyncBaseTransport`, *optional*): for tests or custom networking.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: Optional[str] = None,
                 timeout: Union[Timeouts, float, None] = DEFAULT_TIMEOUTS, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 transport: Any = None):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight} must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.timeout = Timeouts.coerce(timeout)
        self.max_in_flight = max_in_flight
        self._transport = transport
        self._headers = {"user-agent": USER_AGENT}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self.base_url!r})"

    def _request_flow(self, method: str, path: str, body: Optional[dict] = None,
                      headers: Optional[Mapping[str, str]] = None) -> Generator[Any, Any, Any]:
        """One request, not retried: the decoded body of a 2xx answer; otherwise the typed error is raised."""
        answer = yield Send(method, path, body, dict(self._headers, **(headers or {})))
        if isinstance(answer, TokenCreditError):
            raise answer
        if not 200 <= answer.status < 300:
            raise error_from_response(answer.status, answer.body, answer.headers)
        return answer.body


class BaseClient(HTTPCore):
    """Configuration and socket-free logic shared by `Client` and `AsyncClient`; see `Client` for the arguments."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: Optional[str] = None,
        timeout: Union[Timeouts, float, None] = DEFAULT_TIMEOUTS,
        retry: Retry = DEFAULT_RETRY,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        on_error: str = "raise",
        weights: Optional[Mapping[str, float]] = None,
        limits: Optional[Limits] = None,
        rtol: float = 1e-5,
        atol: float = 1e-6,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        # The data-plane token of a server that asks for one; adapters built inside trainers pass none, so the env.
        api_key = api_key if api_key is not None else os.environ.get(API_TOKEN_ENV)
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_in_flight=max_in_flight)
        self.retry = retry
        self.on_error = on_error
        self.weights = None if weights is None else ShapingWeights.model_validate(dict(weights))
        self.rtol, self.atol = rtol, atol
        self._limits = limits  # None until read from /v1/info

    # ------------------------------------------------------------------------------------------------ items
    def _prepare(self, items: Sequence[Any], tokenizer: Any) -> Tuple[List[_Prepared], Dict[int, TokenCreditError]]:
        """Validate items locally (before any I/O); an item that fails becomes that item's error."""
        prepared, failed = [], {}
        for i, raw in enumerate(items):
            try:
                prepared.append(self._prepare_one(i, raw, tokenizer))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                failed[i] = InvalidRequestError(422, "invalid_request", f"items[{i}].{where}: {message} (checked locally)",
                                                field=f"items[{i}].{where}")
            except (ValueError, TypeError) as exc:
                failed[i] = InvalidRequestError(422, "invalid_request", f"items[{i}]: {exc} (checked locally)", field=f"items[{i}]")
        return prepared, failed

    def _prepare_one(self, index: int, raw: Any, tokenizer: Any) -> _Prepared:
        if isinstance(raw, DenseRewardItem):
            data = raw.model_dump(exclude_none=True)
        elif isinstance(raw, Mapping):
            data = dict(raw)
        elif isinstance(raw, (tuple, list)) and len(raw) == 2:
            data = {"prompt": raw[0], "response": raw[1]}
        else:
            raise TypeError(f"an item must be a dict, a DenseRewardItem or a (prompt, response) pair, not {type(raw).__name__}")
        data.setdefault("id", str(index))
        policy = None
        if data.get("response_token_ids") is not None and tokenizer is not None:
            # Offsets computed here from the policy's own ids: the server needs no access to the tokenizer.
            if data.get("messages") is not None:
                # The response is the last message's text (None for invalid messages: validation below says why).
                text = response_of_messages(data["messages"])
                policy = policy_tokens(data.pop("response_token_ids"), tokenizer, text=text)
                data["response_token_offsets"] = policy.offsets
            else:
                policy = policy_tokens(data.pop("response_token_ids"), tokenizer, text=data.get("response"))
                data["response"], data["response_token_offsets"] = policy.text, policy.offsets
        item = DenseRewardItem.model_validate(data)
        if item.response_token_offsets is not None:
            n = len(item.response_token_offsets)
        elif item.response_token_ids is not None:
            n = len(item.response_token_ids)
        else:
            n = None
        est = n if n is not None else math.ceil(len(item.response) / _CHARS_PER_TOKEN)
        return _Prepared(index, item, n, max(1, est), policy)

    def _chunks(self, prepared: List[_Prepared], limits: Optional[Limits]) -> List[List[_Prepared]]:
        """Consecutive chunks within the server's item and (estimated) token limits; order is kept."""
        if limits is None:
            return [prepared] if prepared else []
        chunks: List[List[_Prepared]] = []
        current, tokens = [], 0
        for p in prepared:
            if current and (len(current) >= limits.max_items or tokens + p.est_tokens > limits.max_total_tokens):
                chunks.append(current)
                current, tokens = [], 0
            current.append(p)
            tokens += p.est_tokens
        if current:
            chunks.append(current)
        return chunks

    def _body(self, chunk: Sequence[_Prepared], options: Dict[str, Any]) -> dict:
        body = {"items": [p.item.model_dump(mode="json", exclude_none=True) for p in chunk]}
        body.update({k: v for k, v in options.items() if v is not None})
        return body

    def _request_options(self, weights, methods, policy_tokenizer, shaping_version=None, shaping=None) -> Dict[str, Any]:
        if weights is not None and shaping_version is not None:
            raise ValueError("give weights or shaping_version, not both")
        if weights is None and shaping_version is None and self.weights is not None:
            weights = self.weights
        if weights is not None and not isinstance(weights, ShapingWeights):
            weights = ShapingWeights.model_validate(dict(weights))
        # normalization / residual_placement / return_attributions: sent only when given, so the server's defaults
        # apply otherwise; checked here against the wire type before any I/O.
        extra = {k: v for k, v in (shaping or {}).items() if v is not None}
        if extra:
            DenseRewardsRequest.model_validate({"items": [{"prompt": "", "response": "x"}], **extra})
        return {
            "weights": None if weights is None else weights.model_dump(),
            "methods": methods,
            "policy_tokenizer": policy_tokenizer,
            "shaping_version": None if shaping_version is None else int(shaping_version),
            **extra,
        }

    # ------------------------------------------------------------------------------------------------ flows
    def _retry_or_stop(self, err: TokenCreditError, attempt: int, deadline: Optional[float]) -> Optional[float]:
        """Seconds to wait before the next attempt, or None to give up."""
        if not err.retryable or attempt + 1 >= self.retry.attempts:
            return None
        delay = self.retry.delay(attempt, getattr(err, "retry_after", None))
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    def _info_flow(self, deadline: Optional[float] = None) -> Generator[Any, Any, InfoResponse]:
        attempt = 0
        while True:
            answer = yield Send("GET", "/v1/info", headers=dict(self._headers))
            if isinstance(answer, Answer) and answer.status == 200:
                info = InfoResponse.model_validate(answer.body)
                self._limits = info.limits
                return info
            err = answer if isinstance(answer, TokenCreditError) else error_from_response(answer.status, answer.body, answer.headers)
            delay = self._retry_or_stop(err, attempt, deadline)
            if delay is None:
                raise err
            yield Sleep(delay)
            attempt += 1

    def _chunk_flow(self, chunk: List[_Prepared], options: Dict[str, Any], on_error: str,
                    deadline: Optional[float]) -> Generator[Any, Any, Dict[int, Outcome]]:
        """Send one chunk until every item has an outcome: retries, 413 splits, per-item failures."""
        outcomes: Dict[int, Outcome] = {}
        pending = list(chunk)
        key = uuid.uuid4().hex  # same key on every attempt of the same body, so the server can de-duplicate
        attempt = 0
        failures: Dict[int, TokenCreditError] = {}  # per-item errors of the last answer
        while pending:
            headers = dict(self._headers, **{"idempotency-key": key})
            body = self._body(pending, options)
            if deadline is not None:
                # What is left of the caller's budget, so the server answers (with per-item errors) in time.
                body["deadline_ms"] = max(1, int((deadline - time.monotonic()) * 1000))
            answer = yield Send("POST", "/v1/dense_rewards", body, headers)
            if isinstance(answer, Answer) and answer.status == 200:
                retry_items = self._collect(pending, answer.body, outcomes)
                if not retry_items:
                    return outcomes
                failures = {p.index: o for p, o in retry_items}
                err = next(iter(failures.values()))
                pending = [p for p, _ in retry_items]
                key = uuid.uuid4().hex  # a different body: a different request
            else:
                failures = {}
                err = answer if isinstance(answer, TokenCreditError) else error_from_response(
                    answer.status, answer.body, answer.headers, request_id=key)
            if isinstance(err, PayloadTooLargeError) and len(pending) > 1:
                half = len(pending) // 2
                for part in (pending[:half], pending[half:]):
                    outcomes.update((yield from self._chunk_flow(part, options, on_error, deadline)))
                return outcomes
            bad = self._bad_item(err, pending)
            if bad is not None and on_error != "raise":
                # One invalid item must not cost the others their rewards: drop it and resend the rest.
                outcomes[pending[bad].index] = err
                pending = pending[:bad] + pending[bad + 1:]
                key = uuid.uuid4().hex
                continue
            delay = self._retry_or_stop(err, attempt, deadline)
            if delay is None:
                for p in pending:
                    outcomes[p.index] = failures.get(p.index, err)
                return outcomes
            yield Sleep(delay)
            attempt += 1
        return outcomes

    @staticmethod
    def _bad_item(err: TokenCreditError, pending: List[_Prepared]) -> Optional[int]:
        if not isinstance(err, (InvalidRequestError, PayloadTooLargeError)) or not err.field or len(pending) < 2:
            return None
        if not err.field.startswith(_ITEM_FIELD_PREFIX):
            return None
        try:
            k = int(err.field[len(_ITEM_FIELD_PREFIX):].split("]", 1)[0])
        except ValueError:
            return None
        return k if 0 <= k < len(pending) else None

    def _collect(self, pending: List[_Prepared], body: Any, outcomes: Dict[int, Outcome]):
        """Check a 200 answer; fill outcomes; return the (item, error) pairs worth sending again."""
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(pending):
            got = len(results) if isinstance(results, list) else "no"
            err = ResponseInvariantError(f"sent {len(pending)} items but the server answered {got} results")
            for p in pending:
                outcomes[p.index] = err
            return []
        again = []
        for p, raw in zip(pending, results):
            error = raw.get("error") if isinstance(raw, dict) else None
            if error:
                failure = ItemFailedError(p.index, p.item.id or "", str(error.get("code")), str(error.get("message")),
                                          bool(error.get("retryable")))
                (again.append((p, failure)) if failure.retryable else outcomes.__setitem__(p.index, failure))
                continue
            outcomes[p.index] = self._check(p, raw)
        return again

    def _check(self, p: _Prepared, raw: Mapping[str, Any]) -> Outcome:
        """The contract: the item's id, one finite reward per policy token, Σ rewards = score."""
        where = f"items[{p.index}] (id {p.item.id!r})"
        rewards, score = raw.get("token_rewards"), raw.get("score")
        if raw.get("id") != p.item.id:
            return ResponseInvariantError(f"{where}: the answer is for id {raw.get('id')!r}; results are out of order")
        if not isinstance(rewards, list) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return ResponseInvariantError(f"{where}: the answer has no finite score or no token_rewards")
        expected = p.n_tokens if p.n_tokens is not None else len(raw.get("spans") or [])
        if len(rewards) != expected:
            return ResponseInvariantError(f"{where}: {len(rewards)} rewards for {expected} policy tokens")
        if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in rewards):
            return ResponseInvariantError(f"{where}: token_rewards contain NaN, inf or non-numbers")
        total = math.fsum(rewards)
        scale = max(abs(score), max((abs(r) for r in rewards), default=0.0))
        if abs(total - score) > self.atol + self.rtol * scale:
            return ResponseInvariantError(f"{where}: Σ token_rewards = {total!r} but score = {score!r}")
        attributions = self._check_attributions(where, raw.get("attributions"), score, len(rewards))
        if isinstance(attributions, ResponseInvariantError):
            return attributions
        steps = self._check_steps(where, raw.get("steps"), rewards)
        if isinstance(steps, ResponseInvariantError):
            return steps
        if p.policy is not None:
            rewards = p.policy.expand(rewards)
            attributions = {k: Attribution(p.policy.expand(a.values), a.base, a.exact) for k, a in attributions.items()}
        spans = [tuple(s) for s in (raw.get("spans") or [])]
        return DenseReward(id=p.item.id, score=float(score), token_rewards=[float(r) for r in rewards], spans=spans,
                           coverage=float(raw.get("coverage") if raw.get("coverage") is not None else 1.0),
                           attributions=attributions or None, steps=steps,
                           prompt_truncated=bool(raw.get("prompt_truncated")))

    def _check_steps(self, where: str, raw: Any, rewards: List[float]):
        """Steps, when returned: contiguous token ranges covering every reward, each step's reward their sum (so
        Σ steps = Σ rewards = score, checked above). Byte pieces that `PolicyTokens.expand` spreads never straddle a
        step: a piece without characters goes with the character before it."""
        if raw is None:
            return None
        steps, at = [], 0
        for k, s in enumerate(raw if isinstance(raw, list) else [None]):
            try:
                (a, b), (first, end), reward = s["span"], s["tokens"], float(s["reward"])
            except (TypeError, KeyError, ValueError):
                return ResponseInvariantError(f"{where}: steps[{k}] needs span, tokens and reward")
            if first != at or end < first or not math.isfinite(reward):
                return ResponseInvariantError(f"{where}: steps[{k}] does not continue at token {at}")
            part = rewards[first:end]
            if abs(math.fsum(part) - reward) > self.atol + self.rtol * max([abs(reward)] + [abs(r) for r in part]):
                return ResponseInvariantError(f"{where}: steps[{k}].reward = {reward!r} is not the sum of its tokens' rewards")
            steps.append(Step(span=(int(a), int(b)), tokens=(int(first), int(end)), reward=reward))
            at = end
        if at != len(rewards):
            return ResponseInvariantError(f"{where}: the steps cover {at} of {len(rewards)} tokens")
        return steps

    def _check_attributions(self, where: str, raw: Any, score: float, n: int):
        """Attributions, when returned: one finite value per reward and Σ values + base = score."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            return ResponseInvariantError(f"{where}: attributions is not an object")
        out = {}
        for name, a in raw.items():
            values, base = (a.get("values"), a.get("base")) if isinstance(a, dict) else (None, None)
            if (not isinstance(values, list) or len(values) != n or not isinstance(base, (int, float))
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or not math.isfinite(base)):
                return ResponseInvariantError(f"{where}: attributions.{name} needs {n} finite values and a finite base")
            total = math.fsum(values) + base
            scale = max(abs(score), abs(base), max((abs(v) for v in values), default=0.0))
            if abs(total - score) > self.atol + self.rtol * scale:
                return ResponseInvariantError(f"{where}: attributions.{name}: Σ values + base = {total!r} but score = {score!r}")
            out[name] = Attribution([float(v) for v in values], float(base), a.get("exact"))
        return out

    def _dense_rewards_flow(self, items: Sequence[Any], *, tokenizer=None, policy_tokenizer=None, weights=None,
                            methods=None, on_error=None, deadline_ms=None, shaping_version=None,
                            return_attributions=None, normalization=None, residual_placement=None,
                            aggregate=None, truncation=None):
        """`dense_rewards` (arguments: see `Client.dense_rewards`): the results, with the fallback when asked for.

        Under `on_error="fallback"`, the items that failed are sent again with the `sparse` weights (the plain
        score on the last token) and flagged `degraded`; when that fails too, the first dense error is raised.
        """
        shaping = dict(return_attributions=return_attributions, normalization=normalization,
                       residual_placement=residual_placement, aggregate=aggregate, truncation=truncation)
        kw = dict(tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, methods=methods, deadline_ms=deadline_ms,
                  shaping=shaping)
        results, failed, outcomes = yield from self._dense_flow(items, weights=weights, on_error=on_error,
                                                                shaping_version=shaping_version, **kw)
        if failed and (on_error or self.on_error) == "fallback":
            sub_items = [items[i] for i in failed]
            try:
                sub, _, _ = yield from self._dense_flow(sub_items, weights=SCALAR_WEIGHTS, on_error="raise", **kw)
            except TokenCreditError as exc:
                raise outcomes[failed[0]] from exc
            for i, r in zip(failed, sub):
                results[i] = self._as_degraded(r, _item_id(items[i], i))
        return results

    def _scores_flow(self, items: Sequence[Any], **kwargs):
        """`scores`: the RM score of each item (None for a failed item under `on_error="skip"`)."""
        results = yield from self._dense_rewards_flow(items, weights=SCALAR_WEIGHTS, **kwargs)
        return [None if r is None else r.score for r in results]

    def _health_flow(self):
        """`GET /readyz` once, without retries: the body when ready, else the typed error is raised."""
        return (yield from self._request_flow("GET", "/readyz"))

    def _dense_flow(self, items, *, tokenizer=None, policy_tokenizer=None, weights=None, methods=None,
                    on_error=None, deadline_ms=None, shaping_version=None, shaping=None):
        """Yields `Gather([flow, ...])` to run the chunks concurrently and gets back their outcomes; returns
        `(results, failed indices, outcomes)`."""
        on_error = on_error or self.on_error
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        deadline = None if deadline_ms is None else time.monotonic() + deadline_ms / 1000.0
        prepared, outcomes = self._prepare(items, tokenizer)
        if self._limits is None and prepared:
            yield from self._info_flow(deadline)
        limits = self._limits
        for p in prepared:
            if limits is not None and len(p.item.response) > limits.max_response_chars:
                # Named as the server names it: with messages, the response is the last message's content.
                where = (f"items[{p.index}].response" if p.item.messages is None
                         else f"items[{p.index}].messages[{len(p.item.messages) - 1}].content")
                outcomes[p.index] = PayloadTooLargeError(
                    413, "payload_too_large", f"{where}: {len(p.item.response)} characters exceed "
                    f"the server's limit of {limits.max_response_chars} (checked locally)", field=where)
        sendable = [p for p in prepared if p.index not in outcomes]
        options = self._request_options(weights, methods, policy_tokenizer, shaping_version, shaping)
        flows = [self._chunk_flow(c, options, on_error, deadline) for c in self._chunks(sendable, limits)]
        for part in (yield Gather(flows)):
            outcomes.update(part)
        return self._finish(items, outcomes, on_error)

    def _finish(self, items, outcomes: Dict[int, Outcome], on_error: str):
        results: List[Optional[DenseReward]] = []
        failed: List[int] = []
        for i in range(len(items)):
            o = outcomes.get(i) or ResponseInvariantError(f"items[{i}] got no answer")
            if isinstance(o, ResponseInvariantError) or (isinstance(o, TokenCreditError) and on_error == "raise"):
                raise o  # invariant breaks always raise: rewards that do not mean what they claim must not train
            results.append(o if isinstance(o, DenseReward) else None)
            if not isinstance(o, DenseReward):
                failed.append(i)
        return results, failed, outcomes

    @staticmethod
    def _as_degraded(result: DenseReward, original_id: str) -> DenseReward:
        result.degraded, result.id = True, original_id
        return result

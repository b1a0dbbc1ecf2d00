"""`Client` (sync, thread-safe) and `AsyncClient`: the send / sleep loop over httpx, nothing else.

All decisions (chunking, retries, splits, checks) live in `_base.BaseClient` as generators; the two classes only
perform what those generators ask for. The httpx client is created lazily, on first use, and again after a fork
(or, for `AsyncClient`, in a new event loop), so a `Client` built in a trainer's driver can be shipped to Ray
actors, forked data-loader workers or TRL's background reward loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence

import httpx

from tokencredit._base import Answer, BaseClient, Send, Sleep
from tokencredit.errors import ConnectError, RequestTimeout, TokenCreditError, error_from_response
from tokencredit.results import DenseReward
from tokencredit.types import InfoResponse

__all__ = ["Client", "AsyncClient"]

_SCALAR_WEIGHTS = {"sparse": 1.0}


def _answer(response: httpx.Response) -> Answer:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, body)


def _transport_error(action: Send, exc: Exception) -> TokenCreditError:
    cls = RequestTimeout if isinstance(exc, httpx.TimeoutException) else ConnectError
    err = cls(f"{action.method} {action.path}: {type(exc).__name__}: {exc or 'no answer'}")
    err.__cause__ = exc
    return err


def _item_id(raw: Any, index: int) -> str:
    value = raw.get("id") if isinstance(raw, Mapping) else getattr(raw, "id", None)
    return str(index) if value is None else str(value)


class Client(BaseClient):
    """Synchronous client; safe to share between threads (OpenRLHF calls reward functions from a thread pool).

    Args:
        base_url (`str`, defaults to `"http://127.0.0.1:8000"`): the TokenCredit service.
        api_key (`str`, *optional*): sent as `Authorization: Bearer ...`.
        timeout (`Timeouts | float | None`): per-phase timeouts; defaults to connect 10 s, read 180 s.
        retry (`Retry`): attempts and backoff; defaults to 5 attempts, full-jitter exponential backoff.
        max_in_flight (`int`, defaults to 8): concurrent requests when a call is split into chunks.
        on_error (`str`, defaults to `"raise"`): `"raise"` a typed error; `"skip"`: None for a failed item;
            `"fallback"`: the plain score on the last token, flagged `degraded`. Never a silent 0.
        weights (`dict`, *optional*): default shaping weights (else the server's current ones).
        limits (`Limits`, *optional*): request limits; read from `GET /v1/info` on first use when omitted.
        rtol, atol (`float`): tolerance of the Σ rewards = score check.

    Example:
        >>> from tokencredit import Client
        >>> with Client("http://127.0.0.1:8000") as tc:  # doctest: +SKIP
        ...     [r] = tc.dense_rewards([{"prompt": "Hi.", "response": "Hello there!"}])
        ...     r.score, r.token_rewards
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", **kwargs):
        super().__init__(base_url, **kwargs)
        self._lock = threading.Lock()
        self._http: Optional[httpx.Client] = None
        self._pid: Optional[int] = None
        self._closed = False

    def __getstate__(self) -> dict:
        # Picklable for Ray actors and multiprocessing: the pool and the lock are per process, made again lazily.
        state = self.__dict__.copy()
        state.update(_lock=None, _http=None, _pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _http_client(self) -> httpx.Client:
        with self._lock:
            if self._closed:
                raise RuntimeError("this Client is closed; create a new one")
            if self._http is None or self._pid != os.getpid():
                # After a fork the parent's sockets must not be shared: open a fresh pool in the child.
                self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout.as_httpx(),
                                          limits=httpx.Limits(max_connections=max(16, self.max_in_flight)))
                self._pid = os.getpid()
            return self._http

    def _send(self, action: Send):
        try:
            response = self._http_client().request(action.method, action.path, json=action.body, headers=action.headers)
        except httpx.TransportError as exc:
            return _transport_error(action, exc)
        return _answer(response)

    def _drive(self, flow):
        answer = None
        try:
            action = next(flow)
            while True:
                if isinstance(action, Send):
                    answer = self._send(action)
                elif isinstance(action, Sleep):
                    time.sleep(action.seconds)
                    answer = None
                else:  # ("chunks", flows): run them concurrently, answers in order
                    flows = action[1]
                    if len(flows) <= 1 or self.max_in_flight == 1:
                        answer = [self._drive(f) for f in flows]
                    else:
                        with ThreadPoolExecutor(min(self.max_in_flight, len(flows)), "tokencredit") as pool:
                            answer = list(pool.map(self._drive, flows))
                action = flow.send(answer)
        except StopIteration as stop:
            return stop.value

    # ------------------------------------------------------------------------------------------------ verbs
    def dense_rewards(self, items: Sequence[Any], *, tokenizer: Any = None, policy_tokenizer: Optional[str] = None,
                      weights: Optional[Mapping[str, float]] = None, methods: Optional[Dict[str, Any]] = None,
                      on_error: Optional[str] = None, deadline_ms: Optional[int] = None,
                      shaping_version: Optional[int] = None, return_attributions: Optional[bool] = None,
                      normalization: Optional[str] = None, residual_placement: Optional[str] = None) -> List[Optional[DenseReward]]:
        """Dense rewards for each item, in order.

        Args:
            items: dicts (or `DenseRewardItem`s, or `(prompt, response)` pairs) with `prompt`, `response` and
                optionally `id`, `response_token_offsets` or `response_token_ids`.
            tokenizer: The policy tokenizer; with it, `response_token_ids` are turned into offsets here (and
                `response` may be omitted: it is decoded), so the server needs no copy of the tokenizer.
            policy_tokenizer: Instead, a tokenizer directory *on the server* to decode `response_token_ids` there.
            weights: Shaping weights for this call (e.g. `{"sparse": 0.2, "shap": 0.8}`).
            methods: Per-explainer budgets, e.g. `{"shap": {"max_rows": 256, "seed": 0}}`.
            on_error: Overrides the client's `on_error` for this call.
            deadline_ms: Total time budget: no retry starts after it; also sent to the server.
            shaping_version: Use this stored version of the server's weights (admin API; e.g. the
                `TOKENCREDIT_SHAPING_VERSION` a BO trial runs under) instead of the current one.
            return_attributions: Also return each explained component's attributions (`DenseReward.attributions`:
                per-token values and the base, Σ values + base = score), on the same tokens as the rewards.
            normalization: "additive" (the server's default: each token keeps its own attribution, the base goes
                to the residual placement) or "sign-aware-l1" (the earlier scheme, for comparison only).
            residual_placement: "last" (default) or "uniform": where each component's base goes.

        Returns:
            One `DenseReward` per item (None for a failed item under `on_error="skip"`).

        Raises:
            RewardServiceError, TransportError, ItemFailedError: under `on_error="raise"`.
            ResponseInvariantError: always, when the answer breaks the contract.
        """
        shaping = dict(return_attributions=return_attributions, normalization=normalization,
                       residual_placement=residual_placement)
        kw = dict(tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, methods=methods, deadline_ms=deadline_ms,
                  shaping=shaping)
        results, failed, outcomes = self._drive(self._dense_flow(items, weights=weights, on_error=on_error,
                                                                      shaping_version=shaping_version, **kw))
        if failed and (on_error or self.on_error) == "fallback":
            sub_items = [items[i] for i in failed]
            try:
                sub, _, _ = self._drive(self._dense_flow(sub_items, weights=_SCALAR_WEIGHTS, on_error="raise", **kw))
            except TokenCreditError as exc:
                raise outcomes[failed[0]] from exc
            for i, r in zip(failed, sub):
                results[i] = self._as_degraded(r, _item_id(items[i], i))
        return results

    def scores(self, items: Sequence[Any], **kwargs) -> List[Optional[float]]:
        """The RM score of each item (one forward pass each: the `sparse` weights explain nothing)."""
        return [None if r is None else r.score for r in self.dense_rewards(items, weights=_SCALAR_WEIGHTS, **kwargs)]

    def info(self) -> InfoResponse:
        """`GET /v1/info`: model, limits, components, current weights (retried while the model loads)."""
        return self._drive(self._info_flow())

    def health(self) -> Dict[str, Any]:
        """`GET /readyz` once, without retries: the body when ready, else the typed error is raised."""
        answer = self._send(Send("GET", "/readyz", headers=dict(self._headers)))
        if isinstance(answer, TokenCreditError):
            raise answer
        if answer.status != 200:
            raise error_from_response(answer.status, answer.body, answer.headers)
        return answer.body

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(BaseClient):
    """Asynchronous client with the same arguments and verbs as `Client` (awaited).

    One pooled httpx client per event loop, created on first use in that loop: TRL runs async reward functions on
    its own background loop, and verl / OpenRLHF workers are Ray actors with loops of their own.

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with AsyncClient("http://127.0.0.1:8000") as tc:
        ...         return await tc.dense_rewards([("Hi.", "Hello there!")])
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", **kwargs):
        super().__init__(base_url, **kwargs)
        self._clients: Dict[int, tuple] = {}  # id(loop) -> (loop, httpx.AsyncClient)
        self._closed = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_clients"] = {}  # pools belong to event loops of this process
        return state

    def _http_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed; create a new one")
        loop = asyncio.get_running_loop()
        loop_and_client = self._clients.get(id(loop))
        # Compare the loop itself: a new loop may reuse a dead one's id, and its pool must not be reused.
        if loop_and_client is None or loop_and_client[0] is not loop or loop_and_client[1].is_closed:
            client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout.as_httpx(),
                                       limits=httpx.Limits(max_connections=max(16, self.max_in_flight)))
            self._clients = {k: v for k, v in self._clients.items() if not v[0].is_closed()}
            self._clients[id(loop)] = (loop, client)
            return client
        return loop_and_client[1]

    async def _send(self, action: Send):
        try:
            response = await self._http_client().request(action.method, action.path, json=action.body, headers=action.headers)
        except httpx.TransportError as exc:
            return _transport_error(action, exc)
        return _answer(response)

    async def _drive(self, flow, semaphore: Optional[asyncio.Semaphore] = None):
        answer = None
        try:
            action = next(flow)
            while True:
                if isinstance(action, Send):
                    if semaphore is None:
                        answer = await self._send(action)
                    else:
                        async with semaphore:
                            answer = await self._send(action)
                elif isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                    answer = None
                else:
                    sem = asyncio.Semaphore(self.max_in_flight)
                    answer = list(await asyncio.gather(*(self._drive(f, sem) for f in action[1])))
                action = flow.send(answer)
        except StopIteration as stop:
            return stop.value

    async def dense_rewards(self, items: Sequence[Any], *, tokenizer: Any = None, policy_tokenizer: Optional[str] = None,
                            weights: Optional[Mapping[str, float]] = None, methods: Optional[Dict[str, Any]] = None,
                            on_error: Optional[str] = None, deadline_ms: Optional[int] = None,
                            shaping_version: Optional[int] = None, return_attributions: Optional[bool] = None,
                            normalization: Optional[str] = None, residual_placement: Optional[str] = None) -> List[Optional[DenseReward]]:
        """See `Client.dense_rewards`."""
        shaping = dict(return_attributions=return_attributions, normalization=normalization,
                       residual_placement=residual_placement)
        kw = dict(tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, methods=methods, deadline_ms=deadline_ms,
                  shaping=shaping)
        results, failed, outcomes = await self._drive(self._dense_flow(items, weights=weights, on_error=on_error,
                                                                      shaping_version=shaping_version, **kw))
        if failed and (on_error or self.on_error) == "fallback":
            sub_items = [items[i] for i in failed]
            try:
                sub, _, _ = await self._drive(self._dense_flow(sub_items, weights=_SCALAR_WEIGHTS, on_error="raise", **kw))
            except TokenCreditError as exc:
                raise outcomes[failed[0]] from exc
            for i, r in zip(failed, sub):
                results[i] = self._as_degraded(r, _item_id(items[i], i))
        return results

    async def scores(self, items: Sequence[Any], **kwargs) -> List[Optional[float]]:
        """See `Client.scores`."""
        results = await self.dense_rewards(items, weights=_SCALAR_WEIGHTS, **kwargs)
        return [None if r is None else r.score for r in results]

    async def info(self) -> InfoResponse:
        return await self._drive(self._info_flow())

    async def health(self) -> Dict[str, Any]:
        answer = await self._send(Send("GET", "/readyz", headers=dict(self._headers)))
        if isinstance(answer, TokenCreditError):
            raise answer
        if answer.status != 200:
            raise error_from_response(answer.status, answer.body, answer.headers)
        return answer.body

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = [c for _, c in self._clients.values()], {}
        for client in clients:
            try:
                await client.aclose()
            except RuntimeError:  # created in a loop that is gone; its sockets went with it
                pass

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

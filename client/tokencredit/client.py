"""The faces of the sans-I/O core: drivers that perform what `_base` flows ask for over httpx, and `Client`/`AsyncClient`.

All decisions (chunking, retries, splits, fallback, checks) live in `_base` as generators; `SyncDriver` and
`AsyncDriver` only perform what those generators ask for (`Send`, `Sleep`, `Gather`), and every client (`Client`,
`AsyncClient`, `tokencredit.admin.AdminClient`, `AsyncAdminClient`) is a driver on top of a core. The httpx client is
created lazily, on first use, and again after a fork (or, for the async driver, in a new event loop), so a client
built in a trainer's driver can be shipped to Ray actors, forked data-loader workers or TRL's background reward loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence

import httpx

from tokencredit._base import Answer, BaseClient, Gather, Send, Sleep
from tokencredit.errors import ConnectError, RequestTimeout, TokenCreditError
from tokencredit.results import DenseReward
from tokencredit.types import InfoResponse

__all__ = ["Client", "AsyncClient", "SyncDriver", "AsyncDriver"]


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


class SyncDriver:
    """Runs a core's flows with blocking calls: one pooled `httpx.Client` per process, shared by threads.

    Mixed in before a core (`class Client(SyncDriver, BaseClient)`), whose `base_url`, `timeout`,
    `max_in_flight` and `_transport` it reads.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
                raise RuntimeError(f"this {type(self).__name__} is closed; create a new one")
            if self._http is None or self._pid != os.getpid():
                # After a fork the parent's sockets must not be shared: open a fresh pool in the child.
                self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout.as_httpx(),
                                          limits=httpx.Limits(max_connections=max(16, self.max_in_flight)),
                                          transport=self._transport)
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
                elif isinstance(action, Gather):  # run them concurrently, answers in order
                    flows = action.flows
                    if len(flows) <= 1 or self.max_in_flight == 1:
                        answer = [self._drive(f) for f in flows]
                    else:
                        with ThreadPoolExecutor(min(self.max_in_flight, len(flows)), "tokencredit") as pool:
                            answer = list(pool.map(self._drive, flows))
                else:
                    raise TypeError(f"a flow yielded {action!r}, not Send, Sleep or Gather")
                action = flow.send(answer)
        except StopIteration as stop:
            return stop.value

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncDriver:
    """Runs a core's flows with awaits: one pooled `httpx.AsyncClient` per event loop, created on first use in it.

    TRL runs async reward functions on its own background loop, and verl / OpenRLHF workers are Ray actors with
    loops of their own. Mixed in before a core, like `SyncDriver`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients: Dict[int, tuple] = {}  # id(loop) -> (loop, httpx.AsyncClient)
        self._closed = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_clients"] = {}  # pools belong to event loops of this process
        return state

    def _http_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; create a new one")
        loop = asyncio.get_running_loop()
        loop_and_client = self._clients.get(id(loop))
        # Compare the loop itself: a new loop may reuse a dead one's id, and its pool must not be reused.
        if loop_and_client is None or loop_and_client[0] is not loop or loop_and_client[1].is_closed:
            client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout.as_httpx(),
                                       limits=httpx.Limits(max_connections=max(16, self.max_in_flight)),
                                       transport=self._transport)
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
                elif isinstance(action, Gather):
                    sem = asyncio.Semaphore(self.max_in_flight)
                    answer = list(await asyncio.gather(*(self._drive(f, sem) for f in action.flows)))
                else:
                    raise TypeError(f"a flow yielded {action!r}, not Send, Sleep or Gather")
                action = flow.send(answer)
        except StopIteration as stop:
            return stop.value

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = [c for _, c in self._clients.values()], {}
        for client in clients:
            try:
                await client.aclose()
            except RuntimeError:  # created in a loop that is gone; its sockets went with it
                pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Client(SyncDriver, BaseClient):
    """Synchronous client; safe to share between threads (OpenRLHF calls reward functions from a thread pool).

    Args:
        base_url (`str`, defaults to `"http://127.0.0.1:8000"`): the TokenCredit service.
        api_key (`str`, *optional*): sent as `Authorization: Bearer ...`; defaults to `$TOKENCREDIT_API_TOKEN`
            (the server's data-plane token, when it sets one).
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

    # ------------------------------------------------------------------------------------------------ verbs
    def dense_rewards(self, items: Sequence[Any], *, tokenizer: Any = None, policy_tokenizer: Optional[str] = None,
                      weights: Optional[Mapping[str, float]] = None, methods: Optional[Dict[str, Any]] = None,
                      on_error: Optional[str] = None, deadline_ms: Optional[int] = None,
                      shaping_version: Optional[int] = None, return_attributions: Optional[bool] = None,
                      normalization: Optional[str] = None, residual_placement: Optional[str] = None,
                      aggregate: Optional[Dict[str, Any]] = None, truncation: Optional[str] = None) -> List[Optional[DenseReward]]:
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
            aggregate: Also return per-step rewards, e.g. `{"steps": {"separator": "\n\n"}}` or
                `{"steps": {"regex": "(?m)^Step \\d+:"}}` (`DenseReward.steps`: span, token range, Σ of its rewards).
            truncation: "left_prompt" (the server's default: a too-long prompt is cut from the left and flagged
                `prompt_truncated`) or "error" (413 instead).

        Returns:
            One `DenseReward` per item (None for a failed item under `on_error="skip"`).

        Raises:
            RewardServiceError, TransportError, ItemFailedError: under `on_error="raise"`.
            ResponseInvariantError: always, when the answer breaks the contract.
        """
        return self._drive(self._dense_rewards_flow(
            items, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, weights=weights, methods=methods,
            on_error=on_error, deadline_ms=deadline_ms, shaping_version=shaping_version,
            return_attributions=return_attributions, normalization=normalization, residual_placement=residual_placement,
            aggregate=aggregate, truncation=truncation))

    def scores(self, items: Sequence[Any], **kwargs) -> List[Optional[float]]:
        """The RM score of each item (one forward pass each: the `sparse` weights explain nothing)."""
        return self._drive(self._scores_flow(items, **kwargs))

    def info(self) -> InfoResponse:
        """`GET /v1/info`: model, limits, components, current weights (retried while the model loads)."""
        return self._drive(self._info_flow())

    def health(self) -> Dict[str, Any]:
        """`GET /readyz` once, without retries: the body when ready, else the typed error is raised."""
        return self._drive(self._health_flow())


class AsyncClient(AsyncDriver, BaseClient):
    """Asynchronous client with the same arguments and verbs as `Client` (awaited).

    One pooled httpx client per event loop, created on first use in that loop: TRL runs async reward functions on
    its own background loop, and verl / OpenRLHF workers are Ray actors with loops of their own.

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with AsyncClient("http://127.0.0.1:8000") as tc:
        ...         return await tc.dense_rewards([("Hi.", "Hello there!")])
    """

    async def dense_rewards(self, items: Sequence[Any], *, tokenizer: Any = None, policy_tokenizer: Optional[str] = None,
                            weights: Optional[Mapping[str, float]] = None, methods: Optional[Dict[str, Any]] = None,
                            on_error: Optional[str] = None, deadline_ms: Optional[int] = None,
                            shaping_version: Optional[int] = None, return_attributions: Optional[bool] = None,
                            normalization: Optional[str] = None, residual_placement: Optional[str] = None,
                            aggregate: Optional[Dict[str, Any]] = None, truncation: Optional[str] = None) -> List[Optional[DenseReward]]:
        """See `Client.dense_rewards`."""
        return await self._drive(self._dense_rewards_flow(
            items, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer, weights=weights, methods=methods,
            on_error=on_error, deadline_ms=deadline_ms, shaping_version=shaping_version,
            return_attributions=return_attributions, normalization=normalization, residual_placement=residual_placement,
            aggregate=aggregate, truncation=truncation))

    async def scores(self, items: Sequence[Any], **kwargs) -> List[Optional[float]]:
        """See `Client.scores`."""
        return await self._drive(self._scores_flow(items, **kwargs))

    async def info(self) -> InfoResponse:
        """See `Client.info`."""
        return await self._drive(self._info_flow())

    async def health(self) -> Dict[str, Any]:
        """See `Client.health`."""
        return await self._drive(self._health_flow())

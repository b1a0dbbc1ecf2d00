"""`AdminClient` / `AsyncAdminClient`: the server's versioned shaping weights (`/admin/v1/shaping`).

Writes are optimistic concurrency: `PUT` carries `If-Match: "v<version>"` of the version it replaces, and the
server's compare-and-set lets exactly one of two writers with the same ETag win (the other gets 412).
`update_shaping` is the safe read-modify-write loop on top: GET, PUT with its ETag, and on 412 read again and
retry, so concurrent tuners (two `tokencredit bo run`, or a human) never overwrite each other silently: every
update becomes its own version.

Both clients are faces of one sans-I/O core (`AdminCore`, on `tokencredit._base.HTTPCore`): the same transport,
typed errors and timeouts as `Client`. The wire types (`ShapingVersion`, ...) are `tokencredit.types`', shared
with the server.

The bearer token (default: `TOKENCREDIT_ADMIN_TOKEN`) goes into the `Authorization` header only; it is never in
a message, a `repr` or a log line.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Mapping, Optional, Union
from urllib.parse import quote

from tokencredit._base import HTTPCore, Sleep
from tokencredit._config import Timeouts
from tokencredit.client import AsyncDriver, SyncDriver
from tokencredit.errors import PreconditionFailedError
from tokencredit.types import ShapingVersion, ShapingWeights, etag

__all__ = ["AdminClient", "AsyncAdminClient", "AdminCore", "ShapingVersion", "TOKEN_ENV", "etag"]

TOKEN_ENV = "TOKENCREDIT_ADMIN_TOKEN"
Weights = Union[ShapingWeights, Mapping[str, float]]


def _weights_body(weights: Weights) -> Dict[str, float]:
    if isinstance(weights, ShapingWeights):
        return weights.as_dict()
    return {str(k): float(v) for k, v in weights.items()}


class AdminCore(HTTPCore):
    """The admin API's requests and the `update_shaping` loop as flows (no I/O); see `AdminClient` for the arguments."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: Optional[str] = None, *,
                 timeout: Union[Timeouts, float, None] = 10.0, max_attempts: int = 20, transport: Any = None):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        super().__init__(base_url, api_key=token, timeout=timeout, transport=transport)
        self.max_attempts = max_attempts
        #: How many 412s `update_shaping` has absorbed (a measure of contention; tests read it).
        self.stale_retries = 0

    def _get_shaping_flow(self):
        return ShapingVersion.model_validate((yield from self._request_flow("GET", "/admin/v1/shaping")))

    def _put_shaping_flow(self, weights: Weights, if_match: Union[int, str, None], updated_by: Optional[str]):
        headers = {}
        if if_match is not None:
            headers["if-match"] = etag(if_match) if isinstance(if_match, int) else str(if_match)
        body = {"weights": _weights_body(weights), "updated_by": updated_by}
        return ShapingVersion.model_validate((yield from self._request_flow("PUT", "/admin/v1/shaping", body, headers)))

    def _history_flow(self):
        body = yield from self._request_flow("GET", "/admin/v1/shaping/history")
        return [ShapingVersion.model_validate(v) for v in body["versions"]]

    def _put_bo_study_flow(self, name: str, report: Mapping[str, Any]):
        return (yield from self._request_flow("PUT", f"/admin/v1/bo/studies/{quote(name, safe='')}", dict(report)))

    def _update_shaping_flow(self, weights: Weights, updated_by: Optional[str]):
        body = ShapingWeights(**_weights_body(weights))  # fail before I/O on weights off the simplex
        last: Optional[PreconditionFailedError] = None
        for attempt in range(self.max_attempts):
            if attempt:
                # Racing writers spread out instead of colliding again in lockstep.
                yield Sleep(random.uniform(0.0, min(0.5, 0.01 * 2**attempt)))
            current = yield from self._get_shaping_flow()
            try:
                return (yield from self._put_shaping_flow(body, current.version, updated_by))
            except PreconditionFailedError as exc:
                last = exc
                self.stale_retries += 1
        assert last is not None
        raise last


class AdminClient(SyncDriver, AdminCore):
    """Synchronous client of the admin API; safe to share between threads, and across a fork.

    Args:
        base_url (`str`): the TokenCredit service, e.g. `http://127.0.0.1:8000`.
        token (`str`, *optional*): the admin bearer token; defaults to `$TOKENCREDIT_ADMIN_TOKEN`. Without one,
            requests go out unauthenticated and the server answers 401 (`AuthError`).
        timeout (`Timeouts | float`, defaults to 10): per-phase timeouts (a number sets every phase).
        max_attempts (`int`, defaults to 20): `update_shaping`'s bound on GET→PUT rounds lost to other writers.
        transport (`httpx.BaseTransport`, *optional*): for tests or custom networking.

    Raises (from every call):
        `AuthError` (401/403), `PreconditionFailedError` (412), `PreconditionRequiredError` (428),
        `InvalidRequestError` (422: weights off the simplex, or giving a component the server's RM cannot
        compute), other `RewardServiceError`s,
        `ConnectError` / `RequestTimeout` when no answer came.

    Example:
        >>> with AdminClient("http://127.0.0.1:8000") as admin:  # doctest: +SKIP
        ...     admin.update_shaping({"sparse": 0.2, "shap": 0.8}, updated_by="me").version
    """

    def get_shaping(self) -> ShapingVersion:
        """The current version (its `etag` is what a PUT must send as `If-Match`)."""
        return self._drive(self._get_shaping_flow())

    def put_shaping(self, weights: Weights, *, if_match: Union[int, str, None],
                    updated_by: Optional[str] = None) -> ShapingVersion:
        """Write `weights` as a new version if `if_match` (a version number or an ETag) is still current.

        `if_match=None` sends no `If-Match` (the server answers 428); a stale one raises
        `PreconditionFailedError` with `current_version` set. The weights are validated by the server (422).
        """
        return self._drive(self._put_shaping_flow(weights, if_match, updated_by))

    def history(self) -> List[ShapingVersion]:
        """Every version, oldest first."""
        return self._drive(self._history_flow())

    def put_bo_study(self, name: str, report: Mapping[str, Any]) -> Dict[str, Any]:
        """Show a BO study on the server's web page (`/ui#bo`): `report` is the whole study as
        `tokencredit.bo.report.study_report` builds it; it replaces what the server showed of study `name`."""
        return self._drive(self._put_bo_study_flow(name, report))

    def update_shaping(self, weights: Weights, updated_by: Optional[str] = None) -> ShapingVersion:
        """Make `weights` the current weights as a new version, whatever other writers do meanwhile.

        GET the current ETag, PUT with it; a 412 means another writer got in between, so read again and retry
        (with a short jittered pause, so that racing writers spread out), at most `max_attempts` rounds.
        The weights are checked on the simplex before any I/O (a pydantic `ValidationError`).

        Returns:
            The version record this call created (never another writer's).
        """
        return self._drive(self._update_shaping_flow(weights, updated_by))


class AsyncAdminClient(AsyncDriver, AdminCore):
    """`AdminClient` with awaited verbs (same arguments; `transport` is an `httpx.AsyncBaseTransport`)."""

    async def get_shaping(self) -> ShapingVersion:
        """See `AdminClient.get_shaping`."""
        return await self._drive(self._get_shaping_flow())

    async def put_shaping(self, weights: Weights, *, if_match: Union[int, str, None],
                          updated_by: Optional[str] = None) -> ShapingVersion:
        """See `AdminClient.put_shaping`."""
        return await self._drive(self._put_shaping_flow(weights, if_match, updated_by))

    async def history(self) -> List[ShapingVersion]:
        """See `AdminClient.history`."""
        return await self._drive(self._history_flow())

    async def put_bo_study(self, name: str, report: Mapping[str, Any]) -> Dict[str, Any]:
        """See `AdminClient.put_bo_study`."""
        return await self._drive(self._put_bo_study_flow(name, report))

    async def update_shaping(self, weights: Weights, updated_by: Optional[str] = None) -> ShapingVersion:
        """See `AdminClient.update_shaping`."""
        return await self._drive(self._update_shaping_flow(weights, updated_by))

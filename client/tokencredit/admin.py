"""`AdminClient`: the server's versioned shaping weights (`/admin/v1/shaping`), synchronously.

Writes are optimistic concurrency: `PUT` carries `If-Match: "v<version>"` of the version it replaces, and the
server's compare-and-set lets exactly one of two writers with the same ETag win (the other gets 412).
`update_shaping` is the safe read-modify-write loop on top: GET, PUT with its ETag, and on 412 read again and
retry, so concurrent tuners (two `tokencredit bo run`, or a human) never overwrite each other silently: every
update becomes its own version.

The bearer token (default: `TOKENCREDIT_ADMIN_TOKEN`) goes into the `Authorization` header only; it is never in
a message, a `repr` or a log line.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import httpx

from tokencredit._base import Send
from tokencredit.client import _answer, _transport_error
from tokencredit.errors import PreconditionFailedError, error_from_response
from tokencredit.types import ShapingWeights

__all__ = ["AdminClient", "ShapingVersion", "TOKEN_ENV"]

TOKEN_ENV = "TOKENCREDIT_ADMIN_TOKEN"
Weights = Union[ShapingWeights, Mapping[str, float]]


@dataclass(frozen=True)
class ShapingVersion:
    """One version of the server's shaping weights (what `GET /admin/v1/shaping` answers)."""

    version: int
    weights: Dict[str, float]
    updated_at: str
    updated_by: Optional[str] = None
    # The server's deployment, `[name/]rm@revision`: versions are numbered per deployment (None from older servers).
    deployment: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def etag(self) -> str:
        return etag(self.version)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "ShapingVersion":
        known = {"version", "weights", "updated_at", "updated_by", "deployment"}
        return cls(
            version=int(body["version"]),
            weights={k: float(v) for k, v in body["weights"].items()},
            updated_at=str(body["updated_at"]),
            updated_by=body.get("updated_by"),
            deployment=body.get("deployment"),
            extra={k: v for k, v in body.items() if k not in known},
        )


def etag(version: int) -> str:
    """The server's ETag for a version: `"v3"`."""
    return f'"v{int(version)}"'


def _weights_body(weights: Weights) -> Dict[str, float]:
    if isinstance(weights, ShapingWeights):
        return weights.as_dict()
    return {str(k): float(v) for k, v in weights.items()}


class AdminClient:
    """Synchronous client of the admin API; safe to share between threads (httpx.Client is).

    Args:
        base_url (`str`): the TokenCredit service, e.g. `http://127.0.0.1:8000`.
        token (`str`, *optional*): the admin bearer token; defaults to `$TOKENCREDIT_ADMIN_TOKEN`. Without one,
            requests go out unauthenticated and the server answers 401 (`AuthError`).
        timeout (`float`, defaults to 10): seconds per request.
        max_attempts (`int`, defaults to 20): `update_shaping`'s bound on GET→PUT rounds lost to other writers.

    Raises (from every call):
        `AuthError` (401/403), `PreconditionFailedError` (412), `PreconditionRequiredError` (428),
        `InvalidRequestError` (422: weights off the simplex, or giving a component the server's RM cannot
        compute), other `RewardServiceError`s,
        `ConnectError` / `RequestTimeout` when no answer came.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: Optional[str] = None, *,
                 timeout: float = 10.0, max_attempts: int = 20, transport: Optional[httpx.BaseTransport] = None):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        #: How many 412s `update_shaping` has absorbed (a measure of contention; tests read it).
        self.stale_retries = 0
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __repr__(self) -> str:  # never the token
        return f"AdminClient({self.base_url!r})"

    # ------------------------------------------------------------------------------------------------ verbs
    def get_shaping(self) -> ShapingVersion:
        """The current version (its `etag` is what a PUT must send as `If-Match`)."""
        return ShapingVersion.from_json(self._request("GET", "/admin/v1/shaping"))

    def put_shaping(self, weights: Weights, *, if_match: Union[int, str, None],
                    updated_by: Optional[str] = None) -> ShapingVersion:
        """Write `weights` as a new version if `if_match` (a version number or an ETag) is still current.

        `if_match=None` sends no `If-Match` (the server answers 428); a stale one raises
        `PreconditionFailedError` with `current_version` set. The weights are validated by the server (422).
        """
        headers = {}
        if if_match is not None:
            headers["If-Match"] = etag(if_match) if isinstance(if_match, int) else str(if_match)
        body = {"weights": _weights_body(weights), "updated_by": updated_by}
        return ShapingVersion.from_json(self._request("PUT", "/admin/v1/shaping", json=body, headers=headers))

    def history(self) -> List[ShapingVersion]:
        """Every version, oldest first."""
        return [ShapingVersion.from_json(v) for v in self._request("GET", "/admin/v1/shaping/history")["versions"]]

    def put_bo_study(self, name: str, report: Mapping[str, Any]) -> Dict[str, Any]:
        """Show a BO study on the server's web page (`/ui#bo`): `report` is the whole study as
        `tokencredit.bo.report.study_report` builds it; it replaces what the server showed of study `name`."""
        from urllib.parse import quote

        return self._request("PUT", f"/admin/v1/bo/studies/{quote(name, safe='')}", json=dict(report))

    def update_shaping(self, weights: Weights, updated_by: Optional[str] = None) -> ShapingVersion:
        """Make `weights` the current weights as a new version, whatever other writers do meanwhile.

        GET the current ETag, PUT with it; a 412 means another writer got in between, so read again and retry
        (with a short jittered pause, so that racing writers spread out), at most `max_attempts` rounds.
        The weights are checked on the simplex before any I/O (a pydantic `ValidationError`).

        Returns:
            The version record this call created (never another writer's).
        """
        body = ShapingWeights(**_weights_body(weights))  # fail before I/O on weights off the simplex
        last: Optional[PreconditionFailedError] = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(random.uniform(0.0, min(0.5, 0.01 * 2**attempt)))
            current = self.get_shaping()
            try:
                return self.put_shaping(body, if_match=current.version, updated_by=updated_by)
            except PreconditionFailedError as exc:
                last = exc
                self.stale_retries += 1
        assert last is not None
        raise last

    # ------------------------------------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:  # timeouts included
            raise _transport_error(Send(method, path), exc) from exc
        answer = _answer(response)
        if answer.status >= 400:
            raise error_from_response(answer.status, answer.body, answer.headers)
        return answer.body

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

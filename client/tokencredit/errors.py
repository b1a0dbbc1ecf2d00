"""Exceptions raised by the TokenCredit SDK.

One base class, two branches, so that `except TokenCreditError` catches every service failure and nothing else::

    TokenCreditError
    ├── TransportError              the request never got an HTTP answer
    │   ├── ConnectError            refused / reset / dropped connection
    │   └── RequestTimeout          connect, read, write or pool timeout
    ├── RewardServiceError          the server answered with an error status (status, code, field, retryable, ...)
    │   ├── InvalidRequestError     400 / 422: fix the request, never retried
    │   ├── AuthError               401 / 403: missing or wrong bearer token (admin or data plane), or the admin API is disabled
    │   ├── PreconditionFailedError 412: stale If-Match (another writer won); `current_version` from the ETag
    │   ├── PreconditionRequiredError 428: a write without If-Match
    │   ├── PayloadTooLargeError    413: split (the SDK does this itself) or shorten the item
    │   ├── RateLimitedError        429: retried after `retry_after`
    │   ├── ServiceUnavailableError 503: retried after `retry_after` (model loading, restarting)
    │   └── ServerError             other 5xx (and 408): retried
    ├── ItemFailedError             the request succeeded but one item carries an error
    └── ResponseInvariantError      the answer breaks the contract (length, Σ rewards ≠ score, NaN)

Bugs in the caller's code (bad argument types, a closed client) raise ordinary `ValueError`/`RuntimeError`, so
`except TokenCreditError` never hides them.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, Mapping, Optional

from tokencredit.types import version_of_etag

__all__ = [
    "TokenCreditError",
    "TransportError",
    "ConnectError",
    "RequestTimeout",
    "RewardServiceError",
    "InvalidRequestError",
    "PayloadTooLargeError",
    "AuthError",
    "PreconditionFailedError",
    "PreconditionRequiredError",
    "RateLimitedError",
    "ServiceUnavailableError",
    "ServerError",
    "ItemFailedError",
    "ResponseInvariantError",
    "error_from_response",
    "parse_retry_after",
]


class TokenCreditError(Exception):
    """Base of every error the SDK raises for a failed reward request."""

    #: Whether sending the same request again may succeed.
    retryable: bool = False


class TransportError(TokenCreditError):
    """No HTTP answer was received (the cause is chained as `__cause__`)."""

    retryable = True


class ConnectError(TransportError):
    """The connection was refused, reset or dropped before an answer arrived."""


class RequestTimeout(TransportError):
    """A connect, read, write or pool timeout expired."""


class RewardServiceError(TokenCreditError):
    """The server answered with an error status and a `{"error": {...}}` body.

    Attributes:
        status (`int`): HTTP status code.
        code (`str`): the server's machine-readable code (`invalid_request`, `payload_too_large`, ...).
        message (`str`): the server's message (it names the offending field and the limit or rule).
        field (`str`, *optional*): the offending request field, e.g. `items[2].response`.
        retryable (`bool`): whether the same request may succeed later.
        retry_after (`float`, *optional*): seconds to wait, from the `Retry-After` header.
        request_id (`str`, *optional*): the `Idempotency-Key` the SDK sent, to find the request in server logs.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: Optional[str] = None,
        retryable: bool = False,
        retry_after: Optional[float] = None,
        request_id: Optional[str] = None,
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retryable = retryable
        self.retry_after = retry_after
        self.request_id = request_id


class InvalidRequestError(RewardServiceError):
    """400 or 422: the request is wrong; sending it again cannot help."""


class AuthError(RewardServiceError):
    """401 (missing or wrong bearer token) or 403 (the admin API is disabled on the server); never retried."""


class PreconditionFailedError(RewardServiceError):
    """412: the `If-Match` ETag is stale (another writer won the compare-and-set) or malformed.

    Attributes:
        current_version (`int`, *optional*): the server's current version, from the answer's `ETag`.
    """

    current_version: Optional[int] = None


class PreconditionRequiredError(RewardServiceError):
    """428: a write was sent without `If-Match`."""


class PayloadTooLargeError(RewardServiceError):
    """413: too many items, tokens or bytes; `field` and `message` name the limit."""


class RateLimitedError(RewardServiceError):
    """429: the server is overloaded; retry after `retry_after` seconds."""


class ServiceUnavailableError(RewardServiceError):
    """503: the server is not ready (model loading) or restarting; retry after `retry_after` seconds."""


class ServerError(RewardServiceError):
    """A 5xx other than 503 (or 408): a server-side failure that may be transient."""


class ItemFailedError(TokenCreditError):
    """The request succeeded but the server could not explain one item (`on_error="raise"`).

    Attributes:
        index (`int`): the item's position in the caller's list.
        item_id (`str`): the item's id.
        code (`str`): the server's per-item code, e.g. `explain_failed`.
        retryable (`bool`): whether the item may succeed when sent again.
    """

    def __init__(self, index: int, item_id: str, code: str, message: str, retryable: bool = False):
        super().__init__(f"items[{index}] (id {item_id!r}) failed: {code}: {message}")
        self.index, self.item_id, self.code, self.message, self.retryable = index, item_id, code, message, retryable


class ResponseInvariantError(TokenCreditError):
    """The server's answer breaks the contract: wrong number of results or rewards, Σ rewards ≠ score, NaN.

    Never retried automatically: it points to a server bug or a proxy rewriting bodies, and a training run must
    not continue on rewards that do not mean what they claim.
    """


_BY_STATUS = {
    400: InvalidRequestError,
    401: AuthError,
    403: AuthError,
    408: ServerError,
    412: PreconditionFailedError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    428: PreconditionRequiredError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}
_BY_CODE = {
    "invalid_request": InvalidRequestError,
    "payload_too_large": PayloadTooLargeError,
    "overloaded": RateLimitedError,
    "not_ready": ServiceUnavailableError,
    "unauthorized": AuthError,
    "admin_disabled": AuthError,
    "precondition_failed": PreconditionFailedError,
    "precondition_required": PreconditionRequiredError,
}
# Statuses worth retrying even when the body says nothing (proxies answer 502/504 without our error body).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def error_from_response(
    status: int, body: Any, headers: Optional[Mapping[str, str]] = None, request_id: Optional[str] = None
) -> RewardServiceError:
    """Turn an error answer into the matching exception (returned, not raised: the call site raises it).

    The server's `code` decides first (it is more specific than the status), then the status; bodies that are
    not TokenCredit's `{"error": {...}}` (a proxy's HTML page) still map by status.

    Args:
        status: HTTP status code (>= 400).
        body: The decoded JSON body, or the raw text when it was not JSON.
        headers: Response headers (for `Retry-After`).
        request_id: The Idempotency-Key of the request.

    Returns:
        A `RewardServiceError` subclass instance.
    """
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code") or "http_error")
        message = str(detail.get("message") or "")
        field = detail.get("field")
        retryable = bool(detail.get("retryable", status in RETRYABLE_STATUSES))
    else:
        code, field = "http_error", None
        text = body if isinstance(body, str) else repr(body)
        message = text[:300] or f"HTTP {status} without a body"
        retryable = status in RETRYABLE_STATUSES
    if status in (400, 422):
        cls = InvalidRequestError  # whatever the code says, these are never retried
    else:
        cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else RewardServiceError)
    if status in RETRYABLE_STATUSES:
        retryable = True
    if cls is InvalidRequestError:
        retryable = False
    retry_after = parse_retry_after((headers or {}).get("retry-after")) if headers is not None else None
    error = cls(status, code, message, field=field, retryable=retryable, retry_after=retry_after, request_id=request_id)
    if isinstance(error, PreconditionFailedError) and headers is not None:
        error.current_version = version_of_etag(headers.get("etag"))
    return error


"""Small value objects for the client's configuration: timeouts, retries, defaults."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Tuple, Union

__all__ = ["Timeouts", "Retry", "DEFAULT_TIMEOUTS", "DEFAULT_RETRY", "DEFAULT_MAX_IN_FLIGHT", "API_TOKEN_ENV"]


@dataclass(frozen=True)
class Timeouts:
    """Per-phase timeouts in seconds (None = wait forever), in httpx's shape.

    The read timeout defaults to 180 s, OpenRLHF's hard ceiling for a reward call: an explanation that takes
    longer is useless to it anyway.

    Example:
        >>> Timeouts(read=60).read
        60.0
        >>> Timeouts.coerce(5.0).connect
        5.0
    """

    connect: Optional[float] = 10.0
    read: Optional[float] = 180.0
    write: Optional[float] = 30.0
    pool: Optional[float] = 30.0

    @classmethod
    def coerce(cls, value: Union["Timeouts", float, int, None, Tuple]) -> "Timeouts":
        """A `Timeouts`, a number (every phase), None (no timeout) or a (connect, read, write, pool) tuple."""
        if isinstance(value, Timeouts):
            return value
        if value is None or isinstance(value, (int, float)):
            v = None if value is None else float(value)
            return cls(v, v, v, v)
        if isinstance(value, tuple) and len(value) == 4:
            return cls(*value)
        raise ValueError(f"timeout={value!r} is not a Timeouts, a number, None or a 4-tuple (connect, read, write, pool)")

    def as_httpx(self):
        import httpx

        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True)
class Retry:
    """When and how long to retry.

    Retried: connect errors, timeouts, 408, 429, 500, 502, 503, 504. Never: 400, 422 (the request is wrong) and
    invariant violations. A 413 is not retried but split (see `Client.dense_rewards`).
    The delay before attempt n+1 is full-jitter exponential backoff, `uniform(0, min(max_delay, base · 2^n))`, or
    the server's `Retry-After` when it sent one (capped at `max_retry_after`).

    Args:
        attempts (`int`, defaults to 5): total tries per request, the first included (OpenRLHF also tries 5 times).
        base_delay (`float`, defaults to 0.5): seconds of the first backoff step.
        max_delay (`float`, defaults to 30.0): cap of one backoff step.
        max_retry_after (`float`, defaults to 60.0): cap on a server's Retry-After.
        statuses (`frozenset[int]`): statuses that are retried.

    Example:
        >>> Retry(attempts=1).attempts  # no retries
        1
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 60.0
    statuses: FrozenSet[int] = field(default_factory=lambda: frozenset({408, 429, 500, 502, 503, 504}))

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"Retry(attempts={self.attempts}) must be >= 1 (1 means no retries)")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("Retry delays must be >= 0")

    def delay(self, attempt: int, retry_after: Optional[float] = None, rng: Optional[random.Random] = None) -> float:
        """Seconds to sleep after failed attempt `attempt` (0-based)."""
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        # Full jitter: many trainer workers retrying in lockstep would hit a recovering server all at once.
        cap = min(self.max_delay, self.base_delay * (2.0**attempt))
        return (rng or random).uniform(0.0, cap)


DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_RETRY = Retry()
# Concurrent HTTP requests per dense_rewards call (the server queues beyond its own engine capacity anyway).
DEFAULT_MAX_IN_FLIGHT = 8
# The environment variable a data-plane client reads its bearer token from when given no api_key (the server's
# TOKENCREDIT_API_TOKEN: the same name on both sides).
API_TOKEN_ENV = "TOKENCREDIT_API_TOKEN"

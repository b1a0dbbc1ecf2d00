"""Kept for tests written against it: the shared server and the fault proxy now live in `tests.support` (the lead
removes this module)."""

from tests.support import CHEAP, LIMITS, FaultProxy, free_port, live_server  # noqa: F401

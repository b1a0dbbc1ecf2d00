"""Kept for tests written against it: the spawner now lives in `tests.support` (the lead removes this module)."""

from tests.support import spawn_server  # noqa: F401

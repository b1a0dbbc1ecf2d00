"""Service settings, from `TOKENCREDIT_*` environment variables or CLI flags (flags win).

`Settings` is `workers.settings.EngineSettings` (the reward model, the engine's limits, the broker: what a worker
reads too) plus what only the HTTP server reads (bind address, back-pressure, micro-batching, admin, state).
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import Field, SecretStr, field_validator

from workers.settings import DEFAULT_WEIGHTS, MODEL_FLAGS, EngineSettings

__all__ = ["Settings", "DEFAULT_WEIGHTS", "MODEL_FLAGS"]


class Settings(EngineSettings):
    # Loopback by default: exposing the service is the operator's explicit choice.
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    # Micro-batching (both executors, service/batching.py): the first waiting item waits this long for company, or
    # until this many estimated RM rows wait; then one batch (an engine batch, or one Celery task) goes.
    batch_window_ms: float = 5.0
    batch_max_rows: int = 512
    # Admission: requests queue until this many items, or this many estimated RM rows, are accepted and not yet
    # answered; past either, 429 with Retry-After from the measured drain rate. A waiting single-sample request
    # (connection, body, tokenized item, tasks) costs ~50 kB of server memory (+52 MB RSS with 1,000 in flight on
    # the tiny RM, tests/test_load.py), so the default high mark is under 1 GB.
    max_queued_items: int = 16384
    max_queued_rows: int = 4_194_304
    # Deadline of a request without deadline_ms (below OpenRLHF's 180 s client timeout).
    default_deadline_ms: int = 150_000
    # Result cache TTL (0 disables the cache).
    cache_ttl_s: int = 3600
    # Admin API (/admin/v1/*) bearer token; unset = the admin API answers 403. A SecretStr so it never reaches logs.
    admin_token: Optional[SecretStr] = None
    # Data-plane (/v1/*, /openrlhf/get_reward, /classify) bearer token; unset = no token asked (the loopback default;
    # a non-loopback bind without one logs a warning). A SecretStr so it never reaches logs (service/security.py).
    api_token: Optional[SecretStr] = None
    # Policy tokenizers a request's `policy_tokenizer` may name, separated by os.pathsep: `NAME=DIR` entries and
    # root directories; unset = none (service/security.py, TokenizerDirs).
    tokenizer_dirs: Optional[str] = None
    # SQLite file of the shaping-weight versions (embedded default; with a broker they live in Redis).
    # None = <cache dir>/shaping.sqlite3.
    state_db: Optional[str] = None
    # Deployment name: shaping versions are kept per (deployment name, RM name, RM revision), so servers sharing a
    # state file or a Redis share a history only when they serve the same RM under the same name (None = unnamed).
    deployment: Optional[str] = None
    # Amortized credit head (embedded server; workers/credit_serving.py, service/credit_trainer.py): load the newest
    # head of this RM revision from <credit_dir or cache dir>/credit-heads/, keep full-budget shap explanations as
    # training examples and train new versions in a low-priority background thread.
    credit_head: bool = True
    credit_dir: Optional[str] = None
    # Share of amortized answers also explained at full budget (live fidelity in /metrics; 0 disables audits).
    credit_audit_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # Below this mean Spearman over the last credit_audit_window audits (at least 5), a mode falls back to the
    # permutation estimator at full budget until a new head version is trained.
    credit_min_spearman: float = Field(0.8, ge=-1.0, le=1.0)
    credit_audit_window: int = Field(20, ge=1)
    # The background trainer fits a new version once this many new examples arrived (and at least as many are held).
    credit_train_every: int = Field(64, ge=1)

    @field_validator("deployment")
    @classmethod
    def _deployment_name(cls, value: Optional[str]) -> Optional[str]:
        # Part of SQLite keys, Redis keys and log lines: a plain token, and no "/" or "@" (the key's separators).
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
            raise ValueError(f"deployment name {value!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return value

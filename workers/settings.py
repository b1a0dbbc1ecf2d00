"""What the engine and a Celery worker read from `TOKENCREDIT_*` variables or CLI flags (flags win).

`EngineSettings` holds the reward model, the engine's limits and the broker; the HTTP server's `service.config.Settings`
extends it with what only the API reads. It lives here, below the service, because a worker process loads its
engine from it (`workers.loader.load_engine`) and `workers/` never imports `service/`.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokencredit.types import Limits, ShapingWeights
from workers.model import DEFAULT_CAUSAL_MASKING

__all__ = ["EngineSettings", "DEFAULT_WEIGHTS", "MODEL_FLAGS"]

# Shapley credit for most of the reward, a share kept on the last token like ordinary RLHF. The BO controller
# (admin API) replaces these in production; they are only where a fresh server starts.
DEFAULT_WEIGHTS = ShapingWeights(sparse=0.2, shap=0.8)

# The model flags besides --model, as field names; `worker --concurrency N` forwards the same list to its children.
MODEL_FLAGS = ("device", "dtype", "explain_dtype", "rm_kind", "positive_label", "negative_label", "mask_token",
               "torch_threads", "compile_rows", "causal_masking", "chat_template")


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENCREDIT_", extra="ignore", env_ignore_empty=True)

    # Reward model directory (any local AutoModelForSequenceClassification directory).
    model: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    # Precision of coalition rows: auto = bf16 where the hardware has it (the score R stays at `dtype`).
    explain_dtype: str = "auto"
    # Reuse a causal RM's prompt KV cache across coalition rows (exact).
    kv_reuse: bool = True
    # torch.compile an encoder RM's coalition rows: auto (on CPU), on, off. The compile happens during warm-up,
    # before health reports ready.
    compile_rows: Literal["auto", "on", "off"] = "auto"
    rm_kind: str = "auto"
    # How a causal RM's coalition rows leave tokens out: attention, delete, ellipsis or replace (workers/model.py,
    # CAUSAL_MASKING_MODES; the default is measured in docs/architecture.md). Encoder RMs always use [MASK].
    causal_masking: Literal["attention", "delete", "ellipsis", "replace"] = DEFAULT_CAUSAL_MASKING
    # Lay a causal RM's input out with its tokenizer's chat template when it has one.
    chat_template: bool = True
    positive_label: Optional[str] = None
    negative_label: Optional[str] = None
    mask_token: Optional[str] = None
    # Torch threads of the engine; 1 by default because spinning threads collapse under contention.
    torch_threads: int = 1
    chunk_size: Optional[int] = None
    warmup: bool = True
    # Limits (413 beyond them).
    max_items: int = 64
    max_response_tokens: int = 512
    max_total_tokens: int = 16384
    max_response_chars: int = 16384
    # Celery path: no broker URL = embedded engine. e.g. redis://127.0.0.1:6379/0
    broker_url: Optional[str] = None
    # Queue and Redis key prefix: several deployments (or test runs) can share one Redis.
    queue: str = "tokencredit"
    key_prefix: str = "tc"
    # A task unacked this long (its worker died) is redelivered; results are idempotent so early redelivery is safe.
    visibility_timeout_s: float = 60.0
    # Initial shaping weights (version 1 of an empty store), as JSON: {"sparse": 0.2, "shap": 0.8}.
    weights: str = DEFAULT_WEIGHTS.model_dump_json()

    @field_validator("weights")
    @classmethod
    def _weights_on_simplex(cls, value: str) -> str:
        ShapingWeights.model_validate(json.loads(value))
        return value

    def shaping_weights(self) -> ShapingWeights:
        return ShapingWeights.model_validate(json.loads(self.weights))

    def model_kwargs(self) -> dict:
        """Arguments of `RewardModel.load` from these settings (one place for the service, workers and the CLI)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "kind": self.rm_kind,
            "positive_label": self.positive_label,
            "negative_label": self.negative_label,
            "mask_token": self.mask_token,
            "explain_dtype": self.explain_dtype,
            "kv_reuse": self.kv_reuse,
            "compile_rows": self.compile_rows,
            "causal_masking": self.causal_masking,
            "chat_template": self.chat_template,
        }

    def limits(self) -> Limits:
        return Limits(
            max_items=self.max_items,
            max_response_tokens=self.max_response_tokens,
            max_total_tokens=self.max_total_tokens,
            max_response_chars=self.max_response_chars,
        )

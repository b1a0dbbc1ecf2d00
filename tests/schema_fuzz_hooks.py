"""schemathesis hooks for tests/test_schema_fuzz.py (loaded by the CLI through SCHEMATHESIS_HOOKS).

Positive cases ("valid by the schema") must be accepted; the schema states every constraint JSON Schema can
express (service/openapi.py). A few rules it cannot express decide acceptance too, and positive cases that break
one of them are dropped here, each by its own, independent test:

- cross-field rules of the wire types (weights on the simplex, offsets inside the response, a conversation ending
  with the assistant's response): the type's own validation fails with a `value_error` only. A failure of any
  other kind (a length, a type, a missing field) is a schema gap, so such a case is kept and fails the run;
- what the reward model makes of a text (no token at all, more tokens than the limit, an explainer budget below
  the item's token count, a component this RM cannot compute): the engine's own `prepare` on the same tiny RM,
  which runs no RM row and is the definition of these rules (the shims cut a long text instead of refusing it,
  so for them only "no token at all" counts);
- the server's state and settings: an unknown shaping version, `weights` with `shaping_version`, a
  `policy_tokenizer` (these servers offer none; tests/test_auth.py tests the allow-list), the OpenRLHF shim's
  parallel lists and a query that is its prompt;
- cost: explainer budgets over 4,096 rows would spend minutes of CI on one case without testing anything new.

Generated weights are first rescaled onto the simplex (what the server's 422 asks a caller to do), else almost
none would be valid. Every drop is tallied with its reason (TC_FUZZ_TALLY), and the test checks that a fair share
of each operation's positive cases still reaches the server.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Optional

import httpx
import schemathesis
from pydantic import ValidationError

from tokencredit.types import DenseRewardItem, DenseRewardsRequest, Limits, ShapingUpdate

URL = os.environ["TC_FUZZ_URL"]
RM_DIR = os.environ["TC_FUZZ_RM"]
LIMITS = Limits.model_validate_json(os.environ["TC_FUZZ_LIMITS"])
MAX_BUDGET = 4096
TALLY = os.environ.get("TC_FUZZ_TALLY")


@functools.cache
def _info() -> dict:
    token = os.environ.get("TC_FUZZ_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{URL}/v1/info", headers=headers, timeout=30).raise_for_status().json()


@functools.cache
def _engine():
    from workers.engine import Engine
    from workers.model import RewardModel

    return Engine(RewardModel.load(RM_DIR, compile_rows="off", explain_dtype="float32"), LIMITS)


def _only_cross_field(model, body: Any) -> Optional[bool]:
    """None when `body` validates; True when every error is a custom (cross-field) rule; False otherwise."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return all(error["type"] == "value_error" for error in exc.errors())
    return None


def _engine_refuses(request: DenseRewardsRequest) -> Optional[str]:
    from workers.engine import InvalidField

    try:
        _engine().prepare(request)
    except InvalidField as exc:
        return f"rm: {exc.field.split('.')[-1]}"
    return None


def _uncomputable(weights: Optional[dict]) -> bool:
    return any(float(w or 0) > 0 and name not in _info()["components"] for name, w in (weights or {}).items())


# Each rule answers None to keep a positive case, or why it drops it.
def _dense(body: Any) -> Optional[str]:
    if _only_cross_field(DenseRewardsRequest, body):
        return "cross-field rule"
    if not isinstance(body, dict):
        return None
    try:
        request = DenseRewardsRequest.model_validate(body)
    except ValidationError:
        return None  # a schema gap: keep it, the run says so
    if request.policy_tokenizer is not None:
        return "policy_tokenizer"
    if any(item.response_token_ids is not None for item in request.items):
        return "ids without a policy tokenizer"  # these servers offer none
    if request.shaping_version is not None and request.weights is not None:
        return "weights and shaping_version"
    if request.shaping_version is not None and request.shaping_version > _info()["shaping"]["version"]:
        return "unknown shaping_version"
    if request.methods is not None:
        for name in ("shap", "lime"):
            cfg = getattr(request.methods, name)
            budget = (getattr(cfg, "max_rows", None) or getattr(cfg, "num_samples", None)) if cfg is not None else None
            if budget is not None and budget > MAX_BUDGET:
                return "budget over 4096 rows"
    return _engine_refuses(request)


def _scalar(pairs) -> Optional[str]:
    """The shims' items, as they build them: a valid item whose response has an RM token (what does not fit the
    RM is cut, never refused)."""
    model = _engine().model
    for prompt, response in pairs:
        try:
            DenseRewardItem(prompt=prompt, response=response)
        except ValidationError:
            return "blank response"  # the text left once the prompt is cut off
        if model.count_response_tokens(response) == 0:
            return "rm: no token"
    return None


def _openrlhf(body: Any) -> Optional[str]:
    if not isinstance(body, dict) or not isinstance(body.get("query"), list):
        return None
    queries = body["query"]
    for name in ("prompts", "labels"):
        if isinstance(body.get(name), list) and len(body[name]) != len(queries):
            return "lists not parallel"
    prompts = body.get("prompts") or [None] * len(queries)
    pairs = []
    for query, prompt in zip(queries, prompts):
        if not isinstance(query, str) or not (prompt is None or isinstance(prompt, str)):
            return None
        # As the shim does: the response is what follows the prompt in the query.
        pairs.append((prompt, query[len(prompt):]) if prompt and query.startswith(prompt) else ("", query))
    return _scalar(pairs)


def _classify(body: Any) -> Optional[str]:
    if not isinstance(body, dict):
        return None
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return None
    return _scalar([("", t) for t in texts])


def _put_shaping(body: Any) -> Optional[str]:
    if _only_cross_field(ShapingUpdate, body):
        return "cross-field rule"
    if isinstance(body, dict) and isinstance(body.get("weights"), dict) and _uncomputable(body["weights"]):
        return "rm: component"
    return None


def _onto_simplex(weights: Any) -> None:
    """Rescale generated weights to sum to 1, as the server's 422 tells a caller to: without it almost no generated
    weights would be valid. Weights that are not numbers in [0, 1] with a positive sum are left as they are."""
    if not isinstance(weights, dict) or not weights:
        return
    values = list(weights.values())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
        return
    total = math.fsum(values)
    if total > 0:
        for name, value in weights.items():
            weights[name] = value / total


_BODY_RULES = {
    ("POST", "/v1/dense_rewards"): _dense,
    ("POST", "/openrlhf/get_reward"): _openrlhf,
    ("POST", "/classify"): _classify,
    ("PUT", "/admin/v1/shaping"): _put_shaping,
}


@schemathesis.hook
def filter_case(context, case) -> bool:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    label = f"{case.method.upper()} {case.operation.path}"
    rule = _BODY_RULES.get((case.method.upper(), case.operation.path))
    if rule is not None and isinstance(case.body, dict):
        _onto_simplex(case.body.get("weights"))
    dropped = None if rule is None else rule(case.body)
    if rule is not None and TALLY:
        # The test reads these: positive cases kept must not be a vanishing share (a filter that drops everything
        # would make "valid data is accepted" vacuous).
        with open(TALLY, "a", encoding="utf-8") as out:
            out.write(json.dumps({"operation": label, "dropped": dropped}) + "\n")
    return dropped is None

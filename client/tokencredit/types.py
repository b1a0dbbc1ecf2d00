"""Wire types of the TokenCredit API, shared by the server and the SDK.

The API is defined once, here: the service validates requests with these models and the SDK builds them, so a
field renamed here is renamed everywhere. Field names are part of the public contract (other tools read them).

Checks that need only the request itself live here (simplex weights, offsets inside the response, ...), so the
client can fail before any I/O; checks that need the reward model or a tokenizer live in the service.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "Component",
    "EXPLAINERS",
    "ShapingWeights",
    "ShapConfig",
    "LimeConfig",
    "AttentionConfig",
    "LooConfig",
    "PrefixConfig",
    "MethodsConfig",
    "TextBlock",
    "ToolCallFunction",
    "ToolCall",
    "ChatMessage",
    "DenseRewardItem",
    "response_of_messages",
    "StepsConfig",
    "AggregateConfig",
    "DenseRewardsRequest",
    "ItemError",
    "StepReward",
    "ItemResult",
    "TokenAttributions",
    "ModelInfo",
    "ShapingInfo",
    "Usage",
    "DenseRewardsResponse",
    "Limits",
    "InfoResponse",
    "ErrorDetail",
    "ErrorResponse",
    "ShapingVersion",
    "ShapingHistory",
    "ShapingUpdate",
    "etag",
    "version_of_etag",
    "version_of_if_match",
    "SIMPLEX_TOLERANCE",
]

# How far Σw may stray from 1 (JSON round trips of decimal weights such as 0.1 + 0.2 + 0.7 lose ~1e-16).
SIMPLEX_TOLERANCE = 1e-6


class Component(str, Enum):
    """A shaping component: one distribution of the RM score over response tokens."""

    # All mass on the last policy token: ordinary RLHF.
    sparse = "sparse"
    # Last-layer attention of the scoring position (ABC, "Dense Reward for Free").
    attention = "attention"
    # Shapley values estimated by the shap library on token-id masks.
    shap = "shap"
    # LIME coefficients at token level.
    lime = "lime"
    # Leave-one-out occlusion: f(x) - f(x without token t).
    loo = "loo"
    # Causal RMs only: differences of the scores of successive response prefixes (one forward pass).
    prefix = "prefix"


# Components that need the reward model explained (all but `sparse`).
EXPLAINERS = (Component.attention, Component.shap, Component.lime, Component.loo, Component.prefix)


class _Strict(BaseModel):
    # Unknown fields are errors: a typo such as "wieghts" must not silently fall back to defaults.
    model_config = ConfigDict(extra="forbid")


class ShapingWeights(_Strict):
    """Simplex weights w: r_t = Σ_k w_k r_k[t], r_k being component k's rewards (each sums to R). Each w_k ≥ 0
    and Σ_k w_k = 1."""

    sparse: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the last-token (ordinary RLHF) component.")
    attention: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the RM-attention (ABC) component.")
    shap: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the SHAP component.")
    lime: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the LIME component.")
    loo: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the leave-one-out component.")
    prefix: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the prefix-score component (causal RMs only).")

    @model_validator(mode="after")
    def _on_simplex(self) -> "ShapingWeights":
        total = sum(self.as_dict().values())
        if abs(total - 1.0) > SIMPLEX_TOLERANCE:
            raise ValueError(
                f"weights must lie on the simplex: they sum to {total:.6g}, not 1 "
                f"(got {self.as_dict()}); rescale them so that they sum to 1"
            )
        return self

    def as_dict(self) -> Dict[str, float]:
        return {c.value: float(getattr(self, c.value)) for c in Component}

    def active(self) -> List[Component]:
        """Components with a positive weight, in declaration order."""
        return [c for c in Component if getattr(self, c.value) > 0.0]


class ShapConfig(_Strict):
    """Budget and seed of the `shap` explainer."""

    # Which estimator runs. All satisfy efficiency. "stratified" (default): antithetic permutation passes with
    # stratified positions, the empty and full rows shared (≈ one pass fewer for the same fidelity on the demo
    # RM); "permutation" and "kernel" are the shap library's PermutationExplainer and KernelExplainer.
    # "amortized": the server's learned credit head alone (2 rows on an encoder RM: the score pass, which also gives
    # the hidden states, and f(∅); 3 on a causal RM);
    # "amortized+k": the head correcting one stratified pass (2T + 1 rows; 2T + 2 on a causal RM). Both need a
    # head trained for this RM (`tokencredit-server distill`, or online from full-budget requests; 422 otherwise)
    # and ignore max_rows.
    estimator: Literal["permutation", "kernel", "stratified", "amortized", "amortized+k"] = "stratified"
    # RM rows (coalitions) per response; None = 8 × response tokens. Needs at least 2T (stratified), 2T+1
    # (permutation) or T+2 (kernel); a budget of 2^T or more enumerates every coalition instead (exact values).
    max_rows: Optional[int] = Field(None, ge=1, le=1_000_000)
    seed: int = 0


class LimeConfig(_Strict):
    """Budget and seed of the `lime` explainer."""

    # Perturbed samples per response; None = 8 × response tokens (at least 64).
    num_samples: Optional[int] = Field(None, ge=16, le=1_000_000)
    seed: int = 0
    # LIME's exponential kernel width on the cosine distance (the lime library's default is 25).
    kernel_width: float = Field(25.0, gt=0.0)


class AttentionConfig(_Strict):
    """The `attention` explainer has no budget: one forward pass."""


class LooConfig(_Strict):
    """The `loo` explainer has no budget: T + 1 rows."""


class PrefixConfig(_Strict):
    """The `prefix` explainer has no budget: one forward pass (causal RMs only)."""


class MethodsConfig(_Strict):
    """Per-explainer settings. Naming an explainer here also computes it when its weight is 0."""

    shap: Optional[ShapConfig] = None
    lime: Optional[LimeConfig] = None
    attention: Optional[AttentionConfig] = None
    loo: Optional[LooConfig] = None
    prefix: Optional[PrefixConfig] = None


class TextBlock(_Strict):
    """A content block of a chat message. Only text blocks are accepted: the RM reads text."""

    type: Literal["text"]
    text: str

    # Before the Literal check, so that an image block is told why, not only which value was expected.
    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value != "text":
            raise ValueError(f'only {{"type": "text"}} content blocks are accepted (the RM reads text), not {value!r}')
        return value


_TEXT_BLOCKS = TypeAdapter(List[TextBlock])


class ToolCallFunction(_Strict):
    name: str = Field(..., min_length=1)
    # A JSON string, as OpenAI sends it; passed to chat templates as an object when it parses as one.
    arguments: str


class ToolCall(_Strict):
    """An assistant's tool call, OpenAI shape."""

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    """One message of an OpenAI-style conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    # A string, a list of text blocks (concatenated), or null for an assistant message that carries tool_calls.
    content: Optional[Union[str, List[TextBlock]]] = None
    tool_calls: Optional[List[ToolCall]] = None
    # The call a tool message answers.
    tool_call_id: Optional[str] = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        # Validating the blocks here (not through the Union) reports an error at `content[k].type`, without the
        # Union's branch names in the path.
        if isinstance(value, list):
            return _TEXT_BLOCKS.validate_python(value)
        if value is not None and not isinstance(value, str):
            raise ValueError("content must be a string, a list of text blocks, or null (assistant tool calls)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("value_error", "only assistant messages carry tool_calls")
        if self.tool_calls is not None and not self.tool_calls:
            raise PydanticCustomError("value_error", "tool_calls must not be empty when given")
        if self.tool_call_id is not None and self.role != "tool":
            raise PydanticCustomError("value_error", "only tool messages carry a tool_call_id")
        if self.content is None and not self.tool_calls:
            raise PydanticCustomError("value_error", "content may be null only for an assistant message with tool_calls")
        return self

    @property
    def text(self) -> str:
        """The message's text: the string, or its text blocks concatenated ("" for null content)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


def _missing() -> PydanticCustomError:
    return PydanticCustomError("missing", "Field required (give prompt and response, or messages)")


def _one_form(value: Optional[str], info: ValidationInfo, with_messages: str) -> Optional[str]:
    """An item's prompt/response: required without messages, refused with them (each error at its own field)."""
    if "messages" not in info.data:
        return value  # the messages are invalid: their own error says why
    if info.data["messages"] is not None:
        if value is not None:
            raise ValueError(f"give prompt and response, or messages, not both{with_messages}")
        return value
    if value is None:
        raise _missing()
    return value


class DenseRewardItem(_Strict):
    """One (prompt, response) pair, or one conversation (`messages`), to explain.

    Give either `prompt` and `response`, or `messages`. With `messages` the last message is the assistant's
    response being scored, and `response` is derived from it (its text blocks concatenated): offsets, ids and the
    returned `spans` refer to that text. A derived `response` is never serialized, so a dumped item validates again.
    """

    # Caller's id, echoed back; defaults to the item's index.
    id: Optional[str] = Field(None, max_length=256)
    # An OpenAI-style conversation; the last message is the assistant's response. Declared before prompt and
    # response so that their validators see it (one form or the other, not both).
    messages: Optional[List[ChatMessage]] = None
    # Required unless `messages` is given (validated even when absent, to say so at the field).
    prompt: Optional[str] = Field(None, validate_default=True)
    # The exact response text the policy produced (for ids: their decoding, special tokens skipped). Required
    # unless `messages` is given; then derived from the last message.
    response: Optional[str] = Field(None, validate_default=True)
    # Character spans [start, end) into `response`, one per policy token, sorted and non-overlapping.
    response_token_offsets: Optional[List[Tuple[int, int]]] = None
    # The policy's token ids for `response`; needs `policy_tokenizer` on the request.
    response_token_ids: Optional[List[int]] = None

    @field_validator("messages")
    @classmethod
    def _conversation_ends_with_the_response(cls, value: Optional[List[ChatMessage]]) -> Optional[List[ChatMessage]]:
        if value is None:
            return value
        if not value:
            raise ValueError("messages must not be empty: its last message is the assistant's response")
        last, k = value[-1], len(value) - 1
        if last.role != "assistant":
            raise ValueError(f"the last message (messages[{k}]) is the response: its role must be assistant, not {last.role!r}")
        if last.tool_calls:
            raise ValueError(f"the last message (messages[{k}]) is the response being scored: it must not carry tool_calls")
        if not last.text.strip():
            raise ValueError(f"the last message (messages[{k}]) is the response: its text must contain a non-whitespace character")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_or_messages(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        return _one_form(value, info, "")

    @field_validator("response")
    @classmethod
    def _response_not_empty(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        value = _one_form(value, info, " (with messages, the response is the last message)")
        if value is not None and info.data.get("messages") is None and not value.strip():
            raise ValueError("response must contain at least one non-whitespace character")
        return value

    # Field validators (not a model validator) so that errors are reported at the field they concern;
    # `response` and `response_token_offsets` are declared first, so they are in `info.data` here.
    @field_validator("response_token_offsets")
    @classmethod
    def _offsets_valid(cls, offsets: Optional[List[Tuple[int, int]]], info: ValidationInfo):
        if offsets is None:
            return offsets
        if not offsets:
            raise ValueError("response_token_offsets must not be empty when given")
        n = len(_response_of(info.data))
        previous_end = 0
        for k, (start, end) in enumerate(offsets):
            if not (0 <= start <= end <= n):
                raise ValueError(
                    f"response_token_offsets[{k}] = [{start}, {end}] is out of range: "
                    f"spans must satisfy 0 <= start <= end <= len(response) = {n}"
                )
            if start < previous_end:
                raise ValueError(
                    f"response_token_offsets[{k}] = [{start}, {end}] overlaps or precedes the previous span "
                    f"(which ends at {previous_end}); spans must be sorted and non-overlapping"
                )
            previous_end = end
        return offsets

    @field_validator("response_token_ids")
    @classmethod
    def _ids_valid(cls, value: Optional[List[int]], info: ValidationInfo) -> Optional[List[int]]:
        if value is None:
            return value
        if info.data.get("response_token_offsets") is not None:
            raise ValueError("give response_token_offsets or response_token_ids, not both")
        if not value:
            raise ValueError("response_token_ids must not be empty when given")
        if any(i < 0 for i in value):
            raise ValueError("response_token_ids must be non-negative integers")
        return value

    @model_validator(mode="after")
    def _derive_response(self) -> "DenseRewardItem":
        # One accessor for everyone (engine, SDK checks, adapters): `item.response` is the scored text either way.
        if self.messages is not None:
            self.response = self.messages[-1].text
        return self

    @model_serializer(mode="wrap")
    def _without_derived_response(self, handler):
        # The derived response is not an input: dumping it would make the item "give both" when validated again
        # (the SDK's body, the Celery task's payload).
        data = handler(self)
        if self.messages is not None and isinstance(data, dict):
            data.pop("response", None)
        return data


def _response_of(data: dict) -> str:
    """The response text among already-validated fields: `response`, else the last message's text."""
    if data.get("response") is not None:
        return data["response"]
    messages = data.get("messages")
    return messages[-1].text if messages else ""


def response_of_messages(messages: Any) -> Optional[str]:
    """The response text of raw (unvalidated) messages, or None when they are not a valid conversation (the
    item's own validation then says why). The SDK uses it to compute policy offsets before building the item."""
    try:
        return DenseRewardItem(messages=messages).response
    except ValueError:
        return None


class StepsConfig(_Strict):
    """How a response is cut into steps (PRM-style): after each occurrence of `separator`, or after each match of
    `regex` (Python `re` syntax). Give one of the two. A separator (or match) belongs to the step it ends; the text
    after the last one is the last step."""

    separator: Optional[str] = Field(None, min_length=1, max_length=256)
    regex: Optional[str] = Field(None, min_length=1, max_length=256)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> "StepsConfig":
        if (self.separator is None) == (self.regex is None):
            raise ValueError("give exactly one of separator and regex")
        return self


class AggregateConfig(_Strict):
    """Aggregations returned besides the per-token rewards."""

    # One reward per step: the sum of its tokens' rewards (so the steps sum to the score), with its spans.
    steps: StepsConfig


class DenseRewardsRequest(_Strict):
    """Body of `POST /v1/dense_rewards`."""

    items: List[DenseRewardItem] = Field(..., min_length=1)
    # Local tokenizer directory of the policy, used to turn `response_token_ids` into spans.
    policy_tokenizer: Optional[str] = None
    # Explicit simplex weights for this request, overriding the server's current ones.
    weights: Optional[ShapingWeights] = None
    # Use this stored version of the server's shaping weights (admin API) instead of the current one.
    shaping_version: Optional[int] = Field(None, ge=1)
    # Per-explainer budget and seed.
    methods: Optional[MethodsConfig] = None
    # Also return each component's own per-token rewards (each sums to the score).
    return_components: StrictBool = False
    # Also return each explained component's attributions: per-token values and the base (Σ values + base = score),
    # on the same tokens as token_rewards.
    return_attributions: StrictBool = False
    # How attributions become rewards. "additive" (default): r_k[t] = v_k[t] + b_k·u[t], each token keeps its own
    # attribution in score units and the base b_k goes to the residual placement u. "sign-aware-l1": the earlier
    # scheme R·(sign(R)·φ/Σ|φ| + residual), kept only for comparison (it can reward a harmful last token).
    normalization: Literal["additive", "sign-aware-l1"] = "additive"
    # Where each component's base (and any unexplained mass) goes: the last token, or spread evenly over all.
    residual_placement: Literal["last", "uniform"] = "last"
    # Time budget in ms (Celery path, `serve --broker`; the embedded engine ignores it): items not explained by
    # then get an explicit `deadline_exceeded` error. None = the server's default (150 s, below OpenRLHF's 180 s).
    deadline_ms: Optional[int] = Field(None, ge=1, le=3_600_000)
    # Also return per-step rewards (`results[i].steps`), e.g. {"steps": {"separator": "\n\n"}} (JSON).
    aggregate: Optional[AggregateConfig] = None
    # When an item is longer than the RM takes: "left_prompt" (default) cuts the prompt (or the oldest messages)
    # from the left and flags `prompt_truncated`; "error" answers 413 instead. A response that alone does not fit is
    # always 413 here (rewards are owed to every response token); the scalar shims cut it instead.
    truncation: Literal["left_prompt", "error"] = "left_prompt"


class ItemError(BaseModel):
    """Why one item has no rewards (the other items are still answered)."""

    code: str
    message: str
    retryable: bool = False


class TokenAttributions(BaseModel):
    """One component's explanation of the score: Σ values + base = score.

    shap: Shapley values and f(∅) (the score with every response token masked; the estimator's float residual and
    any row-precision difference from the score are in it); lime: local linear coefficients; loo: f(x) − f(x
    without t); prefix: s_t − s_{t−1}; attention: score · attention share (base 0). The base is always
    score − Σ values.
    """

    # One value per entry of token_rewards (policy tokens when given, else RM tokens), in score units.
    values: List[float]
    base: float
    # shap only: true when the values are exact Shapley values (every coalition enumerated), not an estimate.
    exact: Optional[bool] = None


class StepReward(BaseModel):
    """One step of the response (`aggregate.steps`). A token belongs to the step holding its first character; a
    token with no characters (a special token) to the step of the character before it (the first step at 0)."""

    # Characters [start, end) of the response; the steps cover it, in order, without gaps.
    span: Tuple[int, int]
    # Entries [first, end) of token_rewards that belong to this step (empty when a token that starts in an earlier
    # step covers it).
    tokens: Tuple[int, int]
    # Σ token_rewards[first:end]; the steps' rewards sum to the score.
    reward: float


class ItemResult(BaseModel):
    """Dense rewards of one item."""

    id: str
    # The RM's sequence score R.
    score: Optional[float] = None
    # One reward per policy token (or per RM response token when no policy tokens were given); Σ = score.
    token_rewards: Optional[List[float]] = None
    # Character spans [start, end) into the response, one per entry of token_rewards.
    spans: Optional[List[Tuple[int, int]]] = None
    # Share of explained reward mass that landed on the token whose characters carry it (1.0 = all of it).
    coverage: Optional[float] = None
    # Per component, the rewards that component alone would give (each sums to the score).
    components: Optional[Dict[str, List[float]]] = None
    # Per explained component, its attributions (on request: return_attributions).
    attributions: Optional[Dict[str, TokenAttributions]] = None
    # The shap estimator that ran: "exact" (all 2^T coalitions, when they fit in the budget) or the sampler's name.
    shap_estimator: Optional[str] = None
    # The credit head version that produced the shap values ("amortized" estimators); None when none did (also when
    # the server fell back to the permutation estimator because the head's audited fidelity is too low).
    credit_head_version: Optional[int] = None
    # Response tokens as the RM saw them, and whether the prompt had to be cut from the left to fit.
    rm_tokens: Optional[int] = None
    prompt_truncated: bool = False
    # Per-step rewards, on request (`aggregate.steps`).
    steps: Optional[List[StepReward]] = None
    error: Optional[ItemError] = None


class ModelInfo(BaseModel):
    """The reward model that produced the scores."""

    name: str
    revision: str
    kind: Literal["encoder", "causal"]
    device: str
    dtype: str
    max_length: int


class ShapingInfo(BaseModel):
    """The shaping weights used; version is None when the request supplied its own weights."""

    version: Optional[int] = None
    weights: Dict[str, float]
    # The deployment whose version this is, `[name/]rm@revision` (versions are numbered per deployment); None
    # from servers that predate deployments.
    deployment: Optional[str] = None


class Usage(BaseModel):
    # RM rows (forward-pass sequences) evaluated for this request, after de-duplication.
    rm_rows: int
    latency_ms: float
    # Items whose shap values are exact Shapley values (every coalition enumerated, 2^T <= the row budget).
    shap_exact_items: int = 0


class DenseRewardsResponse(BaseModel):
    """Body of a successful `POST /v1/dense_rewards`."""

    model: ModelInfo
    shaping: ShapingInfo
    results: List[ItemResult]
    usage: Usage


class Limits(BaseModel):
    """Request limits; larger requests get 413 naming the limit."""

    max_items: int
    max_response_tokens: int
    max_total_tokens: int
    max_response_chars: int


class InfoResponse(BaseModel):
    """Body of `GET /v1/info`."""

    model: ModelInfo
    components: List[str]
    limits: Limits
    shaping: ShapingInfo
    # The default `normalization` of dense-rewards requests ("additive").
    normalization: str


class ErrorDetail(BaseModel):
    # Machine-readable code, e.g. "invalid_request", "payload_too_large", "not_ready".
    code: str
    message: str
    # The offending request field in dotted/indexed form, e.g. "items[2].response_token_offsets".
    field: Optional[str] = None
    retryable: bool = False


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------------- admin API
class ShapingVersion(BaseModel):
    """One stored version of a deployment's shaping weights (`GET`/`PUT /admin/v1/shaping`, and each history entry).

    Versions are immutable and numbered 1, 2, ... per deployment; the current one is the highest. A PUT must send
    the current version's `etag` as `If-Match`.
    """

    model_config = ConfigDict(frozen=True)
    version: int
    weights: Dict[str, float]
    # ISO 8601, UTC, milliseconds: when the version was written.
    updated_at: str
    # Who wrote it, as the writer said (free text, e.g. "bo study.json trial 7").
    updated_by: Optional[str] = None
    # Whose version this is: `[name/]rm@revision` (versions are numbered per deployment); None from older servers.
    deployment: Optional[str] = None

    @property
    def etag(self) -> str:
        """The ETag of this version, what a PUT sends as `If-Match`: `"v3"`."""
        return etag(self.version)

    def shaping_weights(self) -> ShapingWeights:
        return ShapingWeights.model_validate(self.weights)


class ShapingHistory(BaseModel):
    """Body of `GET /admin/v1/shaping/history`: every version of the deployment, oldest first."""

    versions: List[ShapingVersion]
    deployment: Optional[str] = None


class ShapingUpdate(_Strict):
    """Body of `PUT /admin/v1/shaping`: new simplex weights (validated like a request's weights)."""

    weights: ShapingWeights
    updated_by: Optional[str] = Field(None, max_length=200)


def etag(version: int) -> str:
    """The ETag of a shaping version: `etag(3) == '"v3"'`."""
    return f'"v{int(version)}"'


def version_of_etag(tag: Optional[str]) -> Optional[int]:
    """The version an ETag names: '"v3"' (or W/"v3", or v3) → 3; anything else → None."""
    tag = (tag or "").strip().removeprefix("W/").strip('"')
    digits = tag[1:]
    # isascii: str.isdigit also accepts characters such as "²" that int() refuses.
    return int(digits) if tag.startswith("v") and digits.isascii() and digits.isdigit() else None


def version_of_if_match(value: str) -> Optional[int]:
    """An `If-Match` header's version: the first ETag of the list that names one; '*' (any version) → -1; else None."""
    for part in value.split(","):
        if part.strip().removeprefix("W/").strip('"') == "*":
            return -1
        version = version_of_etag(part)
        if version is not None:
            return version
    return None

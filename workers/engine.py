"""The attribution engine: a dense-rewards request in, per-token rewards out.

Two phases so that bad input never costs RM time: `prepare` validates everything that needs the RM tokenizer or
the policy tokenizer (limits, ids, alignment) and raises `InvalidField`; `run` explains, shapes and aligns.
The engine is synchronous and single-threaded by design: the service runs it in a worker thread (embedded
default) and Celery workers run it in their own process.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from tokencredit.alignment import (
    AlignmentError,
    align_to_policy,
    byte_spans_to_char_spans,
    char_spans_to_byte_spans,
    policy_byte_spans_from_ids,
)
from tokencredit.tokens import decoder_for
from tokencredit.types import (
    Component,
    DenseRewardItem,
    DenseRewardsRequest,
    ItemError,
    ItemResult,
    Limits,
    MethodsConfig,
    ModelInfo,
    ShapingWeights,
    TokenAttributions,
)
from workers import credit_serving, shaping
from workers.credit_head import token_features
from workers.evaluator import CoalitionEvaluator, RowCounter
from workers.model import RewardModel, RMInput
from workers.registry import REGISTRY, ExplainInput, config_for, supports

__all__ = ["Engine", "InvalidField", "PayloadTooLarge", "PreparedItem", "EngineOutput"]


class InvalidField(ValueError):
    """Bad input, reported as 422 naming the field (dotted/indexed path into the request body)."""

    status = 422
    code = "invalid_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PayloadTooLarge(InvalidField):
    """A limit is exceeded, reported as 413 with the limit."""

    status = 413
    code = "payload_too_large"

    def __init__(self, field: str, message: str, limit: int):
        super().__init__(field, message)
        self.limit = limit


@dataclass
class PreparedItem:
    id: str
    item: DenseRewardItem
    rm_input: RMInput
    # Policy-token byte spans into the response, or None to report on RM tokens.
    policy_byte_spans: Optional[List[Tuple[int, int]]]
    out_spans: List[Tuple[int, int]]


@dataclass
class EngineOutput:
    results: List[ItemResult]
    rm_rows: int


@functools.lru_cache(maxsize=8)
def _load_policy_tokenizer(path: str):
    from transformers import AutoTokenizer

    # Never code from the directory: a tokenizer is data (a request names it; service/security.py vets the path).
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


class Engine:
    """Explains one RM for dense-rewards requests.

    Args:
        model: the loaded reward model.
        limits: request limits (413 beyond them).
        chunk_size: evaluator rows per forward pass (None: per device).
    """

    def __init__(self, model: RewardModel, limits: Limits, chunk_size: Optional[int] = None):
        self.model = model
        self.evaluator = CoalitionEvaluator(model, chunk_size)
        # The response plus the RM's special tokens must fit; the prompt is cut first.
        rm_room = model.max_length - 4
        self.limits = limits.model_copy(update={"max_response_tokens": min(limits.max_response_tokens, rm_room)})
        # Seconds the warm-up took, once `warmup` ran (workers.loader.load_engine runs it).
        self.warmup_seconds: Optional[float] = None
        # The amortized credit head's state (workers/credit_serving.AmortizedCredit), attached by the embedded
        # server; None: the "amortized" shap estimators are refused (422) and nothing is collected for training.
        self.credit = None

    def model_info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(
            name=m.name, revision=m.revision, kind=m.kind, device=m.device, dtype=m.dtype, max_length=m.max_length
        )

    # ------------------------------------------------------------------------------------------------------
    def prepare(self, request: DenseRewardsRequest) -> List[PreparedItem]:
        """Validate and lay out every item. Raises InvalidField / PayloadTooLarge, never runs the RM."""
        limits = self.limits
        if len(request.items) > limits.max_items:
            raise PayloadTooLarge("items", f"{len(request.items)} items exceed the limit of {limits.max_items}", limits.max_items)
        policy_tok = None
        if request.policy_tokenizer is not None:
            policy_tok = self._policy_tokenizer(request.policy_tokenizer)
        prepared: List[PreparedItem] = []
        total_tokens = 0
        for i, item in enumerate(request.items):
            where = f"items[{i}]"
            # With messages the response is the last message's text: errors about it name that message's content.
            response_field = f"{where}.response" if item.messages is None else f"{where}.messages[{len(item.messages) - 1}].content"
            if len(item.response) > limits.max_response_chars:
                raise PayloadTooLarge(
                    response_field,
                    f"{len(item.response)} characters exceed the limit of {limits.max_response_chars}",
                    limits.max_response_chars,
                )
            n_tokens = self.model.count_response_tokens(item.response)
            if n_tokens > limits.max_response_tokens:
                raise PayloadTooLarge(
                    response_field,
                    f"{n_tokens} RM tokens exceed the limit of {limits.max_response_tokens}",
                    limits.max_response_tokens,
                )
            if n_tokens == 0:
                raise InvalidField(response_field, "the reward model's tokenizer finds no token in the response")
            total_tokens += n_tokens
            if total_tokens > limits.max_total_tokens:
                raise PayloadTooLarge(
                    "items", f"the items hold more than {limits.max_total_tokens} RM response tokens in all", limits.max_total_tokens
                )
            rm_input = self._encode(where, item)
            if rm_input.prompt_truncated and request.truncation == "error":
                field = f"{where}.prompt" if item.messages is None else f"{where}.messages"
                raise PayloadTooLarge(
                    field, f"the item is longer than the RM's {self.model.max_length} tokens and truncation is 'error' "
                    "(send truncation='left_prompt' to cut the prompt from the left)", self.model.max_length,
                )
            byte_spans, out_spans = self._policy_spans(where, item, policy_tok, rm_input)
            prepared.append(PreparedItem(item.id or str(i), item, rm_input, byte_spans, out_spans))
        self._check_budgets(request, prepared)
        return prepared

    def _encode(self, where: str, item: DenseRewardItem) -> RMInput:
        if item.messages is None:
            try:
                return self.model.encode(item.prompt, item.response)
            except ValueError as exc:  # the RM's chat template drops or repeats the response
                raise InvalidField(f"{where}.prompt", str(exc)) from None
        try:
            return self.model.encode_messages([m.model_dump(exclude_none=True) for m in item.messages])
        except ValueError as exc:  # the RM's chat template refuses the conversation, or the response cannot fit
            raise InvalidField(f"{where}.messages", str(exc)) from None

    def _policy_tokenizer(self, path: str):
        if not os.path.isdir(path):
            raise InvalidField("policy_tokenizer", f"{path!r} is not a local tokenizer directory on the server")
        try:
            return _load_policy_tokenizer(os.path.realpath(path))
        except Exception as exc:  # transformers raises many types for unusable directories
            raise InvalidField("policy_tokenizer", f"cannot load a tokenizer from {path!r}: {exc}") from None

    def _policy_spans(self, where, item, policy_tok, rm_input):
        if item.response_token_offsets is not None:
            spans = [tuple(s) for s in item.response_token_offsets]
            return char_spans_to_byte_spans(item.response, spans), spans
        if item.response_token_ids is not None:
            if policy_tok is None:
                raise InvalidField("policy_tokenizer", f"{where}.response_token_ids needs policy_tokenizer on the request")
            vocab = len(policy_tok)
            bad = [t for t in item.response_token_ids if t >= vocab]
            if bad:
                raise InvalidField(f"{where}.response_token_ids", f"id {bad[0]} is outside the policy vocabulary of {vocab}")

            try:
                # The SDK's decode rule, so offsets computed client-side and here agree exactly.
                byte_spans = policy_byte_spans_from_ids(item.response_token_ids, decoder_for(policy_tok), item.response)
            except AlignmentError as exc:
                raise InvalidField(f"{where}.response_token_ids", str(exc)) from None
            return byte_spans, byte_spans_to_char_spans(item.response, byte_spans)
        return None, list(rm_input.response_spans)

    def _check_budgets(self, request: DenseRewardsRequest, prepared: List[PreparedItem]) -> None:
        # What each explainer needs (workers/registry.py): a causal RM, a budget that fits the item.
        for explainer in REGISTRY.values():
            if supports(explainer.component, self.model):
                continue
            why = f"the {explainer.name} component needs a causal RM; {self.model.name} is an encoder"
            if request.weights is not None and getattr(request.weights, explainer.name) > 0:
                raise InvalidField(f"weights.{explainer.name}", why)
            if request.methods is not None and getattr(request.methods, explainer.name) is not None:
                raise InvalidField(f"methods.{explainer.name}", why)
        for explainer in REGISTRY.values():
            cfg = getattr(request.methods, explainer.name) if request.methods is not None else None
            if cfg is None or explainer.check is None:
                continue
            for i, p in enumerate(prepared):
                refused = explainer.check(p.rm_input.n_tokens, cfg)
                if refused is not None:
                    field, why = refused
                    raise InvalidField(f"methods.{explainer.name}.{field}",
                                       f"items[{i}] has {p.rm_input.n_tokens} RM tokens; {why}")
        shap_cfg = request.methods.shap if request.methods is not None else None
        if shap_cfg is not None and shap_cfg.estimator in credit_serving.MODES:
            why = credit_serving.unavailable(self.credit, shap_cfg.estimator, f"{self.model.name}@{self.model.revision}")
            if why is not None:
                raise InvalidField("methods.shap.estimator", why)

    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def components_for(request: DenseRewardsRequest, weights: ShapingWeights) -> List[Component]:
        """Explainers to run: the weighted ones plus any named in `methods`."""
        wanted = set(weights.active())
        if request.methods is not None:
            wanted |= {Component(name) for name, cfg in request.methods if cfg is not None}
        return [c for c in Component if c in wanted]

    def run(self, request: DenseRewardsRequest, weights: ShapingWeights, prepared: Optional[List[PreparedItem]] = None) -> EngineOutput:
        """Explain, shape and align every item. A failure inside one item becomes that item's error."""
        prepared = self.prepare(request) if prepared is None else prepared
        components = self.components_for(request, weights)
        counter = RowCounter()
        results = []
        for p in prepared:
            try:
                results.append(self._explain_item(p, request, weights, components, counter))
            except Exception as exc:  # keep the other items: one bad item must not cost a whole batch
                results.append(
                    ItemResult(id=p.id, error=ItemError(code="explain_failed", message=f"{type(exc).__name__}: {exc}", retryable=True))
                )
        return EngineOutput(results=results, rm_rows=counter.rows)

    def _explain_item(self, p: PreparedItem, request, weights: ShapingWeights, components, counter: RowCounter) -> ItemResult:
        inp = p.rm_input
        features = None
        if self.credit is not None and Component.shap in components and not self.model.reads_last_position:
            # An encoder RM's score pass also gives the credit head its hidden states (the same arithmetic, so the
            # same score): collecting training examples and the amortized estimators cost no extra row for it.
            features = token_features(self.model, inp)
            score = features.score
            counter.rows, counter.calls, counter.requested = counter.rows + 1, counter.calls + 1, counter.requested + 1
        else:
            score = self.evaluator.score(inp, counter)
        explained, shap_estimator, head_version = self._attributions(inp, request, components, score, counter, features)
        placement = request.residual_placement
        # On the policy's tokens when given: values move by byte mass (Σ preserved, unmapped mass to the last
        # token), then the base lands on the placement token of the policy tokens.
        attributions: Dict[str, shaping.TokenAttribution] = {}
        coverages: Dict[str, float] = {}
        for name, att in explained.items():
            if p.policy_byte_spans is None:
                attributions[name], coverages[name] = att, 1.0
            else:
                values, coverages[name] = align_to_policy(
                    att.values, inp.response_spans, p.item.response, target_byte_spans=p.policy_byte_spans
                )
                attributions[name] = shaping.TokenAttribution.of(values, score)
        n_out = inp.n_tokens if p.policy_byte_spans is None else len(p.policy_byte_spans)

        rewards_by_component: Dict[str, np.ndarray] = {}
        for name, att in attributions.items():
            if request.normalization == "sign-aware-l1" and name != Component.attention.value:
                e = shaping.normalize_signed(att.values, score, placement)
                rewards_by_component[name] = shaping.conserve(score * e, score)
            else:
                rewards_by_component[name] = shaping.conserve(shaping.additive_rewards(att, placement), score)
        # sparse is placed on the last policy token directly, so w = (sparse=1) is exactly ordinary RLHF whatever
        # the tokenizers and the placement.
        rewards_by_component[Component.sparse.value] = score * shaping.sparse_distribution(n_out)
        coverages[Component.sparse.value] = 1.0

        w = weights.as_dict()
        rewards = shaping.mix_rewards(score, rewards_by_component, w)
        active = {k: v for k, v in w.items() if v > 0}
        coverage = sum(v * coverages[k] for k, v in active.items()) / sum(active.values())
        result = ItemResult(
            id=p.id,
            score=score,
            token_rewards=rewards.tolist(),
            spans=[tuple(s) for s in p.out_spans],
            coverage=float(coverage),
            rm_tokens=inp.n_tokens,
            prompt_truncated=inp.prompt_truncated,
            shap_estimator=shap_estimator,
            credit_head_version=head_version,
        )
        if request.return_components:
            result.components = {c.value: rewards_by_component[c.value].tolist() for c in Component if c.value in rewards_by_component}
        if request.return_attributions:
            result.attributions = {
                c.value: TokenAttributions(
                    values=attributions[c.value].values.tolist(),
                    base=attributions[c.value].base,
                    exact=(shap_estimator == "exact") if c is Component.shap else None,
                )
                for c in Component
                if c.value in attributions
            }
        return result

    def _attributions(self, inp: RMInput, request, components, score: float, counter: RowCounter, features=None):
        """Each explained component's values on the RM's response tokens, with base = R − Σ values."""
        x = ExplainInput(self.evaluator, inp, counter, score, request.residual_placement, credit=self.credit,
                         features=features)
        explained: Dict[str, shaping.TokenAttribution] = {}
        shap_estimator = head_version = None
        for comp in components:
            explainer = REGISTRY.get(comp)
            if explainer is None:  # sparse explains nothing
                continue
            out = explainer.explain(x, config_for(comp, request.methods))
            if comp is Component.shap:
                shap_estimator, head_version = out.estimator, out.credit_head_version
            explained[comp.value] = shaping.TokenAttribution.of(out.values, score)
        return explained, shap_estimator, head_version

    def warmup(self) -> float:
        """One small explanation of every kind so the first request pays no lazy import, JIT or allocation cost."""
        start = time.perf_counter()
        request = DenseRewardsRequest(
            items=[DenseRewardItem(prompt="Warm-up.", response="This is a short warm-up response.")],
            weights=ShapingWeights(sparse=0.2, attention=0.2, shap=0.2, lime=0.2, loo=0.2),
        )
        # Naming every explainer the RM supports in `methods` runs it (prefix has no weight here).
        request.methods = MethodsConfig(**{e.name: e.config() for e in REGISTRY.values() if supports(e.component, self.model)})
        self.run(request, request.weights)
        return time.perf_counter() - start

"""Loading a sequence-classification reward model (RM) and laying out its inputs.

This is the only module that knows how an RM is laid out: encoder RMs (BERT-like) read (prompt, response) as a
text pair and score at [CLS]; causal RMs (Llama/GPT-2-like) read the conversation rendered with their chat template
(else prompt then response) and score at its last token. How a causal RM sees a coalition with absent tokens is
the `causal_masking` value function (see `CAUSAL_MASKING_MODES` and docs/architecture.md, "Causal reward models").
It loads with the real `from_pretrained(path)` from a local directory; the hub is never contacted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import numpy as np

from workers.row_backends import compiled_row_model, eager_attention, from_pretrained_fast_attention, wants_compile

logger = logging.getLogger("tokencredit.model")

__all__ = [
    "CAUSAL_MASKING_MODES",
    "DEFAULT_CAUSAL_MASKING",
    "RewardModel",
    "RMInput",
    "ScoreSpec",
    "ModelLoadError",
    "pick_device",
    "pick_dtype",
]

RMKind = Literal["encoder", "causal"]

# How a causal RM sees a coalition (True = token kept); encoder RMs always replace absent tokens by [MASK].
#   attention: absent tokens stay in the row but no other position attends to them; every token keeps its position
#              id (rows keep one length, the prompt's KV cache is reused).
#   delete:    absent tokens are removed; the shorter row has contiguous positions (what the RM sees if the text
#              had never contained them).
#   ellipsis:  shap's Text-masker convention: each run of absent tokens becomes the tokenizer's ids for "..." once.
#   replace:   absent ids are overwritten with the mask id (unk, pad or eos for most causal tokenizers); the value
#              function used before these modes existed, kept for comparison.
CAUSAL_MASKING_MODES = ("attention", "delete", "ellipsis", "replace")
# Chosen by bench/causal_masking.py on the causal demo RM (docs/architecture.md, "Causal reward models").
DEFAULT_CAUSAL_MASKING = "attention"


class ModelLoadError(RuntimeError):
    """The reward-model directory cannot be used; the message says why and what to change."""


@dataclass(frozen=True)
class ScoreSpec:
    """How logits become the scalar score: logit[positive] (− logit[negative] when given)."""

    positive: int
    negative: Optional[int] = None

    def describe(self) -> str:
        if self.negative is None:
            return f"logit[{self.positive}]"
        return f"logit[{self.positive}] - logit[{self.negative}]"


@dataclass
class RMInput:
    """One (prompt, response) pair laid out for the RM. Only `response_positions` may ever be masked."""

    input_ids: np.ndarray  # int64 [L]
    token_type_ids: Optional[np.ndarray]  # int64 [L] or None
    response_positions: np.ndarray  # int64 [T], indices into input_ids
    response_spans: List[Tuple[int, int]]  # character spans into the response, one per response token
    score_position: int  # where the sequence score R (and the attention row) is read: [CLS], or a causal RM's last id
    prompt_truncated: bool = False

    @property
    def response_ids(self) -> np.ndarray:
        return self.input_ids[self.response_positions]

    @property
    def n_tokens(self) -> int:
        return int(len(self.response_positions))

    @property
    def response_start(self) -> int:
        """Index of the first response token: the ids before it (template head, BOS, prompt) are never masked."""
        return int(self.response_positions[0])

    @property
    def response_end(self) -> int:
        """One past the last response token; ids from here on (template end text) are never masked."""
        return int(self.response_positions[-1]) + 1


@dataclass
class PromptCache:
    """A causal RM's KV cache of the never-masked ids before the response (batch 1), their count, and the score read
    at the last of them (the value of a row that keeps no response token and has nothing after the response)."""

    kv: object
    length: int
    last_score: float


def pick_device(requested: str = "auto") -> str:
    """'auto' → cuda when a GPU is visible (this process's first), else cpu."""
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str) -> str:
    """'auto' → bf16 on CUDA (tensor cores, drift small at RM logit scale), fp32 on CPU (exact by default)."""
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise ModelLoadError(f"dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
        return requested
    return "bfloat16" if device.startswith("cuda") else "float32"


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has bf16 kernels on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds without the probe: be conservative
        return False


def pick_explain_dtype(requested: str, device: str, dtype: str) -> str:
    """Precision of coalition rows (the sequence score R is always computed at `dtype`).

    'auto' → bfloat16 on CUDA and on CPUs with native bf16, else the model's dtype. Measured on the demo RM
    (bench/attribution.py): bf16 rows are ~3.5× cheaper and move SHAP values far less than their sampling noise.
    """
    if requested == "auto":
        if dtype != "float32":
            return dtype
        fast = device.startswith("cuda") or cpu_has_fast_bf16()
        return "bfloat16" if fast else "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise ModelLoadError(f"explain dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    return requested


def _fingerprint(path: Path) -> str:
    """Content hash of config and weights: a revision that changes whenever the model does (cache keys use it)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            with open(path / name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def _resolve_score_spec(config, positive_label: Optional[str], negative_label: Optional[str]) -> ScoreSpec:
    num_labels = int(getattr(config, "num_labels", 1))
    label2id = {str(k).lower(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}

    def index_of(label: str) -> int:
        if label.lower() in label2id:
            return label2id[label.lower()]
        if label.lstrip("-").isdigit() and 0 <= int(label) < num_labels:
            return int(label)
        raise ModelLoadError(f"label {label!r} is not in the model's labels {sorted(label2id)} nor an index < {num_labels}")

    if num_labels == 1:
        return ScoreSpec(positive=0)
    if positive_label is not None:
        positive = index_of(positive_label)
    else:
        positive = next((label2id[n] for n in ("positive", "pos", "label_1") if n in label2id), 1)
    if negative_label is not None:
        return ScoreSpec(positive, index_of(negative_label))
    if num_labels == 2:
        return ScoreSpec(positive, 1 - positive)
    raise ModelLoadError(
        f"the model has {num_labels} labels: say which ones make the score with --positive-label and --negative-label"
    )


_RESPONSE_SENTINEL = "\ue000tokencredit-response\ue000"


def chat_template_parts(tokenizer, prompt: str) -> Optional[Tuple[str, str]]:
    """The tokenizer's chat template rendered around the response of [user: prompt, assistant: response]: (text
    before it, text after it), or None when the tokenizer has no chat template (see `chat_messages_parts`).

    Raises:
        ValueError: the template refuses the conversation, or drops or repeats the response.
    """
    return chat_messages_parts(tokenizer, [{"role": "user", "content": prompt}])


def _laid_around(tokenizer, before: str, response: str, after: str):
    """ids(before) + ids(response) + ids(after), each part tokenized on its own, so the response's ids and spans never
    depend on what surrounds it: (ids, response positions, response character spans)."""
    resp = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(int(a), int(b)) for a, b in resp["offset_mapping"]]
    head = list(tokenizer(before, add_special_tokens=False)["input_ids"]) if before else []
    tail = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else []
    return head + list(resp["input_ids"]) + tail, list(range(len(head), len(head) + len(spans))), spans


def _prefix_specials(tokenizer) -> List[int]:
    """The special ids the tokenizer puts before a text ([BOS] for Llama, none for GPT-2), found by tokenizing a
    probe with and without them (the ids it may put after, such as an EOS, are the layout's own business)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []  # specials that merge with the text cannot be separated from it, so none are added


def causal_layout(
    tokenizer, prompt: str, response: str, *, use_chat_template: bool = True
) -> Tuple[List[int], List[int], List[Tuple[int, int]]]:
    """Token ids of (prompt, response) for a causal RM: (ids, response positions, response character spans).

    With a chat template (and `use_chat_template`): ids(text before) + ids(response) + ids(text after), each part
    tokenized on its own, so the response's ids and spans never depend on the prompt or the template; the score
    is read at the last id, the template's end-of-turn text, which is never masked. Without one, the input TRL's
    RewardTrainer trains a plain-text RM on: [the tokenizer's prefix specials such as BOS] + ids(prompt) +
    ids(response) + [EOS], with the score read where the RM's own `ForSequenceClassification` head reads it, the
    last non-pad token. So the EOS is appended (an always-kept reading position) only when it is not also the pad
    token: where eos = pad (GPT-2, SmolLM2, Llama-3 trained with pad = eos), HF's head skips it and the RM was
    trained to read the text's last token. Then a coalition is read at its last kept token (the RM's score of the
    text that remains), never at an absent one; see `RewardModel.read_positions`.
    """
    parts = chat_template_parts(tokenizer, prompt) if use_chat_template else None
    if parts is not None:
        before, after = parts
        return _laid_around(tokenizer, before, response, after)
    resp = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(int(a), int(b)) for a, b in resp["offset_mapping"]]
    head = _prefix_specials(tokenizer)
    head += list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tail = [eos] if eos is not None and eos != pad else []
    ids = head + list(resp["input_ids"]) + tail
    positions = list(range(len(head), len(head) + len(spans)))
    return ids, positions, spans


# ------------------------------------------------------------------------------------------------------------------
# Conversations (`messages` items). A conversation is laid out as its history (every message but the last) and the
# response (the last, assistant, message's text). History messages here are plain dicts, normalised once by
# `normalize_messages`: content a string, tool-call arguments the string the caller sent.


def message_text(content) -> str:
    """A message's content as text: the string, its text blocks concatenated, or "" for null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(block["text"] for block in content)


def normalize_messages(messages: List[dict]) -> List[dict]:
    """OpenAI-style messages (dicts, already validated: text blocks only) with string content; tool calls, their
    ids and names kept. Templates written for string content (most of them) then render text-block messages too."""
    out = []
    for m in messages:
        n = {"role": m["role"], "content": message_text(m.get("content"))}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                n[key] = copy.deepcopy(m[key])
        out.append(n)
    return out


def _template_messages(history: List[dict]) -> List[dict]:
    """History as HF chat templates take it: tool-call arguments as an object when they parse as a JSON object
    (templates write them with `| tojson`; a string would come out quoted twice), else the string as sent."""
    out = []
    for m in history:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = dict(call["function"])
                try:
                    parsed = json.loads(function["arguments"])
                except (TypeError, ValueError):
                    parsed = None
                if isinstance(parsed, dict):
                    function["arguments"] = parsed
                calls.append({**call, "function": function})
            m["tool_calls"] = calls
        out.append(m)
    return out


def chat_messages_parts(tokenizer, history: List[dict]) -> Optional[Tuple[str, str]]:
    """The chat template rendered around the response of a conversation: (text before it, text after it), or
    None when the tokenizer has no chat template. `history` + [assistant: placeholder] is rendered once, as in
    a placeholder, so the response's own tokens never depend on the conversation (only they are ever masked) and
    the text after it (end-of-turn markers) is where the score is read.

    Raises:
        ValueError: the template refuses the conversation (its own error, e.g. roles that do not alternate), or
            drops or repeats the response.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = _template_messages(history) + [{"role": "assistant", "content": _RESPONSE_SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja raises TemplateError, TypeError, ... for conversations a template refuses
        raise ValueError(f"the RM's chat template cannot render these messages: {type(exc).__name__}: {exc}") from None
    before, found, after = text.partition(_RESPONSE_SENTINEL)
    if not found or _RESPONSE_SENTINEL in after:
        raise ValueError("the RM's chat template does not render the assistant's response exactly once")
    return before, after


def plain_conversation(history: List[dict]) -> str:
    """A conversation's history as plain text, for RMs without a chat template (encoder RMs, causal RMs without
    one or with it switched off): one line per message, "role: text", and one line per tool call,
    "role: name(arguments)" (the arguments as sent); names and tool-call ids are not rendered. Every line ends
    with a newline, so the response that follows starts on a line of its own. "" for an empty history."""
    lines = []
    for m in history:
        if m["content"] or not m.get("tool_calls"):
            lines.append(f"{m['role']}: {m['content']}")
        for call in m.get("tool_calls") or ():
            lines.append(f"{m['role']}: {call['function']['name']}({call['function']['arguments']})")
    return "".join(line + "\n" for line in lines)


def causal_messages_layout(
    tokenizer, history: List[dict], response: str, *, use_chat_template: bool = True
) -> Tuple[List[int], List[int], List[Tuple[int, int]]]:
    """`causal_layout` for a conversation: with a chat template (and `use_chat_template`), ids(text before) +
    ids(response) + ids(text after) of the whole conversation rendered once; without, the plain-text history
    (`plain_conversation`) is the prompt of the plain layout."""
    parts = chat_messages_parts(tokenizer, history) if use_chat_template else None
    if parts is None:
        return causal_layout(tokenizer, plain_conversation(history), response, use_chat_template=False)
    before, after = parts
    return _laid_around(tokenizer, before, response, after)


def _drop_oldest(history: List[dict], k: int) -> List[dict]:
    """History without its k oldest non-system messages (never the newest one, which the response answers); then
    without the next ones until the oldest remaining non-system message is a user message (strict templates
    refuse a conversation that opens with an assistant or tool turn), as long as more than one is left."""
    others = [i for i, m in enumerate(history) if m["role"] != "system"]
    k = min(k, max(len(others) - 1, 0))
    while k < len(others) - 1 and history[others[k]]["role"] != "user":
        k += 1
    dropped = set(others[:k])
    return [m for i, m in enumerate(history) if i not in dropped]


@dataclass
class RewardModel:
    """A loaded RM plus everything needed to run it on masked token ids."""

    path: Path
    name: str
    revision: str
    kind: RMKind
    tokenizer: object
    model: object
    device: str
    dtype: str
    score_spec: ScoreSpec
    mask_token_id: int
    max_length: int
    extra: dict = field(default_factory=dict)
    # Precision of coalition rows; the score R always uses `dtype`. When they differ, `row_model` is a copy of
    # the model cast to `explain_dtype` (cast weights ran ~20 % faster than autocast on the demo RM).
    explain_dtype: str = "float32"
    row_model: object = None
    # Reuse the prompt's KV cache for causal RMs (only response tokens are masked, so it is exact).
    kv_reuse: bool = True
    # torch.compile'd row model (dynamic shapes, frozen weights); None = eager rows. See `compile_rows`.
    compiled_rows: object = None
    # Causal RMs: lay (prompt, response) out with the tokenizer's chat template when it has one.
    chat_template: bool = True
    # Causal RMs: how coalition rows leave tokens out (CAUSAL_MASKING_MODES); encoder RMs ignore it.
    causal_masking: str = DEFAULT_CAUSAL_MASKING
    _ellipsis: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str = "auto",
        kind: str = "auto",
        positive_label: Optional[str] = None,
        negative_label: Optional[str] = None,
        mask_token: Optional[str] = None,
        max_length: Optional[int] = None,
        explain_dtype: str = "auto",
        kv_reuse: bool = True,
        compile_rows: str = "off",
        load_weights: bool = True,
        prune_last_layer: bool = True,
        chat_template: bool = True,
        causal_masking: str = DEFAULT_CAUSAL_MASKING,
    ) -> "RewardModel":
        """Load an `AutoModelForSequenceClassification` directory.

        Args:
            path: local directory holding config.json, weights and a fast tokenizer.
            device: "auto", "cpu", "cuda", "cuda:1", ...
            dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16".
            kind: "auto", "encoder" or "causal".
            positive_label / negative_label: labels (names or indices) forming the score for multi-label heads.
            mask_token: token that replaces masked response tokens; default mask, else unk, else pad, else eos.
            max_length: cap on RM input length; default the model's position limit.
            explain_dtype: precision of coalition rows: "auto", "float32", "bfloat16", "float16".
            kv_reuse: compute a causal RM's prompt once per explanation and reuse its KV cache.
            compile_rows: "on", "off" or "auto" (on for encoder RMs on CPU): run an encoder RM's coalition rows
                through `torch.compile(dynamic=True)` (inductor, frozen weights), ×1.33 per row on the demo RM (CPU,
                bf16; bench/RESULTS.md). The first row batch compiles (~16 s for the demo RM on CPU: the service
                warms up before it reports ready); other lengths and batch sizes reuse the graph. Rows fall back to eager if
                compilation fails. Not measured on GPU, so auto leaves it off there.
            load_weights: False builds the network on torch's meta device (structure, no weights): enough for
                validation and layout (`Engine.prepare`) in a process that never runs the RM, such as the API
                in front of Celery workers.
            prune_last_layer: coalition rows of a supported encoder RM (BERT/RoBERTa classifiers) compute the last
                layer at the scoring position only: same arithmetic, 14 % fewer FLOPs per row on the demo RM.
                False runs the full model (a switch for the benchmark).
            chat_template: causal RMs whose tokenizer has a chat template read [user: prompt, assistant: response]
                rendered with it (`causal_layout`); False (or no template): BOS + prompt + response, + EOS
                unless the EOS is the pad token.
            causal_masking: how a causal RM's coalition rows leave tokens out: "attention", "delete", "ellipsis"
                or "replace" (see `CAUSAL_MASKING_MODES`; default chosen by bench/causal_masking.py). Encoder RMs
                always replace absent tokens by [MASK].

        Raises:
            ModelLoadError: the directory is missing, not a sequence classifier, or has no usable tokenizer.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        from workers.score_position_rows import score_position_rows

        root = Path(path).expanduser()
        if not (root / "config.json").is_file():
            raise ModelLoadError(f"{root} is not a model directory (no config.json); pass --model DIR of a saved model")
        config = AutoConfig.from_pretrained(root)
        if kind == "auto":
            model_type = config.model_type
            causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            kind = "causal" if causal else "encoder"
        if kind not in ("encoder", "causal"):
            raise ModelLoadError(f"kind must be auto, encoder or causal, got {kind!r}")
        if causal_masking not in CAUSAL_MASKING_MODES:
            modes = ", ".join(CAUSAL_MASKING_MODES)
            raise ModelLoadError(f"causal_masking must be one of {modes}, got {causal_masking!r}")
        tokenizer = AutoTokenizer.from_pretrained(root)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"{root} has no fast tokenizer (tokenizer.json); offsets are needed for alignment")
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        try:
            compile_wanted = wants_compile(compile_rows, kind, device)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        if load_weights:
            model = from_pretrained_fast_attention(AutoModelForSequenceClassification, root, getattr(torch, dtype))
            model.to(device).eval()
        else:
            with torch.device("meta"):
                model = AutoModelForSequenceClassification.from_config(config)
        spec = _resolve_score_spec(config, positive_label, negative_label)
        if mask_token is not None:
            mask_id = tokenizer.convert_tokens_to_ids(mask_token)
            if mask_id is None or mask_id == tokenizer.unk_token_id and mask_token != tokenizer.unk_token:
                raise ModelLoadError(f"mask token {mask_token!r} is not in the tokenizer's vocabulary")
        else:
            candidates = (tokenizer.mask_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
            mask_id = next((c for c in candidates if c is not None), None)
            if mask_id is None:
                raise ModelLoadError("the tokenizer has no mask, unk, pad or eos token: name one with --mask-token")
        limit = getattr(config, "max_position_embeddings", None) or 512
        model_max = getattr(tokenizer, "model_max_length", limit) or limit
        limit = min(limit, model_max) if model_max < 1e9 else limit
        if max_length is not None:
            limit = min(limit, max_length)
        meta = {}
        if (root / "tokencredit_demo.json").is_file():
            meta = json.loads((root / "tokencredit_demo.json").read_text())
        explain_dtype = pick_explain_dtype(explain_dtype, device, dtype)
        row_model = model
        if explain_dtype != dtype and load_weights:
            row_model = copy.deepcopy(model).to(getattr(torch, explain_dtype)).eval()
        pruned = score_position_rows(row_model) if prune_last_layer and kind == "encoder" else None
        row_model = pruned if pruned is not None else row_model
        return cls(
            path=root,
            name=root.name,
            revision=_fingerprint(root),
            kind=kind,
            tokenizer=tokenizer,
            model=model,
            device=device,
            dtype=dtype,
            score_spec=spec,
            mask_token_id=int(mask_id),
            max_length=int(limit),
            extra=meta,
            explain_dtype=explain_dtype,
            row_model=row_model,
            kv_reuse=kv_reuse,
            compiled_rows=compiled_row_model(row_model) if load_weights and compile_wanted else None,
            chat_template=chat_template,
            causal_masking=causal_masking,
        )

    @property
    def score_position_rows(self) -> bool:
        """Rows compute the last layer at the scoring position only (supported encoder RMs; see
        workers/score_position_rows.py). Read off the row network, so it cannot disagree with what runs."""
        return type(self.row_model).__name__ == "ScorePositionRows"

    # ----------------------------------------------------------------------------------------------------------
    # Layout
    def ellipsis_ids(self, opens_response: bool) -> np.ndarray:
        """The ids that stand for one run of absent tokens under "ellipsis" masking. shap's Text masker writes
        " ..." for the run and strips the text's ends, so a run that opens the response is "..." and any other
        " ..."; tokenized once, on its own, like the response."""
        text = "..." if opens_response else " ..."
        if text not in self._ellipsis:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._ellipsis[text] = np.asarray(ids, dtype=np.int64)
        return self._ellipsis[text]

    def count_response_tokens(self, response: str) -> int:
        return len(self.tokenizer(response, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str, response: str) -> RMInput:
        """Lay out (prompt, response); the prompt is cut from the left when the pair is longer than the RM allows.

        Response tokens are tokenized on their own (the pair template pre-tokenizes each side separately; the
        causal layout concatenates ids), so their ids and spans never depend on the prompt, and only they are
        masked. Raises ValueError when the response alone does not fit.
        """
        ids, type_ids, positions, spans = self._layout(prompt, response)
        truncated = False
        excess = len(ids) - self.max_length
        if excess > 0:
            prompt_offsets = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if excess > len(prompt_offsets):
                raise ValueError(f"response is {len(positions)} RM tokens; with the RM's special tokens it exceeds {self.max_length}")
            # Keep the end of the prompt: it is what the response answers.
            prompt = prompt[prompt_offsets[excess][0]:] if excess < len(prompt_offsets) else ""
            ids, type_ids, positions, spans = self._layout(prompt, response)
            truncated = True
            while len(ids) > self.max_length and prompt:
                # Re-tokenizing a cut prompt can merge differently; shave one more token until it fits.
                offsets = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                prompt = prompt[offsets[1][0]:] if len(offsets) > 1 else ""
                ids, type_ids, positions, spans = self._layout(prompt, response)
        return self._rm_input((ids, type_ids, positions, spans), truncated)

    def _rm_input(self, laid, truncated: bool) -> RMInput:
        ids, type_ids, positions, spans = laid
        return RMInput(
            input_ids=np.asarray(ids, dtype=np.int64),
            token_type_ids=None if type_ids is None else np.asarray(type_ids, dtype=np.int64),
            response_positions=np.asarray(positions, dtype=np.int64),
            response_spans=spans,
            score_position=0 if self.kind == "encoder" else len(ids) - 1,
            prompt_truncated=truncated,
        )

    def encode_messages(self, messages: List[dict]) -> RMInput:
        """Lay out a conversation (OpenAI-style dicts, validated: the last is the assistant's response).

        Causal RMs with a chat template (and `chat_template` on) read the whole conversation rendered with it; other
        RMs read the plain-text history (`plain_conversation`) as the prompt: the pair's first text for encoders,
        the text before the response for causal RMs. Too long: the oldest non-system messages are dropped first
        (all but the newest, `_drop_oldest`), then the first remaining message is cut from the left (dropped when
        nothing of it would remain), until it fits; `prompt_truncated` says so. Raises ValueError when the
        response alone does not fit, or when the chat template refuses the conversation.
        """
        history = normalize_messages(messages[:-1])
        response = message_text(messages[-1].get("content"))
        laid = self._messages_layout(history, response)
        truncated = False
        if len(laid[0]) > self.max_length:
            truncated = True
            history, laid = self._fit_by_dropping(history, response)
            while len(laid[0]) > self.max_length:
                if not history:
                    raise ValueError(
                        f"response is {len(laid[2])} RM tokens; with the RM's special tokens and template it exceeds {self.max_length}"
                    )
                history = self._cut_first(history, len(laid[0]) - self.max_length)
                laid = self._messages_layout(history, response)
        return self._rm_input(laid, truncated)

    def _messages_layout(self, history: List[dict], response: str):
        if self.kind == "causal":
            ids, positions, spans = causal_messages_layout(self.tokenizer, history, response, use_chat_template=self.chat_template)
            return ids, None, positions, spans
        return self._layout(plain_conversation(history), response)

    def _fit_by_dropping(self, history: List[dict], response: str):
        """The fewest oldest non-system messages dropped so that the conversation fits (binary search: one layout
        per step, not per message), or all that may be dropped when none suffices; (history, its layout)."""
        n_others = sum(m["role"] != "system" for m in history)
        lo, hi = 1, max(n_others - 1, 1)
        best = _drop_oldest(history, hi)
        best_laid = self._messages_layout(best, response)
        if len(best_laid[0]) > self.max_length:
            return best, best_laid
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = _drop_oldest(history, mid)
            laid = self._messages_layout(candidate, response)
            if len(laid[0]) <= self.max_length:
                hi, best, best_laid = mid, candidate, laid
            else:
                lo = mid + 1
        return best, best_laid

    def _cut_first(self, history: List[dict], excess: int) -> List[dict]:
        """History with its first message's text cut by `excess` RM tokens from the left (it keeps its end, nearest
        the response), or without that message when nothing of its text would remain."""
        first = history[0]
        offsets = self.tokenizer(first["content"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if excess >= len(offsets) or first.get("tool_calls"):
            return history[1:]
        return [{**first, "content": first["content"][offsets[excess][0]:]}] + history[1:]

    def _layout(self, prompt: str, response: str):
        tok = self.tokenizer
        if self.kind == "causal":
            ids, positions, spans = causal_layout(tok, prompt, response, use_chat_template=self.chat_template)
            return ids, None, positions, spans
        # Encoder: the tokenizer's own pair template ([CLS] prompt [SEP] response [SEP] for BERT).
        # Token type ids only when the tokenizer itself returns them: the RM was trained on what it returns.
        enc = tok(prompt, response, return_offsets_mapping=True)
        sequence_ids = enc.sequence_ids()
        positions = [i for i, s in enumerate(sequence_ids) if s == 1]
        spans = [(int(a), int(b)) for a, b in (enc["offset_mapping"][i] for i in positions)]
        return list(enc["input_ids"]), enc.get("token_type_ids"), positions, spans

    # ----------------------------------------------------------------------------------------------------------
    # Forward passes
    def _net(self, low_precision: bool):
        return self.row_model if low_precision and self.row_model is not None else self.model

    @property
    def reads_last_position(self) -> bool:
        """Causal RMs with a `score` head: we run the backbone and read the score where we choose."""
        return self.kind == "causal" and hasattr(self.model, "score")

    @property
    def masking(self) -> str:
        """The value function of coalition rows: `causal_masking` for causal RMs whose backbone we run, else
        replacement of absent tokens by the mask id (encoder RMs: [MASK], which is what they were pre-trained on)."""
        return self.causal_masking if self.reads_last_position else "replace"

    @staticmethod
    def read_positions(rm_input: RMInput, keep: np.ndarray) -> np.ndarray:
        """Where the score of each fixed-length coalition row is read: int64 [N], indices into `input_ids`.

        `keep` is bool [N, T] over the response tokens. With ids after the response (the chat template's end
        text, or a plain-text layout's EOS), always the last id. Otherwise the last kept response token,
        else the last id before the response: the RM's score of the text that remains, read where the RM's own
        classification head reads it, and never at an absent token. -1 when no id precedes the response and no
        token is kept (an empty text; its value is 0.0, as `prefix_scores` entry 0).
        """
        keep = np.asarray(keep, dtype=bool)
        n = len(keep)
        if rm_input.response_end < len(rm_input.input_ids):
            return np.full(n, len(rm_input.input_ids) - 1, dtype=np.int64)
        last_kept = rm_input.response_start + keep.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)
        return np.where(keep.any(axis=1), last_kept, rm_input.response_start - 1).astype(np.int64)

    def prompt_cache(self, prefix_ids: np.ndarray, low_precision: bool = False) -> PromptCache:
        """KV cache of the never-masked ids before the response of a causal RM, batch 1, and the score read at
        the last of them. Caller holds inference_mode."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(prefix_ids[None])).to(self.device)
        net = self._net(low_precision)
        out = net.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        kv = getattr(out, "cache", None)
        kv = out.past_key_values if kv is None else kv
        last_score = float(self._logits_to_score(net.score(out.last_hidden_state[:, -1]))[0])
        return PromptCache(kv=kv, length=int(ids.shape[1]), last_score=last_score)

    def scores(
        self,
        input_ids: np.ndarray,
        token_type_ids: Optional[np.ndarray],
        low_precision: bool = False,
        prompt_cache: Optional[PromptCache] = None,
        visible: Optional[np.ndarray] = None,
        read_at: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Scores of a [N, C] batch of rows, float64 [N]. Caller holds inference_mode.

        Without `visible` and `read_at`, rows are unpadded and the score is read at the last column (encoders: at
        [CLS] by their own head). Causal RMs only:
            prompt_cache: `input_ids` holds only the columns after the cached prefix; every row shares that
                never-masked prefix, so its keys and values are computed once. Position ids continue after it.
            visible: bool [N, C]; a False column is seen by no other position ("attention" masking). Every column
                keeps its position id.
            read_at: int [N], the column where row i's score is read (>= 0). Columns after it may hold anything
                (padding, absent tokens): in a causal model no earlier position attends to them.
        """
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device)
        n = ids.shape[0]
        net = self._net(low_precision)
        # Encoder rows only (causal RMs run their backbone piecewise and reuse the prompt's KV cache). Batches of
        # one would specialise the dynamic graph and recompile (~20 s), so they stay eager.
        if self.compiled_rows is not None and low_precision and not self.reads_last_position and n > 1:
            try:
                return self._scores_with(self.compiled_rows, ids, token_type_ids, None)
            except Exception as exc:  # inductor needs a C++ toolchain; eager rows are always correct
                logger.warning("compiled rows failed (%s: %s); rows run eager from now on", type(exc).__name__, exc)
                self.compiled_rows = None
        return self._scores_with(net, ids, token_type_ids, prompt_cache, visible, read_at)

    def _scores_with(self, net, ids, token_type_ids, prompt_cache, visible=None, read_at=None) -> np.ndarray:
        import torch

        if self.reads_last_position:
            # Read the score ourselves: HF picks the last non-pad token, which is wrong when the mask id equals the
            # pad id, and knows nothing of rows read before their end.
            logits = net.score(self._causal_hidden(net, ids, prompt_cache, visible, read_at))
        else:
            kwargs = {"attention_mask": torch.ones_like(ids)}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = torch.from_numpy(np.ascontiguousarray(token_type_ids)).to(self.device)
            logits = net(input_ids=ids, **kwargs).logits
        return self._logits_to_score(logits)

    def _causal_hidden(self, net, ids, prompt_cache, visible, read_at):
        """Last-layer hidden state at each row's reading column, [N, H]."""
        import torch

        device = ids.device
        if read_at is not None:
            read = torch.as_tensor(np.asarray(read_at, dtype=np.int64), device=device)
            # Columns after the last reading column cannot change any score: do not compute them.
            width = int(np.max(read_at)) + 1
            ids = ids[:, :width]
            visible = None if visible is None else visible[:, :width]
        n, width = ids.shape
        past = 0 if prompt_cache is None else prompt_cache.length
        kwargs = {}
        if prompt_cache is not None:
            cache = copy.deepcopy(prompt_cache.kv)
            cache.batch_repeat_interleave(n)
            kwargs[_cache_keyword(net.base_model)] = cache
        # Explicit position ids: the row's columns continue after the cached prefix (under "attention" absent columns
        # keep theirs, so every kept token sits at its own position in the full input).
        positions = torch.arange(past, past + width, device=device).unsqueeze(0).expand(n, width)
        if visible is not None and not np.all(visible):
            mask = _visibility_mask(visible, past, net.dtype, device)
        else:
            # No padding mask: whatever follows a row's reading column (right padding, absent tokens) is unseen by
            # it in a causal model, and all-ones keeps SDPA on its plain causal path.
            mask = torch.ones((n, past + width), dtype=torch.long, device=device)
        hidden = net.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).last_hidden_state
        if read_at is None:
            return hidden[:, -1]
        return hidden[torch.arange(n, device=device), read]

    def _logits_to_score(self, logits) -> np.ndarray:
        logits = logits.float()
        out = logits[..., self.score_spec.positive]
        if self.score_spec.negative is not None:
            out = out - logits[..., self.score_spec.negative]
        return out.double().cpu().numpy()

    def prefix_scores(self, rm_input: RMInput) -> np.ndarray:
        """Scores after each response prefix of a causal RM, in one forward pass: float64 [T + 1].

        Entry 0 is the score read at the last id before the response (0.0 when nothing precedes it), entry t the
        score read at response token t. Entry T is read at the last response token: it is the sequence score R
        only when nothing follows the response; with a chat template R is read at the template's end text, and
        R − entry T is that text's share. Differences telescope exactly to entry T − entry 0.
        """
        import torch

        if not self.reads_last_position:
            raise ValueError("prefix scoring needs a causal RM with a score head")
        start, end = rm_input.response_start, rm_input.response_end
        # Ids after the response cannot change the scores before them (causal): they are not computed.
        ids = torch.from_numpy(np.ascontiguousarray(rm_input.input_ids[None, :end])).to(self.device)
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            rows = hidden[max(start - 1, 0) : end]
            scores = self._logits_to_score(self.model.score(rows))
        return np.concatenate([[0.0], scores]) if start == 0 else scores

    def attention_row(self, rm_input: RMInput) -> np.ndarray:
        """Last-layer attention from the scoring position to each response token, heads averaged (ABC).

        Causal RMs: the scoring position is the last id (the chat template's end text when there is one)."""
        import torch

        ids = torch.from_numpy(rm_input.input_ids[None]).to(self.device)
        kwargs = {"attention_mask": torch.ones_like(ids), "output_attentions": True}
        if rm_input.token_type_ids is not None:
            kwargs["token_type_ids"] = torch.from_numpy(rm_input.token_type_ids[None]).to(self.device)
        with torch.inference_mode(), eager_attention(self.model):
            out = self.model(input_ids=ids, **kwargs)
        last = out.attentions[-1][0].float().mean(dim=0)  # [L, L], heads averaged
        row = last[rm_input.score_position].double().cpu().numpy()
        return row[rm_input.response_positions]


_CACHE_KEYWORDS: dict = {}


def _cache_keyword(backbone) -> str:
    """`cache` since transformers 5.x renamed it; `past_key_values` before (and deprecated, with a warning, after)."""
    import inspect

    kind = type(backbone)
    if kind not in _CACHE_KEYWORDS:
        params = inspect.signature(kind.forward).parameters
        _CACHE_KEYWORDS[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORDS[kind]


def _visibility_mask(visible: np.ndarray, past: int, dtype, device):
    """Additive 4D attention mask [N, 1, C, past + C] for rows whose False columns no other position may see.

    Query q sees key k when k ≤ q (causal) and k is visible (the `past` cached columns always are) or k = q: an
    absent token sees itself, so no query row is fully masked (with -inf that row is NaN, which leaks through
    0 × NaN; with dtype-min it averages every column, later ones included). Its own output is seen by nobody, so
    this changes no score. Additive (0 / dtype min) so eager and SDPA attention read it alike; HF passes 4D masks
    through unchanged.
    """
    import torch

    n, width = visible.shape
    keys = past + width
    key_visible = torch.ones((n, keys), dtype=torch.bool, device=device)
    key_visible[:, past:] = torch.as_tensor(np.asarray(visible, dtype=bool), device=device)
    query_at = torch.arange(past, keys, device=device)[:, None]
    key_at = torch.arange(keys, device=device)[None, :]
    allowed = (key_at <= query_at)[None] & (key_visible[:, None, :] | (key_at == query_at)[None])
    mask = torch.zeros((n, 1, width, keys), dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

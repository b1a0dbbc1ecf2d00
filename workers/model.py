"""Loading a sequence-classification reward model (RM) and laying out its inputs.

This is the only module that knows how an RM is laid out: encoder RMs (BERT-like) read (prompt, response) as a
text pair and score at [CLS]; causal RMs (Llama/GPT-2-like) read prompt then response and score at the last token.
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

__all__ = ["RewardModel", "RMInput", "ScoreSpec", "ModelLoadError", "pick_device", "pick_dtype"]

RMKind = Literal["encoder", "causal"]


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
    score_position: int  # where the score (and the attention row) is read
    prompt_truncated: bool = False

    @property
    def response_ids(self) -> np.ndarray:
        return self.input_ids[self.response_positions]

    @property
    def n_tokens(self) -> int:
        return int(len(self.response_positions))


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
        )

    @property
    def score_position_rows(self) -> bool:
        """Rows compute the last layer at the scoring position only (supported encoder RMs; see
        workers/score_position_rows.py). Read off the row network, so it cannot disagree with what runs."""
        return type(self.row_model).__name__ == "ScorePositionRows"

    # ----------------------------------------------------------------------------------------------------------
    # Layout
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
        score_position = 0 if self.kind == "encoder" else len(ids) - 1
        return RMInput(
            input_ids=np.asarray(ids, dtype=np.int64),
            token_type_ids=None if type_ids is None else np.asarray(type_ids, dtype=np.int64),
            response_positions=np.asarray(positions, dtype=np.int64),
            response_spans=spans,
            score_position=score_position,
            prompt_truncated=truncated,
        )

    def _layout(self, prompt: str, response: str):
        tok = self.tokenizer
        if self.kind == "causal":
            # [prefix specials such as BOS] + prompt + response; the score is read at the last response token.
            prefix = list(tok("", add_special_tokens=True)["input_ids"])
            prompt_ids = list(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
            resp = tok(response, add_special_tokens=False, return_offsets_mapping=True)
            start = len(prefix) + len(prompt_ids)
            ids = prefix + prompt_ids + list(resp["input_ids"])
            positions = list(range(start, len(ids)))
            return ids, None, positions, [(int(a), int(b)) for a, b in resp["offset_mapping"]]
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
        """Causal RMs with a `score` head: we run the backbone and read the last position ourselves."""
        return self.kind == "causal" and hasattr(self.model, "score")

    def prompt_cache(self, prefix_ids: np.ndarray, low_precision: bool = False):
        """KV cache of the unmasked prefix (BOS + prompt) of a causal RM, batch 1. Caller holds inference_mode."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(prefix_ids[None])).to(self.device)
        net = self._net(low_precision)
        return net.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values

    def scores(
        self,
        input_ids: np.ndarray,
        token_type_ids: Optional[np.ndarray],
        low_precision: bool = False,
        prompt_cache=None,
    ) -> np.ndarray:
        """Scores of a [N, L] batch of equal-length rows (no padding), float64 [N]. Caller holds inference_mode.

        With `prompt_cache` (causal RMs), `input_ids` holds only the response columns and the cached prefix
        supplies the rest: every row shares the same unmasked prompt, so its keys and values are computed once.
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
        return self._scores_with(net, ids, token_type_ids, prompt_cache)

    def _scores_with(self, net, ids, token_type_ids, prompt_cache) -> np.ndarray:
        import torch

        n = ids.shape[0]
        if self.reads_last_position:
            # Read the last position ourselves: HF picks the last non-pad token, which is wrong when the mask
            # id equals the pad id and the last response token is masked.
            if prompt_cache is not None:
                cache = copy.deepcopy(prompt_cache)
                cache.batch_repeat_interleave(n)
                past = cache.get_seq_length()
                mask = torch.ones((n, past + ids.shape[1]), dtype=torch.long, device=ids.device)
                hidden = net.base_model(input_ids=ids, attention_mask=mask, past_key_values=cache).last_hidden_state
            else:
                hidden = net.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            logits = net.score(hidden[:, -1])
        else:
            kwargs = {"attention_mask": torch.ones_like(ids)}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = torch.from_numpy(np.ascontiguousarray(token_type_ids)).to(self.device)
            logits = net(input_ids=ids, **kwargs).logits
        return self._logits_to_score(logits)

    def _logits_to_score(self, logits) -> np.ndarray:
        logits = logits.float()
        out = logits[..., self.score_spec.positive]
        if self.score_spec.negative is not None:
            out = out - logits[..., self.score_spec.negative]
        return out.double().cpu().numpy()

    def prefix_scores(self, rm_input: RMInput) -> np.ndarray:
        """Scores after each response prefix of a causal RM, in one forward pass: float64 [T + 1].

        Entry 0 is the score read at the last token before the response (0.0 when nothing precedes it), entry t
        the score after response token t; entry T is the sequence score. Differences telescope exactly.
        """
        import torch

        if not self.reads_last_position:
            raise ValueError("prefix scoring needs a causal RM with a score head")
        ids = torch.from_numpy(rm_input.input_ids[None]).to(self.device)
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            start = int(rm_input.response_positions[0])
            rows = hidden[max(start - 1, 0) :]
            scores = self._logits_to_score(self.model.score(rows))
        return np.concatenate([[0.0], scores]) if start == 0 else scores

    def attention_row(self, rm_input: RMInput) -> np.ndarray:
        """Last-layer attention from the scoring position to each response token, heads averaged (ABC)."""
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

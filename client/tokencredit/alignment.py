"""Move per-token reward mass from the reward model's tokens to the policy's tokens.

The two tokenizations of a response rarely agree, so mass travels through the UTF-8 bytes of the response, which
both tokenizations cover: each source value is spread uniformly over the bytes of its span, and each target token
receives the mass of the bytes it covers. Bytes are used rather than characters because byte-level tokenizers
(GPT-2 style BPE, SentencePiece byte fallback) split one character into several tokens.

Only numpy and the standard library are used here, so the client SDK stays light; the caller supplies `decode`.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "AlignmentError", "utf8_char_to_byte", "char_spans_to_byte_spans", "byte_spans_to_char_spans",
    "policy_byte_spans_from_ids", "policy_char_spans_from_ids", "transfer_mass", "align_to_policy",
]

Span = Tuple[int, int]


class AlignmentError(ValueError):
    """Spans, values or token ids do not fit the response text or each other."""


def _short(text: str, limit: int = 60) -> str:
    # Error messages quote the strings, but a 10k-character response would drown the message.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def utf8_char_to_byte(text: str) -> np.ndarray:
    """Byte offset of every character index of `text` in its UTF-8 encoding.

    Args:
        text: The string.

    Returns:
        int64 array of length `len(text) + 1`; entry `c` is the number of UTF-8 bytes of `text[:c]`.
    """
    # Code points via UTF-32 are vectorisable; surrogatepass keeps lone surrogates (3 bytes each, as in WTF-8).
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    widths = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    out = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(widths, out=out[1:])
    return out


def _as_spans(spans: Sequence[Sequence[int]], what: str) -> np.ndarray:
    arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2) if len(spans) else np.zeros((0, 2), dtype=np.int64)
    bad = np.flatnonzero((arr[:, 0] < 0) | (arr[:, 0] > arr[:, 1]))
    if bad.size:
        k = int(bad[0])
        raise AlignmentError(f"{what}[{k}] = {tuple(arr[k].tolist())} is invalid: spans must satisfy 0 <= start <= end")
    return arr


def char_spans_to_byte_spans(text: str, spans: Sequence[Sequence[int]]) -> List[Span]:
    """Convert character spans `[start, end)` into `text` to UTF-8 byte spans.

    Args:
        text: The string the spans index.
        spans: Character spans, e.g. a fast tokenizer's `offset_mapping`.

    Returns:
        One `(start_byte, end_byte)` per span.

    Raises:
        AlignmentError: If a span is reversed or lies outside `text`.
    """
    arr = _as_spans(spans, "char span")
    too_far = np.flatnonzero(arr[:, 1] > len(text))
    if too_far.size:
        k = int(too_far[0])
        raise AlignmentError(f"char span[{k}] = {tuple(arr[k].tolist())} ends past the text (len {len(text)}): "
                             f"the spans must index the same string that is passed as text")
    table = utf8_char_to_byte(text)
    return list(zip(table[arr[:, 0]].tolist(), table[arr[:, 1]].tolist()))


def byte_spans_to_char_spans(text: str, byte_spans: Sequence[Sequence[int]]) -> List[Span]:
    """Convert UTF-8 byte spans into the smallest character spans covering them.

    A byte span inside one multi-byte character maps to that character, `[c, c + 1)`; a zero-width byte span maps
    to a zero-width span at the character that contains (or starts at) its position.

    Args:
        text: The string the byte spans index (through its UTF-8 encoding).
        byte_spans: `(start_byte, end_byte)` pairs.

    Returns:
        One `(start_char, end_char)` per span.

    Raises:
        AlignmentError: If a span is reversed or lies outside the encoded text.
    """
    arr = _as_spans(byte_spans, "byte span")
    table = utf8_char_to_byte(text)
    too_far = np.flatnonzero(arr[:, 1] > table[-1])
    if too_far.size:
        k = int(too_far[0])
        raise AlignmentError(f"byte span[{k}] = {tuple(arr[k].tolist())} ends past the text ({int(table[-1])} bytes)")
    # Start: the last character starting at or before the byte; end: the first boundary at or after the byte.
    starts = np.searchsorted(table, arr[:, 0], side="right") - 1
    ends = np.searchsorted(table, arr[:, 1], side="left")
    ends = np.where(arr[:, 0] == arr[:, 1], starts, ends)
    return list(zip(starts.tolist(), ends.tolist()))


def policy_byte_spans_from_ids(ids: Sequence[int], decode: Callable[[Sequence[int]], str], text: str) -> List[Span]:
    """UTF-8 byte span of each policy token, found by decoding growing prefixes of `ids`.

    Token `k` owns the characters that `decode(ids[:k + 1])` adds to `decode(ids[:k])`. Prefixes (rather than
    single tokens) are decoded because SentencePiece-style decoders strip the leading "▁" of the first token only,
    and byte-level pieces decode to text only together. While a prefix does not decode to a prefix of `text`
    (typically it ends in U+FFFD: a character cut mid-way), tokens are grouped until it does; the group's bytes are
    then split evenly and contiguously among its tokens, so each piece of an emoji gets some of its bytes.
    Tokens that add nothing (special tokens skipped by `decode`) get zero-width spans at the current position.
    Costs `len(ids) + 1` decodes of growing length.

    Args:
        ids: The policy's token ids for the response.
        decode: Decodes ids to text, e.g.
            `lambda ids: tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`.
        text: The response; must equal `decode(ids)`.

    Returns:
        One `(start_byte, end_byte)` per id; the spans are contiguous and tile the bytes of `text`.

    Raises:
        AlignmentError: If `decode(ids)` differs from `text`.
    """
    ids = [int(i) for i in ids]
    full = decode(ids)
    if full != text:
        raise AlignmentError(
            f"the policy token ids decode to {_short(full)} but the response is {_short(text)}: `response` must be "
            f"the exact decoding of response_token_ids with special tokens skipped (and without clean-up of "
            f"tokenization spaces)"
        )
    table = utf8_char_to_byte(text)
    spans: List[Span] = []
    done_chars = 0  # characters of text owned by tokens before the open group
    group_start = 0  # first token of the open group
    for k in range(len(ids)):
        prefix = decode(ids[: k + 1])
        # A prefix shorter than what is already owned cannot be assigned consistently: keep the group open.
        if len(prefix) < done_chars or not text.startswith(prefix):
            continue
        lo, hi = int(table[done_chars]), int(table[len(prefix)])
        n = k + 1 - group_start
        # Boundaries lo + (hi - lo) * i // n are contiguous and differ by at most one byte per token.
        cuts = [lo + (hi - lo) * i // n for i in range(n + 1)]
        spans.extend(zip(cuts[:-1], cuts[1:]))
        done_chars, group_start = len(prefix), k + 1
    # decode(ids) == text, so the last prefix always closes the group.
    return spans


def policy_char_spans_from_ids(ids: Sequence[int], decode: Callable[[Sequence[int]], str], text: str) -> List[Span]:
    """Character span of each policy token; see `policy_byte_spans_from_ids`.

    Pieces of one multi-byte character all map to that character's span, so these spans may overlap.

    Args:
        ids: The policy's token ids for the response.
        decode: Decodes ids to text, special tokens skipped.
        text: The response; must equal `decode(ids)`.

    Returns:
        One `(start_char, end_char)` per id.

    Raises:
        AlignmentError: If `decode(ids)` differs from `text`.
    """
    return byte_spans_to_char_spans(text, policy_byte_spans_from_ids(ids, decode, text))


def transfer_mass(
    values: Sequence[float], source_byte_spans: Sequence[Sequence[int]], target_byte_spans: Sequence[Sequence[int]]
) -> Tuple[np.ndarray, float]:
    """Move values from source byte spans to target byte spans, preserving their sum.

    Each source value is spread uniformly over its bytes; each target receives the mass of the bytes it covers.
    Mass on no target byte (zero-width sources, bytes outside every target) goes to the last target. Source spans
    may overlap (byte-level tokens of one character share its span); target spans may not, as bytes would be
    counted twice.

    Args:
        values: One finite value per source span.
        source_byte_spans: `(start_byte, end_byte)` per value.
        target_byte_spans: `(start_byte, end_byte)` per target token; non-empty and non-overlapping.

    Returns:
        `(target_values, coverage)`: float64 array with one value per target, whose sum equals `sum(values)` up
        to rounding; and the share of |mass| that landed on covering targets (1.0 when there is no mass).

    Raises:
        AlignmentError: If lengths differ, values are not finite, spans are invalid, there are no targets or
            targets overlap.
    """
    vals, src = np.asarray(values, dtype=np.float64).reshape(-1), _as_spans(source_byte_spans, "source span")
    tgt = _as_spans(target_byte_spans, "target span")
    if vals.size != len(src):
        raise AlignmentError(f"got {vals.size} values for {len(src)} source spans: pass one value per source token")
    if not np.all(np.isfinite(vals)):
        raise AlignmentError("values must be finite (found NaN or inf); check the explainer's output")
    if len(tgt) == 0:
        raise AlignmentError("target spans are empty: at least one target token is needed to receive the mass")
    order = np.argsort(tgt[:, 0], kind="stable")
    nonempty = tgt[order][tgt[order, 0] < tgt[order, 1]]  # zero-width targets own no byte, so cannot overlap
    clash = np.flatnonzero(nonempty[1:, 0] < nonempty[:-1, 1])
    if clash.size:
        a, b = nonempty[clash[0]].tolist(), nonempty[clash[0] + 1].tolist()
        raise AlignmentError(
            f"target spans {tuple(a)} and {tuple(b)} overlap: each byte may belong to one target token only; "
            f"pass byte spans (e.g. from policy_byte_spans_from_ids), not char spans of byte-level pieces"
        )

    n_bytes = int(max(src[:, 1].max(initial=0), tgt[:, 1].max(initial=0)))
    width = src[:, 1] - src[:, 0]
    has_bytes = width > 0
    rate = np.zeros_like(vals)
    rate[has_bytes] = vals[has_bytes] / width[has_bytes]
    # Per-byte density, one entry per (source, byte) pair summed by bincount: O(source bytes), and exact where
    # sources do not overlap (a +rate/-rate difference array with a running sum would drift along the text).
    first = np.cumsum(width) - width
    byte_idx = np.arange(int(width.sum())) + np.repeat(src[:, 0] - first, width)
    density = np.bincount(byte_idx, weights=np.repeat(rate, width), minlength=n_bytes + 1)  # [n_bytes] stays 0
    # Sum density over each target's own bytes with reduceat on the (start, end) pairs: unlike differences of one
    # running prefix sum, this does not lose digits to the magnitude of everything before the target.
    sums = np.add.reduceat(density, tgt.ravel())[0::2]
    out = np.where(tgt[:, 0] < tgt[:, 1], sums, 0.0)  # reduceat gives density[start], not 0, for empty ranges

    # Bytes of each source covered by some target, counted exactly in integers (targets do not overlap).
    covered = np.zeros(n_bytes + 1, dtype=np.int64)
    np.add.at(covered, tgt[:, 0], 1)
    np.add.at(covered, tgt[:, 1], -1)
    covered_prefix = np.concatenate(([0], np.cumsum(np.cumsum(covered[:-1]))))
    covered_bytes = covered_prefix[src[:, 1]] - covered_prefix[src[:, 0]]
    share = np.where(has_bytes, covered_bytes / np.maximum(width, 1), 0.0)
    total_abs = float(np.abs(vals).sum())
    coverage = 1.0 if total_abs == 0.0 else min(1.0, float((np.abs(vals) * share).sum()) / total_abs)

    # Unmapped mass to the last token; the residual also absorbs the rounding of the byte-wise sums.
    out[-1] += math.fsum(vals.tolist()) - math.fsum(out.tolist())
    return out, coverage


def align_to_policy(
    values: Sequence[float],
    source_char_spans: Sequence[Sequence[int]],
    text: str,
    target_char_spans: Optional[Sequence[Sequence[int]]] = None,
    target_byte_spans: Optional[Sequence[Sequence[int]]] = None,
) -> Tuple[np.ndarray, float]:
    """Move values from the RM's character spans to the policy's tokens; see `transfer_mass`.

    Args:
        values: One value per RM response token.
        source_char_spans: The RM tokens' character spans into `text` (its `offset_mapping`).
        text: The response.
        target_char_spans: The policy tokens' character spans into `text`; or
        target_byte_spans: their UTF-8 byte spans (needed when a token is part of a character). Give exactly one.

    Returns:
        `(target_values, coverage)` as in `transfer_mass`.

    Raises:
        AlignmentError: If not exactly one kind of target spans is given, or the spans do not fit `text`.
    """
    if (target_char_spans is None) == (target_byte_spans is None):
        raise AlignmentError("give exactly one of target_char_spans and target_byte_spans")
    if target_byte_spans is None:
        target_byte_spans = char_spans_to_byte_spans(text, target_char_spans)
    else:
        n_bytes = int(utf8_char_to_byte(text)[-1])
        if any(end > n_bytes for _, end in target_byte_spans):
            raise AlignmentError(f"target byte spans end past the text ({n_bytes} UTF-8 bytes)")
    return transfer_mass(values, char_spans_to_byte_spans(text, source_char_spans), target_byte_spans)

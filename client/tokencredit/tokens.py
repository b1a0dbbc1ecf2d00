"""Send the policy's exact tokens: character offsets from token ids, computed on the client.

The server accepts `response_token_offsets` (character spans, sorted, non-overlapping). Spans come from the
policy's own generated ids by incremental decoding (`alignment.policy_byte_spans_from_ids`), never by
re-encoding the text, because a re-encode can split differently from what the policy generated. This works for
byte-level BPE (GPT-2, Llama-3, Qwen) and SentencePiece (Llama-2, Mistral, Gemma) tokenizers alike.

Pieces of one multi-byte character (an emoji split into byte tokens) share that character, which character
offsets cannot express; such a group is sent as one span on its first token and zero-width spans on the others,
and `PolicyTokens.expand` splits the group's reward evenly back over its tokens (the sum is unchanged).

`transformers` is optional: anything with `decode(ids, skip_special_tokens=..., ...)` works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from tokencredit.alignment import byte_spans_to_char_spans, policy_byte_spans_from_ids

__all__ = ["PolicyTokens", "policy_tokens", "decoder_for"]


def decoder_for(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """The decode function the server uses for policy ids: special tokens skipped, no clean-up of spaces."""

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode


@dataclass(frozen=True)
class PolicyTokens:
    """The response of one policy sample and how its tokens map onto it.

    Attributes:
        text (`str`): the response, the exact decoding of the ids (special tokens skipped).
        offsets (`list[tuple[int, int]]`): one non-overlapping character span per token, ready for the server.
        groups (`list[tuple[int, int]]`): `[first, end)` token ranges that share characters (byte pieces).
    """

    text: str
    offsets: List[Tuple[int, int]]
    groups: List[Tuple[int, int]]

    def expand(self, rewards: Sequence[float]) -> List[float]:
        """Spread each group's reward (all on its first token, as sent) evenly over the group's tokens."""
        out = [float(r) for r in rewards]
        if len(out) != len(self.offsets):
            raise ValueError(f"got {len(out)} rewards for {len(self.offsets)} policy tokens")
        for start, end in self.groups:
            share = sum(out[start:end]) / (end - start)
            out[start:end] = [share] * (end - start)
        return out


def policy_tokens(ids: Sequence[int], tokenizer: Any = None, *, decode: Optional[Callable] = None,
                  text: Optional[str] = None) -> PolicyTokens:
    """Character offsets for the policy token ids of one response.

    Args:
        ids: The policy's generated token ids for the response (completion only, no prompt).
        tokenizer: The policy tokenizer (anything with `decode`); or
        decode: a function ids → text with special tokens skipped.
        text: The response text, if known; it must equal the decoding of `ids`.

    Returns:
        A `PolicyTokens` with one offset per id.

    Raises:
        tokencredit.alignment.AlignmentError: If `text` is not the decoding of `ids`.

    Example:
        >>> class Chars:  # a toy tokenizer: one character per id
        ...     def decode(self, ids, **kw): return "".join(map(chr, ids))
        >>> policy_tokens([72, 105], Chars()).offsets
        [(0, 1), (1, 2)]
    """
    if decode is None:
        if tokenizer is None:
            raise ValueError("policy_tokens needs a tokenizer or a decode function")
        decode = decoder_for(tokenizer)
    ids = [int(i) for i in ids]
    text = decode(ids) if text is None else text
    char_spans = byte_spans_to_char_spans(text, policy_byte_spans_from_ids(ids, decode, text))
    offsets: List[Tuple[int, int]] = []
    groups: List[Tuple[int, int]] = []
    end_so_far, group_start = 0, None
    for k, (s, e) in enumerate(char_spans):
        if s < end_so_far:
            # Shares a character with the previous token: only its new characters (often none) are sent; the
            # shared character's mass lands on the group's first token and `expand` spreads it again.
            offsets.append((end_so_far, max(end_so_far, e)))
            end_so_far = max(end_so_far, e)
            if group_start is None:
                group_start = k - 1
            continue
        if group_start is not None:
            groups.append((group_start, k))
            group_start = None
        offsets.append((s, e))
        end_so_far = max(end_so_far, e)
    if group_start is not None:
        groups.append((group_start, len(char_spans)))
    # A special token decoding to nothing sits between real tokens as a zero-width span: fine for the server.
    return PolicyTokens(text=text, offsets=offsets, groups=groups)

"""Tests of tokencredit.alignment: unit cases, then round trips through real (locally trained) tokenizers."""

import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers are trained here; nothing may come from the hub
try:
    import tokencredit  # noqa: F401
except ImportError:  # the client package is not installed: use the checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "client"))

import numpy as np
import pytest

from tokencredit.alignment import (
    AlignmentError,
    align_to_policy,
    byte_spans_to_char_spans,
    char_spans_to_byte_spans,
    policy_byte_spans_from_ids,
    policy_char_spans_from_ids,
    transfer_mass,
    utf8_char_to_byte,
)


def _sum_ok(out, values, rel=1e-12):
    scale = max(1.0, float(np.abs(values).sum()))
    assert abs(float(np.sum(out)) - float(np.sum(values))) <= rel * scale


# ---------------------------------------------------------------- unit tests


def test_utf8_tables():
    text = "aé日😀"
    assert utf8_char_to_byte(text).tolist() == [0, 1, 3, 6, 10]
    assert utf8_char_to_byte("").tolist() == [0]
    assert char_spans_to_byte_spans(text, [(0, 2), (2, 4), (1, 1)]) == [(0, 3), (3, 10), (1, 1)]
    # Bytes inside one character map to that character; zero-width stays zero-width at the containing char.
    assert byte_spans_to_char_spans(text, [(7, 8), (3, 7), (0, 10), (8, 8), (6, 6), (10, 10)]) == [
        (3, 4), (2, 4), (0, 4), (3, 3), (3, 3), (4, 4)]
    with pytest.raises(AlignmentError, match="ends past the text"):
        char_spans_to_byte_spans(text, [(0, 5)])
    with pytest.raises(AlignmentError, match="invalid"):
        byte_spans_to_char_spans(text, [(3, 2)])


def test_identical_spans_give_values_and_full_coverage():
    values = [0.5, -1.25, 3.0]
    spans = [(0, 2), (2, 5), (5, 9)]
    out, coverage = transfer_mass(values, spans, spans)
    np.testing.assert_allclose(out, values, rtol=0, atol=1e-15)
    assert out.dtype == np.float64 and coverage == 1.0


def test_conservation_random_tilings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_bytes = int(rng.integers(1, 400))
        src_cuts = np.unique(np.r_[0, rng.integers(0, n_bytes, 30), n_bytes])
        tgt_cuts = np.unique(np.r_[0, rng.integers(0, n_bytes, 20), n_bytes])
        values = rng.normal(scale=10.0 ** rng.integers(-3, 4), size=len(src_cuts) - 1)
        src, tgt = list(zip(src_cuts[:-1], src_cuts[1:])), list(zip(tgt_cuts[:-1], tgt_cuts[1:]))
        out, coverage = transfer_mass(values, src, tgt)
        _sum_ok(out, values)
        assert coverage == pytest.approx(1.0, abs=1e-12)


def test_uncovered_and_zero_width_sources_go_to_last_token():
    # Source 1 covers bytes 4..6, which no target covers; source 2 is zero-width.
    out, coverage = transfer_mass([2.0, 3.0, 5.0], [(0, 4), (4, 6), (2, 2)], [(0, 2), (2, 4)])
    np.testing.assert_allclose(out, [1.0, 1.0 + 3.0 + 5.0])
    assert coverage == pytest.approx(2.0 / 10.0)
    # Half of a source's bytes uncovered: half its mass is unmapped.
    out, coverage = transfer_mass([4.0], [(0, 4)], [(0, 2)])
    np.testing.assert_allclose(out, [4.0])
    assert coverage == pytest.approx(0.5)


def test_negative_values_and_coverage_uses_abs_mass():
    out, coverage = transfer_mass([-3.0, 1.0], [(0, 3), (3, 4)], [(0, 1), (1, 3), (5, 6)])
    np.testing.assert_allclose(out, [-1.0, -2.0, 1.0])  # source 1's byte 3 is uncovered -> last token
    assert coverage == pytest.approx(3.0 / 4.0)
    _sum_ok(out, [-3.0, 1.0])


def test_empty_mass():
    out, coverage = transfer_mass([0.0, 0.0], [(0, 1), (1, 2)], [(0, 2)])
    assert out.tolist() == [0.0] and coverage == 1.0
    out, coverage = transfer_mass([], [], [(0, 1), (1, 1)])
    assert out.tolist() == [0.0, 0.0] and coverage == 1.0


def test_invalid_inputs_raise():
    with pytest.raises(AlignmentError, match="overlap"):
        transfer_mass([1.0], [(0, 4)], [(0, 3), (2, 4)])
    transfer_mass([1.0], [(0, 4)], [(0, 2), (1, 1), (2, 4)])  # zero-width inside a token owns no byte: allowed
    with pytest.raises(AlignmentError, match="at least one target"):
        transfer_mass([1.0], [(0, 4)], [])
    with pytest.raises(AlignmentError, match="2 values for 1 source"):
        transfer_mass([1.0, 2.0], [(0, 4)], [(0, 4)])
    with pytest.raises(AlignmentError, match="finite"):
        transfer_mass([float("nan")], [(0, 4)], [(0, 4)])
    with pytest.raises(AlignmentError, match="exactly one"):
        align_to_policy([1.0], [(0, 1)], "a")
    with pytest.raises(AlignmentError, match="exactly one"):
        align_to_policy([1.0], [(0, 1)], "a", target_char_spans=[(0, 1)], target_byte_spans=[(0, 1)])


def test_multibyte_characters_are_split_by_bytes():
    text = "a😀é"  # bytes: a=0..1, 😀=1..5, é=5..7
    tgt = [(0, 2), (2, 5), (5, 6), (6, 7)]
    out, coverage = align_to_policy([8.0, 2.0], [(1, 2), (2, 3)], text, target_byte_spans=tgt)
    np.testing.assert_allclose(out, [2.0, 6.0, 1.0, 1.0])
    assert coverage == 1.0
    out, _ = align_to_policy([8.0, 2.0], [(1, 2), (2, 3)], text, target_char_spans=[(0, 1), (1, 3)])
    np.testing.assert_allclose(out, [0.0, 10.0])


def test_policy_spans_with_byte_pieces_and_special_tokens():
    pieces = [b"a", b"\xf0\x9f", b"\x98", b"\x80b", b"", "\ufffd".encode()]  # id 4: a special token
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    text = "a😀b\ufffd"
    spans = policy_byte_spans_from_ids([0, 1, 2, 3, 4, 5], decode, text)
    # Tokens 1-3 form one group over bytes 1..6, split 1/2/2; the genuine U+FFFD in the text is not a fragment.
    assert spans == [(0, 1), (1, 2), (2, 4), (4, 6), (6, 6), (6, 9)]
    chars = policy_char_spans_from_ids([0, 1, 2, 3, 4, 5], decode, text)
    assert chars == [(0, 1), (1, 2), (1, 2), (1, 3), (3, 3), (3, 4)]
    with pytest.raises(AlignmentError, match="exact decoding of response_token_ids"):
        policy_byte_spans_from_ids([0, 1, 2, 3], decode, "a😀c")


# ---------------------------------------------------------------- real tokenizers

CORPUS = [
    "Héllo wörld, señor! Ça va? Über naïve café. Señor Müller ate crème brûlée.",
    "日本語のテキスト 中文文本 日本 中文 日本語です",
    "I like 😀 and 👍🏽 and the 👨‍👩‍👧 family: great job 👍🏽😀 ok",
    "The quick brown fox jumps over the lazy dog. Mixed text and newlines.",
] * 10
TEXTS = [
    "Señor Müller ate crème brûlée.",
    "日本語 and 中文 mixed: 日本語です",
    "Great job 👍🏽😀! Family: 👨‍👩‍👧.",
    "naïve  café\tüber\nñ 中文 😀",
]


@pytest.fixture(scope="module")
def toks():
    pytest.importorskip("transformers")  # the SDK's optional `tokenizers` extra (absent from its torch-free venv)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # 1. RM-like BERT WordPiece (offsets only; its decode inserts spaces around CJK so it is no policy here).
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[SEP]"]))
    # 2. GPT-2 style byte-level BPE; few merges, so CJK and emoji stay split into byte pieces.
    bb = Tokenizer(models.BPE())
    bb.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bb.decoder = decoders.ByteLevel()
    bb.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    # 3. SentencePiece style: Metaspace + BPE trained without CJK/emoji, then byte fallback (<0xXX>) for them.
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.train_from_iterator([c for c in CORPUS if "😀" not in c and "日" not in c],
                           trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>"]))
    spec = json.loads(sp.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # plain vocab entries, not added tokens, so decode(skip_special_tokens=True) keeps them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}]}
    sp = Tokenizer.from_str(json.dumps(spec))
    return {name: PreTrainedTokenizerFast(tokenizer_object=t) for name, t in [("wp", wp), ("bb", bb), ("sp", sp)]}


def _decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["wp", "bb", "sp"])
def test_policy_spans_tile_text(toks, name):
    tok = toks[name]
    # WordPiece decoding spaces out CJK and drops the ZWJ, so only texts it reproduces are used for it.
    texts = ["Señor Müller ate crème brûlée 👍🏽😀"] if name == "wp" else TEXTS
    split = False
    for text in texts:
        ids = _ids(tok, text)
        spans = policy_byte_spans_from_ids(ids, _decoder(tok), text)
        assert len(spans) == len(ids)
        assert spans[0][0] == 0 and spans[-1][1] == len(text.encode())
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, hence non-overlapping
        # Every piece of a split character gets some bytes; only SentencePiece's prepended "▁" owns none.
        pieces = tok.convert_ids_to_tokens(ids)
        assert all(e > s or (k == 0 and pieces[0] == "▁") for k, (s, e) in enumerate(spans))
        chars = policy_char_spans_from_ids(ids, _decoder(tok), text)
        split |= len(set(chars)) < len(chars)  # pieces of one character share its char span
    assert split or name == "wp"  # some character was split over several tokens: the hard case ran


def test_special_token_is_zero_width(toks):
    tok, text = toks["bb"], TEXTS[2]
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = [eos] + _ids(tok, text) + [eos]
    spans = policy_byte_spans_from_ids(ids, _decoder(tok), text)
    assert spans[0] == (0, 0) and spans[-1] == (len(text.encode()),) * 2


def test_mismatching_text_raises(toks):
    tok = toks["sp"]
    with pytest.raises(AlignmentError, match="must be the exact decoding"):
        policy_byte_spans_from_ids(_ids(tok, TEXTS[0]), _decoder(tok), TEXTS[1])
    # SentencePiece decoding drops a leading space: such a response cannot be used with these ids.
    with pytest.raises(AlignmentError, match="' x y'"):
        policy_byte_spans_from_ids(_ids(tok, " x y"), _decoder(tok), " x y")


@pytest.mark.parametrize("source,target", [("wp", "bb"), ("wp", "sp"), ("bb", "sp"), ("sp", "bb")])
def test_round_trip_between_tokenizers(toks, source, target):
    rng = np.random.default_rng(1)
    for text in TEXTS:
        enc = toks[source](text, add_special_tokens=False, return_offsets_mapping=True)
        src_chars = enc["offset_mapping"]
        src = char_spans_to_byte_spans(text, src_chars)
        tgt = policy_byte_spans_from_ids(_ids(toks[target], text), _decoder(toks[target]), text)
        values = rng.normal(size=len(src))
        out, coverage = align_to_policy(values, src_chars, text, target_byte_spans=tgt)
        _sum_ok(out, values, rel=1e-9)
        # Policy spans tile every byte (whitespace included), so all RM mass lands on covering tokens.
        assert coverage == 1.0
        # Each source's mass goes to the targets sharing its bytes, in proportion to the shared bytes.
        overlap = np.array([[max(0, min(se, te) - max(ss, ts)) for ss, se in src] for ts, te in tgt], dtype=float)
        width = np.array([e - s for s, e in src], dtype=float)
        assert (width > 0).all()
        for i in range(len(src)):
            unit, _ = transfer_mass(np.eye(len(src))[i], src, tgt)
            np.testing.assert_allclose(unit, overlap[:, i] / width[i], atol=1e-12)
        np.testing.assert_allclose(out, overlap @ (values / width), atol=1e-9)


def test_hand_computed_case(toks):
    text = "ok 👍🏽😀"  # bytes: "ok" 0..2, space 2..3, three 4-byte code points 3..15
    enc = toks["wp"](text, add_special_tokens=False, return_offsets_mapping=True)
    assert toks["wp"].convert_ids_to_tokens(enc["input_ids"]) == ["ok", "👍🏽😀"]
    values = [2.0, 12.0]  # 1 per byte on both RM tokens
    ids = _ids(toks["bb"], text)
    assert toks["bb"].convert_ids_to_tokens(ids) == ["o", "k", "ĠðŁĳ", "įðŁ", "ı", "½", "ðŁ", "ĺ", "Ģ"]
    tgt = policy_byte_spans_from_ids(ids, _decoder(toks["bb"]), text)
    # " 👍🏽" (9 bytes) is one group of 4 pieces -> 2+2+2+3 bytes; "😀" (4 bytes) 3 pieces -> 1+1+2 bytes.
    assert tgt == [(0, 1), (1, 2), (2, 4), (4, 6), (6, 8), (8, 11), (11, 12), (12, 13), (13, 15)]
    out, coverage = align_to_policy(values, enc["offset_mapping"], text, target_byte_spans=tgt)
    np.testing.assert_allclose(out, [1, 1, 1, 2, 2, 3, 1, 1, 2])  # the space byte 2 carries no RM mass
    assert coverage == 1.0
    # SentencePiece byte fallback: one byte per <0xXX> token; the prepended "▁" and the space get nothing.
    ids = _ids(toks["sp"], text)
    assert toks["sp"].convert_ids_to_tokens(ids)[:4] == ["▁", "o", "k", "▁"] and len(ids) == 16
    tgt = policy_byte_spans_from_ids(ids, _decoder(toks["sp"]), text)
    out, coverage = align_to_policy(values, enc["offset_mapping"], text, target_byte_spans=tgt)
    np.testing.assert_allclose(out, [0, 1, 1, 0] + [1] * 12)
    assert coverage == 1.0

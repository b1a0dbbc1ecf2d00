"""The SDK against a real server on loopback: retries through a fault-injecting proxy, splits, checks, on_error,
16 threads on one `Client`, 64 concurrent `AsyncClient` calls, and the policy's own ids for 3 tokenizers.

The SDK is a light distribution: this file also runs in a venv with only `./client` and pytest
(`tests/test_sdk_alone.py`), so nothing here imports torch, transformers or the server at module level; the
tests that need them skip there.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest

from tests.support import CHEAP, LIMITS, FaultProxy, free_port, live_server
from tokencredit import (
    AsyncClient,
    Client,
    ConnectError,
    InvalidRequestError,
    PayloadTooLargeError,
    RateLimitedError,
    ResponseInvariantError,
    Retry,
    ServiceUnavailableError,
    as_numpy,
    as_torch,
    policy_tokens,
)
from tokencredit._base import Answer, BaseClient, Gather, _Prepared
from tokencredit.errors import error_from_response, parse_retry_after
from tokencredit.types import DenseRewardItem, Limits, ShapingWeights

ITEM = {"prompt": "Tell me about the movie.", "response": "The movie was wonderful and the acting was superb."}
FAST = Retry(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def url(encoder_rm_dir, tmp_path_factory):
    return live_server(encoder_rm_dir, tmp_path_factory.mktemp("sdk"))


@pytest.fixture()
def proxy(url):
    with FaultProxy(url) as p:
        yield p


def _client(base, **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("weights", CHEAP)
    return Client(base, **kw)


def _conserved(r):
    assert math.isclose(sum(r.token_rewards), r.score, rel_tol=0, abs_tol=1e-6 + 1e-5 * abs(r.score))


# ---------------------------------------------------------------------------------------------------- happy path
OFFSETS = [[0, 3], [4, 9], [10, 13], [14, 24], [25, 50]]


def test_dense_rewards_plain_and_offsets(url):
    offsets = OFFSETS
    with _client(url) as tc:
        info = tc.info()
        assert info.limits.max_items == LIMITS["max_items"]
        a, b = tc.dense_rewards([ITEM, dict(ITEM, id="mine", response_token_offsets=offsets)])
    assert a.id == "0" and b.id == "mine" and len(b.token_rewards) == 5 and not a.degraded
    for r in (a, b):
        _conserved(r)
    arr = as_numpy([a, None, b])
    assert arr.shape == (3, len(a.token_rewards)) and all(math.isnan(x) for x in arr[1])  # None is NaN, never 0


def test_as_torch(url):
    pytest.importorskip("torch")
    with _client(url) as tc:
        a, b = tc.dense_rewards([ITEM, dict(ITEM, id="mine", response_token_offsets=OFFSETS)])
    ten = as_torch([a, b])
    assert ten.shape[0] == 2 and abs(float(b.as_torch().sum()) - b.score) < 1e-4


def test_chunks_by_item_limit_keep_order(proxy):
    items = [dict(ITEM, id=f"x{i}", response=f"The movie number {i} was great.") for i in range(LIMITS["max_items"] * 2 + 3)]
    with _client(proxy.url, max_in_flight=3) as tc:
        out = tc.dense_rewards(items, weights={"sparse": 1.0})
    assert [r.id for r in out] == [it["id"] for it in items]
    assert [c["items"] for c in proxy.calls] == [8, 8, 3] or sorted(c["items"] for c in proxy.calls) == [3, 8, 8]


# ---------------------------------------------------------------------------------------------------- retries
@pytest.mark.parametrize("faults,error", [
    (["drop", "drop"], None),
    ([(503, {"Retry-After": "0"}), (500, {})], None),
    ([(429, {"Retry-After": "1"})], None),
    (["drop"] * 4, ConnectError),
    ([(503, {"Retry-After": "0"})] * 4, ServiceUnavailableError),
])
def test_retries_counted_same_key(proxy, faults, error):
    proxy.script = list(faults)
    with _client(proxy.url) as tc:
        tc.info()
        if error is None:
            t0 = time.monotonic()
            [r] = tc.dense_rewards([ITEM], deadline_ms=60_000)
            _conserved(r)
            if faults[0][0:1] == (429,):
                assert time.monotonic() - t0 >= 0.9, "Retry-After: 1 was not honoured"
        else:
            with pytest.raises(error) as exc:
                tc.dense_rewards([ITEM])
            assert exc.value.retryable
    expected = len(faults) + 1 if error is None else FAST.attempts
    assert len(proxy.calls) == expected
    assert len({c["key"] for c in proxy.calls}) == 1, "every attempt must carry the same Idempotency-Key"
    if error is None:
        assert all(c["deadline_ms"] and c["deadline_ms"] <= 60_000 for c in proxy.calls)


def test_no_retry_on_422_and_rate_limit_error(proxy):
    proxy.script = [(422, {"field": "weights"})]
    with _client(proxy.url) as tc:
        tc.info()
        with pytest.raises(InvalidRequestError) as exc:
            tc.dense_rewards([ITEM])
        assert exc.value.status == 422 and exc.value.field == "weights" and not exc.value.retryable
        assert len(proxy.calls) == 1
        proxy.script = [(429, {"Retry-After": "0"})] * 4
        with pytest.raises(RateLimitedError) as exc:
            tc.dense_rewards([ITEM])
        assert exc.value.retry_after == 0.0 and len(proxy.calls) == 1 + FAST.attempts


def test_413_splits_and_resends(proxy):
    proxy.script = [(413, {"field": "items"})]
    items = [dict(ITEM, id=str(i)) for i in range(4)]
    with _client(proxy.url) as tc:
        tc.info()
        out = tc.dense_rewards(items, weights={"sparse": 1.0})
    assert [r.id for r in out] == ["0", "1", "2", "3"]
    assert [c["items"] for c in proxy.calls] == [4, 2, 2]


def test_real_413_single_item_and_local_checks(url):
    long = " ".join(["the movie was wonderful"] * 30)  # beyond max_response_tokens
    with _client(url) as tc:
        with pytest.raises(PayloadTooLargeError) as exc:
            tc.dense_rewards([dict(ITEM, response=long)])
        assert exc.value.field == "items[0].response" and exc.value.status == 413
        with pytest.raises(InvalidRequestError, match="checked locally"):
            tc.dense_rewards([dict(ITEM, response="   ")])
        # skip: the bad item is None, the others are answered; fallback: the plain score, flagged degraded.
        ok, bad = tc.dense_rewards([ITEM, dict(ITEM, response=long)], on_error="skip")
        assert bad is None and ok is not None
        with pytest.raises(PayloadTooLargeError):
            tc.dense_rewards([dict(ITEM, response=long)], on_error="fallback")  # no scalar either: raise, never 0


def test_fallback_gives_scalar_on_last_token(proxy):
    proxy.script = [(503, {"Retry-After": "0"})] * FAST.attempts  # every dense attempt fails, then the fallback passes
    with _client(proxy.url) as tc:
        tc.info()
        [r] = tc.dense_rewards([dict(ITEM, id="a")], on_error="fallback")
    assert r.degraded and r.id == "a" and r.token_rewards[-1] == r.score and not any(r.token_rewards[:-1])


def test_async_fallback_and_health_share_the_core(proxy):
    """The fallback and health are written once (`_base`): the async face behaves as the sync one."""
    proxy.script = [(503, {"Retry-After": "0"})] * FAST.attempts

    async def main():
        async with AsyncClient(proxy.url, retry=FAST, weights=CHEAP) as tc:
            await tc.info()
            [r] = await tc.dense_rewards([dict(ITEM, id="a")], on_error="fallback")
            return r, await tc.health()

    r, ready = asyncio.run(main())
    assert r.degraded and r.id == "a" and r.token_rewards[-1] == r.score and not any(r.token_rewards[:-1])
    assert [c["items"] for c in proxy.calls] == [1] * (FAST.attempts + 1)  # the dense attempts, then the fallback
    with _client(proxy.url) as tc:
        assert tc.health() == ready and ready["status"] == "ready"
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError), _client(dead) as tc:
        tc.health()


def test_fallback_flow_sans_io():
    """Drive `dense_rewards`' flow by hand: the dense chunk fails with a 503, the fallback asks for `sparse` only."""
    limits = Limits(max_items=8, max_response_tokens=64, max_total_tokens=256, max_response_chars=1000)
    base = BaseClient(retry=Retry(attempts=1), limits=limits, on_error="fallback", weights=CHEAP)
    flow = base._dense_rewards_flow([dict(ITEM, id="a")])
    gather = next(flow)
    assert isinstance(gather, Gather) and len(gather.flows) == 1
    chunk = gather.flows[0]
    dense = next(chunk)
    assert dense.body["weights"] == ShapingWeights.model_validate(CHEAP).model_dump()
    with pytest.raises(StopIteration) as done:
        chunk.send(Answer(503, {}, {"error": {"code": "not_ready", "message": "", "retryable": True}}))
    fallback = flow.send([done.value.value]).flows[0]
    scalar = next(fallback)
    assert scalar.body["weights"] == ShapingWeights(sparse=1.0).model_dump()
    n = len(ITEM["response"].split())
    answer = {"results": [{"id": "a", "score": 2.0, "token_rewards": [0.0] * (n - 1) + [2.0], "spans": [[0, 1]] * n}]}
    with pytest.raises(StopIteration) as scalar_done:
        fallback.send(Answer(200, {}, answer))
    with pytest.raises(StopIteration) as result:
        flow.send([scalar_done.value.value])
    [r] = result.value.value
    assert r.degraded and r.id == "a" and r.score == 2.0


def test_attributions_come_back_on_the_same_tokens_as_the_rewards(url):
    offsets = [[0, 3], [4, 9], [10, 13], [14, 24], [25, 50]]
    with _client(url) as tc:
        [r] = tc.dense_rewards([dict(ITEM, response_token_offsets=offsets)], weights={"shap": 0.5, "loo": 0.5},
                               methods={"shap": {"max_rows": 64}}, return_attributions=True, residual_placement="uniform")
        [plain] = tc.dense_rewards([ITEM], weights={"shap": 1.0})
        with pytest.raises(ValueError, match="normalization"):
            tc.dense_rewards([ITEM], normalization="l2")
    assert plain.attributions is None
    assert set(r.attributions) == {"shap", "loo"} and r.attributions["shap"].exact is False
    for a in r.attributions.values():
        assert len(a.values) == 5 and math.isclose(math.fsum(a.values) + a.base, r.score, abs_tol=1e-6)
    # uniform placement: each token gets its mixed values plus the mixed base / 5.
    base = 0.5 * (r.attributions["shap"].base + r.attributions["loo"].base)
    expected = [0.5 * (s + l) + base / 5 for s, l in zip(r.attributions["shap"].values, r.attributions["loo"].values)]
    assert all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(r.token_rewards, expected))


# ---------------------------------------------------------------------------------------------------- checks
def _prep(n):
    return _Prepared(0, DenseRewardItem(id="0", prompt="p", response="abc"), n, n)


@pytest.mark.parametrize("raw,message", [
    ({"id": "0", "score": 1.0, "token_rewards": [0.5, 0.4], "spans": [[0, 1], [1, 3]]}, "Σ"),
    ({"id": "0", "score": 1.0, "token_rewards": [1.0], "spans": [[0, 3]]}, "rewards for 2"),
    ({"id": "0", "score": 1.0, "token_rewards": [float("nan"), 1.0]}, "NaN"),
    ({"id": "9", "score": 1.0, "token_rewards": [0.5, 0.5]}, "out of order"),
    ({"id": "0", "score": None, "token_rewards": [0.5, 0.5]}, "no finite score"),
    ({"id": "0", "score": 1.0, "token_rewards": [0.5, 0.5], "attributions": {"shap": {"values": [0.5], "base": 0.5}}}, "needs 2"),
    ({"id": "0", "score": 1.0, "token_rewards": [0.5, 0.5], "attributions": {"shap": {"values": [0.5, 0.5], "base": 0.5}}}, "Σ values + base"),
])
def test_invariants(raw, message):
    out = BaseClient()._check(_prep(2), raw)
    assert isinstance(out, ResponseInvariantError) and message in str(out)


def test_invariant_breach_always_raises():
    base = BaseClient(on_error="skip")
    with pytest.raises(ResponseInvariantError):
        base._finish([ITEM], {0: ResponseInvariantError("x")}, "skip")


def test_error_mapping_and_retry_after():
    body = {"error": {"code": "overloaded", "message": "busy", "field": None, "retryable": True}}
    err = error_from_response(429, body, {"retry-after": "3"})
    assert isinstance(err, RateLimitedError) and err.retry_after == 3.0 and err.retryable
    assert isinstance(error_from_response(502, "<html>bad gateway</html>"), Exception)
    assert error_from_response(502, "<html>").retryable and not error_from_response(400, {}).retryable
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0 and parse_retry_after("soon") is None
    assert 0 <= Retry(base_delay=1, max_delay=2).delay(5) <= 2 and Retry().delay(0, retry_after=120) == 60


def test_flow_is_shared_sans_io():
    """The retry logic is a generator: drive it by hand, as both clients do."""
    base = BaseClient(retry=FAST, limits=None)
    base._limits = None
    flow = base._chunk_flow([_prep(1)], {}, "raise", None)
    first = next(flow)
    second = flow.send(Answer(503, {"retry-after": "0"}, {"error": {"code": "not_ready", "message": "", "retryable": True}}))
    assert second.seconds == 0.0
    again = flow.send(None)
    assert again.headers["idempotency-key"] == first.headers["idempotency-key"]


# ---------------------------------------------------------------------------------------------------- concurrency
def _one_score(scores) -> bool:
    """One item sent in many concurrent requests gets one score, up to fp32 rounding: the server batches
    concurrent items into shared padded passes, and the batch's shape moves the score by ~1e-7 of its value
    (docs/architecture.md, micro-batching). Each answer's rewards still sum to the score it reports."""
    scores = list(scores)
    return max(scores) - min(scores) <= 1e-5 * max(1.0, abs(scores[0]))


def test_sync_client_16_threads(url):
    errors, results = [], {}
    with _client(url) as tc:
        def work(k):
            try:
                [r] = tc.dense_rewards([dict(ITEM, id=f"t{k}")], weights={"sparse": 1.0})
                results[k] = r
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and sorted(results) == list(range(16))
    assert _one_score(r.score for r in results.values()) and all(r.id == f"t{k}" for k, r in results.items())


def test_pickle_and_fork(url):
    """A client built in the driver works after pickling (Ray actors) and in a forked child (own pool)."""
    import os
    import pickle

    tc = _client(url)
    [before] = tc.dense_rewards([ITEM], weights={"sparse": 1.0})
    clone = pickle.loads(pickle.dumps(tc))
    assert clone.dense_rewards([ITEM], weights={"sparse": 1.0})[0].score == before.score
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the score through the pipe, never return into pytest
        code = 1
        try:
            os.write(write, repr(tc.dense_rewards([ITEM], weights={"sparse": 1.0})[0].score).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and float(os.read(read, 100).decode()) == before.score
    os.close(read)
    tc.close()
    with pytest.raises(RuntimeError, match="closed"):
        tc.dense_rewards([ITEM])


def test_async_client_64_concurrent(url):
    async def main():
        async with AsyncClient(url, retry=FAST, max_in_flight=16) as tc:
            calls = [tc.dense_rewards([dict(ITEM, id=f"a{k}")], weights={"sparse": 1.0}) for k in range(64)]
            return await asyncio.gather(*calls)

    out = asyncio.run(main())
    assert [r.id for [r] in out] == [f"a{k}" for k in range(64)]
    assert _one_score(r.score for [r] in out)


# ---------------------------------------------------------------------------------------------------- policy tokens
TEXTS = ["Café crème, señor Müller! Emoji 😀👍🏽 at the end.", "Plain words, nothing fancy at all."]


@pytest.fixture(scope="module")
def tokenizers():
    pytest.importorskip("transformers")  # the SDK's optional `tokenizers` extra
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import CORPUS as C, _bytelevel_bpe_tokenizer, _wordpiece_tokenizer

    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    plain = [c for c in C if "😀" not in c and "日" not in c]  # so emoji fall back to byte pieces
    sp.train_from_iterator(plain * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    spec = json.loads(sp.to_str())
    for b in range(256):  # byte fallback, so emoji and CJK decode through <0xXX> pieces (SentencePiece style)
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"},
                       {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}]}
    return {
        "bytelevel": PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe_tokenizer(280), eos_token="<|endoftext|>"),
        "sentencepiece": PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec))),
        "wordpiece": PreTrainedTokenizerFast(tokenizer_object=_wordpiece_tokenizer()),
    }


@pytest.mark.parametrize("name", ["bytelevel", "sentencepiece", "wordpiece"])
def test_policy_ids_round_trip(url, tokenizers, name):
    tok = tokenizers[name]
    texts = TEXTS if name != "wordpiece" else ["plain words, nothing fancy at all."]
    items, all_ids = [], []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if name == "bytelevel":
            ids = ids + [tok.eos_token_id]  # generated ids end with EOS: a zero-width token
        all_ids.append(ids)
        items.append({"id": f"{name}{i}", "prompt": "Say something.", "response_token_ids": ids})
    with _client(url) as tc:
        out = tc.dense_rewards(items, tokenizer=tok)
    for ids, r in zip(all_ids, out):
        assert len(r.token_rewards) == len(ids), "one reward per policy id, special tokens included"
        _conserved(r)
        pt = policy_tokens(ids, tok)
        assert pt.text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for start, end in pt.groups:  # byte pieces of one character share its reward evenly
            assert len(set(r.token_rewards[start:end])) == 1
    if name != "wordpiece":
        assert any(policy_tokens(ids, tok).groups for ids in all_ids), "the emoji should split into byte pieces"

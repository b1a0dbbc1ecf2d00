"""Least privilege on the data plane, over real HTTP on loopback: the optional bearer token of /v1/* and the shims
(TOKENCREDIT_API_TOKEN), and the allow-list of policy tokenizers (TOKENCREDIT_TOKENIZER_DIRS)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import httpx
import pytest

from tests.support import spawn_server, stop, wait_ready

API_TOKEN = "tc-api-" + uuid.uuid4().hex  # distinctive, so a grep of the log finds any leak
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
ITEM = {"prompt": "Tell me about the movie.", "response": "The movie was wonderful."}
WEIGHTS = json.dumps({"sparse": 0.5, "attention": 0.5})  # cheap components: no shap JIT
DATA_PLANE = [
    ("POST", "/v1/dense_rewards", {"items": [ITEM]}),
    ("GET", "/v1/info", None),
    ("POST", "/openrlhf/get_reward", {"query": ["The movie was wonderful."], "prompts": [""], "labels": [None]}),
    ("POST", "/classify", {"input": ["The movie was wonderful."]}),
    ("GET", "/v1/bo/studies", None),
]


@pytest.fixture(scope="module")
def env(encoder_rm_dir, bpe_policy_tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    # An allow-listed root with a tokenizer in a sub-folder, a link out of the root, a folder that is no tokenizer,
    # and a "tokenizer" whose config asks for code from its own folder; one real tokenizer outside every root.
    root = tmp / "root"
    shutil.copytree(bpe_policy_tokenizer_dir, root / "sub" / "policy")
    outside = tmp / "outside-tokenizer"
    shutil.copytree(bpe_policy_tokenizer_dir, outside)
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "not-a-tokenizer").mkdir()
    (root / "not-a-tokenizer" / "notes.txt").write_text("hello")
    evil = root / "evil"
    shutil.copytree(bpe_policy_tokenizer_dir, evil)
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]})
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp / "evil-ran"
    (evil / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    dirs = os.pathsep.join([f"bpe={bpe_policy_tokenizer_dir}", str(root)])
    locked = spawn_server(encoder_rm_dir, tmp / "locked.log", state_db=tmp / "locked.sqlite3", weights=WEIGHTS,
                          api_token=API_TOKEN, tokenizer_dirs=dirs)
    # The defaults: no token asked, no tokenizer offered.
    default = spawn_server(encoder_rm_dir, tmp / "default.log", state_db=tmp / "default.sqlite3", weights=WEIGHTS)
    try:
        wait_ready(locked[0], locked[1], tmp / "locked.log")
        wait_ready(default[0], default[1], tmp / "default.log")
        yield {"locked": locked[1], "default": default[1], "tmp": tmp, "root": root, "outside": outside,
               "evil": evil, "marker": marker, "bpe": bpe_policy_tokenizer_dir}
    finally:
        stop(locked[0], default[0])


def _call(url, method, path, body=None, headers=None):
    return httpx.request(method, f"{url}{path}", json=body, headers=headers or {}, timeout=60)


# ---------------------------------------------------------------------------------------------------- token
@pytest.mark.parametrize("method,path,body", DATA_PLANE, ids=[p for _, p, _ in DATA_PLANE])
def test_data_plane_needs_the_token_when_one_is_set(env, method, path, body):
    url = env["locked"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {API_TOKEN}"},
                    {"Authorization": f"Bearer {API_TOKEN}x"}):
        r = _call(url, method, path, body, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"]["code"] == "unauthorized"
        assert API_TOKEN not in r.text
    r = _call(url, method, path, body, AUTH)
    assert r.status_code == 200, r.text
    # The server without a token answers the same request without one (off by default).
    assert _call(env["default"], method, path, body).status_code == 200


def test_probes_metrics_and_page_need_no_token(env):
    for path in ("/healthz", "/readyz", "/metrics", "/ui", "/ui/config.json"):
        assert httpx.get(env["locked"] + path, timeout=10).status_code == 200, path
    assert httpx.get(env["locked"] + "/ui/config.json", timeout=10).json()["api_token_required"] is True
    assert httpx.get(env["default"] + "/ui/config.json", timeout=10).json()["api_token_required"] is False


def test_the_token_never_reaches_the_log(env):
    for _ in range(2):
        _call(env["locked"], "POST", "/v1/dense_rewards", {"items": [ITEM]}, {"Authorization": "Bearer wrong"})
        _call(env["locked"], "POST", "/v1/dense_rewards", {"items": [ITEM]}, AUTH)
    log = (env["tmp"] / "locked.log").read_text(errors="replace")
    assert "data-plane token: required" in log
    assert API_TOKEN not in log and "wrong" not in log


def test_schema_states_the_token(env):
    spec = httpx.get(env["locked"] + "/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["APIToken"] == {
        "type": "http", "scheme": "bearer", "description": "TOKENCREDIT_API_TOKEN, when the server sets one (off by default)"}
    assert spec["paths"]["/v1/dense_rewards"]["post"]["security"] == [{"APIToken": []}]
    assert "401" in spec["paths"]["/classify"]["post"]["responses"]
    # Off: the token is documented as accepted, not required (the empty requirement).
    spec = httpx.get(env["default"] + "/openapi.json", timeout=10).json()
    assert spec["paths"]["/v1/dense_rewards"]["post"]["security"] == [{"APIToken": []}, {}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_sdk_and_adapter_send_the_token(env, monkeypatch):
    from tokencredit import Client
    from tokencredit.adapters import openrlhf
    from tokencredit.errors import AuthError

    url = env["locked"]
    monkeypatch.delenv("TOKENCREDIT_API_TOKEN", raising=False)
    with Client(url) as tc, pytest.raises(AuthError) as failed:
        tc.dense_rewards([ITEM])
    assert failed.value.status == 401 and API_TOKEN not in str(failed.value)
    with Client(url, api_key=API_TOKEN) as tc:
        [r] = tc.dense_rewards([ITEM])
        assert r.score is not None and len(r.token_rewards) > 0
    assert API_TOKEN not in repr(tc)
    # From the environment: what adapters built inside a trainer's workers rely on.
    monkeypatch.setenv("TOKENCREDIT_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("TOKENCREDIT_URL", url)
    monkeypatch.setattr(openrlhf, "_client", None)
    out = openrlhf.reward_func(["Tell me. The movie was wonderful."], ["Tell me."], [None])
    assert out["rewards"].shape == (1,) and bool(out["rewards"].isfinite().all())
    monkeypatch.setattr(openrlhf, "_client", None)


# ---------------------------------------------------------------------------------------------------- tokenizers
def _policy_request(env, policy_tokenizer):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(env["bpe"]))(ITEM["response"], add_special_tokens=False)["input_ids"]
    return {"items": [dict(ITEM, response_token_ids=ids)], "policy_tokenizer": policy_tokenizer}, len(ids)


def test_offered_tokenizers_are_used(env):
    for name in ("bpe", str(env["root"] / "sub" / "policy"), "sub/policy", "sub/../sub/policy"):
        body, n = _policy_request(env, name)
        r = _call(env["locked"], "POST", "/v1/dense_rewards", body, AUTH)
        assert r.status_code == 200, (name, r.text)
        assert len(r.json()["results"][0]["token_rewards"]) == n


def test_anything_else_gets_one_answer(env):
    """Missing, outside the roots, a link out of a root, not a tokenizer, a relative escape, a system folder: the
    same 422, word for word, so that a caller learns nothing about the server's files."""
    tmp, root = env["tmp"], env["root"]
    refused = ["/etc", "/etc/passwd", "/no/such/tokenizer", str(env["outside"]), str(root / "link-out"), "link-out",
               str(root), str(root / "not-a-tokenizer"), "not-a-tokenizer", "../outside-tokenizer", "sub/../../outside-tokenizer",
               "", " ", "bpe/..", str(tmp), "\u0000", "~", "sub/policy/tokenizer.json"]
    answers = set()
    for value in refused:
        body, _ = _policy_request(env, value)
        r = _call(env["locked"], "POST", "/v1/dense_rewards", body, AUTH)
        assert r.status_code == 422, (value, r.text)
        error = r.json()["error"]
        assert error["field"] == "policy_tokenizer", (value, error)
        answers.add(json.dumps(error, sort_keys=True))
    assert len(answers) == 1, answers
    # The server that offers none refuses a real tokenizer with the same words.
    body, _ = _policy_request(env, str(env["bpe"]))
    r = _call(env["default"], "POST", "/v1/dense_rewards", body)
    assert r.status_code == 422 and json.dumps(r.json()["error"], sort_keys=True) in answers


def test_tokenizer_code_never_runs(env):
    # A tokenizer inside a root whose config names code from its folder: refused at load, the code not run.
    body, _ = _policy_request(env, "evil")
    r = _call(env["locked"], "POST", "/v1/dense_rewards", body, AUTH)
    assert r.status_code == 422 and r.json()["error"]["field"] == "policy_tokenizer", r.text
    assert not env["marker"].exists()


# ---------------------------------------------------------------------------------------------------- settings
def test_tokenizer_dirs_parse_names_and_roots(tmp_path):
    from service.security import TokenizerDirs

    dirs = TokenizerDirs.parse(os.pathsep.join(["qwen=/models/qwen-tok", "/srv/tokenizers", " ", "~/toks"]))
    assert dirs.names == {"qwen": "/models/qwen-tok"}
    assert dirs.roots == ["/srv/tokenizers", os.path.expanduser("~/toks")]
    assert TokenizerDirs.parse(None).describe() == "none"


def test_a_public_bind_without_a_token_is_warned_about(caplog, encoder_rm_dir):
    from pydantic import SecretStr

    from service.config import Settings
    from service.main import create_app
    from service.security import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    for host, token, warned in (("0.0.0.0", None, True), ("0.0.0.0", SecretStr(API_TOKEN), False),
                                ("127.0.0.1", None, False), ("::", None, True)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tokencredit.security"):
            create_app(Settings(model=str(encoder_rm_dir), host=host, api_token=token))
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warnings) == warned, (host, caplog.text)
        assert API_TOKEN not in caplog.text


# ---------------------------------------------------------------------------------------------------- page
def test_the_page_asks_for_the_token_and_sends_it(env):
    """The page on a server that asks for a token: it says so, takes the token, explains, and keeps the token in a
    JS variable only (not the URL, storage, cookies or the DOM)."""
    chromium = os.environ.get("TOKENCREDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        assert os.environ.get("TOKENCREDIT_REQUIRE_BROWSER") != "1", "TOKENCREDIT_REQUIRE_BROWSER=1 but no chromium"
        pytest.skip("no chromium on PATH (apt-get install -y chromium; CI installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"{env['locked']}/ui")
            page.wait_for_selector("#api-token-form:not([hidden])")
            sync_api.expect(page.locator("#model-info")).to_contain_text("API token")
            page.fill("#api-token", API_TOKEN)
            with page.expect_request(lambda r: r.url.endswith("/v1/info") and "authorization" in r.headers) as sent:
                page.click("#api-token-use")
            assert sent.value.headers["authorization"] == f"Bearer {API_TOKEN}"
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#prompt", ITEM["prompt"])
            page.fill("#response", ITEM["response"])
            page.click("#explain-run")
            page.wait_for_selector(".hm-row[data-row=mix] .tok")
            kept = page.evaluate("""() => JSON.stringify([location.href, document.cookie, {...localStorage},
                {...sessionStorage}, document.documentElement.outerHTML, [...document.querySelectorAll('input')].map(i => i.value)])""")
            assert API_TOKEN not in kept and API_TOKEN not in json.dumps(page.context.cookies())
        finally:
            browser.close()

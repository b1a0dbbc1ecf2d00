"""The web page (`GET /ui`) in a real headless Chromium against real servers (tiny encoder RM) on loopback.

Chromium comes from the operating system's packages (`.ci/run` installs it when missing; `TOKENCREDIT_CHROMIUM`
overrides the path), driven by Playwright for Python (no browser download). Without a Chromium the module is
skipped, unless TOKENCREDIT_REQUIRE_BROWSER=1 (CI), where that is a failure. Screenshots go to
tests/artifacts/ui/ (git-ignored).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import metric, spawn_server, stop, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "tests" / "artifacts" / "ui"
CHROMIUM = os.environ.get("TOKENCREDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if os.environ.get("TOKENCREDIT_REQUIRE_BROWSER") == "1":
    assert CHROMIUM, "TOKENCREDIT_REQUIRE_BROWSER=1 but no chromium: apt-get install -y chromium"
elif not CHROMIUM:
    pytest.skip("no chromium on PATH (apt-get install -y chromium; CI installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")  # pinned in the `test` extra
# Polls from the test process: the page's CSP forbids the eval that page.wait_for_function("...") needs.
expect = sync_api.expect

# Headless on a closed network: no sandbox (root in CI), and nothing that phones home and stalls.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TOKEN = "tc-ui-" + uuid.uuid4().hex
PROMPT = "How was the film?"
RESPONSE = "The movie was wonderful, but the ending was bad."
EXPLAINERS = ["attention", "shap", "lime", "loo"]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def servers(encoder_rm_dir, tmp_path_factory):
    """One server with the admin API, one without (both start at once). fp32 rows: the page's request and the
    test's own give bit-identical answers."""
    tmp = tmp_path_factory.mktemp("ui")
    common = {"explain_dtype": "float32", "weights": json.dumps({"sparse": 0.2, "shap": 0.8})}
    spawned = {
        "admin": spawn_server(encoder_rm_dir, tmp / "admin.log", admin_token=TOKEN, state_db=tmp / "admin.sqlite3", **common),
        "open": spawn_server(encoder_rm_dir, tmp / "open.log", state_db=tmp / "open.sqlite3", **common),
    }
    try:
        for name, (proc, url) in spawned.items():
            wait_ready(proc, url, tmp / f"{name}.log")
        yield {name: url for name, (_, url) in spawned.items()}
    finally:
        stop(*(proc for proc, _ in spawned.values()))
    for name in spawned:
        assert TOKEN not in (tmp / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh context per test; every console error and uncaught exception fails the test, except those the
    test names in `page.expected_errors` (regexes)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.errors = []
    pg.expected_errors = []
    pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda exc: pg.errors.append(f"uncaught: {exc}"))
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    unexpected = [e for e in pg.errors if not any(re.search(p, e) for p in pg.expected_errors)]
    assert not unexpected, unexpected


def _open(page, url, fragment=""):
    page.goto(f"{url}/ui{fragment}")
    page.wait_for_selector("body[data-ready=true]")


def _shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _rgb(css: str):
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def _row(page, name):
    """A heatmap row as the page shows it: per token its text, reward, attribution, base and background."""
    return page.eval_on_selector_all(
        f".hm-row[data-row={name}] .tok",
        """els => els.map(e => ({text: e.textContent, reward: Number(e.dataset.reward),
            attribution: Number(e.dataset.attribution), base: Number(e.dataset.base),
            bg: getComputedStyle(e).backgroundColor}))""")


def _page_weights(page, container="#mix-weights"):
    return page.eval_on_selector_all(
        f"{container} output[data-weight]", "els => Object.fromEntries(els.map(e => [e.dataset.weight, Number(e.dataset.value)]))")


def _api_request(weights, placement="last"):
    return {"items": [{"prompt": PROMPT, "response": RESPONSE}], "weights": weights,
            "methods": {c: {} for c in EXPLAINERS}, "return_components": True, "return_attributions": True,
            "residual_placement": placement}


def _explain(page, url):
    _open(page, url)
    page.fill("#prompt", PROMPT)
    page.fill("#response", RESPONSE)
    with page.expect_response(lambda r: r.url.endswith("/v1/dense_rewards")) as answer:
        page.click("#explain-run")
    page.wait_for_selector(".hm-row[data-row=mix] .tok")
    return json.loads(answer.value.request.post_data), answer.value.json()


# ---------------------------------------------------------------------------------------------------- Explain
def test_heatmap_shows_the_api_answer(servers, page):
    url = servers["admin"]
    sent, answer = _explain(page, url)
    # The page asks for every explainer (so the sliders can remix) at the server's current weights.
    assert sent == _api_request({"sparse": 0.2, "attention": 0.0, "shap": 0.8, "lime": 0.0, "loo": 0.0})
    with httpx.Client(base_url=url, timeout=60) as client:
        own = client.post("/v1/dense_rewards", json=sent).json()["results"][0]
    item = answer["results"][0]
    assert item["token_rewards"] == own["token_rewards"] and item["components"] == own["components"]

    expected = {"mix": (item["token_rewards"], [0.8 * v for v in item["attributions"]["shap"]["values"]],
                        0.2 * item["score"] + 0.8 * item["attributions"]["shap"]["base"])}
    n = len(item["spans"])
    expected["sparse"] = (item["components"]["sparse"], [0.0] * n, item["score"])
    for c in EXPLAINERS:
        expected[c] = (item["components"][c], item["attributions"][c]["values"], item["attributions"][c]["base"])
    rows = page.eval_on_selector_all(".hm-row", "els => els.map(e => e.dataset.row)")
    assert rows == ["mix", "sparse", *EXPLAINERS]
    for name, (rewards, values, base) in expected.items():
        shown = _row(page, name)
        assert [t["text"] for t in shown] == [RESPONSE[s:e] for s, e in item["spans"]], name
        assert [t["reward"] for t in shown] == rewards, name  # the same floats, not rounded ones
        assert [t["attribution"] for t in shown] == pytest.approx(values, abs=1e-12), name
        assert all(t["base"] == pytest.approx(base, abs=1e-12) for t in shown), name
        for t in shown:
            r, g, b = _rgb(t["bg"])
            if t["reward"] > 0:
                assert b > r, (name, t)  # blue: raised the score
            elif t["reward"] < 0:
                assert r > b, (name, t)  # red: lowered it
            else:
                assert (r, g, b) == (255, 255, 255), (name, t)
        # Gaps between tokens are shown as they are: each row reads as the response.
        assert page.text_content(f".hm-row[data-row={name}] .hm-text") == RESPONSE
    assert page.get_attribute(".hm-row[data-row=mix]", "data-source") == "server"
    assert any(t["reward"] < 0 for t in _row(page, "shap")) and any(t["reward"] > 0 for t in _row(page, "shap"))

    # Hover: the token's reward, attribution and the base, as numbers.
    shap = _row(page, "shap")
    page.hover(".hm-row[data-row=shap] .tok >> nth=1")
    tip = page.text_content("#tip")
    assert page.is_visible("#tip") and f'"{shap[1]["text"]}"' in tip
    for label, value in (("reward", shap[1]["reward"]), ("attribution", shap[1]["attribution"]), ("base", shap[1]["base"])):
        assert re.search(rf"{label}\s+[+−]\s?{abs(value):.5f}", tip), (label, tip)
    _shot(page, "explain")


def test_sliders_remix_in_the_page_and_the_permalink_restores_it(servers, page, browser):
    url = servers["admin"]
    _explain(page, url)
    explained = []
    page.on("request", lambda r: explained.append(r.url) if "/v1/dense_rewards" in r.url else None)
    before = {name: _row(page, name) for name in ("sparse", *EXPLAINERS)}

    page.fill("#mix-weights input[data-component=shap]", "0.3")  # others rescale: sparse 0.7
    page.fill("#mix-weights input[data-component=loo]", "0.25")  # sparse 0.525, shap 0.225
    weights = _page_weights(page)
    assert weights == pytest.approx({"sparse": 0.525, "attention": 0.0, "shap": 0.225, "lime": 0.0, "loo": 0.25}, abs=1e-12)
    assert all(w >= 0 for w in weights.values()) and math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-15)
    assert page.get_attribute(".hm-row[data-row=mix]", "data-source") == "page"
    mix = [t["reward"] for t in _row(page, "mix")]
    with httpx.Client(base_url=url, timeout=60) as client:
        server = client.post("/v1/dense_rewards", json=_api_request(weights)).json()["results"][0]
    # The page's mix is the server's, operation for operation (residual on the last token by exact summation).
    assert mix == pytest.approx(server["token_rewards"], abs=1e-12)
    assert math.fsum(mix) == pytest.approx(server["score"], abs=1e-12)
    assert {name: _row(page, name) for name in before} == before  # the components did not change
    assert explained == []  # no new request: no new RM rows

    # A slider on a vertex keeps the others at 0 and the sum at 1.
    page.fill("#mix-weights input[data-component=shap]", "1")
    assert _page_weights(page) == {"sparse": 0.0, "attention": 0.0, "shap": 1.0, "lime": 0.0, "loo": 0.0}
    page.fill("#mix-weights input[data-component=shap]", "0.6")  # the others were all 0: they share the rest
    assert _page_weights(page) == pytest.approx({"sparse": 0.1, "attention": 0.1, "shap": 0.6, "lime": 0.1, "loo": 0.1}, abs=1e-12)
    r = {k: [t["reward"] for t in before[k]] for k in before}
    remix = [0.1 * (r["sparse"][i] + r["attention"][i] + r["lime"][i] + r["loo"][i]) + 0.6 * r["shap"][i] for i in range(len(r["shap"]))]
    assert [t["reward"] for t in _row(page, "mix")] == pytest.approx(remix, abs=1e-9)

    # The permalink reproduces the inputs and the weights (to 4 decimals) in a fresh page, and runs them.
    page.fill("#mix-weights input[data-component=lime]", "0.2")  # the others × 0.8/0.9
    weights = _page_weights(page)
    mix = [t["reward"] for t in _row(page, "mix")]
    link = page.get_attribute("#permalink", "href")
    assert link.startswith("#explain?") and TOKEN not in link
    other = browser.new_context().new_page()
    try:
        with other.expect_response(lambda r: r.url.endswith("/v1/dense_rewards")):
            other.goto(f"{url}/ui{link}")
        other.wait_for_selector(".hm-row[data-row=mix] .tok")
        assert other.input_value("#prompt") == PROMPT and other.input_value("#response") == RESPONSE
        assert _page_weights(other) == pytest.approx(weights, abs=1e-4)
        assert [t["reward"] for t in _row(other, "mix")] == pytest.approx(mix, abs=1e-3)
    finally:
        other.context.close()


# The response as the last message's text blocks: the page must concatenate them as the server does.
MESSAGES = [
    {"role": "system", "content": "You are a film critic."},
    {"role": "user", "content": PROMPT},
    {"role": "assistant", "content": [{"type": "text", "text": "The movie was wonderful, "},
                                      {"type": "text", "text": "but the ending was bad."}]},
]


def test_chat_messages_are_explained_like_a_response(servers, page, browser):
    url = servers["admin"]
    _open(page, url)
    sent_requests = []
    page.on("request", lambda r: sent_requests.append(r.url) if "/v1/dense_rewards" in r.url else None)
    assert page.is_visible("#prompt") and not page.is_visible("#messages")
    page.check("input[name=input-mode][value=chat]")
    assert page.is_visible("#messages") and not page.is_visible("#prompt") and not page.is_visible("#response")
    status = page.locator("#explain-status")

    # What is not a JSON list of messages is said in the page, and nothing is sent.
    for text, said in (('[{"role": "user", "content": "hi"},]', "not valid JSON"),
                       ('{"role": "assistant", "content": "hi"}', "non-empty JSON list"),
                       ('[{"role": "user", "content": "hi"}, "hello"]', "messages[1]: expected a JSON object")):
        page.fill("#messages", text)
        page.click("#explain-run")
        expect(status).to_contain_text(said)
        assert "error" in status.get_attribute("class") and "nothing was sent" in status.text_content()
    page.wait_for_timeout(300)
    assert sent_requests == [] and page.locator(".hm-row").count() == 0

    # A conversation the server refuses (it does not end with the assistant): its 422, in words, in the page.
    page.expected_errors = [r"status of 422"]  # the browser logs the refused request itself
    page.fill("#messages", json.dumps(MESSAGES[:2]))
    with page.expect_response(lambda r: r.url.endswith("/v1/dense_rewards")) as refused:
        page.click("#explain-run")
    assert refused.value.status == 422
    expect(status).to_contain_text("422 invalid_request: items[0].messages")
    assert "must be assistant" in status.text_content() and page.locator(".hm-row").count() == 0
    _shot(page, "explain-chat-refused")

    # Three messages: the request carries them as given; the heatmap is the last message's text, the API's numbers.
    text = json.dumps(MESSAGES, indent=2)
    page.fill("#messages", text)
    with page.expect_response(lambda r: r.url.endswith("/v1/dense_rewards")) as answer:
        page.click("#explain-run")
    page.wait_for_selector(".hm-row[data-row=mix] .tok")
    sent = json.loads(answer.value.request.post_data)
    expected_body = _api_request({"sparse": 0.2, "attention": 0.0, "shap": 0.8, "lime": 0.0, "loo": 0.0})
    assert sent == {**expected_body, "items": [{"messages": MESSAGES}]}
    with httpx.Client(base_url=url, timeout=60) as client:
        own = client.post("/v1/dense_rewards", json=sent).json()["results"][0]
    item = answer.value.json()["results"][0]
    assert item["token_rewards"] == own["token_rewards"] and item["components"] == own["components"]
    assert item["spans"] == own["spans"] and item["spans"][-1][1] <= len(RESPONSE)
    expected = {"mix": item["token_rewards"], "sparse": item["components"]["sparse"],
                **{c: item["components"][c] for c in EXPLAINERS}}
    assert page.eval_on_selector_all(".hm-row", "els => els.map(e => e.dataset.row)") == list(expected)
    for name, rewards in expected.items():
        shown = _row(page, name)
        assert [t["text"] for t in shown] == [RESPONSE[s:e] for s, e in item["spans"]], name
        assert [t["reward"] for t in shown] == rewards, name
        assert page.text_content(f".hm-row[data-row={name}] .hm-text") == RESPONSE, name
    assert "response: messages[2]" in status.text_content() and "error" not in status.get_attribute("class")
    _shot(page, "explain-chat")

    # The permalink carries the messages as typed, and opens in chat mode and runs them.
    link = page.get_attribute("#permalink", "href")
    assert link.startswith("#explain?") and "m=" in link and "r=" not in link
    other = browser.new_context().new_page()
    try:
        with other.expect_response(lambda r: r.url.endswith("/v1/dense_rewards")):
            other.goto(f"{url}/ui{link}")
        other.wait_for_selector(".hm-row[data-row=mix] .tok")
        assert other.is_checked("input[name=input-mode][value=chat]") and other.is_visible("#messages")
        assert other.input_value("#messages") == text and not other.is_visible("#prompt")
        assert [t["reward"] for t in _row(other, "mix")] == item["token_rewards"]
        assert other.text_content(".hm-row[data-row=mix] .hm-text") == RESPONSE
    finally:
        other.context.close()

    # Back to prompt / response: those inputs again, and the permalink carries them instead.
    page.check("input[name=input-mode][value=text]")
    assert page.is_visible("#prompt") and not page.is_visible("#messages")
    link = page.get_attribute("#permalink", "href")
    assert "r=" in link and "m=" not in link


# ---------------------------------------------------------------------------------------------------- Shaping
def _token_left_anywhere(page) -> list:
    """Where the token could have been kept by the page: the URL, storage, cookies, the DOM."""
    stored = page.evaluate("""() => JSON.stringify([location.href, document.cookie, {...localStorage}, {...sessionStorage},
        document.documentElement.outerHTML, [...document.querySelectorAll('input')].map(i => i.value)])""")
    cookies = json.dumps(page.context.cookies())
    return [where for where, text in (("page", stored), ("cookies", cookies)) if TOKEN in text]


def test_shaping_without_and_with_the_token(servers, page):
    url = servers["admin"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        current = client.get("/v1/info").json()["shaping"]
    _open(page, url, "#shaping")
    page.wait_for_selector("#current-version")
    assert page.get_attribute("#current-version", "data-version") == str(current["version"])
    shown = page.eval_on_selector_all("#shaping-current .wb", "els => Object.fromEntries(els.map(e => [e.dataset.component, Number(e.dataset.value)]))")
    assert shown == {k: v for k, v in current["weights"].items() if v > 0}
    # No token: the history and the editor stay closed; the page asks for the token.
    assert page.is_visible("#token-form") and not page.is_visible("#shaping-history") and not page.is_visible("#shaping-editor")
    assert not page.is_visible("#admin-disabled")

    page.expected_errors = [r"status of 401"]  # the browser logs the refused request itself
    page.fill("#admin-token", "not-the-token")
    page.click("#token-use")
    expect(page.locator("#admin-status")).to_contain_text("401")
    assert not page.is_visible("#shaping-history") and page.is_visible("#token-form")

    page.fill("#admin-token", TOKEN)
    page.click("#token-use")
    page.wait_for_selector("#shaping-history tbody tr")
    with httpx.Client(base_url=url, timeout=30, headers=auth) as client:
        history = client.get("/admin/v1/shaping/history").json()["versions"]
        shown = page.eval_on_selector_all("#shaping-history tbody tr", "els => els.map(e => Number(e.dataset.version))")
        assert shown == [v["version"] for v in reversed(history)]
        assert _token_left_anywhere(page) == []

        page.fill("#new-weights input[data-component=loo]", "0.5")
        wanted = _page_weights(page, "#new-weights")
        page.fill("#updated-by", "ui test")
        page.click("#shaping-save")
        expect(page.locator("#admin-status")).to_contain_text("saved as version")
        saved = client.get("/admin/v1/shaping").json()
        assert saved["version"] == history[-1]["version"] + 1 and saved["updated_by"] == "ui test"
        assert saved["weights"] == pytest.approx({"prefix": 0.0, **wanted}, abs=1e-12)
        page.wait_for_selector(f"#shaping-history tbody tr[data-version='{saved['version']}']")
        assert page.get_attribute("#current-version", "data-version") == str(saved["version"])

        # Someone else saves meanwhile: the page's next save is refused (412), nothing is overwritten.
        client.put("/admin/v1/shaping", json={"weights": {"sparse": 1.0}, "updated_by": "rival"},
                   headers={"If-Match": f'"v{saved["version"]}"'}).raise_for_status()
        page.expected_errors.append(r"status of 412")
        page.click("#shaping-save")
        expect(page.locator("#admin-status")).to_contain_text("someone else")
        rival = client.get("/admin/v1/shaping").json()
        assert rival["updated_by"] == "rival"  # not overwritten by the page
        assert page.get_attribute("#current-version", "data-version") == str(rival["version"])  # and now shown
    _shot(page, "shaping")
    assert _token_left_anywhere(page) == []
    page.click("#token-forget")
    assert page.is_visible("#token-form") and not page.is_visible("#shaping-history")


def test_admin_disabled_is_said_and_the_rest_works(servers, page):
    url = servers["open"]
    _open(page, url, "#shaping")
    page.wait_for_selector("#current-version")
    assert page.is_visible("#admin-disabled") and "disabled" in page.text_content("#admin-disabled")
    assert not page.is_visible("#admin-panel")
    page.click("#tabs a[data-tab=bo]")
    page.wait_for_selector("#bo-empty:not([hidden])")
    page.click("#tabs a[data-tab=explain]")
    page.click("#explain-run")
    page.wait_for_selector(".hm-row[data-row=mix] .tok")


# ---------------------------------------------------------------------------------------------------- BO
def test_bo_page_shows_a_reported_study(servers, page, tmp_path):
    """A study as `tokencredit bo run` reports it (the same client code): trials, best so far, best weights,
    the running trial's elapsed time. tests/test_bo.py runs the real CLI against a server."""
    from tokencredit.admin import AdminClient
    from tokencredit.bo import Study
    from tokencredit.bo.report import StudyReporter, study_report

    url = servers["admin"]
    components = ["sparse", "shap", "loo"]
    study = Study(components, seed=0, n_init=3, path=tmp_path / "ui-study.json")
    values = [0.52, 0.61, None, 0.58, 0.74, 0.70]  # None: failed
    for i, value in enumerate(values):
        w = [(i + 1) / 10, 0.4, 0.6 - (i + 1) / 10]
        trial = study.add_trial(dict(zip(components, w)), "sobol" if i < 3 else "bo")
        study.set_version(trial.id, 10 + i)
        if value is None:
            study.fail(trial.id, "cannot read an objective from the last line 'nan'")
        else:
            study.complete(trial.id, value, noise=0.01)
    running = study.add_trial({"sparse": 0.2, "shap": 0.3, "loo": 0.5}, "bo")
    study.set_version(running.id, 16)
    best = study.trial(4)
    with AdminClient(url, token=TOKEN) as admin:
        reporter = StudyReporter(admin, "ui-study")
        assert reporter.report(lambda: study_report(study, target_trials=10, state="running", running={running.id: 125.0},
                                                    best=best, best_how="highest GP posterior mean among observed trials",
                                                    log_path=lambda i: None))
    _open(page, url, "#bo/ui-study")
    page.wait_for_selector("#bo-chart .pt")
    points = page.eval_on_selector_all("#bo-chart .pt", "els => els.map(e => [Number(e.dataset.trial), Number(e.dataset.value)])")
    assert points == [[i, v] for i, v in enumerate(values) if v is not None]
    assert page.eval_on_selector_all("#bo-chart .failed", "els => els.map(e => Number(e.dataset.trial))") == [2]
    so_far = json.loads(page.get_attribute("#bo-chart .best-so-far", "data-values"))
    assert so_far == study.best_so_far()
    summary = page.locator("#bo-summary")
    assert summary.get_attribute("data-finished") == "6" and summary.get_attribute("data-best-trial") == "4"
    assert "6/10 trials finished (1 failed)" in summary.text_content()
    bars = page.eval_on_selector_all("#bo-best .wb", "els => Object.fromEntries(els.map(e => [e.dataset.component, Number(e.dataset.value)]))")
    assert bars == best.weights
    assert "GP posterior mean" in page.text_content("#bo-best-title")
    line = page.text_content(f"#bo-running [data-trial='{running.id}']")
    assert re.search(rf"trial {running.id} running for 2m(0[5-9]|1\d)s", line), line  # 125 s at report + the page's clock
    _shot(page, "bo")


# ---------------------------------------------------------------------------------------------------- Live
def test_live_numbers_are_the_metrics(servers, page):
    url = servers["open"]
    _open(page, url, "#live")
    page.wait_for_selector(".stat[data-stat=rows_total]")
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/v1/dense_rewards", json={"items": [{"prompt": PROMPT, "response": RESPONSE}],
                                               "weights": {"loo": 1.0}}).raise_for_status()
        assert client.post("/v1/dense_rewards", json={"items": []}).status_code == 422
        text = client.get("/metrics").text
    rows = metric(text, "tokencredit_rm_rows_total")
    # Probes are not load: /readyz answers 503 by design while the RM loads (wait_ready may have seen one).
    def api_requests(status):
        return sum(float(m.group(2)) for m in re.finditer(rf'tokencredit_requests_total\{{([^}}]*status="{status}"[^}}]*)\}} (\S+)', text)
                   if not re.search(r'endpoint="(/metrics|/healthz|/readyz|/ui[^"]*)"', m.group(1)))
    client_errors, server_errors = api_requests(r"4\d\d"), api_requests(r"5\d\d")
    assert rows > 0 and client_errors >= 1 and server_errors == 0

    def shown(key):
        return float(page.get_attribute(f".stat[data-stat={key}]", "data-value") or "nan")

    deadline = time.monotonic() + 15
    while (shown("rows_total"), shown("errors_4xx")) != (rows, client_errors):
        assert time.monotonic() < deadline, (shown("rows_total"), rows, shown("errors_4xx"), client_errors)
        time.sleep(0.2)
    assert shown("rows_per_s") > 0  # the rows fell inside the last 10 s
    assert shown("queue_depth") == metric(text, "tokencredit_queue_depth") == 0
    assert shown("errors_5xx") == server_errors and page.text_content(".stat[data-stat=cache_hit_rate] .v") == "no cache"
    _shot(page, "live")

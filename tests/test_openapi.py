"""The committed openapi.yaml is the schema the app serves: regenerate it with `make openapi` after an API change."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.config import Settings
from service.main import create_app

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"


def _live_schema() -> dict:
    # Round trip through YAML so both sides have the same key and value types (tuples → lists, int keys, ...).
    # As `tokencredit-server openapi` renders it: for the default settings, whatever the environment says.
    app = create_app(Settings.model_construct(), load_model=False)
    return yaml.safe_load(yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True))


def test_openapi_yaml_is_current():
    assert SPEC.is_file(), "openapi.yaml is missing: run `make openapi` and commit it"
    committed = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    assert committed == _live_schema(), "openapi.yaml is out of date with the app: run `make openapi` and commit it"


def test_openapi_contract():
    spec = _live_schema()
    assert {"/v1/dense_rewards", "/v1/info", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "post" in spec["paths"]["/v1/dense_rewards"] and "get" in spec["paths"]["/v1/info"]
    request = spec["components"]["schemas"]["DenseRewardsRequest"]
    assert {"items", "policy_tokenizer", "weights", "methods", "return_components"} <= set(request["properties"])
    assert request["required"] == ["items"] and request.get("additionalProperties") is False
    # Every error status of the dense-rewards route documents the shared error body.
    responses = spec["paths"]["/v1/dense_rewards"]["post"]["responses"]
    for status in ("413", "422", "429", "503"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse"), (status, ref)


def test_schema_states_what_the_app_enforces():
    """What the handlers, the middleware and the validators enforce beyond the routes' models (service/openapi.py);
    tests/test_schema_fuzz.py checks the running server against it."""
    spec = _live_schema()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    # Every route with a body documents the 400 for undecodable bytes and the 413 of the body limit; every error
    # documents the shared ErrorResponse (FastAPI's own 422 body is never answered).
    for path, item in paths.items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), (path, status)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(operation["responses"]), (method, path)
    assert "HTTPValidationError" not in schemas
    # Limits of the default settings; non-blank responses and texts; prompt + response, or messages.
    item = schemas["DenseRewardItem"]
    response = next(v for v in item["properties"]["response"]["anyOf"] if v.get("type") == "string")
    assert response["maxLength"] == 16384 and response["pattern"].startswith("[^")
    assert [form["required"] for form in item["anyOf"]] == [["prompt", "response"], ["messages"]]
    assert schemas["DenseRewardsRequest"]["properties"]["items"] == {
        **schemas["DenseRewardsRequest"]["properties"]["items"], "minItems": 1, "maxItems": 64}
    text, texts = schemas["ClassifyRequest"]["properties"]["input"]["anyOf"]
    assert text["pattern"] == response["pattern"] and texts["minItems"] == 1
    # The admin API: If-Match is required on PUT (428 without it); no credentials is 401, a disabled API 403.
    put = paths["/admin/v1/shaping"]["put"]
    assert [p["required"] for p in put["parameters"] if p["name"] == "if-match"] == [True]
    assert {"401", "403", "412", "428"} <= set(put["responses"])
    # The data plane accepts its optional token (off by default: the empty requirement), and says 401.
    for path, method in (("/v1/dense_rewards", "post"), ("/v1/info", "get"), ("/openrlhf/get_reward", "post"), ("/classify", "post")):
        assert paths[path][method]["security"] == [{"APIToken": []}, {}] and "401" in paths[path][method]["responses"]
    assert paths["/admin/v1/shaping"]["get"]["security"] == [{"AdminToken": []}]


def test_non_blank_pattern_is_pythons_whitespace():
    """The schema's "has a non-whitespace character" is exactly the validators' `str.strip()`, in any regex dialect
    (the class spells every whitespace character out)."""
    import re
    import sys

    from service.openapi import NON_BLANK

    pattern = re.compile(NON_BLANK)
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        assert bool(pattern.search(char)) == bool(char.strip()), hex(code)

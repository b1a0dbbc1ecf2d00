"""The committed openapi.yaml is the schema the app serves: regenerate it with `make openapi` after an API change."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.main import create_app

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"


def _live_schema() -> dict:
    # Round trip through YAML so both sides have the same key and value types (tuples → lists, int keys, ...).
    return yaml.safe_load(yaml.safe_dump(create_app(load_model=False).openapi(), sort_keys=False, allow_unicode=True))


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

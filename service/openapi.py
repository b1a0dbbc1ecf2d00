"""The OpenAPI schema: FastAPI's, plus what the app enforces that FastAPI cannot see.

FastAPI renders the routes' pydantic models. Some answers come from elsewhere (the body-size middleware's 413,
FastAPI's own 400 for a body that is not UTF-8 JSON, the error handlers' ErrorResponse for every 422), some
constraints live in validators (a response with a non-whitespace character, prompt and response or messages, a
non-empty `/classify` input, `If-Match` on PUT), and some depend on this server's settings (its limits, whether the
data-plane token is required). `app_schema` adds them, so that the schema states what the server does; schemathesis
checks the two against each other (tests/test_schema_fuzz.py). What no JSON Schema can state (weights summing to
1, the OpenRLHF shim's parallel lists, what the RM's tokenizer makes of a text) is said in descriptions.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.security import API_SCHEME, api_token_enabled

__all__ = ["app_schema", "NON_BLANK"]

# "Has a character that is not whitespace", with Python's whitespace (str.strip, what the validators use) spelled
# out: `\s` differs between Python, ECMA-262 and Rust regexes (U+001C-U+001F, U+0085, U+FEFF).
NON_BLANK = "[^\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"

_ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
_ERRORS = {
    "400": "The body cannot be read as JSON (it is not UTF-8)",
    "401": "Missing or wrong bearer token",
    "413": "The body, or an item in it, exceeds a server limit (the message names the limit)",
    "422": "A field is invalid; `error.field` names it",
}


def app_schema(app: FastAPI, settings) -> dict:
    """The app's OpenAPI document for these settings (cached on the app, as FastAPI does)."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for path, path_item in spec.get("paths", {}).items():
        for method, operation in path_item.items():
            _errors(operation)
            _security(operation, required=api_token_enabled(settings))
            if (method, path) == ("put", "/admin/v1/shaping"):
                _if_match_required(operation)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _constraints(schemas, settings)
    app.openapi_schema = spec
    return spec


def _error(status: str) -> dict:
    return {"description": _ERRORS[status], **_ERROR_REF}


def _errors(operation: dict) -> None:
    responses = operation.setdefault("responses", {})
    for status, response in list(responses.items()):
        # FastAPI's default 422 names its own body; the handlers answer ErrorResponse for every error.
        ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
        if ref.endswith("/HTTPValidationError"):
            responses[status] = _error("422")
    if "requestBody" in operation or operation.get("parameters"):
        responses.setdefault("422", _error("422"))
    if "requestBody" in operation:
        # FastAPI answers 400 to undecodable bytes; the body-size middleware 413 to any body over the limit.
        for status in ("400", "413"):
            responses.setdefault(status, _error(status))


def _security(operation: dict, required: bool) -> None:
    security = operation.get("security") or []
    if any(API_SCHEME in requirement for requirement in security):
        operation["responses"].setdefault("401", _error("401"))
        # Off by default: the empty requirement says a request without the token is accepted then.
        operation["security"] = [{API_SCHEME: []}] if required else [{API_SCHEME: []}, {}]


def _if_match_required(operation: dict) -> None:
    # Declared optional in Python so that its absence is a 428 naming the header, not a generic 422.
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "header" and parameter.get("name", "").lower() == "if-match":
            parameter["required"] = True
            parameter["schema"] = {"type": "string", "minLength": 1, "title": "If-Match",
                                   "description": 'the ETag of GET /admin/v1/shaping, e.g. "v3" (or *)'}
            parameter.setdefault("description", "the current version's ETag: 412 when stale, 428 when absent")


def _string_variant(prop: dict) -> dict:
    # Optional[str] renders as anyOf [string, null]: constrain the string branch.
    for variant in prop.get("anyOf", []):
        if variant.get("type") == "string":
            return variant
    return prop


def _array_variant(prop: dict) -> dict:
    for variant in prop.get("anyOf", []):
        if variant.get("type") == "array":
            return variant
    return prop


def _constraints(schemas: dict, settings) -> None:
    request = schemas.get("DenseRewardsRequest")
    if request:
        request["properties"]["items"]["maxItems"] = settings.max_items
    item = schemas.get("DenseRewardItem")
    if item:
        props = item["properties"]
        response = _string_variant(props["response"])
        response.update(pattern=NON_BLANK, maxLength=settings.max_response_chars)
        for variant in props["messages"].get("anyOf", []):
            if variant.get("type") == "array":
                variant["minItems"] = 1
        offsets = _array_variant(props["response_token_offsets"])
        offsets["minItems"] = 1
        for position in offsets["items"].get("prefixItems", []):
            position["minimum"] = 0
        ids = _array_variant(props["response_token_ids"])
        ids["minItems"] = 1
        ids["items"]["minimum"] = 0
        # Either prompt and response, or messages (whose last, assistant, message is the response).
        forms = [
            {"required": ["prompt", "response"],
             "properties": {"prompt": {"type": "string"}, "response": {"type": "string"}, "messages": {"type": "null"}}},
            {"required": ["messages"],
             "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}, "response": {"type": "null"}}},
        ]
        # (Offsets or ids, not both, is left to the description: with it, generators hardly find a valid item.)
        item["anyOf"] = forms
        props["response_token_ids"]["description"] = "the policy's ids of the response; not with response_token_offsets"
    message = schemas.get("ChatMessage")
    if message:
        _array_variant(message["properties"]["tool_calls"])["minItems"] = 1
        given = {"not": {"type": "null"}}
        absent = {"type": "null"}
        # Who carries what: content (null only beside an assistant's tool calls), tool_calls (assistants only),
        # tool_call_id (tool messages only).
        message["anyOf"] = [
            {"required": ["content"], "properties": {"role": {"enum": ["system", "user"]}, "content": given,
                                                      "tool_calls": absent, "tool_call_id": absent}},
            {"required": ["content"], "properties": {"role": {"const": "tool"}, "content": given, "tool_calls": absent}},
            {"required": ["content"], "properties": {"role": {"const": "assistant"}, "content": given, "tool_call_id": absent}},
            {"required": ["tool_calls"], "properties": {"role": {"const": "assistant"}, "tool_calls": given, "tool_call_id": absent}},
        ]
    weights = schemas.get("ShapingWeights")
    if weights:
        weights["description"] = weights.get("description", "") + " The weights must sum to 1 (within 1e-6)."
    classify = schemas.get("ClassifyRequest")
    if classify:
        # No maxLength: the shims cut what does not fit the RM (and say so) instead of refusing it.
        text = {"type": "string", "pattern": NON_BLANK}
        classify["properties"]["input"] = {
            "anyOf": [text, {"type": "array", "items": text, "minItems": 1}], "title": "Input",
            "description": "one text or a non-empty list of texts, each with a non-whitespace character",
        }
    openrlhf = schemas.get("OpenRLHFRewardRequest")
    if openrlhf:
        props = openrlhf["properties"]
        props["query"]["items"] = {"type": "string", "pattern": NON_BLANK}
        for name in ("prompts", "labels"):
            props[name]["description"] = "parallel to `query`: as many entries (422 otherwise), or null"

"""The Celery task payload (workers/celery_app.py, TaskPayload): what the API sends is what a worker reads back."""

import json

import pytest
from pydantic import ValidationError

from tokencredit.types import DenseRewardItem, DenseRewardsRequest, ShapingWeights
from workers.celery_app import TaskPayload


def _payload(request: DenseRewardsRequest, weights: ShapingWeights) -> dict:
    # As service/dispatch.py builds it: the request's shared part once, each item without its id.
    shared = {"request": request.model_dump(mode="json", exclude={"items", "weights", "deadline_ms"}),
              "weights": weights.as_dict()}
    items = [{"uid": f"r:{i}", "cache_key": None, "item": it.model_dump(mode="json", exclude={"id"}), "deadline": 2e9}
             for i, it in enumerate(request.items)]
    return TaskPayload(reply_to="tc:reply:1", prefix="tc", revision="abc", deadline=2e9, cache_ttl=60,
                       groups=[{**shared, "items": items}]).model_dump(mode="json")


def test_a_payload_survives_the_json_hop_and_rebuilds_each_one_item_request():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]
    request = DenseRewardsRequest(
        items=[DenseRewardItem(id="a", prompt="P", response="It was fine.", response_token_offsets=[[0, 2], [3, 12]]),
               DenseRewardItem(id="b", messages=messages)],
        return_components=True, residual_placement="uniform",
    )
    weights = ShapingWeights(sparse=0.25, loo=0.75)
    wire = json.loads(json.dumps(_payload(request, weights)))  # Celery's JSON serializer
    payload = TaskPayload.model_validate(wire)
    group = payload.groups[0]
    assert group.weights == weights and payload.cache_ttl == 60 and payload.revision == "abc"
    for entry, original in zip(group.items, request.items):
        # What tasks._explain_one builds: the same item (without the caller's id) under the same request fields.
        rebuilt = DenseRewardsRequest.model_validate({**group.request, "items": [entry.item]})
        assert rebuilt.items[0].model_dump(exclude={"id"}) == original.model_dump(exclude={"id"})
        assert rebuilt.items[0].response == original.response  # a conversation's derived response too
        assert (rebuilt.return_components, rebuilt.residual_placement) == (True, "uniform")


def test_a_malformed_payload_is_refused_naming_the_field():
    request = DenseRewardsRequest(items=[DenseRewardItem(prompt="P", response="R")])
    wire = _payload(request, ShapingWeights(sparse=1.0))
    del wire["reply_to"]
    with pytest.raises(ValidationError, match="reply_to"):
        TaskPayload.model_validate(wire)
    wire = _payload(request, ShapingWeights(sparse=1.0))
    wire["groups"][0]["weights"] = {"sparse": 0.5}  # off the simplex
    with pytest.raises(ValidationError, match="simplex"):
        TaskPayload.model_validate(wire)
    wire = _payload(request, ShapingWeights(sparse=1.0))
    wire["groups"][0]["items"][0]["priority"] = 1  # a field this worker does not know: API and worker disagree
    with pytest.raises(ValidationError, match="priority"):
        TaskPayload.model_validate(wire)

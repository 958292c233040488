"""The env Space's scoring routes against the protocol's typed wire module (`shared.wire`), which is what the
trainer sends and reads. The env image holds no protocol code, so the server keeps its own models of the same
routes: this test is what keeps the two sides from drifting apart. It talks to a real env_space server."""

from __future__ import annotations

import httpx
import pytest

from env_space import v1
from shared import wire


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, timeout=30, headers=main_server.headers) as client:
        yield client


def test_request_fields_the_trainer_sends_exist_on_the_server():
    for ours, theirs in ((wire.ScoreItem, v1.ScoreItem), (wire.ScoreRequest, v1.ScoreRequest)):
        assert set(ours.model_fields) <= set(theirs.model_fields), (ours.__name__, set(ours.model_fields))
    for ours, theirs in ((wire.ScoreResponse, v1.ScoreResponse), (wire.TaskInfo, v1.TaskInfo),
                         (wire.PromptOut, v1.PromptOut)):
        required = {n for n, f in ours.model_fields.items() if f.is_required()}
        assert required <= set(theirs.model_fields), (ours.__name__, required - set(theirs.model_fields))


def test_a_typed_round_trip_through_the_real_server(http):
    tasks = [wire.TaskInfo.model_validate(t) for t in http.get("/v1/tasks").json()["tasks"]]
    task = next(t for t in tasks if t.max_turns == 1)
    prompts = [wire.PromptOut.model_validate(p)
               for p in http.get(f"/v1/tasks/{task.name}/prompts", params={"n": 3}).json()["prompts"]]
    req = wire.ScoreRequest(task=task.name, items=[wire.ScoreItem(prompt_id=p.prompt_id, completion="x")
                                                   for p in prompts])
    resp = http.post("/v1/score", json=req.model_dump(exclude_none=True))
    assert resp.status_code == 200, resp.text
    scored = wire.ScoreResponse.model_validate(resp.json())
    assert scored.task == task.name and len(scored.rewards) == len(prompts)


def test_a_request_the_wire_allows_but_the_server_refuses_is_a_clear_4xx(http):
    """Both prompt forms at once is valid for the trainer's model but not the server's: a 422 with a message."""
    req = wire.ScoreRequest(task="short", items=[wire.ScoreItem(prompt_id="a", prompt="b", completion="c")])
    resp = http.post("/v1/score", json=req.model_dump(exclude_none=True))
    assert resp.status_code == 422 and "exactly one" in resp.text

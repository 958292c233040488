"""HTTP API of a real env_space server: OpenEnv's routes, the /v1 trainer routes, /status and the Gradio page."""

from __future__ import annotations

import httpx
import pytest

from env_space import tasks


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, timeout=30) as client:
        yield client


def test_health_and_schema(http):
    assert http.get("/health").json() == {"status": "healthy"}
    schema = http.get("/schema").json()
    assert "text" in schema["action"]["properties"] and "text" in schema["action"]["required"]
    assert "task" in schema["observation"]["properties"]
    assert "episode_return" in schema["state"]["properties"]
    assert http.get("/metadata").json()["name"] == "dws"
    assert "/v1/score" in http.get("/openapi.json").json()["paths"]


def test_task_listing(http):
    listed = {t["name"]: t for t in http.get("/v1/tasks").json()["tasks"]}
    assert set(listed) == set(tasks.names())
    assert listed["wordle"]["multi_turn"] and listed["wordle"]["max_turns"] == 6
    assert listed["wordle"]["reward_range"] == [-0.5, 2.5]
    assert listed["letter"]["reward_range"] == [0.0, 1.0] and not listed["letter"]["multi_turn"]


def test_prompt_listing_is_stable(http):
    first = http.get("/v1/tasks/letter/prompts", params={"n": 3}).json()
    assert first["count"] == 3
    assert [p["prompt_id"] for p in first["prompts"]] == ["letter:00", "letter:01", "letter:02"]
    a = http.get("/v1/tasks/reverse/prompts", params={"n": 10, "seed": 5}).json()["prompts"]
    b = http.get("/v1/tasks/reverse/prompts", params={"n": 10, "seed": 5}).json()["prompts"]
    c = http.get("/v1/tasks/reverse/prompts", params={"n": 10, "seed": 6}).json()["prompts"]
    assert a == b != c and len({p["prompt_id"] for p in a}) == 10
    assert http.get("/v1/tasks/short/prompts").json()["count"] == len(tasks.get("short").prompts)
    assert http.get("/v1/tasks/letter/prompts", params={"n": 10_000}).json()["count"] == 52
    wordle = http.get("/v1/tasks/wordle/prompts", params={"n": 2}).json()["prompts"]
    assert all("caper" not in p["prompt"] for p in wordle)  # answers are never listed
    r = http.get("/v1/tasks/chess/prompts")
    assert r.status_code == 422 and "message" in r.json()
    assert http.get("/v1/tasks/letter/prompts", params={"n": 0}).status_code == 422


def test_batch_scoring(http):
    body = {"task": "letter", "items": [
        {"prompt_id": "letter:16", "completion": "qqqq"},
        {"prompt_id": "letter:16", "completion": "zzzq"},
        {"prompt": "letter: b", "completion": "b"},  # a listed prompt's text resolves to its id
        {"prompt": "LETTER:c", "completion": "cx"},  # unlisted text the task can still read
    ]}
    r = http.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["rewards"] == [1.0, 0.125, 1.0, 0.75] and out["reward_range"] == [0.0, 1.0] and "results" not in out
    detailed = http.post("/v1/score", json={**body, "detail": True}).json()
    assert [x.get("prompt_id") for x in detailed["results"]] == ["letter:16", "letter:16", "letter:01", None]
    # Wordle scores a completion as the first guess of the episode at that prompt
    w = http.post("/v1/score", json={"task": "wordle", "items": [
        {"prompt_id": "wordle:0000", "completion": "[caper]"},
        {"prompt_id": "wordle:0000", "completion": "no"},
    ]}).json()
    assert w["rewards"] == [2.5, -0.5]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"task": "letter", "items": [{"prompt_id": "letter:999", "completion": "a"}]}, "unknown prompt_id"),
        ({"task": "letter", "items": [{"prompt_id": "reverse:001", "completion": "a"}]}, "unknown prompt_id"),
        ({"task": "letter", "items": [{"prompt": "spell it", "completion": "a"}]}, "cannot score prompt text"),
        ({"task": "letter", "items": [{"prompt_id": "letter:00", "prompt": "letter: a", "completion": "a"}]},
         "exactly one of"),
        ({"task": "letter", "items": [{"prompt_id": "letter:00"}]}, "completion"),
        ({"task": "letter", "items": []}, "items"),
        ({"task": "chess", "items": [{"prompt_id": "letter:00", "completion": "a"}]}, "task"),
        ({"task": "wordle", "items": [{"prompt": "guess", "completion": "[crane]"}]}, "cannot score prompt text"),
        ({"task": "letter", "items": [{"prompt_id": "letter:00", "completion": "a", "extra": 1}]}, "extra"),
    ],
)
def test_batch_scoring_rejects_bad_requests_with_422(http, body, needle):
    r = http.post("/v1/score", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["message"]


def test_stateless_reset_and_step(http):
    a = http.post("/reset", json={"task": "reverse", "seed": 11}).json()
    b = http.post("/reset", json={"task": "reverse", "seed": 11}).json()
    assert a == b and a["observation"]["task"] == "reverse" and a["done"] is False
    pid = a["observation"]["prompt_id"]
    answer = tasks.get("reverse").prompt(pid).target
    r = http.post("/step", json={"action": {"text": answer, "prompt_id": pid}})
    assert r.status_code == 200 and r.json()["reward"] == 1.0 and r.json()["done"] is True
    default = http.post("/reset", json={}).json()
    assert default["observation"]["task"] == "wordle"  # the server's default task
    assert http.get("/state").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/step", {"action": {"text": "abc"}}, 409, "no episode in progress"),
        ("/step", {"action": {}}, 422, "text"),
        ("/step", {"action": {"text": "a", "bogus": True}}, 422, "bogus"),
        ("/step", {"action": {"text": "a", "prompt_id": "nope:1"}}, 422, "unknown task"),
        ("/step", {}, 422, "action"),
        ("/reset", {"task": "chess"}, 422, "unknown task"),
        ("/reset", {"task": "letter", "prompt_id": "letter:77"}, 422, "unknown prompt_id"),
        ("/reset", {"task": "letter", "colour": "red"}, 422, "colour"),
        ("/reset", {"seed": -1}, 422, "seed"),
        ("/reset", {"task": ["wordle"]}, 422, "task"),
    ],
)
def test_openenv_routes_reject_bad_input_without_500(http, path, body, status, needle):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_openenv_task_api_lists_the_same_prompts(http):
    assert http.get("/dws/splits").status_code == 200
    assert {s["name"] for s in http.get("/dws/splits").json()} == set(tasks.names())
    assert http.post("/dws/num_tasks", json={"split": "letter"}).json() == {"num_tasks": 52}
    assert http.post("/dws/task", json={"split": "letter", "index": 0}).json()["task"] == \
        {"prompt_id": "letter:00", "prompt": "letter: a"}
    assert http.post("/dws/task", json={"split": "letter", "index": 52}).status_code == 400
    assert http.post("/dws/num_tasks", json={"split": "chess"}).status_code == 404


def test_status_reports_sessions_rates_and_rewards(http):
    http.post("/v1/score", json={"task": "short", "items": [{"prompt_id": "short:00", "completion": ""}] * 4})
    st = http.get("/status").json()
    assert st["sessions"]["max"] == 400 and st["sessions"]["active"] >= 0
    assert st["metrics"]["requests_total"] > 0 and st["metrics"]["requests_per_s"] > 0
    short = st["metrics"]["tasks"]["short"]
    assert short["scored"] >= 4 and short["mean_reward"] is not None
    assert set(st["metrics"]["tasks"]) == set(tasks.names())


def test_gradio_page_at_root(http):
    r = http.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "gradio" in r.text.lower()
    config = http.get("/config")
    assert config.status_code == 200 and "dws env_space" in config.text


def test_gradio_views_render_the_status(http):
    from env_space.ui import _rows, _summary

    st = http.get("/status").json()
    assert "Sessions" in _summary(st) and "requests/s" in _summary(st)
    rows = _rows(st)
    assert [r[0] for r in rows] == sorted(tasks.names()) and all(len(r) == 6 for r in rows)

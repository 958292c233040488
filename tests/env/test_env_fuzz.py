"""Fuzzing a real server: schemathesis over the OpenAPI spec, plus hypothesis over raw bodies and WebSocket frames.

No input may produce a 5xx. Examples are bounded so the whole file runs in well under a minute on two cores. The
server is a separate instance so sessions the fuzzer opens (e.g. through OpenEnv's /mcp session methods) cannot
disturb the other tests' session counts.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from websockets.sync.client import connect as ws_connect

# Bounded for the 3-minute suite; raise ENV_FUZZ_SCALE (e.g. 20) for a deep run.
SCALE = max(1, int(os.environ.get("ENV_FUZZ_SCALE", "1")))
EXAMPLES_PER_OPERATION = 25 * SCALE


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server("fuzz", args=["--ui", "false", "--max-sessions", "64", "--max-body-bytes", "65536"])


def test_openapi_operations_never_5xx(fuzz_server):
    # schemathesis' own pytest plugin (4.32) breaks on pytest 9, so its Python API drives hypothesis here:
    # every operation of the published spec, with valid (positive) and schema-violating (negative) inputs.
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    failures: list[str] = []
    tried = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error])

            try:
                run()
                tried += 1
            except Unsatisfiable:
                continue  # no schema-violating input exists for this operation (e.g. no parameters)
            except Exception as e:  # noqa: BLE001 -- collect every operation's failure, then report all
                failures.append(f"{op.label} [{mode.value}]: {str(e)[:500]}")
    assert not failures, "\n".join(failures)
    assert tried >= len(operations)


# Lone surrogates are legal JSON escapes but not encodable text: a classic source of 500s when echoed back.
strings = st.text(max_size=20) | st.sampled_from(["\ud800", "x\udfff", "\ud83d\ude00", "[crane]", "letter:00"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | strings,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(strings, children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["task", "items", "prompt_id", "prompt", "completion", "action", "text", "seed", "split",
                        "index", "episode_id", "detail", "data", "type", "jsonrpc", "method", "params", "id",
                        "self", "kwargs", "timeout_s", "request_id", "metadata"])
shaped = st.recursive(json_values, lambda c: st.dictionaries(keys, c, max_size=5) | st.lists(c, max_size=3),
                      max_leaves=16)
bodies = st.one_of(
    st.binary(max_size=300),
    shaped.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
routes = st.sampled_from(["/reset", "/step", "/state", "/v1/score", "/v1/tasks", "/v1/tasks/letter/prompts",
                          "/dws/tasks", "/dws/task", "/dws/task_range", "/dws/num_tasks", "/mcp", "/status",
                          "/schema", "/metadata", "/nonexistent"])


@given(path=routes, method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), body=bodies,
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
       query=st.dictionaries(st.sampled_from(["n", "seed", "session_id", "x"]), st.text(max_size=8), max_size=2))
@settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
def test_raw_requests_never_5xx(fuzz_server, path, method, body, ctype, query):
    headers = {"content-type": ctype} if ctype else {}
    r = httpx.request(method, f"{fuzz_server.url}{path}", content=body, headers=headers, params=query, timeout=30)
    assert r.status_code < 500, (r.status_code, r.text[:300])


frames = st.one_of(
    shaped.map(json.dumps),
    st.fixed_dictionaries({"type": st.sampled_from(["reset", "step", "state", "mcp", "close", "other"]),
                           "data": shaped}).map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=50),
)


def _is_close(raw: str) -> bool:
    try:
        msg = json.loads(raw)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "close"


@given(messages=st.lists(frames, min_size=1, max_size=6))
@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
def test_websocket_frames_never_break_the_session(fuzz_server, messages):
    url = fuzz_server.url.replace("http://", "ws://") + "/ws"
    with ws_connect(url, open_timeout=30) as ws:
        for raw in messages:
            if isinstance(raw, str) and _is_close(raw):
                continue  # a close ends the session by design
            ws.send(raw)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] in ("observation", "state", "error", "mcp"), reply
            if reply["type"] == "error":
                assert reply["data"]["code"] != "SESSION_ERROR", reply
        # the session still works after whatever came before
        ws.send(json.dumps({"type": "reset", "data": {"task": "short"}}))
        assert json.loads(ws.recv(timeout=30))["type"] == "observation"


@pytest.mark.parametrize("path", ["/ws", "/mcp"])
def test_frames_that_crash_openenv_are_answered_and_the_session_lives(fuzz_server, path):
    url = fuzz_server.url.replace("http://", "ws://") + path
    with ws_connect(url, open_timeout=30) as ws:
        for raw in ("null", "[1, 2]", "5", '"step"', b"\x00binary",
                    json.dumps({"type": "step", "data": {"text": "\ud800"}}),
                    json.dumps({"jsonrpc": "2.0", "id": 2, "method": "\udfff", "params": {}}),
                    '{"type": "step", "data": {"text": "a", "n": ' + "9" * 5000 + "}}",
                    '{"type": "step", "data": {"text": "a", "deep": ' + "[" * 5000 + "]" * 5000 + "}}"):
            ws.send(raw)
            reply = json.loads(ws.recv(timeout=30))
            assert "JSON" in json.dumps(reply), reply
        if path == "/ws":
            ws.send(json.dumps({"type": "reset", "data": {"task": "letter", "prompt_id": "letter:00"}}))
            assert json.loads(ws.recv(timeout=30))["data"]["observation"]["prompt"] == "letter: a"
        else:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}))
            assert json.loads(ws.recv(timeout=30))["id"] == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/step", {"action": {"text": "\ud800", "prompt_id": "letter:00"}}),
        ("/step", {"action": {"text": "a", "prompt_id": "\udfff"}}),
        ("/reset", {"task": "letter", "episode_id": "\ud800"}),
        ("/v1/score", {"task": "letter", "items": [{"prompt_id": "letter:00", "completion": "\ud800"}]}),
        ("/reset", {"task": "letter", "seed": 1e400}),
        ("/reset", '{"task": "letter", "seed": ' + "9" * 5000 + "}"),
        ("/reset", {"self": 1, "task": "letter"}),  # OpenEnv forwards extra fields as keyword arguments
        ("/step", {"action": {"text": "a", "prompt_id": "letter:00"}, "self": 1, "action_": 2}),
        ("/v1/score", '{"task": "letter", "items": ' + "[" * 5000 + "]" * 5000 + "}"),
    ],
)
def test_hostile_json_is_4xx_not_500(fuzz_server, path, body):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{fuzz_server.url}{path}", content=content, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 or (r.status_code == 200 and path == "/step"), r.text

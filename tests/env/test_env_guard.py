"""Limits on a real server configured only through environment variables: auth, 413, 422, 429, idle expiry.

The `strict_server` fixture sets DWS_API_KEY, DWS_MAX_SESSIONS=4, DWS_SESSION_TIMEOUT=2, DWS_MAX_BODY_BYTES=4096.
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from env_helpers import API_KEY
from websockets.exceptions import ConnectionClosedError

from env_space.client import DwsEnvClient
from trainer_space.remote import EnvPool


def status(server) -> dict:
    return httpx.get(f"{server.url}/status", headers=server.headers).json()


def wait_sessions(server, n: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while status(server)["sessions"]["active"] != n:
        assert time.monotonic() < deadline, f"sessions did not reach {n}"
        time.sleep(0.1)


@pytest.mark.parametrize("path", ["/status", "/v1/tasks", "/schema", "/state", "/docs", "/openapi.json", "/",
                                  "/v1/tasks/letter/prompts"])
def test_every_route_but_health_needs_the_token(strict_server, path):
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    r = httpx.get(f"{strict_server.url}{path}")
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert "Bearer" in r.headers["www-authenticate"]
    assert httpx.get(f"{strict_server.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{strict_server.url}{path}", headers=strict_server.headers).status_code == 200


def test_post_routes_and_basic_auth(strict_server):
    body = {"task": "short", "items": [{"prompt_id": "short:00", "completion": ""}]}
    assert httpx.post(f"{strict_server.url}/v1/score", json=body).status_code == 401
    assert httpx.post(f"{strict_server.url}/reset", json={}).status_code == 401
    basic = base64.b64encode(f"anyone:{API_KEY}".encode()).decode()
    r = httpx.post(f"{strict_server.url}/v1/score", json=body, headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200 and r.json()["rewards"] == [1.0]
    client = EnvPool([strict_server.url], token=API_KEY, timeout_s=60, retry_after_s=1)  # the trainer's client
    try:
        assert client.score("short", ["short:00"], [""]) == [1.0]
    finally:
        client.close()


def test_websocket_needs_the_token(strict_server):
    with pytest.raises(ConnectionError, match="401"):
        DwsEnvClient(base_url=strict_server.url).sync().connect()
    with DwsEnvClient(base_url=strict_server.url, api_key=API_KEY).sync() as env:
        assert env.reset(task="short").observation.task == "short"


def test_token_never_logged(strict_server):
    assert API_KEY not in strict_server.log_text()
    assert "auth=on" in strict_server.log_text()  # the startup line says auth is on, without the key


def test_oversized_bodies_get_413(strict_server):
    big = {"task": "short", "items": [{"prompt_id": "short:00", "completion": "x" * 5000}]}
    r = httpx.post(f"{strict_server.url}/v1/score", json=big, headers=strict_server.headers)
    assert r.status_code == 413 and "4096" in r.json()["detail"]

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(f"{strict_server.url}/v1/score", content=chunks(),
                   headers={**strict_server.headers, "content-type": "application/json"})
    assert r.status_code == 413
    # a small chunked body still works
    r = httpx.post(f"{strict_server.url}/v1/score", content=iter([b'{"task":"short",',
                                                                   b'"items":[{"prompt":"hi","completion":""}]}']),
                   headers={**strict_server.headers, "content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_oversized_websocket_frame_closes_the_socket(strict_server):
    with DwsEnvClient(base_url=strict_server.url, api_key=API_KEY).sync() as env:
        env.reset(task="short")
        with pytest.raises(ConnectionClosedError, match="1009"):
            env.step("y" * 8000)  # uvicorn's ws_max_size = DWS_MAX_BODY_BYTES: "message too big"
    wait_sessions(strict_server, 0)


def test_schema_errors_are_422_with_a_message(strict_server):
    r = httpx.post(f"{strict_server.url}/v1/score", json={"task": "short", "items": [{"prompt_id": "short:00"}]},
                   headers=strict_server.headers)
    assert r.status_code == 422
    assert r.json()["message"] == "body.items.0.completion: Field required"
    r = httpx.post(f"{strict_server.url}/v1/score", content=b"{not json", headers={**strict_server.headers,
                                                                                  "content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["message"]


def test_sessions_over_the_cap_get_429(strict_server):
    wait_sessions(strict_server, 0)
    clients = [DwsEnvClient(base_url=strict_server.url, api_key=API_KEY).sync() for _ in range(4)]
    try:
        for c in clients:
            c.connect()
            c.reset(task="short")
        for c in clients:
            c.reset(task="short")  # fresh activity, so the 2 s idle reaper cannot free a slot mid-test
        assert status(strict_server)["sessions"] == {"active": 4, "max": 4, "timeout_s": 2.0}
        with pytest.raises(ConnectionError, match="429"):
            DwsEnvClient(base_url=strict_server.url, api_key=API_KEY).sync().connect()
        r = httpx.get(f"{strict_server.url}/ws", headers={
            **strict_server.headers, "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
        assert r.status_code == 429 and "session cap" in r.json()["detail"] and r.headers["retry-after"]
    finally:
        for c in clients:
            c.close()
    wait_sessions(strict_server, 0)
    with DwsEnvClient(base_url=strict_server.url, api_key=API_KEY).sync() as env:  # capacity is back
        assert env.reset(task="short").observation.task == "short"


def test_idle_sessions_expire(strict_server):
    wait_sessions(strict_server, 0)
    with DwsEnvClient(base_url=strict_server.url, api_key=API_KEY).sync() as env:
        env.reset(task="letter", prompt_id="letter:00")
        assert status(strict_server)["sessions"]["active"] == 1
        # OpenEnv's reaper checks every max(timeout/4, 5 s); the idle session must be gone soon after
        wait_sessions(strict_server, 0, timeout_s=15)
        with pytest.raises(RuntimeError, match="expired"):
            env.step("a")

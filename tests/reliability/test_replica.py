"""Faults and hostile input against one real rollout replica (gateway + vLLM on CPU) following a local bucket that a
real publisher fills with AdamW steps of the tiny model.

The replica runs its production entrypoint (`python -m rollout_space`) through `with_faults.py`, which only registers
the test-only `faulty://` bucket wrapper so that bucket faults can be switched on and off while it runs. What the
replica serves is measured, not trusted: the digest of vLLM's live weights is read over its loopback RL route (this
test runs on the replica's host) and compared with the trainer's digest of the version the replica claims.
One engine serves the whole module, in order: bucket faults, hostile manifests and deltas, schema fuzzing, oversized
bodies, many clients during many syncs, secrets, then vLLM and finally the whole replica killed inside an apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dws_testing import REPO, Service, TinyTrainer, free_port
from faulty_bucket import write_faults
from rollout_space.vllm_proc import group_members
from shared.bucket import open_bucket
from shared.manifest import MANIFEST_PATH, FileEntry, delta_path, read_manifest
from shared.publisher import Publisher

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
KEY = "dws-secret-KEY-7f3a9c1e5b2d"  # DWS_API_KEY of every service here
HF = "hf_SECRETtokenQ8zX2mN4vB6rT1"  # HF_TOKEN of every service here
WRONG = "dws-WRONG-guess-K2p9Lq7xx"  # a client's wrong token: must not be echoed either
AUTH = {"Authorization": f"Bearer {KEY}"}


class Replica(Service):
    """A rollout replica that only moves when nudged (POST /sync), with vLLM on a known loopback port."""

    def __init__(self, world: World, name: str, *, faults: bool) -> None:
        self.vllm_port = free_port()
        prefix = [sys.executable, str(HERE / "with_faults.py"), "rollout_space"] if faults else \
            [sys.executable, "-m", "rollout_space"]
        bucket = f"faulty://{world.bucket}" if faults else str(world.bucket)
        env = {"DWS_API_KEY": KEY, "HF_TOKEN": HF, "VLLM_CACHE_ROOT": str(world.root / "vllm-cache"),
               "DWS_FAULTS_FILE": str(world.faults), "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
        self.vllm_log = world.root / f"{name}-vllm.log"
        super().__init__([*prefix, "--model", str(world.model), "--bucket", bucket, "--host", "127.0.0.1",
                          "--port", "{PORT}", "--vllm-port", str(self.vllm_port), "--poll-interval", "600",
                          "--max-model-len", "512", "--vllm-log", str(self.vllm_log), "--vllm-args=--enforce-eager",
                          "--cache-dir", str(world.root / "replica-cache")],
                         log=world.root / f"{name}.log", env=env)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def status(self) -> dict:
        return self.http.get("/status").json()

    def nudge(self) -> None:
        r = self.http.post("/sync", headers=AUTH)
        assert r.status_code == 200, r.text

    def sync_to(self, version: int, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.nudge()
            time.sleep(0.3)
            st = self.status()
            if st["served_version"] == version and not st["syncing"]:
                return st
        raise AssertionError(f"replica never reached v{version}: {json.dumps(self.status())[:1500]}\n{self.tail()}")

    def wait_failure(self, failures_before: int, timeout: float = 60) -> dict:
        self.nudge()
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status()
            if st["failures"] > failures_before and not st["syncing"]:
                return st
            time.sleep(0.2)
        raise AssertionError(f"no failed sync round: {json.dumps(self.status())[:1500]}\n{self.tail()}")

    def vllm_digest(self) -> str:
        """The digest of the weights vLLM actually serves, over its loopback-only RL route."""
        r = httpx.post(f"http://127.0.0.1:{self.vllm_port}/collective_rpc", json={"method": "dws_digest"},
                       timeout=120)
        return r.json()["results"][0]["digest"]

    def model_name(self) -> str:
        return self.http.get("/v1/models", headers=AUTH).json()["data"][0]["id"]

    def complete(self, *, stream: bool = False, max_tokens: int = 6, client: httpx.Client | None = None):
        return (client or self.http).post("/v1/completions", headers=AUTH, json={
            "model": self.model_name(), "prompt": "the quick brown", "max_tokens": max_tokens, "stream": stream,
            "temperature": 1.0})


class World:
    def __init__(self, root: Path, model: Path) -> None:
        self.root, self.model = root, model
        self.bucket = root / "bucket"
        self.faults = root / "faults.json"
        write_faults(self.faults, {})
        self.trainer = TinyTrainer(model, lr=1e-4)
        self.pub = Publisher(self.bucket, run_id="reliability-replica", anchor_every=10, lease_settle_s=0)
        self.digests: dict[int, str] = {}
        self.latest = -1
        self.replicas: list[Replica] = []

    def publish(self, steps: int = 1) -> int:
        if self.latest >= 0:
            self.trainer.step(steps)
        v = self.latest + 1
        self.pub.publish(self.trainer.params(), v)
        self.pub.flush()
        self.digests[v] = self.pub.reports[-1].digest
        self.latest = v
        return v

    @property
    def gw(self) -> Replica:
        return self.replicas[0]

    def manifest_bytes(self) -> bytes:
        return (self.bucket / MANIFEST_PATH).read_bytes()

    def restore_manifest(self, data: bytes) -> None:
        open_bucket(self.bucket).write_bytes(MANIFEST_PATH, data)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    w = World(tmp_path_factory.mktemp("replica"), tiny_model_dir)
    w.publish()
    w.publish()
    w.replicas.append(Replica(w, "a", faults=True))
    yield w
    for r in w.replicas:
        r.stop()
    w.pub.close()


def served_ok(gw: Replica, world: World, version: int) -> bool:
    """The replica claims `version` and vLLM's live weights hash to the trainer's digest of it."""
    st = gw.status()
    return st["served_version"] == version and gw.vllm_digest() == world.digests[version]


# ------------------------------------------------------------------------------------------------ bucket faults
FAULTS = [
    ("downloads fail (EIO)", {"rules": [{"ops": ["download"], "path": "*", "error": "io"}]}, "injected fault"),
    ("manifest reads time out", {"rules": [{"ops": ["stat", "read_bytes"], "path": MANIFEST_PATH,
                                            "error": "timeout"}]}, "TimeoutError"),
    ("downloads fail (HTTP 503 after retries)", {"rules": [{"ops": ["download"], "path": "*", "error": "bucket"}]},
     "HTTP 503"),
    ("connection reset on every read", {"rules": [{"path": "*", "error": "reset",
                                                   "ops": ["stat", "read_bytes", "download"]}]}, "reset"),
]


def test_bucket_faults_keep_the_last_good_version_then_catch_up(world, figures):
    gw = world.gw
    good = world.latest
    gw.sync_to(good)
    wrong, failed_requests, rounds = 0, 0, 0
    for name, plan, expect in FAULTS:
        write_faults(world.faults, plan)
        world.publish()
        st = gw.wait_failure(gw.status()["failures"])
        rounds += 1
        assert expect in st["last_sync"]["error"], (name, st["last_sync"])
        assert st["last_sync"]["pause_s"] == 0.0, "a bucket fault never gets as far as pausing inference"
        wrong += not served_ok(gw, world, good)
        r = gw.complete()
        failed_requests += r.status_code != 200
        assert r.status_code == 200 and r.json()["model_version"] == good
    write_faults(world.faults, {})
    gw.sync_to(world.latest)
    caught_up = served_ok(gw, world, world.latest)
    figures["replica_bucket_faults"] = {"fault_kinds": [f[0] for f in FAULTS], "failed_sync_rounds": rounds,
                                        "wrong_weights_served": wrong, "failed_requests": failed_requests,
                                        "caught_up_bit_exact": caught_up}
    assert wrong == 0 and failed_requests == 0 and caught_up
    assert "Traceback" not in gw.tail(), "a bucket fault is one clear log line, not a traceback"


# ------------------------------------------------------------------------------------------------ hostile input
def _hostile_paths(world: World) -> dict[str, str]:
    return {"parent": "../outside.safetensors", "absolute": str(world.root / "abs.safetensors"),
            "parent inside": "deltas/../../outside.safetensors", "scheme": "file:///etc/passwd",
            "backslash": "deltas\\..\\..\\outside.safetensors", "nested": "deltas/sub/v1.safetensors"}


def test_hostile_manifest_paths_are_rejected_before_any_weight_is_touched(world, figures):
    gw = world.gw
    rejected, wrong = 0, 0
    paths = _hostile_paths(world)
    for name, hostile in paths.items():
        good = world.latest
        gw.sync_to(good)
        v = world.publish()
        honest = world.manifest_bytes()
        m = json.loads(honest)
        for kind in ("deltas", "anchors"):
            for e in m[kind]:
                if e["version"] == v:
                    # A real, matching file waits at the hostile target: following the path would "work".
                    target = (world.bucket / hostile) if not hostile.startswith("/") else Path(hostile)
                    if "\\" not in hostile and ":" not in hostile:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(world.bucket / e["path"], target)
                    e["path"] = hostile
        world.restore_manifest(json.dumps(m).encode())
        st = gw.wait_failure(gw.status()["failures"])
        ok = "invalid" in st["last_sync"]["error"] and st["last_sync"]["pause_s"] == 0.0
        rejected += ok
        wrong += not served_ok(gw, world, good)
        assert ok, (name, st["last_sync"])
        world.restore_manifest(honest)
        gw.sync_to(v)
        wrong += not served_ok(gw, world, v)
    figures["hostile_manifest_paths"] = {"tried": len(paths), "rejected_before_pause": rejected,
                                         "wrong_weights_served": wrong}
    assert wrong == 0


def _huge_header_files(tmp: Path) -> dict[str, Path]:
    files = {}
    claim = tmp / "claims-1TB.safetensors"  # an 8-byte length prefix far beyond the file
    claim.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    files["length prefix of 1 TB"] = claim
    real = tmp / "header-65MB.safetensors"  # a real header just over the 64 MiB the reader allows
    meta = {"format": "dws-delta", "dws_kind": "delta", "encoding": "raw", "version": "0", "base": "0",
            "pad": "x" * (65 << 20)}
    header = json.dumps({"__metadata__": meta}).encode()
    real.write_bytes(struct.pack("<Q", len(header)) + header)
    files["real 65 MiB header"] = real
    return files


def test_huge_safetensors_header_in_a_delta_is_rejected_clearly(world, tmp_path, figures):
    gw = world.gw
    good = world.latest
    gw.sync_to(good)
    honest = world.manifest_bytes()
    bucket = open_bucket(world.bucket)
    results = {}
    for name, src in _huge_header_files(tmp_path).items():
        v = good + 1
        blob = src.read_bytes()
        bucket.write_bytes(delta_path(v), blob)
        m = read_manifest(bucket)
        entry = FileEntry(version=v, path=delta_path(v), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                          digest=world.digests[good], base=good)
        world.restore_manifest(m.model_copy(update={"deltas": (*m.deltas, entry), "latest": v,
                                                    "latest_digest": entry.digest}).to_bytes())
        st = gw.wait_failure(gw.status()["failures"])
        err = st["last_sync"]["error"]
        results[name] = {"error": err[:200], "pause_s": st["last_sync"]["pause_s"],
                         "served_ok": served_ok(gw, world, good)}
        world.restore_manifest(honest)
        bucket.delete([delta_path(v)])
    figures["huge_header_delta"] = {"tried": len(results),
                                    "rejected_before_pause": sum(r["pause_s"] == 0.0 and "larger than" in r["error"]
                                                                 for r in results.values()),
                                    "wrong_weights_served": sum(not r["served_ok"] for r in results.values())}
    for name, r in results.items():
        assert "larger than" in r["error"] and r["pause_s"] == 0.0 and r["served_ok"], (name, r)
    v = world.publish()  # the trainer's next version replaces the bogus one and the replica follows
    gw.sync_to(v)
    assert served_ok(gw, world, v)


# ------------------------------------------------------------------------------------------------ fuzzing, bodies
def test_schema_fuzzing_the_gateway_never_5xx(world, figures):
    """schemathesis over the gateway's own OpenAPI document -- every operation, valid and schema-violating inputs --
    with the right token, a wrong one and none."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url = world.gw.url
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert {op.label for op in operations} >= {"GET /health", "GET /status", "POST /sync"}, \
        [op.label for op in operations]
    statuses: list[int] = []
    server_errors: list[str] = []
    for headers in (AUTH, {"Authorization": f"Bearer {WRONG}"}, {}):
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def run(case):
                    r = case.call(base_url=url, headers=headers, timeout=60)
                    statuses.append(r.status_code)
                    if r.status_code >= 500:
                        server_errors.append(f"{case.method} {case.formatted_path} -> {r.status_code}: {r.text[:200]}")

                try:
                    run()
                except Unsatisfiable:
                    continue
    figures["gateway_schema_fuzz"] = {"requests": len(statuses), "operations": len(operations),
                                      "status_5xx": len(server_errors),
                                      "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}
    assert server_errors == [], server_errors[:5]
    assert len(statuses) >= 100


def test_hostile_request_bodies_to_the_proxied_routes_never_5xx(world, figures):
    """hypothesis drives the three proxied routes (through to vLLM) with shaped and shapeless bodies; sizes that
    would only cost CPU (n, max_tokens) stay small, their absurd values are tried explicitly below."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    gw = world.gw
    name = gw.model_name()
    scalars = st.none() | st.booleans() | st.integers(-3, 16) | st.floats(allow_nan=True) | \
        st.text(max_size=12) | st.sampled_from(["\ud800", name, "x" * 300, "<|endoftext|>"])
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3), max_leaves=8)
    keys = st.sampled_from(["model", "prompt", "messages", "max_tokens", "n", "stream", "temperature", "top_p",
                            "logprobs", "echo", "stop", "seed", "best_of", "logit_bias", "response_format", "tools",
                            "stream_options", "role", "content", "min_tokens", "prompt_logprobs"])
    shaped = st.dictionaries(keys, values, max_size=6).map(lambda d: {"model": name, **d})
    bodies = st.one_of(shaped.map(json.dumps), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                       values.map(json.dumps))
    statuses: list[int] = []
    errors: list[str] = []

    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models"]), body=bodies,
           auth=st.sampled_from([AUTH, {}]))
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(path, body, auth):
        method = "GET" if path == "/v1/models" else "POST"
        r = gw.http.request(method, path, content=body.encode("utf-8", "surrogatepass"),
                            headers={**auth, "content-type": "application/json"})
        statuses.append(r.status_code)
        if r.status_code >= 500:
            errors.append(f"{path} {body[:200]!r} -> {r.status_code}: {r.text[:200]}")

    run()
    absurd = [{"prompt": "x", "n": 10**9}, {"prompt": "x", "n": -1}, {"prompt": "x", "max_tokens": 10**12},
              {"prompt": "x", "max_tokens": 2**70}, {"prompt": [[2**40]]}, {"prompt": [-5]}, {"prompt": []},
              {"prompt": "x", "logprobs": 10**6}, {"prompt": "x", "temperature": -5}, {"prompt": "x", "stop": [[]]},
              {"messages": [{"role": "system", "content": None}]}, {"prompt": "x", "best_of": 10**9}]
    for body in absurd:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = gw.http.post(path, headers=AUTH, json={"model": name, **body})
            statuses.append(r.status_code)
            if r.status_code >= 500:
                errors.append(f"{path} {body} -> {r.status_code}: {r.text[:200]}")
    figures["gateway_body_fuzz"] = {"requests": len(statuses), "status_5xx": len(errors),
                                    "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}
    assert errors == [], errors[:5]
    assert gw.http.get("/health").status_code == 200 and gw.complete().status_code == 200


def _endless_chunked_body(port: int) -> int:
    """A chunked body that goes past the limit and never ends: the answer must come while the client still sends.
    Returns the status, or 0 if the server kept reading without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: replica\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"a" * (1 << 16)
        try:
            for _ in range(80):  # 5 MiB, over the 4 MiB limit, and no final chunk: the body never ends
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server answered and closed while we were still sending: what we want
        try:
            head = s.recv(64)
        except (socket.timeout, OSError):
            return 0
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0


def test_oversized_bodies_are_413_even_without_a_declared_length(world, figures):
    gw = world.gw
    big = b'{"prompt": "' + b"a" * (6 << 20) + b'"}'

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    results = {
        "declared": gw.http.post("/v1/completions", headers=AUTH, content=big).status_code,
        "chunked": gw.http.post("/v1/completions", headers=AUTH, content=chunks()).status_code,
        "chat chunked": gw.http.post("/v1/chat/completions", headers=AUTH, content=chunks()).status_code,
        "no token": gw.http.post("/v1/completions", content=chunks()).status_code,
        "sync with a body": gw.http.post("/sync", headers=AUTH, content=chunks()).status_code,
    }
    results["endless chunked"] = _endless_chunked_body(gw.port)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:  # a client gone halfway through
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: replica\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Length: 100000\r\n\r\n{\"prompt\": ".encode())
    time.sleep(1)
    figures["oversized_bodies"] = {"tried": len(results), "results": results,
                                   "status_5xx": sum(s >= 500 for s in results.values())}
    assert results["declared"] == results["chunked"] == results["chat chunked"] == 413, results
    assert results["endless chunked"] == 413, "the gateway must stop reading at the limit, not buffer everything"
    assert results["no token"] == 401 and results["sync with a body"] == 200, results
    assert gw.complete().status_code == 200
    log = gw.log.read_text(errors="replace")
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------------------------ load
CLIENTS, SYNCS = 8, 20


def test_many_clients_during_many_syncs_never_fail(world, figures):
    gw = world.gw
    gw.sync_to(world.latest)
    before = gw.status()
    results: list[tuple] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=gw.url, timeout=120) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = gw.complete(stream=i % 2 == 1, client=http)
                    if i % 2:
                        versions = {json.loads(line[6:]).get("model_version") for line in r.text.split("\n")
                                    if line.startswith("data: {")}
                        ok = r.status_code == 200 and "error" not in r.text
                    else:
                        versions = {r.json().get("model_version")}
                        ok = r.status_code == 200
                    rec = (ok, r.status_code, versions, time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 -- a transport failure is a failed request
                    rec = (False, repr(exc), set(), time.perf_counter() - t0)
                with lock:
                    results.append(rec)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    wrong = 0
    t_start = time.time()
    for _ in range(SYNCS):
        v = world.publish()
        gw.sync_to(v)
        wrong += not served_ok(gw, world, v)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    elapsed = time.time() - t_start
    after = gw.status()
    failed = [r for r in results if not r[0]]
    seen = set().union(*(r[2] for r in results))
    latencies = sorted(r[3] for r in results)
    figures["load_during_syncs"] = {
        "clients": CLIENTS, "syncs": SYNCS, "requests": len(results), "failed_requests": len(failed),
        "gateway_failed_requests": after["failed_requests"] - before["failed_requests"],
        "versions_seen": len(seen), "wrong_weights_served": wrong,
        "untagged_or_unknown_versions": len(seen - set(world.digests)),
        "requests_per_s": round(len(results) / elapsed, 1),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "latency_p99_s": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
        "pause_ms_median": after.get("pause_ms", {}).get("median"),
    }
    assert failed == [], failed[:5]
    assert len(results) >= CLIENTS * 4
    assert wrong == 0 and seen <= set(world.digests), seen
    assert after["failed_requests"] == before["failed_requests"]


# ------------------------------------------------------------------------------------------------ secrets
ENV_PY = REPO / ".venv" / "env" / "bin" / "python"
TRAINER_PY = REPO / ".venv" / "trainer" / "bin" / "python"
# The whole value, and a distinctive core that a truncated or half-masked leak would still contain.
NEEDLES = [KEY, HF, WRONG, KEY[-10:], HF[-10:], WRONG[-9:]]


def _leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if n in text]


def test_secrets_never_appear_in_logs_status_or_pages(world, figures):
    """env_space, the rollout replica and a 2-step trainer all run with distinctive DWS_API_KEY / HF_TOKEN values
    (debug logging where a service has it); they are exercised, including requests with a wrong token; then every
    log, every /status body and every page a browser would fetch (`/`, Gradio's `/config` and `/gradio_api/info`)
    are searched for the secrets."""
    gw = world.gw
    secrets_env = {"DWS_API_KEY": KEY, "HF_TOKEN": HF}
    env = Service([str(ENV_PY), "-m", "env_space", "--host", "127.0.0.1", "--port", "{PORT}"],
                  log=world.root / "env.log",
                  env={**secrets_env, "DWS_LOG_LEVEL": "debug", "DWS_ACCESS_LOG": "true"})
    trainer = None
    try:
        trainer = Service([str(TRAINER_PY), "-m", "trainer_space", "--model", str(world.model), "--bucket",
                           str(world.root / "trainer-bucket"), "--rollout-url", gw.url, "--env-url", env.url,
                           "--task", "short", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
                           "--max-completion-length", "8", "--host", "127.0.0.1", "--port", "{PORT}",
                           "--output-dir", str(world.root / "trainer-out"), "--no-exit-when-done"],
                          log=world.root / "trainer.log", env={**secrets_env, "DWS_LOG_LEVEL": "DEBUG"})
        deadline = time.time() + 480
        phase = None
        while time.time() < deadline:
            phase = httpx.get(f"{trainer.url}/status", timeout=30).json().get("phase")
            if phase in ("done", "failed"):
                break
            time.sleep(2)
        assert phase == "done", trainer.tail()
        wrong = {"Authorization": f"Bearer {WRONG}"}
        denied = [
            gw.http.post("/sync", headers=wrong).status_code,
            gw.http.post("/v1/completions", headers=wrong, json={"prompt": "x"}).status_code,
            httpx.get(f"{env.url}/status", headers=wrong).status_code,
            httpx.post(f"{env.url}/v1/score", headers=wrong, json={"task": "short", "items": []}).status_code,
        ]
        assert denied == [401, 401, 401, 401], denied
        bodies: dict[str, str] = {}
        for name, svc in (("rollout", gw), ("env", env), ("trainer", trainer)):
            for path in ("/status", "/", "/config", "/gradio_api/info", "/health"):
                for label, headers in (("token", AUTH), ("wrong", wrong), ("none", {})):
                    r = httpx.get(f"{svc.url}{path}", headers=headers, timeout=60, follow_redirects=True)
                    bodies[f"{name} {path} ({label}) -> {r.status_code}"] = r.text + json.dumps(dict(r.headers))
        logs = {p.name: p.read_text(errors="replace") for p in world.root.glob("*.log")}
    finally:
        if trainer is not None:
            trainer.stop()
        env.stop()
    leaks = {where: _leaks(text) for where, text in {**bodies, **logs}.items() if _leaks(text)}
    figures["secrets"] = {"services": 3, "responses_checked": len(bodies), "logs_checked": sorted(logs),
                          "log_bytes_checked": sum(len(t) for t in logs.values()),
                          "pages_served": sum(" -> 200" in k for k in bodies),
                          "secret_occurrences": sum(len(v) for v in leaks.values())}
    assert leaks == {}, leaks
    assert any(k.startswith("trainer / ") and k.endswith("-> 200") for k in bodies), sorted(bodies)
    assert {"env.log", "trainer.log", "a.log", "a-vllm.log"} <= set(logs)


# ------------------------------------------------------------------------------------------------ kills
def _kill_inside_an_apply(world: World, gw: Replica, kill) -> dict:
    """Publish a long catch-up without telling the replica, nudge it, and kill the moment /status says paused."""
    for attempt in range(1, 4):
        for _ in range(6 * attempt + 6):
            world.publish()
        target = world.latest
        gw.nudge()
        deadline = time.time() + 90
        while time.time() < deadline:
            st = gw.status()
            if st["paused"]:
                kill(st)
                return {"paused_at_kill": True, "attempts": attempt, "target": target,
                        "served_at_kill": st["served_version"]}
            if st["served_version"] == target and not st["syncing"]:
                break  # too quick for us: a longer catch-up next time
    raise AssertionError("never caught the replica inside an apply")


def test_vllm_killed_inside_an_apply_is_restarted_and_converges_bit_exact(world, figures):
    gw = world.gw
    gw.sync_to(world.latest)
    old_pid = gw.status()["vllm_pid"]
    rec = _kill_inside_an_apply(world, gw, lambda st: os.kill(st["vllm_pid"], signal.SIGKILL))
    health = []
    deadline = time.time() + 420
    while time.time() < deadline:
        r = gw.http.get("/health")
        health.append((r.status_code, r.json().get("vllm")))
        if r.status_code == 200 and gw.status()["vllm_pid"] != old_pid:
            break
        time.sleep(1)
    v = world.publish()
    gw.sync_to(v, timeout=180)
    converged = served_ok(gw, world, v)
    rec.update(converged_bit_exact=converged, health_reported_not_ready=any(c == 503 for c, _ in health),
               old_vllm_processes_left=len(group_members(old_pid)))
    figures.setdefault("killed_inside_an_apply", {})["vllm_only"] = rec
    assert converged and rec["health_reported_not_ready"] and rec["old_vllm_processes_left"] == 0, rec
    assert gw.complete().status_code == 200


def test_replica_killed_inside_an_apply_a_new_one_converges_bit_exact(world, figures):
    gw = world.gw
    gw.sync_to(world.latest)
    groups = [gw.proc.pid, os.getpgid(gw.status()["vllm_pid"])]

    def kill_everything(st):  # the container dies: gateway, vLLM and its engine core, all at once
        for g in groups:
            os.killpg(g, signal.SIGKILL)

    rec = _kill_inside_an_apply(world, gw, kill_everything)
    gw.proc.wait(30)
    deadline = time.time() + 60
    while time.time() < deadline and any(group_members(g) for g in groups):
        time.sleep(0.5)
    rec["processes_left"] = sum(len(group_members(g)) for g in groups)
    # The new replica: the production command, the same bucket (plain path) and the same download cache.
    b = Replica(world, "b", faults=False)
    world.replicas.append(b)
    v = world.latest
    b.sync_to(v, timeout=180)
    rec["converged_bit_exact"] = served_ok(b, world, v)
    v = world.publish()
    b.sync_to(v)
    rec["follows_on_bit_exact"] = served_ok(b, world, v)
    figures.setdefault("killed_inside_an_apply", {})["whole_replica"] = rec
    assert rec["processes_left"] == 0 and rec["converged_bit_exact"] and rec["follows_on_bit_exact"], rec
    assert b.complete().status_code == 200

"""A real rollout replica -- `python -m rollout_space`, the Space's entrypoint, with vLLM (CPU) as its child -- follows
a local bucket that a publisher fills with real AdamW steps on the tiny model. Nothing is mocked. The late second
replica runs vLLM with tensor parallelism 2 (two worker processes, each applying the slice it owns)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from dws_testing import Service, TinyTrainer
from shared.bucket import open_bucket
from shared.digest import weights_digest
from shared.formats import TensorChange, encode_delta
from shared.manifest import FileEntry, delta_path, read_manifest, write_manifest
from shared.publisher import Publisher
from shared.wire import MODEL_VERSION_FIELD, MODEL_VERSION_HEADER, ReplicaStatus
from rollout_space.vllm_proc import group_members
from dws_testing import free_port

TOKEN = "test-token-rollout"
pytestmark = pytest.mark.slow


class Gateway(Service):
    """`python -m rollout_space` as the Space runs it, with a bearer token; moves only when nudged (POST /sync)."""

    def __init__(self, model: Path, bucket: Path, logdir: Path, name: str, tp: int = 1):
        self.vllm_port = free_port()
        super().__init__([sys.executable, "-m", "rollout_space", "--model", str(model), "--bucket", str(bucket),
                          "--host", "127.0.0.1", "--port", "{PORT}", "--poll-interval", "600", "--max-model-len",
                          "512", "--vllm-log", str(logdir / f"{name}-vllm.log"), "--no-ui",
                          "--vllm-args=--enforce-eager", "--tensor-parallel-size", str(tp),
                          "--vllm-port", str(self.vllm_port)],
                         log=logdir / f"{name}.log",
                         env={"DWS_API_KEY": TOKEN, "VLLM_CACHE_ROOT": str(logdir / f"{name}-vllm-cache")})
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def vllm_rpc(self, method: str, *args: str) -> list:
        """Straight to the loopback vLLM behind the gateway (what only the replica itself can reach)."""
        r = httpx.post(f"http://127.0.0.1:{self.vllm_port}/collective_rpc", timeout=120,
                       json={"method": method, "args": list(args)})
        assert r.status_code == 200, r.text[:500]
        return r.json()["results"]

    def status(self) -> dict:
        return self.http.get("/status").json()

    def sync_to(self, version: int, timeout: float = 90) -> dict:
        """Nudge (the authenticated POST /sync) until the replica serves `version`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.http.post("/sync", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
            time.sleep(0.5)
            st = self.status()
            if st["served_version"] == version and not st["syncing"]:
                return st
        raise AssertionError(f"replica did not reach v{version}: {json.dumps(self.status())[:1500]}\n{self.tail()}")

    def complete(self, prompt="hello", stream=False, max_tokens=8) -> httpx.Response:
        return self.http.post("/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                              json={"model": self.model_name(), "prompt": prompt, "max_tokens": max_tokens,
                                    "stream": stream, "temperature": 1.0})

    def model_name(self) -> str:
        return self.http.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("rollout")
    bucket = root / "bucket"
    trainer = TinyTrainer(tiny_model_dir, lr=1e-4)
    digests = {}
    with Publisher(bucket, anchor_every=100) as pub:
        for v in range(3):  # v0 is the base model itself: the replica recognises it and needs no anchor download
            if v:
                trainer.step()
            pub.publish(trainer.params(), v)
            pub.flush()
            digests[v] = pub.reports[-1].digest
    gw = Gateway(tiny_model_dir, bucket, root, "a")
    w = {"root": root, "bucket": bucket, "trainer": trainer, "digests": digests, "gw": gw, "model": tiny_model_dir,
         "latest": 2}
    yield w
    gw.stop()
    if "gw_b" in w:
        w["gw_b"].stop()


def publish(w, *, encoding="compact", anchor=False, steps=1):
    w["trainer"].step(steps)
    v = w["latest"] + 1
    with Publisher(w["bucket"], encoding=encoding, anchor_every=1 if anchor else 100) as pub:
        pub.publish(w["trainer"].params(), v)
    w["digests"][v] = pub.reports[-1].digest
    w["latest"] = v
    return v


def publish_trl_layout(w):
    """A delta exactly as TRL's delta-sync branch lays it out (no dws keys at all), committed by hand."""
    bucket = open_bucket(w["bucket"])
    m = read_manifest(bucket)
    before = w["trainer"].bf16()
    w["trainer"].step()
    after = w["trainer"].bf16()
    tensors, names = {}, []
    for name, t in after.items():
        a, b = t.view(torch.int16).reshape(-1), before[name].view(torch.int16).reshape(-1)
        pos = (a != b).nonzero().squeeze(1)
        if pos.numel():
            tensors[f"{name}.indices"] = pos.to(torch.int32)
            tensors[f"{name}.values"] = t.reshape(-1)[pos].clone()
            names.append(name)
    v = w["latest"] + 1
    blob = save(tensors, metadata={"sparse": "True", "model_version": str(v), "changed_params": json.dumps(names)})
    bucket.write_bytes(delta_path(v), blob)
    entry = FileEntry(version=v, path=delta_path(v), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                      digest=weights_digest(after), base=m.latest)
    write_manifest(bucket, m.model_copy(update={"deltas": (*m.deltas, entry), "latest": v,
                                                "latest_digest": entry.digest}))
    w["digests"][v] = entry.digest
    w["latest"] = v
    return v


def publish_in_parts(w, *, count=2, encoding="compact"):
    """A delta stored as `count` row-slice parts, as `count` sharded trainer ranks store it (tests/shared/
    test_parts.py), appended to the bucket's history."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
    from test_parts import store_in_parts

    bucket = open_bucket(w["bucket"])
    m = read_manifest(bucket)
    before = w["trainer"].bf16()
    w["trainer"].step()
    after = w["trainer"].bf16()
    v = w["latest"] + 1
    entry = store_in_parts(w["bucket"], after, before, version=v, count=count, encoding=encoding)
    write_manifest(bucket, m.model_copy(update={"deltas": (*m.deltas, entry), "latest": v,
                                                "latest_digest": entry.digest}))
    w["digests"][v] = entry.digest
    w["latest"] = v
    return v


def test_replica_identifies_base_then_serves_every_version_bit_exact(world):
    gw = world["gw"]
    st = gw.sync_to(2)
    assert st["digest_match"] is True and st["served_digest"] == world["digests"][2]
    assert not st["last_sync"]["plan"].startswith("vNone"), "the base model is v0: no anchor download needed"
    for kind in ("compact", "raw", "trl", "anchor", "compact"):
        v = publish_trl_layout(world) if kind == "trl" else publish(world, encoding="raw" if kind == "raw" else
                                                                     "compact", anchor=kind == "anchor")
        st = gw.sync_to(v)
        assert st["served_digest"] == world["digests"][v], f"{kind} v{v} is not bit-exact on the replica"
        assert st["digest_match"] is True and st["last_sync"]["ok"] is True
        assert st["last_sync"]["pause_s"] > 0 and st["last_sync"]["verified"] is True
        assert st["last_sync"]["verify_window_s"] > 0 and st["verify_window_ms"]["count"] >= 1
    status = ReplicaStatus.model_validate(gw.status())  # /status is a superset of the typed wire contract
    assert status.verified()[world["latest"]] == world["digests"][world["latest"]]


def test_requests_during_syncs_never_fail_and_carry_real_versions(world):
    gw = world["gw"]
    results, stop = [], threading.Event()

    def client(stream: bool):
        while not stop.is_set():
            try:
                r = gw.complete(stream=stream)
                if stream:
                    versions = {json.loads(line[6:])["model_version"] for line in r.text.split("\n")  # SSE is \n-delimited; splitlines() also cuts at U+2028 etc.
                                if line.startswith("data: {")}
                    results.append((r.status_code, versions))
                else:
                    results.append((r.status_code, {r.json().get("model_version")}))
            except Exception as exc:  # noqa: BLE001 -- a transport failure is a failed request
                results.append((repr(exc), set()))

    threads = [threading.Thread(target=client, args=(s,)) for s in (False, True, False)]
    for t in threads:
        t.start()
    for _ in range(4):
        gw.sync_to(publish(world))
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert len(results) >= 8
    failed = [r for r in results if r[0] != 200]
    assert failed == [], failed[:5]
    seen = set().union(*(v for _, v in results))
    assert seen <= set(world["digests"]), f"responses tagged with versions that never existed: {seen}"
    assert gw.status()["failed_requests"] == 0


def test_streamed_text_with_unicode_line_separators_reaches_the_client_whole(world):
    """The echoed prompt carries U+2028, U+2029 and U+0085, which vLLM's JSON leaves unescaped: each SSE data line
    the client gets still parses (the relay cuts lines at SSE's line ends only) and the text comes back intact."""
    gw = world["gw"]
    prompt = "the quick\u2028brown\u2029fox\x85jumps"
    r = gw.http.post("/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                     json={"model": gw.model_name(), "prompt": prompt, "max_tokens": 4, "stream": True,
                           "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 2, r.text
    chunks = [json.loads(d) for d in data[:-1]]  # a line cut at a separator raises here
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith(prompt), text
    assert all(isinstance(c[MODEL_VERSION_FIELD], int) for c in chunks)
    assert "\u2028" not in r.text and "\x85" not in r.text, "the relay re-encodes each chunk with ASCII escapes"


def test_corrupted_delta_keeps_last_good_version_then_recovers_from_anchor(world):
    gw = world["gw"]
    good = world["latest"]
    bad = publish(world)
    path = world["bucket"] / delta_path(bad)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    gw.http.post("/sync", headers={"Authorization": f"Bearer {TOKEN}"})
    deadline = time.time() + 60
    while time.time() < deadline and gw.status()["failures"] == 0:
        time.sleep(0.5)
    st = gw.status()
    assert st["failures"] >= 1 and "sha256" in st["last_sync"]["error"]
    assert st["served_version"] == good and st["served_digest"] == world["digests"][good]
    assert gw.complete().json()["model_version"] == good, "the replica keeps serving its last good version"
    anchor = publish(world, anchor=True)
    st = gw.sync_to(anchor)
    assert st["digest_match"] is True and st["served_digest"] == world["digests"][anchor]


def test_out_of_range_delta_is_rejected_before_the_pause(world):
    gw = world["gw"]
    good = world["latest"]
    bucket = open_bucket(world["bucket"])
    m = read_manifest(bucket)
    name = "model.norm.weight"
    numel = m.model.tensors[name].shape[0]
    v = good + 1
    blob = encode_delta({name: TensorChange((numel + 10,), __import__("numpy").array([numel + 5]),
                                            __import__("numpy").array([1], "uint16"),
                                            __import__("numpy").array([0], "uint16"))},
                        version=v, base=good, total=1, encoding="raw")
    # The header claims a bigger tensor so that the file itself is self-consistent; the manifest's model says no.
    bucket.write_bytes(delta_path(v), blob)
    entry = FileEntry(version=v, path=delta_path(v), bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                      digest=world["digests"][good], base=good)
    write_manifest(bucket, m.model_copy(update={"deltas": (*m.deltas, entry), "latest": v,
                                                "latest_digest": entry.digest}))
    failures = gw.status()["failures"]
    gw.http.post("/sync", headers={"Authorization": f"Bearer {TOKEN}"})
    deadline = time.time() + 60
    while time.time() < deadline and gw.status()["failures"] == failures:
        time.sleep(0.5)
    st = gw.status()
    assert "shape" in st["last_sync"]["error"] or "range" in st["last_sync"]["error"]
    assert st["last_sync"]["pause_s"] == 0.0, "rejected before pausing inference"
    assert st["served_version"] == good
    world["digests"][v] = entry.digest
    world["latest"] = v
    # The trainer's next anchor heals the bucket (and the replica).
    fixed = publish(world, anchor=True)
    assert gw.sync_to(fixed)["digest_match"] is True


def test_second_replica_started_late_catches_up_to_the_same_digest(world):
    for _ in range(2):
        publish(world)
    # The late replica runs vLLM at tensor parallelism 2: each rank writes the slice of every delta it owns, and
    # the digest it reports is of the checkpoint-coordinate weights merged across both ranks.
    gw_b = world["gw_b"] = Gateway(world["model"], world["bucket"], world["root"], "b", tp=2)
    st_b = gw_b.sync_to(world["latest"], timeout=400)
    st_a = world["gw"].sync_to(world["latest"])
    assert st_b["served_digest"] == st_a["served_digest"] == world["digests"][world["latest"]]
    assert st_b["digest_match"] is True
    ranks = gw_b.vllm_rpc("dws_status")
    assert [r["tp_rank"] for r in ranks] == [0, 1] and all(r["tp_size"] == 2 for r in ranks)
    for encoding in ("compact", "raw", "parts"):
        # parts: a version as two sharded trainer ranks store it -- row slices that do not line up with this
        # replica's TP slices (a fused qkv's head split); each TP rank applies what it owns of both parts.
        v = publish_in_parts(world) if encoding == "parts" else publish(world, encoding=encoding)
        st = gw_b.sync_to(v)
        assert st["served_digest"] == world["digests"][v] and st["last_sync"]["verified"] is True, encoding
        # (the publisher's anchor policy may have made this version an anchor: then nothing sparse was applied)
        assert st["last_sync"]["changed"] > 0 or "anchor" in st["last_sync"]["plan"], st["last_sync"]
        if encoding == "parts":
            assert st["last_sync"]["changed"] > 0 and len(read_manifest(open_bucket(world["bucket"])).delta(v).parts) == 2
    r = gw_b.complete()
    assert r.status_code == 200 and r.json()[MODEL_VERSION_FIELD] == v and r.headers[MODEL_VERSION_HEADER] == str(v)


def test_served_weights_that_differ_from_the_manifest_stop_the_claim_and_resync_from_the_anchor(world, tmp_path):
    """A weight changes behind the replica's back (memory corruption, a stray writer): the next version's writes
    read back fine (they touch other positions), but the full digest after resume differs from the manifest's.
    The replica stops claiming the version, says so on /status, and converges again from the newest anchor."""
    from safetensors.torch import save_file

    gw = world["gw"]
    gw.sync_to(world["latest"])
    before = gw.status()
    # corrupt one served weight through the loopback vLLM (not reachable through the gateway)
    p = tmp_path / "corrupt.safetensors"
    save_file({"model.norm.weight.indices": torch.tensor([5], dtype=torch.int32),
               "model.norm.weight.values": torch.tensor([123.0], dtype=torch.bfloat16)}, str(p),
              metadata={"sparse": "True", "model_version": str(world["latest"] + 1)})  # TRL: base = version - 1
    gw.vllm_rpc("dws_apply", json.dumps([{"path": str(p), "kind": "delta", "verify": False}]))
    v = publish(world)
    gw.http.post("/sync", headers={"Authorization": f"Bearer {TOKEN}"})
    deadline = time.time() + 120
    while time.time() < deadline and gw.status()["digest_mismatches"] == before["digest_mismatches"]:
        time.sleep(0.2)
    st = gw.status()
    assert st["digest_mismatches"] == before["digest_mismatches"] + 1
    caught = [r for r in st["recent_syncs"] if r["to_version"] == v and r["verified"] is False]
    assert caught and "DigestMismatch" in caught[0]["error"], st["recent_syncs"][-3:]
    assert str(v) not in st["verified_versions"] or st["verified_versions"][str(v)] == world["digests"][v]
    st = gw.sync_to(v)
    assert st["served_digest"] == world["digests"][v] and st["digest_match"] is True
    assert st["last_sync"]["plan"].startswith("vNone") and "anchor" in st["last_sync"]["plan"]
    assert st["resyncs_from_anchor"] > before["resyncs_from_anchor"]
    assert st["verified_versions"][str(v)] == world["digests"][v]


def test_n_per_request_is_capped(world):
    http = world["gw"].http
    h = {"Authorization": f"Bearer {TOKEN}"}
    for n in (16384, 0, -1, "4", 2.5, True):
        r = http.post("/v1/completions", headers=h, json={"model": world["gw"].model_name(), "prompt": "x", "n": n})
        assert r.status_code == 400 and "n must be" in r.json()["error"]["message"], (n, r.text[:200])
    ok = http.post("/v1/completions", headers=h, json={"model": world["gw"].model_name(), "prompt": "x", "n": 2,
                                                        "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


@pytest.mark.parametrize("method, path", [("POST", "/pause"), ("POST", "/resume"), ("POST", "/update_weights"),
                                          ("POST", "/start_weight_update"), ("POST", "/collective_rpc"),
                                          ("POST", "/v1/collective_rpc"), ("GET", "/is_paused"),
                                          ("POST", "/init_weight_transfer_engine"), ("GET", "/metrics")])
def test_vllm_dev_routes_are_not_reachable(world, method, path):
    r = world["gw"].http.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code in (404, 405), (path, r.status_code)


def test_auth(world):
    http = world["gw"].http
    assert http.post("/sync").status_code == 401
    assert http.post("/sync", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    assert http.get("/health").status_code == 200 and http.get("/status").status_code == 200
    too_big = http.post("/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                        content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert too_big.status_code == 413
    assert http.post("/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"}, content=b"[1,2").status_code == 400


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


def test_killed_vllm_is_restarted_and_catches_up(world):
    gw = world["gw"]
    old = gw.status()["vllm_pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline and gw.http.get("/health").status_code == 200:
        time.sleep(0.2)
    assert gw.http.get("/health").json()["vllm"] in ("restarting", "ready")
    unavailable = gw.status()["unavailable_503"]
    # the gateway's own refusal while vLLM restarts is a failure a client saw: counted on /status
    r = gw.http.post("/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                     json={"model": "m", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 503 and gw.status()["unavailable_503"] == unavailable + 1
    v = publish(world)  # published while vLLM is down
    deadline = time.time() + 400
    while time.time() < deadline and gw.http.get("/health").status_code != 200:
        time.sleep(1)
    st = gw.sync_to(v, timeout=120)
    assert st["vllm_pid"] != old and st["vllm_restarts"] == 1
    assert group_members(old) == [], "the dead vLLM's engine-core/worker processes must not linger"
    assert st["digest_match"] is True and st["served_digest"] == world["digests"][v]
    assert gw.complete().status_code == 200


def test_killed_gateway_leaves_no_vllm_behind(world):
    gw_b = world["gw_b"]
    vllm_pid = gw_b.status()["vllm_pid"]
    assert _alive(vllm_pid)
    os.kill(gw_b.proc.pid, signal.SIGKILL)
    gw_b.proc.wait(10)
    deadline = time.time() + 60
    while time.time() < deadline and _alive(vllm_pid):
        time.sleep(0.5)
    assert not _alive(vllm_pid), "vLLM outlived its gateway"
    deadline = time.time() + 60
    while time.time() < deadline and group_members(vllm_pid):
        time.sleep(0.5)
    assert group_members(vllm_pid) == [], "vLLM's engine-core/worker processes outlived the gateway"


# ------------------------------------------------------------------ the gateway's prepare step (no vLLM needed)
def _prepared_contents(path: Path) -> tuple[dict, dict]:
    from rollout_space.prepared import PreparedReader

    with PreparedReader(path) as r:
        arrays = {k: (r.read(k).dtype.str, r.read(k).tobytes()) for k in r._arrays}
        return {n: (t.shape, t.mode, t.count, t.encoding, t.params, t.offset) for n, t in r.tensors.items()}, arrays


@pytest.mark.parametrize("encoding", ["compact", "raw", "ctx", "trl"])
def test_streamed_prepare_writes_what_the_whole_decode_writes(tmp_path, encoding):
    """The gateway decodes each tensor slice by slice into the prepared file (`DeltaReader.streamed` ->
    `write_stream`); the file must hold exactly what decoding the delta whole writes -- across the writer's slice
    boundaries (1.3 M changed elements: 21 slices of 64 K) and for every encoding, TRL's layout included."""
    import numpy as np

    from rollout_space.prepared import write_prepared, write_stream
    from shared.formats import DeltaReader, read_patch_file

    rng = np.random.default_rng(5)
    shapes = {"big.weight": (3000, 1000), "small.weight": (64, 8)}
    changes, tensors, names = {}, {}, []
    for name, shape in shapes.items():
        numel = int(np.prod(shape))
        base = rng.integers(0x3000, 0x3C00, numel, dtype=np.uint16)
        pos = np.flatnonzero(rng.random(numel) < (0.45 if name == "big.weight" else 0.3)).astype(np.int64)
        new_at = base[pos] + rng.choice(np.array([1, 65535, 3, 700], np.uint16), pos.size, p=[.5, .45, .04, .01])
        changes[name] = TensorChange(shape, pos, new_at, base[pos], base=base)
        tensors[f"{name}.indices"] = torch.from_numpy(pos.astype(np.int32))
        tensors[f"{name}.values"] = torch.from_numpy(new_at.astype(np.uint16).view(np.int16)).view(torch.bfloat16)
        names.append(name)
    path = tmp_path / "d.safetensors"
    if encoding == "trl":
        path.write_bytes(save(tensors, metadata={"sparse": "True", "model_version": "8",
                                                 "changed_params": json.dumps(names)}))
    else:
        path.write_bytes(encode_delta(changes, version=8, base=7, total=3_000_512, encoding=encoding))
    whole = write_prepared(read_patch_file(path, shapes=shapes, base=7), tmp_path / "whole.safetensors")
    with DeltaReader(path, shapes=shapes, base=7) as r:
        streamed = write_stream(r, tmp_path / "streamed.safetensors", version=r.header.version,
                                base=r.header.base, shapes=r.header.shapes,
                                params_chars=len(r.header.metadata.get("tensors", "")))
    assert whole["changed"] == streamed["changed"] == sum(c.positions.size for c in changes.values()) > 1 << 20
    info_w, arrays_w = _prepared_contents(tmp_path / "whole.safetensors")
    info_s, arrays_s = _prepared_contents(tmp_path / "streamed.safetensors")
    assert info_s == info_w and arrays_s == arrays_w
    if encoding != "ctx":
        assert {m for _, m, *_ in info_s.values()} == {"values" if encoding in ("raw", "trl") else "residual"}


def test_streamed_prepare_refuses_a_nan_and_leaves_no_file(tmp_path):
    import numpy as np

    from rollout_space.prepared import write_stream
    from shared.errors import FormatError
    from shared.formats import DeltaReader

    numel = 2_000_000
    pos = np.arange(0, numel, 2, dtype=np.int64)
    new_at = np.full(pos.size, 0x3F80, np.uint16)
    new_at[-3] = 0x7FC0  # a NaN in the last slice: earlier slices were already written
    path = tmp_path / "d.safetensors"
    path.write_bytes(encode_delta({"w": TensorChange((numel,), pos, new_at, np.zeros(pos.size, np.uint16))},
                                  version=2, base=1, total=numel, encoding="raw"))
    dest = tmp_path / "p.safetensors"
    with DeltaReader(path) as r, pytest.raises(FormatError, match="NaN"):
        write_stream(r, dest, version=2, base=1, shapes=r.header.shapes)
    assert not dest.exists()

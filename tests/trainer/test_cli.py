"""`dws train`'s options: flags, their environment variables (strict: a typo is an error naming the variable), the
exit-when-done default (exit outside a Space, keep serving inside one) and `--help` naming every variable. No
services."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dws_testing import REPO
from trainer_space.config import build_parser, parse_args

BASE = ["--model", "m", "--bucket", "b"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("DWS_") or k in ("SPACE_ID", "PORT", "HOST")]:
        monkeypatch.delenv(k)


def test_requires_inputs_and_reads_variables(monkeypatch):
    with pytest.raises(SystemExit):
        parse_args([])
    monkeypatch.setenv("DWS_ROLLOUT_URLS", "http://a:1, http://b:2/")
    monkeypatch.setenv("DWS_ENV_URL", "http://e1,http://e2/")
    monkeypatch.setenv("DWS_API_KEY", "secret-value")
    cfg = parse_args(BASE)
    assert cfg.rollout_urls == ("http://a:1", "http://b:2") and cfg.env_urls == ("http://e1", "http://e2")
    assert cfg.env_url == "http://e1" and cfg.max_staleness == 1 and cfg.weight_sync_steps == 1
    assert "secret-value" not in repr(cfg) and "secret-value" not in str(cfg.describe())
    cfg = parse_args([*BASE, "--env-url", "http://x", "--env-url", "http://y", "--task", "short, wordle"])
    assert cfg.env_urls == ("http://x", "http://y") and cfg.tasks == ("short", "wordle")


def test_exit_when_done_default_depends_on_space(monkeypatch):
    args = [*BASE, "--rollout-url", "http://r", "--env-url", "http://e"]
    assert parse_args(args).exit_when_done is True  # a terminal or CI: the command returns when done
    monkeypatch.setenv("SPACE_ID", "me/dws-trainer")
    assert parse_args(args).exit_when_done is False  # a Space keeps serving its dashboard
    assert parse_args([*args, "--exit-when-done"]).exit_when_done is True
    monkeypatch.setenv("DWS_EXIT_WHEN_DONE", "true")
    assert parse_args(args).exit_when_done is True
    assert parse_args([*args, "--no-exit-when-done"]).exit_when_done is False


@pytest.mark.parametrize("var, value", [("DWS_EXIT_WHEN_DONE", "ture"), ("DWS_UI", "flase"), ("DWS_STEPS", "ten")])
def test_a_malformed_variable_is_one_line_naming_it(var, value):
    env = {"PATH": "/usr/bin:/bin", var: value}
    p = subprocess.run([sys.executable, "-m", "trainer_space", *BASE, "--rollout-url", "http://r", "--env-url",
                        "http://e"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert var in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_help_lists_every_flag_with_its_variable():
    text = subprocess.run([sys.executable, "-m", "trainer_space", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
    flags = sorted({s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"})
    for flag in flags:
        assert flag in text, flag
    # every option's help ends with its variable, e.g. [DWS_STEPS]
    for a in build_parser()._actions:
        if a.option_strings and a.dest != "help":
            assert re.search(r"\[[A-Z_]+(=[a-z]+)?\]$", a.help or ""), (a.option_strings, a.help)
    assert "nan-at" not in text.lower() and "FAULT" not in text  # test hooks are environment variables, not user-facing flags


@pytest.mark.parametrize("model", ["/definitely/not/a/model", "./nowhere"])
def test_a_missing_model_folder_is_one_line_before_anything_starts(model, tmp_path):
    """A local path that is not a model folder is refused at parse time (exit 2), before the bucket lease is taken
    or any service is contacted; a Hub id ("org/name") is left for the loader."""
    p = subprocess.run([sys.executable, "-m", "trainer_space", "--model", model, "--bucket", str(tmp_path / "b"),
                        "--rollout-url", "http://r", "--env-url", "http://e"], cwd=REPO,
                       env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a model folder" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "b").exists(), "nothing was written to the bucket"
    assert parse_args(["--model", "Qwen/Qwen3-0.6B", "--bucket", "b", "--rollout-url", "http://r",
                       "--env-url", "http://e"]).model == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize("extra, env, says", [
    (["--prompts-per-step", "3", "--group-size", "3"], {}, "does not split over 2 ranks"),
    (["--trainable", "mlp"], {}, "single-process trainer only"),
    ([], {"ACCELERATE_USE_FSDP": "true"}, "accelerate's own FSDP"),
    ([], {"RANK": "2"}, "not a valid place in a job"),
    ([], {"WORLD_SIZE": "", "RANK": "", "PMI_SIZE": "2"}, "without torchrun's WORLD_SIZE/RANK"),
])
def test_a_configuration_two_ranks_cannot_run_is_one_line(extra, env, says, tmp_path):
    """Under torchrun (WORLD_SIZE=2 here, as torchrun sets it) what cannot work is refused by each rank at parse
    time, exit 2, before any process group forms, the bucket is touched or a service is contacted."""
    p = subprocess.run([sys.executable, "-m", "trainer_space", "--model", "org/m", "--bucket", str(tmp_path / "b"),
                        "--rollout-url", "http://r", "--env-url", "http://e", *extra], cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **env},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if "error:" in ln]) == 1, p.stderr
    assert not (tmp_path / "b").exists(), "nothing was written to the bucket"
    # The same options on one process are fine: the single-process trainer is unchanged.
    if not env:
        assert parse_args(["--model", "org/m", "--bucket", "b", "--rollout-url", "http://r", "--env-url", "http://e",
                           *extra]).model == "org/m"

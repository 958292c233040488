"""`dws spaces deploy` (dws_tools/spaces.py).

The Hub is unreachable here, so the deploy is tested at the huggingface_hub function boundary: `create_bucket`,
`create_repo`, `add_space_variable`, `add_space_secret`, `request_space_hardware`, `upload_folder` and `whoami` are
replaced by a recorder, and the tests assert the exact calls (arguments included, and for `upload_folder` the exact
files and bytes of the folder it was handed). Whether the real Hub accepts them is not tested here. Errors that must
stop the deploy before any call are also checked through the real console script in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import huggingface_hub as hfh
import pytest
from dws_testing import REPO
from huggingface_hub.errors import HfHubHTTPError

from shared.cli import main
from dws_tools.spaces import DeployOptions, SetVariable, build_plan, space_url

DWS = str(Path(sys.executable).with_name("dws"))
TOKEN = "hf_test_token_never_printed"


class Recorder:
    """Stands in for the huggingface_hub functions the deploy calls; records (name, args, kwargs) in order."""

    NAMES = ("create_bucket", "create_repo", "add_space_variable", "add_space_secret", "request_space_hardware",
             "upload_folder", "whoami")

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploads: list[dict[str, str]] = []  # per upload_folder call: repo path -> sha256 of what was staged
        self.fail: dict[str, Exception] = {}
        self.fail_once = False  # True: each planted failure happens on the first call only
        for name in self.NAMES:
            monkeypatch.setattr(hfh, name, self._fake(name))

    def _fake(self, name):
        def fake(*args, **kwargs):
            if name == "upload_folder":
                # The staging folder is temporary: record what it held, then the call with a stable placeholder.
                root = Path(kwargs["folder_path"])
                self.uploads.append({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                                     for p in sorted(root.rglob("*")) if p.is_file()})
                kwargs = {**kwargs, "folder_path": "<staged>"}
            self.calls.append((name, args, kwargs))
            if name in self.fail:
                exc = self.fail[name]
                if self.fail_once:
                    del self.fail[name]
                raise exc
            if name == "whoami":
                return {"name": "bob", "type": "user"}
            return None

        return fake

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "DWS_API_KEY", "DWS_SPACE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return Recorder(monkeypatch)


def deploy(tmp_path, *extra, capsys=None):
    rc = main(["spaces", "deploy", "--state-dir", str(tmp_path / "state"), *extra])
    out = capsys.readouterr() if capsys else None
    return rc, out


def plan_block(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("plan:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("DWS_API_KEY:"))
    return lines[start:end]


def expected_files(space_pkg: str, space: str) -> dict[str, str]:
    """What a Space repo must hold, computed from the checkout: the Space's docker/ folder at the root, plus
    pyproject.toml, its own package and shared/ unless it is the env Space (no bytecode)."""
    files = {p.name: p for p in (REPO / "docker" / space).iterdir() if p.is_file()}
    if space_pkg != "env_space":
        files["pyproject.toml"] = REPO / "pyproject.toml"
    for sub in (("shared",) if space_pkg != "env_space" else ()) + (space_pkg,):
        for p in (REPO / sub).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                files[p.relative_to(REPO).as_posix()] = p
    return {k: hashlib.sha256(v.read_bytes()).hexdigest() for k, v in files.items()}


# ------------------------------------------------------------------------------------------------ the exact calls
def test_deploy_makes_exactly_the_expected_calls(hub, tmp_path, capsys):
    rc, out = deploy(tmp_path, "--namespace", "alice", "--token", TOKEN, "--replicas", "2",
                     "--model", "Qwen/Qwen3-1.7B", "--hardware", "trainer=cpu-upgrade", capsys=capsys)
    assert rc == 0, out.err
    key_file = tmp_path / "state" / "alice--dws-.api_key"
    key = key_file.read_text().strip()
    assert len(key) >= 32 and (key_file.stat().st_mode & 0o777) == 0o600
    t = {"token": TOKEN}
    bucket = "hf://buckets/alice/dws-bucket"
    urls = "https://alice-dws-rollout-1.hf.space,https://alice-dws-rollout-2.hf.space"

    def space(repo, *, private=False):
        return ("create_repo", (repo,), {"repo_type": "space", "space_sdk": "docker", "private": private,
                                          "exist_ok": True, **t})

    def var(repo, k, v):
        return ("add_space_variable", (repo, k, v), t)

    def secret(repo, k, v):
        return ("add_space_secret", (repo, k, v), t)

    def hw(repo, flavor):
        return ("request_space_hardware", (repo, hfh.SpaceHardware(flavor)), t)

    expected = [("create_bucket", ("alice/dws-bucket",), {"private": True, "exist_ok": True, **t}),
                space("alice/dws-env"), secret("alice/dws-env", "DWS_API_KEY", key), hw("alice/dws-env", "cpu-basic"),
                ("upload", "alice/dws-env")]
    for i in (1, 2):
        r = f"alice/dws-rollout-{i}"
        expected += [space(r), var(r, "DWS_MODEL", "Qwen/Qwen3-1.7B"), var(r, "DWS_BUCKET", bucket),
                     secret(r, "DWS_API_KEY", key), secret(r, "HF_TOKEN", TOKEN), hw(r, "l4x1"), ("upload", r)]
    r = "alice/dws-trainer"
    expected += [space(r), var(r, "DWS_MODEL", "Qwen/Qwen3-1.7B"), var(r, "DWS_BUCKET", bucket),
                 var(r, "DWS_ROLLOUT_URLS", urls), var(r, "DWS_ENV_URL", "https://alice-dws-env.hf.space"),
                 secret(r, "DWS_API_KEY", key), secret(r, "HF_TOKEN", TOKEN), hw(r, "cpu-upgrade"), ("upload", r)]
    assert len(hub.calls) == len(expected)
    for call, want in zip(hub.calls, expected, strict=True):
        if want[0] == "upload":
            name, args, kwargs = call
            assert name == "upload_folder" and args == ()
            assert {k: v for k, v in kwargs.items() if k != "commit_message"} == {
                "repo_id": want[1], "repo_type": "space", "folder_path": "<staged>", "delete_patterns": "*", **t}
        else:
            assert call == want
    pkgs = {"env": "env_space", "rollout": "rollout_space", "trainer": "trainer_space"}
    for staged, kind in zip(hub.uploads, ["env", "rollout", "rollout", "trainer"], strict=True):
        assert staged == expected_files(pkgs[kind], kind)
        assert not any(p.startswith(("tests/", ".venv", "docker/", "bench/")) for p in staged)
    # The token is a secret: it is never printed (nor is the API key).
    assert TOKEN not in out.out + out.err and key not in out.out + out.err
    assert "https://alice-dws-trainer.hf.space" in out.out


def test_rerun_is_idempotent(hub, tmp_path, capsys):
    """The same command twice makes the same calls with the same values (the generated key is reused), and every
    create is exist_ok."""
    args = ("--namespace", "alice", "--token", TOKEN)
    assert deploy(tmp_path, *args, capsys=capsys)[0] == 0
    first, first_uploads = list(hub.calls), list(hub.uploads)
    hub.calls.clear()
    hub.uploads.clear()
    rc, out = deploy(tmp_path, *args, capsys=capsys)
    assert rc == 0 and "reused from" in out.out
    assert hub.calls == first and hub.uploads == first_uploads
    assert all(c[2].get("exist_ok") is True for c in first if c[0] in ("create_repo", "create_bucket"))


def test_dry_run_prints_the_same_plan_and_calls_nothing(hub, tmp_path, capsys):
    args = ("--namespace", "alice", "--replicas", "3", "--bucket", "team/weights/run7", "--private",
            "--hardware", "env=keep")
    rc, real = deploy(tmp_path, *args, "--token", TOKEN, capsys=capsys)
    assert rc == 0
    n_real = len(hub.calls)
    hub.calls.clear()
    rc, dry = deploy(tmp_path, *args, "--dry-run", capsys=capsys)
    assert rc == 0 and hub.calls == []
    assert "dry run: nothing was sent to the Hub" in dry.out
    assert plan_block(dry.out) == plan_block(real.out)
    assert f"{n_real} Hub calls" in plan_block(dry.out)[0]
    # Through the real console script as well (no token at all: a dry run needs none).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "DWS_API_KEY", "DWS_SPACE_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    proc = subprocess.run([DWS, "spaces", "deploy", "--state-dir", str(tmp_path / "state"), *args, "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert plan_block(proc.stdout) == plan_block(real.out)
    # What the options asked for is in the plan: bucket with a prefix, three replicas, env hardware left alone,
    # only the trainer private.
    block = "\n".join(plan_block(real.out))
    assert "create bucket     team/weights (private)" in block
    assert "DWS_BUCKET=hf://buckets/team/weights/run7" in block
    assert "alice/dws-rollout-3" in block and "alice/dws-rollout-4" not in block
    assert "request hardware  alice/dws-env" not in block
    assert "create Space      alice/dws-trainer (docker, private)" in block
    assert "create Space      alice/dws-rollout-1 (docker, public)" in block


def test_namespace_defaults_to_token_user(hub, tmp_path, capsys):
    rc, out = deploy(tmp_path, "--token", TOKEN, capsys=capsys)
    assert rc == 0, out.err
    assert hub.calls[0] == ("whoami", (), {"token": TOKEN})
    assert hub.calls[1][:2] == ("create_bucket", ("bob/dws-bucket",))
    assert "plan: namespace bob" in out.out


def test_variables_are_what_the_space_commands_read(hub, tmp_path):
    """The deploy's variable names feed the Spaces' own parsers: the trainer gets every replica URL and the env
    URL, a replica gets the model and the bucket."""
    from rollout_space.__main__ import parse_args as rollout_args
    from trainer_space.config import parse_args as trainer_args

    plan = build_plan(DeployOptions(namespace="alice", replicas=2, api_key="k", space_token="t"))
    env_of = {}
    for a in plan.actions:
        if isinstance(a, SetVariable):
            env_of.setdefault(a.repo_id, {})[a.key] = a.value
    mp = pytest.MonkeyPatch()
    try:
        for k, v in {**env_of["alice/dws-trainer"], "DWS_API_KEY": "k"}.items():
            mp.setenv(k, v)
        cfg = trainer_args([])
        assert cfg.rollout_urls == ("https://alice-dws-rollout-1.hf.space", "https://alice-dws-rollout-2.hf.space")
        assert cfg.env_url == "https://alice-dws-env.hf.space" and cfg.bucket == "hf://buckets/alice/dws-bucket"
        mp.undo()
        for k, v in env_of["alice/dws-rollout-2"].items():
            mp.setenv(k, v)
        args = rollout_args([])
        assert (args.model, args.bucket) == ("Qwen/Qwen3-0.6B", "hf://buckets/alice/dws-bucket")
    finally:
        mp.undo()


# ---------------------------------------------------------------------------------------- errors: nothing called
def _cli(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "DWS_API_KEY", "DWS_SPACE_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")  # no token saved by `hf auth login` either
    return subprocess.run([DWS, "spaces", "deploy", "--state-dir", str(tmp_path / "state"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args, message", [
    (("--namespace", "alice"), "no Hub token"),
    (("--dry-run",), "no namespace"),
])
def test_missing_token_or_namespace_cli(tmp_path, args, message):
    proc = _cli(tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "state").exists()


def test_missing_token_calls_nothing(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hfh, "get_token", lambda: None)
    rc, out = deploy(tmp_path, "--namespace", "alice", capsys=capsys)
    assert rc == 2 and "no Hub token" in out.err and hub.calls == []


@pytest.mark.parametrize("args, message", [
    (("--replicas", "0"), "--replicas must be 1..16"),
    (("--hardware", "rollout=h100-huge"), "unknown flavour"),
    (("--hardware", "gpu=l4x1"), "unknown Space 'gpu'"),
    (("--hardware", "rollout"), "expected SPACE=FLAVOUR"),
    (("--bucket", "hf://datasets/alice/x"), "hf://buckets/"),
    (("--prefix", "bad--", "--bucket", "ok"), "invalid Space name 'alice/bad--env'"),
    (("--bucket", "hf://buckets/alice"), "expected hf://buckets/<namespace>/<name>"),
])
def test_bad_options_exit_2_before_any_call(hub, tmp_path, capsys, args, message):
    rc, out = deploy(tmp_path, "--namespace", "alice", "--token", TOKEN, *args, capsys=capsys)
    assert rc == 2 and message in out.err and hub.calls == []
    assert not (tmp_path / "state").exists(), "no key is generated for a deploy that cannot start"


def test_hub_error_is_one_clear_line_and_stops(hub, tmp_path, capsys):
    req = httpx.Request("POST", "https://hub.invalid/api/repos/create")
    hub.fail["create_repo"] = HfHubHTTPError("403 Forbidden", response=httpx.Response(403, request=req))
    rc, out = deploy(tmp_path, "--namespace", "alice", "--token", TOKEN, capsys=capsys)
    assert rc == 1
    assert "HTTP 403" in out.err and "write access" in out.err and "alice/dws-env" in out.err
    assert "Traceback" not in out.err and TOKEN not in out.err
    assert hub.names() == ["create_bucket", "create_repo"], "nothing after the failed call"


def test_space_url_follows_hub_subdomain_rules():
    assert space_url("Alice/dws_run.v2") == "https://alice-dws-run-v2.hf.space"
    assert space_url("alice/dws-trainer") == "https://alice-dws-trainer.hf.space"


def test_whoami_failure_asks_for_namespace(hub, tmp_path, capsys):
    req = httpx.Request("GET", "https://hub.invalid/api/whoami-v2")
    hub.fail["whoami"] = HfHubHTTPError("401 Unauthorized", response=httpx.Response(401, request=req))
    rc, out = deploy(tmp_path, "--token", TOKEN, capsys=capsys)
    assert rc == 2 and "HTTP 401: check the token" in out.err and "--namespace" in out.err
    assert hub.names() == ["whoami"] and not (tmp_path / "state").exists()


def test_transient_hub_error_is_retried(hub, tmp_path, capsys):
    req = httpx.Request("POST", "https://hub.invalid/api/buckets/create")
    hub.fail["create_bucket"] = HfHubHTTPError("503 Service Unavailable", response=httpx.Response(503, request=req))
    hub.fail_once = True
    rc, out = deploy(tmp_path, "--namespace", "alice", "--token", TOKEN, capsys=capsys)
    assert rc == 0, out.err
    assert hub.names()[:3] == ["create_bucket", "create_bucket", "create_repo"]

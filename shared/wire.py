"""The typed contract between Spaces: what crosses HTTPS between trainer, replicas, env and the operator's tools.

Weights never cross here (they go through the bucket); this module owns the *names and shapes* of everything else
that one Space reads from another, so that a field renamed on one side fails a type check instead of silently
reading as missing on the other:

* the **version tag** every replica puts on every completion (`MODEL_VERSION_HEADER`, `MODEL_VERSION_FIELD`): the
  model version whose weights produced it; a request that spanned a sync carries the *older* version;
* a replica's `GET /health` and `GET /status` (`ReplicaHealth`, `ReplicaStatus`, `SyncRecord`): what it serves, what
  it has proved bit-exact (`verified_versions`: version -> digest it measured itself), how its syncs went;
* the env Space's scoring routes (`ScoreItem`, `ScoreRequest`, `ScoreResponse`, `PromptOut`, `TaskInfo`) as the
  trainer sends and reads them. The env Space's image holds no protocol code, so its server keeps its own models of
  the same routes; tests/env checks both against each other.

Readers use `ReplicaStatus.model_validate(resp.json())`: unknown fields are kept (newer replicas may report more),
missing required ones fail loudly.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MODEL_VERSION_HEADER = "X-DWS-Model-Version"
MODEL_VERSION_FIELD = "model_version"  # in every completion body (and every streamed chunk)
#: vLLM's optional version list on a completion, when a sync happened while the request ran
MODEL_VERSIONS_FIELD = "model_versions"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SyncRecord(_Open):
    """One sync round of a replica (the replica fills it in as the round goes, then reports it on /status)."""

    started: float
    plan: str
    from_version: int | None = None
    to_version: int | None = None
    bytes: int = 0
    download_s: float = 0.0  # download + sha256 + decode + prepare, all before the pause
    decode_s: float = 0.0
    prepare_s: float = 0.0  # the worker's plan (dws_prepare calls): checks, ctx decodes, residuals, offsets
    pause_s: float = 0.0  # pause -> resume, as the gateway sees it
    apply_s: float = 0.0  # the apply round trip inside the pause
    worker_apply_s: float = 0.0  # of which the worker's own validate + write + read-back
    control_s: float = 0.0  # pause_s - worker_apply_s: the control plane's share of the pause
    changed: int = 0
    verify_s: float | None = None  # the after-resume digest (worker time)
    verify_window_s: float | None = None  # resume -> verdict: how long an undetected wrong weight could be served
    verified: bool | None = None
    ok: bool = False
    error: str | None = None


class ReplicaHealth(_Open):
    """`GET /health` of a replica: 200 only when vLLM is ready."""

    status: str
    vllm: str
    served_version: int | None = None
    synced: bool = False


class ReplicaStatus(_Open):
    """`GET /status` of a replica (the fields other Spaces and tools rely on; a replica may report more)."""

    model: str
    bucket: str
    vllm: str
    served_version: int | None = None
    served_digest: str | None = None
    digest_match: bool | None = None
    latest_version: int | None = None
    latest_digest: str | None = None
    lag: int | None = None
    syncs: int = 0
    failures: int = 0
    resyncs_from_anchor: int = 0
    requests: int = 0
    failed_requests: int = 0
    last_sync: SyncRecord | None = None
    recent_syncs: list[SyncRecord] = Field(default_factory=list)
    #: version (a JSON key, so a string) -> the digest this replica measured of the weights it served at it
    verified_versions: dict[str, str] = Field(default_factory=dict)

    def verified(self) -> dict[int, str]:
        return {int(v): d for v, d in self.verified_versions.items()}


class TaskInfo(_Open):
    """One entry of the env Space's `GET /v1/tasks`."""

    name: str
    description: str = ""
    answer_format: str = ""
    max_turns: int = 1
    num_prompts: int = 0


class PromptOut(_Open):
    """One prompt of `GET /v1/tasks/{task}/prompts`."""

    prompt_id: str
    prompt: str


class ScoreItem(BaseModel):
    """One completion to score: against a known prompt id, or a prompt given as text."""

    prompt_id: str | None = None
    prompt: str | None = None
    completion: str


class ScoreRequest(BaseModel):
    """`POST /v1/score`."""

    task: str
    items: list[ScoreItem]
    detail: bool = False


class ScoreResponse(_Open):
    """`POST /v1/score`'s answer: one reward per item, in request order."""

    task: str
    rewards: list[float]

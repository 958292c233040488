"""dws protocol library, shared by the trainer and rollout Spaces (docs/design.md §2-3).

One module per concern:
    bucket/     where files live (local folder or hf://buckets/…), atomic writes, retries
    codec       sparse encodings of one tensor's change (a registry: raw = TRL layout, compact, …)
    formats     anchor and delta safetensors files (and TRL's delta-sync layout)
    digest      the weights digest proving bit-exactness
    manifest    manifest.json, the commit point
    parts       part files: one version stored as row slices, one file per trainer rank
    publisher   trainer side: snapshot -> diff -> encode -> upload -> commit, in the background
    sharded     trainer side under FSDP2: each rank publishes its own rows as a part, rank 0 commits
    lease       owner.json: one publisher per bucket
    follower    replica side: plan the shortest verified path, fetch + sha256, decode, apply to dicts
    verify      `dws verify`: replay and prove a whole bucket
    wire        the typed contract between services (version tag, replica /status, env scoring)
    envvars     configuration from environment variables, parsed strictly
    proc        child-process hygiene (process groups, parent-death signal, /health wait)
    errors      the exception types callers catch
    cli         the `dws` console script: `inspect`, `verify`, and the commands registered as entry points

Import the submodules directly (`from shared.publisher import Publisher`); this package imports nothing heavy. It
names no Space and no tool (tests/shared/test_cli.py checks): they depend on it, never the other way round.
"""

__version__ = "0.1.0"

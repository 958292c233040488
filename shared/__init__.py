"""dws protocol library, shared by the three Spaces (docs/design.md §2-3).

One module per concern:
    bucket/     where files live (local folder or hf://buckets/…), atomic writes, retries
    codec       sparse encodings of one tensor's change (raw = TRL layout, compact = Rice gaps + bit residuals)
    formats     anchor and delta safetensors files (and TRL's delta-sync layout)
    digest      the weights digest proving bit-exactness
    manifest    manifest.json, the commit point
    publisher   trainer side: snapshot -> diff -> encode -> upload -> commit, in the background
    follower    replica side: plan the shortest verified path, fetch + sha256, decode, apply to dicts
    verify      `dws verify`: replay and prove a whole bucket
    cli         the `dws` console script

Import the submodules directly (`from shared.publisher import Publisher`); this package imports nothing heavy so
that the env Space, which has no torch, can still run `dws`.
"""

__version__ = "0.1.0"

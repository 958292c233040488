"""Versions in parts, at the protocol level (no processes): the digest does not depend on the partition, part files
are ordinary safetensors files with their slice in the header, followers apply parts bit-exactly, old single-file
manifests (legacy digest, no `digest` field) still read, and hostile manifests or part headers are refused with a
clear error before anything is applied."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open

from shared.bucket import open_bucket
from shared.cli import main as cli_main
from shared.digest import DigestBuilder, ElementSum, combine, weights_digest
from shared.errors import DwsError, FormatError
from shared.follower import Follower
from shared.formats import TensorChange, bits, encode_delta, write_anchor
from shared.manifest import (
    MANIFEST_PATH,
    FileEntry,
    Manifest,
    ModelIdentity,
    PartEntry,
    TensorSpec,
    anchor_path,
    delta_path,
    part_path,
    read_manifest,
    sha256_file,
    write_manifest,
)
from shared.parts import add_metadata, encode_anchor_part, part_info, part_metadata, rows_of
from shared.publisher import Publisher
from shared.verify import verify_bucket


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(37, 8, generator=g).bfloat16(), "norm.weight": torch.randn(5, generator=g).bfloat16(),
            "proj.weight": torch.randn(3, 4, 2, generator=g).bfloat16(), "scale": torch.tensor(0.5).bfloat16(),
            "empty.weight": torch.zeros(0, 4).bfloat16()}


def step(state, frac, seed):
    """A new version: `frac` of the elements changed (by a bf16 ulp-sized nudge, like an optimizer step)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in state.items():
        t = t.clone()
        if t.numel():
            mask = torch.rand(t.shape, generator=g) < frac
            t[mask] = (t[mask].float() * 1.01 + 1e-3).bfloat16()
        out[k] = t
    return out


def rows(t: torch.Tensor, r: tuple[int, int]) -> torch.Tensor:
    return t[r[0]:r[1]] if t.dim() else t


def publish_in_parts(bucket_dir, states: list[dict], count: int, *, encoding: str = "compact") -> Manifest:
    """What `count` ranks of a ShardedPublisher store, done in one process: v0 an anchor in parts, then deltas in
    parts, each rank's rows diffed against its own previous rows."""
    bucket = open_bucket(bucket_dir, create=True)
    shapes = {k: tuple(t.shape) for k, t in states[0].items()}
    identity = ModelIdentity(tensors={k: TensorSpec(shape=s) for k, s in sorted(shapes.items())})
    anchors, deltas = [], []
    for v, st in enumerate(states):
        entry = store_in_parts(bucket_dir, st, None if v == 0 else states[v - 1], version=v, count=count,
                               encoding=encoding)
        (anchors if v == 0 else deltas).append(entry)
        m = Manifest(model=identity, latest=v, latest_digest=entry.digest, digest="xsum64", anchors=tuple(anchors),
                     deltas=tuple(deltas))
        write_manifest(bucket, m)
    return m


def store_in_parts(bucket_dir, state: dict, prev: dict | None, *, version: int, count: int,
                   encoding: str = "compact") -> FileEntry:
    """Store one version as `count` part files, as `count` ranks would (an anchor in parts when `prev` is None, else
    a delta on `version - 1`, each rank's rows diffed against its own previous rows); returns the manifest entry,
    not yet committed."""
    bucket = open_bucket(bucket_dir, create=True)
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    parts = []
    for k in range(count):
        mine = {n: rows(t, rows_of(shapes[n], k, count)) for n, t in state.items()
                if rows_of(shapes[n], k, count)[1] > rows_of(shapes[n], k, count)[0]}
        if prev is None:
            blob = encode_anchor_part(mine, version=version, shapes=shapes, index=k, count=count)
        else:
            changes, total = {}, 0
            for n, cur in mine.items():
                before = rows(prev[n], rows_of(shapes[n], k, count))
                cb, pb = bits(cur).reshape(-1), bits(before).reshape(-1)
                pos = np.flatnonzero(cb != pb)
                total += cur.numel()
                if pos.size:
                    changes[n] = TensorChange(tuple(cur.shape), pos, cb[pos], pb[pos], base=pb)
            blob = add_metadata(encode_delta(changes, version=version, base=version - 1, total=total,
                                             encoding=encoding), part_metadata(shapes, k, count))
        path = part_path(version, k, count, anchor=prev is None)
        bucket.write_bytes(path, blob)
        parts.append(PartEntry(index=k, path=path, bytes=len(blob), sha256=sha256_file(bucket_dir / path)))
    return FileEntry(version=version, bytes=sum(p.bytes for p in parts), digest=weights_digest(state),
                     base=None if prev is None else version - 1, layout="dim0-chunks", parts=tuple(parts))


# ----------------------------------------------------------------------------------------------------- digest
@pytest.mark.parametrize("seed", range(4))
def test_digest_is_the_same_for_every_partition(seed):
    rnd = random.Random(seed)
    st = step(model(seed), 0.3, seed)
    want = weights_digest(st)
    shapes = {k: tuple(t.shape) for k, t in st.items()}
    count = rnd.randint(1, 6)
    sums = []
    for k in range(count):  # each "rank" hashes its own rows in its own order
        b = DigestBuilder()
        names = list(st)
        rnd.shuffle(names)
        for n in names:
            r = rows_of(shapes[n], k, count)
            if r[1] > r[0]:
                t = rows(st[n], r)
                b.update_rows(n, shapes[n], r[0], t.reshape(1) if t.dim() == 0 else t)
        sums.append(b.partial_sum)
    assert combine(shapes, sums) == want
    # Any other weights digest differently: one element of one tensor nudged by one ulp, or two elements swapped.
    other = {k: t.clone() for k, t in st.items()}
    bits(other["emb.weight"]).reshape(-1)[rnd.randrange(37 * 8)] ^= 1
    assert weights_digest(other) != want
    swapped = {k: t.clone() for k, t in st.items()}
    flat = bits(swapped["emb.weight"]).reshape(-1)
    flat[[0, 1]] = flat[[1, 0]]
    assert (flat[0] == flat[1]) or weights_digest(swapped) != want
    # A missing tensor, even an empty one, changes it.
    assert weights_digest({k: t for k, t in st.items() if k != "empty.weight"}) != want


def test_digest_of_a_large_tensor_hashed_in_threaded_blocks_is_partition_independent():
    """Beyond 8 Mi elements a tensor is hashed in 4 Mi-element blocks on several threads; slices that cut those
    blocks anywhere still combine to the same digest, and the blocks do not hash as if they were one another."""
    x = torch.randn(3000, 4096).bfloat16()
    want = weights_digest({"x": x})
    a, b = DigestBuilder(), DigestBuilder()
    a.update_rows("x", x.shape, 0, x[:1234])
    b.update_rows("x", x.shape, 1234, x[1234:])
    assert combine({"x": x.shape}, [a.partial_sum, b.partial_sum]) == want
    rolled = torch.roll(x.reshape(-1), 1 << 22).reshape(x.shape)  # the same blocks in another order
    assert weights_digest({"x": rolled}) != want


def test_digest_follows_changes_in_o_changed():
    a = model(1)
    b = step(a, 0.05, 2)
    es = ElementSum(DigestBuilder().partial_sum)
    builder = DigestBuilder()
    for n, t in a.items():
        builder.update(n, t)
    es = ElementSum(builder.partial_sum)
    for n in a:
        pa, pb = bits(a[n]).reshape(-1), bits(b[n]).reshape(-1)
        pos = np.flatnonzero(pa != pb)
        es.replace(n, a[n].shape, pos, pa[pos], pb[pos])
    assert es.digest({n: t.shape for n, t in a.items()}) == weights_digest(b)


def test_legacy_digest_is_todays_xxh3_128_definition():
    st = model(3)
    h = xxhash.xxh3_128()
    for n in sorted(st):
        h.update(n.encode() + b"\0bfloat16\0" + json.dumps(list(st[n].shape)).encode() + b"\0")
        h.update(st[n].contiguous().view(torch.int16).numpy().tobytes())
    assert weights_digest(st, algorithm="xxh3_128") == "xxh3_128:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------------- files
def test_part_files_are_safetensors_with_their_slice_in_the_header(tmp_path):
    states = [model(0), step(model(0), 0.2, 1)]
    m = publish_in_parts(tmp_path / "b", states, 3)
    for e in (m.anchors[0], m.deltas[0]):
        for p in e.parts:
            path = tmp_path / "b" / p.path
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                keys = list(f.keys())
            assert meta["dws_parts"] == "3" and meta["dws_layout"] == "dim0-chunks" and keys
            info = part_info(path, shapes=m.model.shapes, index=p.index, count=3)
            assert info.slices["emb.weight"] == rows_of((37, 8), p.index, 3)
    # 37 rows in 3 parts: 13 + 13 + 11; the 0-d tensor and the 5-element norm are in parts 0 (and 1 for norm).
    assert part_info(tmp_path / "b" / m.anchors[0].parts[2].path).slices["emb.weight"] == (26, 37)
    assert "scale" not in part_info(tmp_path / "b" / m.anchors[0].parts[1].path).slices


@pytest.mark.parametrize("count, encoding", [(1, "compact"), (2, "compact"), (5, "compact"), (2, "raw"), (3, "ctx")])
def test_follower_applies_parts_bit_exact_from_every_point(tmp_path, monkeypatch, count, encoding):
    """ctx decodes against the base: for a part, the base is the part's own rows of each tensor (forced here: on
    these small synthetic steps compact would win every tensor)."""
    import shared.formats as formats

    monkeypatch.setitem(formats.FALLBACKS, encoding, ())
    states = [model(0)]
    for v in range(1, 5):
        states.append(step(states[-1], 0.1, v))
    publish_in_parts(tmp_path / "b", states, count, encoding=encoding)
    for start in [None, 0, 2, 3]:
        st = {} if start is None else {k: t.clone() for k, t in states[start].items()}
        assert Follower(tmp_path / "b", download_workers=3).sync_state(st, start) == 4
        assert same(st, states[4])
    assert verify_bucket(str(tmp_path / "b")).ok
    # fetch() hands a replica one verified file per part, in order, tagged with version, part and rows.
    f = Follower(tmp_path / "b")
    files = f.fetch(f.plan(2))
    assert [(vf.version, vf.part, vf.parts) for vf in files] == [(v, k, count) for v in (3, 4) for k in range(count)]
    assert [vf.last_part for vf in files].count(True) == 2
    assert files[-1].slices["emb.weight"] == rows_of((37, 8), count - 1, count)


def test_dws_inspect_and_verify_read_parts(tmp_path, capsys):
    publish_in_parts(tmp_path / "b", [model(0), step(model(0), 0.2, 1)], 2)
    assert cli_main(["verify", str(tmp_path / "b")]) == 0
    assert "in 2 parts" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "b" / part_path(1, 1, 2, anchor=False)), "--json", "--tensors",
                     "--manifest", str(tmp_path / "b" / MANIFEST_PATH)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["part"] == "1 of 2 (dim0-chunks)" and out["per_tensor"]["emb.weight"]["rows"] == [19, 37]


# ----------------------------------------------------------------------------------------------------- old buckets
def test_old_single_file_manifest_with_the_legacy_digest_still_reads(tmp_path):
    """A bucket as written before parts: no `digest` field, xxh3_128 digests, single files. Followers, verify and
    a new publisher continuing it all work; the new versions carry the new digest."""
    b = tmp_path / "old"
    bucket = open_bucket(b, create=True)
    s0, s1 = model(0), step(model(0), 0.1, 1)
    size = write_anchor(s0, b / "a.tmp", version=0)
    bucket.upload(b / "a.tmp", anchor_path(0))
    pos = {n: np.flatnonzero(bits(s0[n]).reshape(-1) != bits(s1[n]).reshape(-1)) for n in s0}
    blob = encode_delta({n: TensorChange(tuple(s0[n].shape), p, bits(s1[n]).reshape(-1)[p], bits(s0[n]).reshape(-1)[p])
                         for n, p in pos.items()}, version=1, base=0, total=sum(t.numel() for t in s0.values()),
                        encoding="raw")
    bucket.write_bytes(delta_path(1), blob)
    d0, d1 = weights_digest(s0, algorithm="xxh3_128"), weights_digest(s1, algorithm="xxh3_128")
    raw = {"format": "dws-manifest", "format_version": 1,
           "model": {"name": "old", "tensors": {n: {"shape": list(t.shape), "dtype": "bfloat16"} for n, t in s0.items()}},
           "latest": 1, "latest_digest": d1,
           "anchors": [{"version": 0, "path": anchor_path(0), "bytes": size, "sha256": sha256_file(b / anchor_path(0)),
                        "digest": d0}],
           "deltas": [{"version": 1, "path": delta_path(1), "bytes": len(blob), "sha256": sha256_file(b / delta_path(1)),
                       "digest": d1, "base": 0, "changed": 10, "encoding": "raw"}]}
    bucket.write_bytes(MANIFEST_PATH, json.dumps(raw).encode())
    m = read_manifest(bucket)
    assert m.digest == "xxh3_128"
    st = {}
    assert Follower(b).sync_state(st, None) == 1 and same(st, s1)
    assert verify_bucket(str(b)).ok
    s2 = step(s1, 0.1, 2)
    with Publisher(b, run_id="new", lease_settle_s=0) as pub:
        pub.publish(s2, 2)
    m = read_manifest(bucket)
    assert m.digest == "xsum64" and m.latest_digest == weights_digest(s2) and m.delta(2).base == 1
    assert verify_bucket(str(b)).ok


# ----------------------------------------------------------------------------------------------------- hostile
def _manifest_json(tmp_path, count=2):
    publish_in_parts(tmp_path / "b", [model(0), step(model(0), 0.2, 1)], count)
    return json.loads((tmp_path / "b" / MANIFEST_PATH).read_text())


@pytest.mark.parametrize("how, message", [
    ("unsafe path", "must not contain empty, ... or .... segments"),
    ("other version's file", "must be stored at"),
    ("part listed twice", "listed once each"),
    ("missing part", "listed once each|must be stored at"),
    ("bytes do not add up", "sum of its parts"),
    ("path and parts", "no path/sha256 of its own"),
    ("same file in two entries", "must be stored at|listed twice"),
])
def test_hostile_manifests_are_refused_before_anything_is_fetched(tmp_path, how, message):
    raw = _manifest_json(tmp_path)
    d = raw["deltas"][0]
    if how == "unsafe path":
        d["parts"][1]["path"] = "deltas/../../../etc/passwd"
    elif how == "other version's file":
        d["parts"][1]["path"] = raw["anchors"][0]["parts"][1]["path"].replace("anchors", "deltas")
    elif how == "part listed twice":
        d["parts"][1] = dict(d["parts"][0])
    elif how == "missing part":
        d["parts"] = [d["parts"][0], {**d["parts"][1], "index": 2}]
    elif how == "bytes do not add up":
        d["bytes"] += 1
    elif how == "path and parts":
        d["path"] = delta_path(1)
    elif how == "same file in two entries":
        raw["anchors"][0]["parts"][0]["path"] = d["parts"][0]["path"]
    with pytest.raises(FormatError, match=message):
        Manifest.from_bytes(json.dumps(raw).encode())
    (tmp_path / "b" / MANIFEST_PATH).write_text(json.dumps(raw))
    st = {}
    with pytest.raises(DwsError):
        Follower(tmp_path / "b").sync_state(st, None)
    assert st == {}
    assert cli_main(["verify", str(tmp_path / "b")]) == 1  # one clear line, no traceback


def _rewrite_part(bucket_dir, m_raw, entry_kind, index, mutate):
    """Replace one stored part with a hostile one and list its new sha256, as a malicious publisher could."""
    entry = m_raw[entry_kind][0]
    p = entry["parts"][index]
    path = bucket_dir / p["path"]
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    mutate(header["__metadata__"], header)
    hdr = json.dumps(header).encode()
    hdr += b" " * (-len(hdr) % 8)
    path.write_bytes(len(hdr).to_bytes(8, "little") + hdr + blob[8 + n:])
    entry["bytes"] += path.stat().st_size - p["bytes"]
    p["bytes"] = path.stat().st_size
    p["sha256"] = sha256_file(path)
    (bucket_dir / MANIFEST_PATH).write_text(json.dumps(m_raw))


def _overlap(meta, header):
    s = json.loads(meta["dws_slices"])
    s["emb.weight"]["rows"] = [0, 19]  # part 1 claims part 0's rows
    meta["dws_slices"] = json.dumps(s)


def _missing(meta, header):
    s = json.loads(meta["dws_slices"])
    del s["norm.weight"]
    meta["dws_slices"] = json.dumps(s)


def _wrong_index(meta, header):
    meta["dws_part"] = "0"


def _wrong_shape(meta, header):
    s = json.loads(meta["dws_slices"])
    s["emb.weight"]["shape"] = [38, 8]
    meta["dws_slices"] = json.dumps(s)


@pytest.mark.parametrize("kind", ["deltas", "anchors"])
@pytest.mark.parametrize("mutate, message", [(_overlap, "overlapping or missing"), (_missing, "missing slices"),
                                             (_wrong_index, "manifest lists it as part 1"),
                                             (_wrong_shape, "overlapping or missing|has shape")])
def test_hostile_part_headers_are_refused_before_anything_is_applied(tmp_path, kind, mutate, message):
    raw = _manifest_json(tmp_path)
    _rewrite_part(tmp_path / "b", raw, kind, 1, mutate)
    base = model(0)
    f = Follower(tmp_path / "b")
    with pytest.raises(FormatError, match=message):
        f.fetch(f.plan(None))
    # A replica at v0 needs the bad delta; a new one needs the bad anchor: each keeps what it had.
    start = 0 if kind == "deltas" else None
    st = {k: t.clone() for k, t in base.items()} if start == 0 else {}
    with pytest.raises(FormatError, match=message):
        f.sync_state(st, start)
    assert same(st, base) if start == 0 else st == {}
    if kind == "anchors":  # the delta path from v0 does not touch the bad anchor
        st = {k: t.clone() for k, t in base.items()}
        assert f.sync_state(st, 0) == 1
    res = verify_bucket(str(tmp_path / "b"))
    assert not res.ok and res.first_bad == (1 if kind == "deltas" else 0)


def test_a_bad_later_part_rolls_back_the_earlier_parts_of_the_version(tmp_path):
    """Part 0 applies, part 1 decodes to garbage (its header is fine, its data is not): the version is undone."""
    raw = _manifest_json(tmp_path)
    path = tmp_path / "b" / raw["deltas"][0]["parts"][1]["path"]
    blob = bytearray(path.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    info = json.loads(header["__metadata__"]["tensors"])
    name = sorted(info)[0]
    info[name]["shape"] = [1]  # the stored slice no longer matches its rows
    header["__metadata__"]["tensors"] = json.dumps(info)
    _rewrite_part(tmp_path / "b", raw, "deltas", 1, lambda meta, h: meta.update(tensors=json.dumps(info)))
    base = model(0)
    st = {k: t.clone() for k, t in base.items()}
    f = Follower(tmp_path / "b")
    m = f.manifest()
    with pytest.raises(FormatError):
        f.apply_plan(st, f.plan(0, manifest=m), m)  # no retry from the anchor: only the undo can restore v0
    assert same(st, base)

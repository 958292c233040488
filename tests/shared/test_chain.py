"""Publisher -> bucket -> follower with real AdamW steps on the tiny model: bit-exact at every version from every
starting point, damaged files detected and recovered from, crashes leave a consistent bucket."""

from __future__ import annotations

import json
import random

from dws_testing import TinyTrainer

import pytest
import torch

from shared.bucket import open_bucket
from shared.digest import weights_digest
from shared.errors import (ChainError, FormatError, IntegrityError, ModelMismatchError, NonFiniteWeightsError,
                           PublishError)
from shared.follower import Follower
from shared.manifest import MANIFEST_PATH, Manifest, read_manifest
from shared.lease import OWNER_PATH
from shared.publisher import Publisher
from shared.verify import verify_bucket


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


@pytest.mark.parametrize("encoding, seed", [("compact", 0), ("raw", 1), ("compact", 2)])
def test_follower_from_every_point_is_bit_exact_at_every_version(tiny_model_dir, tmp_path, encoding, seed):
    rnd = random.Random(seed)
    trainer = TinyTrainer(tiny_model_dir, lr=rnd.choice([3e-6, 1e-5, 1e-4]), seed=seed)
    pub = Publisher(tmp_path / "b", encoding=encoding, anchor_every=rnd.randint(2, 5),
                    anchor_fraction=rnd.choice([0.05, 0.5, 10.0]), keep_anchors=100)
    states: dict[int, dict] = {}
    version = 0
    for _ in range(9):
        pub.publish(trainer.params(), version)
        pub.flush()
        states[version] = trainer.bf16()
        assert pub.reports[-1].digest == weights_digest(states[version])
        for start in [None, *states]:  # every replica position, including a brand-new one
            follower = Follower(tmp_path / "b")
            st = {} if start is None else {k: v.clone() for k, v in states[start].items()}
            reached = follower.sync_state(st, start)
            assert reached == version
            assert same(st, states[version]), f"follower from v{start} is not bit-exact at v{version}"
        trainer.step(rnd.randint(1, 3))  # any number of optimizer steps between publishes
        version += rnd.randint(1, 4)     # versions may skip
    m = read_manifest(open_bucket(tmp_path / "b"))
    assert m.anchors and m.deltas and all(d.encoding == encoding for d in m.deltas)
    assert verify_bucket(str(tmp_path / "b")).ok


@pytest.fixture
def history(tiny_model_dir, tmp_path):
    """v0..v9 with anchors at 0, 4, 8 (anchor_every=4), every state kept for comparison."""
    trainer = TinyTrainer(tiny_model_dir, lr=1e-5)
    pub = Publisher(tmp_path / "b", anchor_every=4, anchor_fraction=100.0, keep_anchors=10)
    states = {}
    for v in range(10):
        pub.publish(trainer.params(), v)
        states[v] = trainer.bf16()
        trainer.step()
    pub.flush()
    m = read_manifest(open_bucket(tmp_path / "b"))
    assert [a.version for a in m.anchors] == [0, 4, 8]
    return tmp_path / "b", states, trainer, pub


def _damage(bucket, path, how):
    p = bucket / path
    if how == "corrupt":
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[:-7])
    else:
        p.unlink()


@pytest.mark.parametrize("how", ["corrupt", "truncate", "delete"])
def test_damaged_delta_is_detected_and_recovered_from_the_next_anchor(history, how):
    bucket, states, _, _ = history
    _damage(bucket, "deltas/v00000006.safetensors", how)
    st = {k: v.clone() for k, v in states[5].items()}
    follower = Follower(bucket)
    with pytest.raises(IntegrityError) as info:
        follower.fetch(follower.plan(5))
    assert info.value.version == 6
    # sync_state falls back to the newest anchor (v8), which does not need the damaged v6.
    assert follower.sync_state(st, 5) == 9 and same(st, states[9])
    res = verify_bucket(str(bucket))
    assert not res.ok and res.first_bad == 6


def test_damaged_delta_after_newest_anchor_leaves_state_at_last_good_version(history):
    bucket, states, _, _ = history
    _damage(bucket, "deltas/v00000009.safetensors", "corrupt")
    st = {k: v.clone() for k, v in states[7].items()}
    with pytest.raises(IntegrityError):
        Follower(bucket).sync_state(st, 7)
    assert same(st, states[7]), "nothing may be applied when a file of the plan is bad"


def test_digest_mismatch_is_reported_and_recovered(history):
    bucket, states, _, _ = history
    m = json.loads((bucket / MANIFEST_PATH).read_text())
    for d in m["deltas"]:
        if d["version"] == 2:
            d["digest"] = "xxh3_128:" + "0" * 32
    (bucket / MANIFEST_PATH).write_text(json.dumps(m))
    st = {k: v.clone() for k, v in states[1].items()}
    assert Follower(bucket).sync_state(st, 1) == 9 and same(st, states[9])  # recovered through anchor v8
    assert verify_bucket(str(bucket)).first_bad == 2


def test_new_replica_takes_newest_anchor_and_old_one_takes_deltas(history):
    bucket, _, _, _ = history
    f = Follower(bucket)
    assert [s.version for s in f.plan(None).steps] == [8, 9] and f.plan(None).from_anchor
    assert [s.version for s in f.plan(7).steps] == [8, 9] and not f.plan(7).from_anchor
    assert f.plan(9).steps == ()


class FlakyBucket:
    """Wraps a real bucket; fails the manifest write once, as a trainer killed between upload and commit would."""

    def __init__(self, inner):
        self.inner, self.fail_manifest = inner, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_bytes(self, path, data):
        if path == MANIFEST_PATH and self.fail_manifest:
            self.fail_manifest = False
            raise ConnectionError("killed before the commit")
        return self.inner.write_bytes(path, data)


def test_crash_between_upload_and_manifest_leaves_a_consistent_bucket(history, tmp_path):
    bucket_dir, states, trainer, pub = history
    from shared.bucket import Bucket

    Bucket.register(FlakyBucket)
    flaky = FlakyBucket(open_bucket(bucket_dir))
    pub2 = Publisher(flaky)
    trainer.step()
    pub2.publish(trainer.params(), 10)
    with pytest.raises(PublishError, match="killed before the commit"):
        pub2.flush()
    assert (bucket_dir / "deltas/v00000010.safetensors").exists(), "the file was stored..."
    m = read_manifest(open_bucket(bucket_dir))
    assert m.latest == 9 and "deltas/v00000010.safetensors" not in m.paths, "...but never committed"
    assert verify_bucket(str(bucket_dir)).ok
    st = {}
    assert Follower(bucket_dir).sync_state(st, None) == 9 and same(st, states[9])
    # A restarted trainer continues the history from the manifest.
    pub3 = Publisher(bucket_dir)
    assert pub3.latest_version == 9
    pub3.publish(trainer.params(), 10)
    pub3.flush()
    assert pub3.reports[-1].kinds == ("delta",) and pub3.reports[-1].base == 9
    st = {k: v.clone() for k, v in states[9].items()}
    assert Follower(bucket_dir).sync_state(st, 9) == 10 and same(st, trainer.bf16())


def test_refuses_nan_and_inf_and_writes_nothing(history):
    bucket_dir, _, trainer, _ = history
    before = {p.name: p.read_bytes() for p in bucket_dir.rglob("*") if p.is_file()}
    pub = Publisher(bucket_dir)
    for bad in (float("nan"), float("inf"), 3.4e38):  # 3.4e38 is finite in fp32, inf in bf16
        params = {k: v.detach().clone() for k, v in trainer.params().items()}
        params["model.norm.weight"][3] = bad
        with pytest.raises(NonFiniteWeightsError, match="model.norm.weight"):
            pub.publish(params, 10)
    pub.flush()
    assert {p.name: p.read_bytes() for p in bucket_dir.rglob("*") if p.is_file()} == before


def test_version_order_and_model_identity_are_enforced(history):
    bucket_dir, _, trainer, _ = history
    pub = Publisher(bucket_dir)
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(trainer.params(), 9)
    params = trainer.params()
    params.pop("model.norm.weight")
    with pytest.raises(ModelMismatchError, match="model.norm.weight"):
        pub.publish(params, 10)


def test_retention_keeps_last_anchors_and_deletes_only_after_commit(tiny_model_dir, tmp_path):
    trainer = TinyTrainer(tiny_model_dir)
    pub = Publisher(tmp_path / "b", anchor_every=3, keep_anchors=2, anchor_fraction=100.0)
    for v in range(12):
        pub.publish(trainer.params(), v)
        trainer.step()
    pub.flush()
    bucket = open_bucket(tmp_path / "b")
    m = read_manifest(bucket)
    assert [a.version for a in m.anchors] == [6, 9]
    assert [d.version for d in m.deltas] == [7, 8, 9, 10, 11]
    stored = {e.path for e in bucket.list()} - {MANIFEST_PATH, OWNER_PATH}  # owner.json: the publisher's lease
    assert stored == m.paths, "retired files are deleted, kept ones are all there"
    assert verify_bucket(str(tmp_path / "b")).ok


def test_adaptive_anchor_when_deltas_add_up(tiny_model_dir, tmp_path):
    trainer = TinyTrainer(tiny_model_dir, lr=1e-3)  # dense updates: big deltas
    pub = Publisher(tmp_path / "b", anchor_every=100, anchor_fraction=0.3)
    for v in range(6):
        pub.publish(trainer.params(), v)
        trainer.step()
    pub.flush()
    kinds = [r.kinds for r in pub.reports]
    assert sum("anchor" in k for k in kinds) >= 3, kinds  # far more often than every 100 versions


@pytest.mark.parametrize("path", ["../outside.safetensors", "/etc/passwd", "deltas/../../x", "weights/v1.bin"])
def test_hostile_manifest_paths_are_rejected(history, path):
    bucket_dir, _, _, _ = history
    m = json.loads((bucket_dir / MANIFEST_PATH).read_text())
    m["deltas"][-1]["path"] = path
    (bucket_dir / MANIFEST_PATH).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="invalid"):
        Follower(bucket_dir).manifest()


def test_manifest_roundtrip_and_consistency_rules(history):
    bucket_dir, _, _, _ = history
    m = read_manifest(open_bucket(bucket_dir))
    assert Manifest.from_bytes(m.to_bytes()) == m
    bad = json.loads(m.to_bytes())
    bad["latest"] = 42
    with pytest.raises(FormatError, match="latest"):
        Manifest.from_bytes(json.dumps(bad).encode())


def test_empty_bucket_is_a_clear_error(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(ChainError, match="no manifest"):
        Follower(tmp_path / "b").sync_state({}, None)


def test_restart_on_a_bucket_with_a_broken_latest_delta_publishes_an_anchor(history):
    bucket_dir, states, trainer, _ = history
    _damage(bucket_dir, "deltas/v00000009.safetensors", "corrupt")
    pub = Publisher(bucket_dir)
    trainer.step()
    pub.publish(trainer.params(), 10)
    pub.flush()
    assert pub.reports[-1].kinds == ("anchor",), "history it cannot reproduce is not diffed against"
    st = {}
    assert Follower(bucket_dir).sync_state(st, None) == 10 and same(st, trainer.bf16())

"""Anchor/delta files: ordinary safetensors, TRL's layout read too, hostile files rejected with FormatError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from shared.errors import FormatError
from shared.follower import apply_to_state
from shared.formats import TensorChange, encode_delta, read_patch_file, write_anchor


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": (torch.randn(8, 4, generator=g) * 0.02).bfloat16(),
            "b.bias": (torch.randn(5, generator=g) * 0.02).bfloat16()}


def test_anchor_is_an_ordinary_checkpoint(tmp_path):
    st = _state()
    write_anchor(st, tmp_path / "a.safetensors", version=3)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["a.weight", "b.bias"]
        assert f.metadata()["format"] == "pt"
        assert torch.equal(f.get_tensor("a.weight"), st["a.weight"])
    pf = read_patch_file(tmp_path / "a.safetensors")
    assert (pf.kind, pf.version) == ("anchor", 3)


@pytest.mark.parametrize("encoding", ["raw", "compact"])
def test_delta_lists_with_safe_open_and_says_what_it_is(tmp_path, encoding):
    st = _state()
    b = st["a.weight"].view(torch.int16).numpy().view(np.uint16).reshape(-1)
    pos = np.array([0, 5, 31])
    path = tmp_path / "d.safetensors"
    path.write_bytes(encode_delta({"a.weight": TensorChange((8, 4), pos, b[pos] + 1, b[pos])}, version=4, base=3,
                                  total=37, encoding=encoding))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys())
    assert meta["format"] == "dws-delta" and meta["encoding"] == encoding
    assert (meta["version"], meta["base"], meta["changed"], meta["total"]) == ("4", "3", "3", "37")
    if encoding == "raw":  # it is TRL's layout too
        assert meta["sparse"] == "True" and meta["model_version"] == "4"
        assert json.loads(meta["changed_params"]) == ["a.weight"]
        with safe_open(str(path), framework="pt") as f:
            assert f.get_tensor("a.weight.indices").dtype == torch.int32
            assert f.get_tensor("a.weight.values").dtype == torch.bfloat16


def test_reads_trl_delta_sync_layout(tmp_path):
    """A file as TRL's delta-sync branch writes it: {name}.indices int32, {name}.values bf16, sparse header."""
    st = _state()
    new = {k: v.clone() for k, v in st.items()}
    flat = new["a.weight"].view(-1)
    idx = torch.tensor([1, 2, 30], dtype=torch.int32)
    flat[idx.long()] = torch.tensor([0.5, -0.25, 1e-3]).bfloat16()
    blob = save({"a.weight.indices": idx, "a.weight.values": flat[idx.long()].clone()},
                metadata={"sparse": "True", "model_version": "12", "changed_params": json.dumps(["a.weight"])})
    path = tmp_path / "trl.safetensors"
    path.write_bytes(blob)
    with pytest.raises(FormatError, match="shapes"):
        read_patch_file(path)
    pf = read_patch_file(path, shapes={k: tuple(v.shape) for k, v in st.items()}, base=11)
    assert (pf.kind, pf.version, pf.base) == ("delta", 12, 11)
    apply_to_state(st, pf)
    assert all(torch.equal(st[k], new[k]) for k in st)


def test_reads_trl_anchor(tmp_path):
    st = _state()
    save_file(st, str(tmp_path / "anchor.safetensors"), metadata={"sparse": "False", "model_version": "20"})
    pf = read_patch_file(tmp_path / "anchor.safetensors")
    assert (pf.kind, pf.version) == ("anchor", 20)


@pytest.mark.parametrize("content, match", [
    (b"", "truncated"),
    ((10**12).to_bytes(8, "little") + b"{}", "larger than"),
    ((5).to_bytes(8, "little") + b"{nope", "not valid JSON"),
])
def test_hostile_files_are_rejected(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=match):
        read_patch_file(path)


def test_out_of_range_raw_indices_rejected(tmp_path):
    blob = save({"a.weight.indices": torch.tensor([0, 32], dtype=torch.int32),
                 "a.weight.values": torch.zeros(2, dtype=torch.bfloat16)},
                metadata={"format": "dws-delta", "dws_kind": "delta", "encoding": "raw", "version": "2", "base": "1",
                          "tensors": json.dumps({"a.weight": {"shape": [8, 4], "params": {}}})})
    (tmp_path / "d.safetensors").write_bytes(blob)
    with pytest.raises(FormatError, match="out of range"):
        read_patch_file(tmp_path / "d.safetensors")


def test_delta_base_must_be_older(tmp_path):
    (tmp_path / "d.safetensors").write_bytes(encode_delta({}, version=3, base=3, total=1))
    with pytest.raises(FormatError, match="not older"):
        read_patch_file(tmp_path / "d.safetensors")


def test_apply_validates_before_writing(tmp_path):
    st = _state()
    before = {k: v.clone() for k, v in st.items()}
    b = st["a.weight"].view(torch.int16).numpy().view(np.uint16).reshape(-1)
    changes = {"a.weight": TensorChange((8, 4), np.array([0]), b[[0]] + 1, b[[0]]),
               "zzz.unknown": TensorChange((2,), np.array([1]), np.array([7], np.uint16), np.array([0], np.uint16))}
    (tmp_path / "d.safetensors").write_bytes(encode_delta(changes, version=1, base=0, total=39))
    with pytest.raises(FormatError, match="zzz.unknown"):
        apply_to_state(st, read_patch_file(tmp_path / "d.safetensors"))
    assert all(torch.equal(st[k], before[k]) for k in st), "a rejected patch must leave every tensor untouched"


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b'{"__metadata__": [1]}', b'{"__metadata__": {"version": 3}}'])
def test_a_header_that_is_not_an_object_with_string_metadata_is_a_format_error(tmp_path, header):
    """The one header reader (also behind part files) refuses what safetensors' JSON could hold but a header cannot."""
    from shared.parts import is_part_file

    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(FormatError, match="not a JSON object"):
        read_patch_file(path)
    assert is_part_file(path) is False


@pytest.mark.parametrize("encoding", ["raw", "compact", "ctx", "trl"])
def test_a_decoded_delta_is_freed_with_its_last_reference_not_by_the_garbage_collector(tmp_path, encoding):
    """Nothing the reader builds is a reference cycle: a decoded delta's arrays (the codec's recycled buffers among
    them) go back the moment the caller drops it. One that waited for the collector's next run made the next
    delta decode into fresh pages (0.6B: up to 30 k page faults per decode)."""
    import gc
    import weakref

    from shared import codec_buffers
    from shared.formats import DeltaReader, bits, resolve_context

    g = torch.Generator().manual_seed(1)
    old = (torch.randn(512, 1024, generator=g) * 0.02).bfloat16()
    new = (old.float() + torch.randn(old.shape, generator=g) * 2e-4).bfloat16()
    ob, nb = bits(old).reshape(-1), bits(new).reshape(-1)
    path = tmp_path / "d.safetensors"
    if encoding == "trl":
        pos = np.flatnonzero(ob != nb)
        path.write_bytes(save({"w.indices": torch.from_numpy(pos), "w.values": new.reshape(-1)[pos].contiguous()},
                              metadata={"sparse": "True", "model_version": "2"}))
    else:
        from shared.formats import diff_state

        path.write_bytes(encode_delta(diff_state({"w": new}, {"w": old}, encoding=encoding), version=2, base=1,
                                      total=ob.size, encoding=encoding))

    def decode():
        pf = read_patch_file(path, shapes={"w": tuple(old.shape)})
        return resolve_context(pf, {"w": ob})

    was = gc.isenabled()
    gc.disable()  # only reference counts free anything below
    try:
        pf = decode()
        dec = pf.tensors["w"]
        assert np.array_equal(dec.positions, np.flatnonzero(ob != nb))  # really decoded: the arrays exist
        gone = weakref.ref(pf)
        del pf, dec
        assert gone() is None
        held = codec_buffers.RECYCLER.held_bytes
        decode()  # dropped at once: its buffers come back for the next
        decode()
        assert codec_buffers.RECYCLER.held_bytes == held
        with DeltaReader(path, shapes={"w": tuple(old.shape)}) as r:
            gone = weakref.ref(r)
            assert [n for n, _ in r] == ["w"]
        del r
        assert gone() is None
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("encoding", ["raw", "compact", "ctx"])
def test_the_same_delta_is_written_byte_for_byte_the_same(tmp_path, encoding):
    """A delta encoded twice is the same file (safetensors' own serializer ordered the header metadata differently
    on every call: the same version had a different sha256 each time it was written), readable by safetensors
    itself, every tensor starting on a multiple of its item size; an anchor likewise."""
    import hashlib

    from shared.formats import diff_state

    g = torch.Generator().manual_seed(3)
    old = {"a.weight": (torch.randn(64, 32, generator=g) * 0.02).bfloat16(),
           "b.bias": (torch.randn(40, generator=g) * 0.02).bfloat16()}
    new = {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).bfloat16() for k, v in old.items()}
    blobs = [encode_delta(diff_state(new, old, encoding=encoding), version=2, base=1, total=64 * 32 + 40,
                          encoding=encoding) for _ in range(4)]
    assert len({hashlib.sha256(b).hexdigest() for b in blobs}) == 1
    path = tmp_path / "d.safetensors"
    path.write_bytes(blobs[0])
    n = int.from_bytes(blobs[0][:8], "little")
    header = json.loads(blobs[0][8:8 + n])
    assert n % 8 == 0 and next(iter(header)) == "__metadata__"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == header["__metadata__"] and sorted(f.keys()) == sorted(k for k in header if k != "__metadata__")
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            t = f.get_tensor(key)
            assert entry["data_offsets"][0] % t.element_size() == 0 and list(t.shape) == entry["shape"]
    st = {k: v.clone() for k, v in old.items()}
    apply_to_state(st, read_patch_file(path))
    assert all(torch.equal(st[k], new[k]) for k in st)
    anchors = [tmp_path / f"a{i}.safetensors" for i in range(3)]
    for a in anchors:
        write_anchor(new, a, version=2)
    assert len({a.read_bytes() for a in anchors}) == 1
    with safe_open(str(anchors[0]), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), new[k]) for k in new) and f.metadata()["dws_kind"] == "anchor"


def test_stfile_writes_every_dtype_safetensors_reads_and_refuses_what_it_cannot_store(tmp_path):
    from safetensors.numpy import load_file

    from shared import stfile

    arrays = {"empty": np.zeros(0, np.int64), "flags": np.array([True, False]), "big": np.arange(5, dtype=">i4"),
              "strided": np.arange(12, dtype=np.int16)[::3], "f": np.linspace(0, 1, 7, dtype=np.float32),
              "scalar": np.array(2.5, np.float64), "grid": np.arange(6, dtype=np.uint32).reshape(2, 3)}
    path = tmp_path / "x.safetensors"
    stfile.write(arrays, path, metadata={"z": "1", "a": "2"})
    assert path.read_bytes() == stfile.to_bytes(arrays, metadata={"z": "1", "a": "2"})
    back = load_file(str(path))
    assert all(np.array_equal(back[k], v) and back[k].shape == v.shape for k, v in arrays.items())
    assert back["big"].dtype == np.int32  # stored little-endian
    raw = path.read_bytes()
    assert list(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]) == ["z", "a"]  # as given
    with pytest.raises(TypeError, match="no safetensors dtype"):
        stfile.to_bytes({"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="uint16 bit patterns"):
        stfile.to_bytes({"v": np.zeros(2, np.int32)}, bf16=frozenset({"v"}))
    with pytest.raises(TypeError, match="strings to strings"):
        stfile.to_bytes({"v": np.zeros(2, np.int32)}, metadata={"n": 1})

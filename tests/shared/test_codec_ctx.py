"""Codec v2 (`ctx`): decoding needs the exact base, mixed-encoding files say which tensor uses what, a wrong base is
refused or caught by the digest (never silently applied), and files of the older encodings still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors import safe_open

from shared.codec import ContextTensor, bf16_bits, get_encoding
from shared.digest import weights_digest
from shared.errors import DigestMismatch, FormatError
from shared.follower import Follower, apply_to_state
from shared.formats import TensorChange, diff_state, encode_delta, read_patch_file, resolve_context
from shared.manifest import read_manifest
from shared.bucket import open_bucket
from shared.publisher import Publisher

FIXTURES = Path(__file__).parent / "fixtures"
# The host decode paths (`_BaseClasses.walk_max`, `.walk_split_min`): one walk of the whole tensor that counts its
# classes, the same in two halves (only the first counted beforehand), histogram + chunked walks.
WALKS = [(1 << 30, 1 << 30), (1 << 30, 1), (0, 1)]


def _weights(numel: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return bf16_bits((torch.randn(numel, generator=g) * 0.02).bfloat16())


def _step(base: np.ndarray, lr: float, seed: int) -> np.ndarray:
    """What one optimizer step does to bf16 weights: every fp32 master weight moves by ~lr."""
    g = torch.Generator().manual_seed(seed)
    master = torch.from_numpy(base.view(np.int16)).view(torch.bfloat16).float()
    return bf16_bits((master + torch.randn(base.size, generator=g) * lr).bfloat16())


def _change(base: np.ndarray, new: np.ndarray, shape) -> TensorChange:
    pos = np.flatnonzero(base != new)
    return TensorChange(tuple(shape), pos, new[pos], base[pos], base=base)


@pytest.mark.parametrize("held,pooled", [(128, True), (129, False)])
def test_exponent_tails_of_at_most_numel_over_512_elements_share_a_class(held, pooled):
    """The pooling rule (the header records its bounds): a tail of exponents holding at most max(64, numel / 512)
    elements is pooled into its neighbour class; one element more and it keeps a class of its own."""
    numel = 1 << 16  # tail: 128 elements
    base = np.full(numel, 0x3C00 | 5, np.uint16)  # exponent 120 ...
    base[:held] = 0x3200  # ... but `held` elements at exponent 100, below every other
    base[-50:] = 0x4000  # and 50 at exponent 128: always pooled
    new = base.copy()
    new[::7] += 1
    for detect in (False, True):  # the encoder's own count, and the detection's ranks
        ch = TensorChange.between((numel,), new, base, encoding="ctx") if detect else _change(base, new, (numel,))
        out = get_encoding("ctx").encode(ch.positions, ch.new_bits, ch.base_bits, numel, base_context=ch.base)
        assert out.params["p"] == ([120, 120] if pooled else [100, 120])


def test_ctx_beats_compact_where_small_weights_change_more():
    base = _weights(400_000, 0)
    new = _step(base, 3e-6, 1)
    ch = _change(base, new, (400_000,))
    sizes = {}
    for name in ("compact", "ctx"):
        out = get_encoding(name).encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
        sizes[name] = sum(a.nbytes for a in out.arrays.values())
    assert sizes["ctx"] < 0.85 * sizes["compact"], sizes


def test_base_context_as_torch_tensor_decodes_the_same():
    base = _weights(50_000, 2)
    new = _step(base, 1e-5, 3)
    ch = _change(base, new, (50_000,))
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size,
                     base_context=torch.from_numpy(base.view(np.int16)).view(torch.bfloat16))
    for ctx in (base, torch.from_numpy(base.view(np.int16)), torch.from_numpy(base.view(np.int16)).view(torch.bfloat16)):
        dec = enc.decode(out.arrays, out.params, base.size, base_context=ctx)
        assert np.array_equal(dec.positions, ch.positions)
        assert np.array_equal(dec.resolve(base[dec.positions]), ch.new_bits)


@pytest.mark.parametrize("walk_max,split_min", WALKS)
def test_ctx_refuses_to_decode_without_or_against_a_wrong_base(monkeypatch, walk_max, split_min):
    """On every decode path: the walks that count the classes as they go, and the chunked one that counts first."""
    from shared import codec

    monkeypatch.setattr(codec._BaseClasses, "walk_max", walk_max)
    monkeypatch.setattr(codec._BaseClasses, "walk_split_min", split_min)
    base = _weights(20_000, 4)
    new = _step(base, 3e-6, 5)
    ch = _change(base, new, (20_000,))
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    with pytest.raises(FormatError, match="base"):
        enc.decode(out.arrays, out.params, base.size)
    with pytest.raises(FormatError, match="elements"):
        enc.decode(out.arrays, out.params, base.size, base_context=base[:-1])
    other = _weights(20_000, 99)  # another model's weights: class sizes differ
    with pytest.raises(FormatError, match="does not fit this base"):
        enc.decode(out.arrays, out.params, base.size, base_context=other)
    # A base with the same class sizes in another order (rolled by one): the size checks pass, and the decode
    # must then not return the delta's positions (what it does return, the weights digest refuses after applying).
    shifted = np.roll(base, 1)
    try:
        dec = enc.decode(out.arrays, out.params, base.size, base_context=shifted)
    except FormatError as exc:
        assert "fit" in str(exc)
    else:
        assert not np.array_equal(dec.positions, ch.positions)


def test_ctx_rejects_inconsistent_parameters():
    base = _weights(5_000, 6)
    new = _step(base, 1e-5, 7)
    ch = _change(base, new, (5_000,))
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    with pytest.raises(FormatError):
        enc.decode({"": out.arrays[""][:-3]}, out.params, base.size, base_context=base)
    bad = json.loads(json.dumps(out.params))
    bad["c"][0][2] += 1
    with pytest.raises(FormatError):
        enc.decode(out.arrays, bad, base.size, base_context=base)
    with pytest.raises(FormatError):
        enc.decode(out.arrays, {"n": 1}, base.size, base_context=base)


def test_mixed_file_names_each_tensors_encoding_and_old_readers_refuse_it(tmp_path):
    big, tiny = _weights(60_000, 8), _weights(3, 9)
    big_new, tiny_new = _step(big, 3e-6, 10), tiny.copy()
    tiny_new[1] += 1
    changes = {"big.weight": _change(big, big_new, (60_000,)), "tiny.bias": _change(tiny, tiny_new, (3,)),
               "nobase.weight": TensorChange((3,), np.array([0]), tiny_new[:1] + 1, tiny_new[:1])}
    path = tmp_path / "d.safetensors"
    path.write_bytes(encode_delta(changes, version=5, base=4, total=60_006, encoding="ctx", verify=True))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    info = json.loads(meta["tensors"])
    assert meta["encoding"] == "ctx"
    assert "encoding" not in info["big.weight"]  # the file's own encoding
    assert info["tiny.bias"]["encoding"] == "compact"  # per-class tables outweigh 1 change
    assert info["nobase.weight"]["encoding"] == "compact"  # no base given: ctx cannot code it
    pf = read_patch_file(path)
    assert pf.encoding == "ctx" and pf.changed == sum(c.positions.size for c in changes.values())
    assert isinstance(pf.tensors["big.weight"], ContextTensor)
    with pytest.raises(FormatError, match="no base weights"):
        resolve_context(pf, {})
    resolve_context(pf, {"big.weight": big}, workers=2)
    dec = pf.tensors["big.weight"]
    rebuilt = big.copy()
    rebuilt[dec.positions] = dec.resolve(big[dec.positions])
    assert np.array_equal(rebuilt, big_new)
    # A reader from before codec v2 knows only raw/compact: it must refuse the file, not misread it.
    from shared import codec

    saved = codec.ENCODINGS.pop("ctx")
    try:
        with pytest.raises(FormatError, match="unknown delta encoding 'ctx'"):
            read_patch_file(path)
    finally:
        codec.ENCODINGS["ctx"] = saved


def _fixture_states():
    a = {"a.weight": torch.from_numpy(_weights(64, 11).view(np.int16)).view(torch.bfloat16).reshape(8, 8),
         "b.bias": torch.from_numpy(_weights(5, 12).view(np.int16)).view(torch.bfloat16)}
    b = {k: torch.from_numpy(_step(bf16_bits(v).reshape(-1), 3e-4, 13).view(np.int16)).view(torch.bfloat16)
         .reshape(v.shape) for k, v in a.items()}
    return a, b


def test_compact_file_written_before_codec_v2_still_applies():
    """tests/shared/fixtures/compact-v1.safetensors was written by the single-encoding writer (encoding="compact"):
    no per-tensor encoding entries. It must keep decoding bit-exactly onto its base."""
    base, want = _fixture_states()
    path = FIXTURES / "compact-v1.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["encoding"] == "compact"
    assert all("encoding" not in e for e in json.loads(meta["tensors"]).values())
    pf = read_patch_file(path)
    state = {k: v.clone() for k, v in base.items()}
    apply_to_state(state, pf)
    assert weights_digest(state) == weights_digest(want)


def _tiny_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed.weight": (torch.randn(256, 64, generator=g) * 0.02),
            "model.layers.0.mlp.weight": (torch.randn(128, 64, generator=g) * 0.02),
            "model.norm.weight": torch.ones(64)}


def _adam_like(state, lr, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g).sign() * lr for k, v in state.items()}


def _publish_history(root, n=5, lr=3e-5):
    fp32 = _tiny_state()
    states = {}
    with Publisher(root, encoding="ctx", anchor_every=100, anchor_fraction=100.0, keep_anchors=10) as pub:
        for v in range(n):
            pub.publish(fp32, v)
            pub.flush()
            states[v] = {k: t.bfloat16() for k, t in fp32.items()}
            fp32 = _adam_like(fp32, lr, v)
    return states


def test_follower_applies_ctx_deltas_bit_exactly(tmp_path):
    states = _publish_history(tmp_path / "b")
    m = read_manifest(open_bucket(tmp_path / "b"))
    assert [d.encoding for d in m.deltas] == ["ctx"] * 4
    for start in (None, 0, 2):
        st = {} if start is None else {k: v.clone() for k, v in states[start].items()}
        assert Follower(tmp_path / "b").sync_state(st, start) == 4
        assert weights_digest(st) == weights_digest(states[4])


def test_wrong_base_is_caught_never_silently_applied(tmp_path):
    states = _publish_history(tmp_path / "b", n=3)
    follower = Follower(tmp_path / "b")
    m = follower.manifest()
    wrong = {k: v.clone() for k, v in states[1].items()}
    # Nudge a handful of weights by one ulp: same exponent classes, so the decoder's size checks pass and the delta
    # decodes -- onto the wrong base. The digest must catch it.
    flat = bf16_bits(wrong["model.layers.0.mlp.weight"]).reshape(-1)
    flat[:5] += 1
    plan = follower.plan(1, manifest=m)
    with pytest.raises((DigestMismatch, FormatError)):
        follower._run_plan(wrong, plan, m, verify=True)
    # The public entry point recovers through the newest anchor and ends bit-exact.
    wrong = {k: v.clone() for k, v in states[1].items()}
    bf16_bits(wrong["model.layers.0.mlp.weight"]).reshape(-1)[:5] += 1
    assert follower.sync_state(wrong, 1) == 2
    assert weights_digest(wrong) == weights_digest(states[2])


def test_device_path_matches_host_path(monkeypatch):
    """The torch path (what a CUDA base takes) must produce the same bytes and decode the same as numpy's."""
    from shared import codec

    base = _weights(30_000, 21)
    new = _step(base, 3e-6, 22)
    ch = _change(base, new, (30_000,))
    enc = get_encoding("ctx")
    host = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    monkeypatch.setattr(codec._BaseClasses, "torch_on_cpu", True)
    tb = torch.from_numpy(base.view(np.int16)).view(torch.bfloat16)
    dev = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=tb)
    assert dev.params == host.params and np.array_equal(dev.arrays[""], host.arrays[""])
    dec = enc.decode(host.arrays, host.params, base.size, base_context=tb)
    assert np.array_equal(dec.positions, ch.positions)
    assert np.array_equal(dec.resolve(base[dec.positions]), ch.new_bits)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 4096])
def test_ranks_do_not_depend_on_how_the_host_path_cuts_the_tensor(monkeypatch, chunk):
    """The host path sorts chunks; the format must not notice: same bytes as one whole-tensor sort, same decode."""
    from shared import codec

    base = _weights(12_345, 31)
    base[:40] = 0x0001  # a pooled tail (subnormals), so pooled classes span chunks too
    new = _step(base, 3e-6, 32)
    new[:40] = base[:40] + 3
    ch = _change(base, new, (12_345,))
    enc = get_encoding("ctx")
    whole = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    monkeypatch.setattr(codec._BaseClasses, "chunk", chunk)
    cut = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    assert cut.params == whole.params and np.array_equal(cut.arrays[""], whole.arrays[""])
    # Every decode path: histogram + chunked walks (walk_max 0), and the walk that counts as it goes -- over the
    # whole tensor, or its first half counted beforehand (split_min 1).
    for walk_max, split_min in WALKS:
        monkeypatch.setattr(codec._BaseClasses, "walk_max", walk_max)
        monkeypatch.setattr(codec._BaseClasses, "walk_split_min", split_min)
        dec = enc.decode(whole.arrays, whole.params, base.size, base_context=base)
        assert np.array_equal(dec.positions, ch.positions)
        assert np.array_equal(dec.resolve(base[dec.positions]), ch.new_bits)


def test_tensor_of_one_exponent_class():
    """Norm weights start as exactly 1.0: one exponent, pooled bounds lo == hi."""
    base = np.full(3000, 0x3F80, np.uint16)
    new = base.copy()
    new[::7] += 1
    new[::11] -= 2
    ch = _change(base, new, (3000,))
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    assert out.params["p"][0] == out.params["p"][1]
    dec = enc.decode(out.arrays, out.params, base.size, base_context=base)
    assert np.array_equal(dec.positions, ch.positions)
    assert np.array_equal(dec.resolve(base[dec.positions]), ch.new_bits)


def _ctx_fixture_states():
    """The states tests/shared/fixtures/ctx-v1.safetensors was written from (by the numpy encoder, before the codec's
    passes were compiled): a pooled subnormal tail, pooled huge exponents, wide residuals (extra bits), classes in
    all three modes, and a one-class tensor that changed entirely."""
    g = torch.Generator().manual_seed(41)
    a = bf16_bits((torch.randn(6000, generator=g) * 0.02).bfloat16()).copy()
    a[:30] = np.arange(1, 31, dtype=np.uint16)
    a[30:40] = 0x7F7F
    na = bf16_bits(((torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
                     + torch.randn(6000, generator=g) * 3e-5)).bfloat16()).copy()
    na[100:140] = a[100:140] ^ np.uint16(0x0055)
    b = np.full(300, 0x3F80, np.uint16)
    nb = b + np.uint16(1)
    nb[::3] = b[::3] - np.uint16(1)
    return {"a.weight": (a, na, (60, 100)), "b.weight": (b, nb, (300,))}


def _pinned_arrays(f) -> tuple[dict, dict]:
    """A delta file's tensor params and arrays with every zstd bucket frame replaced by what it decompresses to:
    zstd may compress the same input differently in another library version, which changes no decoded value."""
    info = json.loads(f.metadata()["tensors"])
    arrays = {key: f.get_tensor(key) for key in f.keys()}
    for name, entry in info.items():
        p = entry["params"]
        if p.get("r") != "zstd":
            continue
        blob = arrays[name]
        a = sum(row[5] + row[6] for row in p["c"]) + (p["n"] + 7) // 8
        buckets = zstandard.ZstdDecompressor().decompress(blob[a: a + p["z"]].tobytes(), max_output_size=p["n"])
        arrays[name] = np.concatenate([blob[:a], np.frombuffer(buckets, np.uint8), blob[a + p["z"]:]])
        del p["z"]
    return info, arrays


@pytest.mark.parametrize("coder,fixture", [("range", "ctx-v1.safetensors"), ("zstd", "ctx-v2.safetensors")])
@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("detect", ["numpy", "diff_bits"])
def test_ctx_writer_still_writes_the_bytes_of_the_first_ctx_files(monkeypatch, tmp_path, chunk, detect, coder,
                                                                  fixture):
    """The compiled passes changed how ranks are found, not what is written: from the same states the writer
    produces tests/shared/fixtures/ctx-v1.safetensors (the first residual coder, range) and ctx-v2.safetensors
    (zstd, what `encode` writes now) byte for byte -- whether the encoder ranks the changes itself or the
    publisher's detection saw them first -- and both files apply bit-exactly. The one difference by design: a zstd
    tensor the detection encoded on the way (diff_bits) codes each class's ranks with the mode and Rice parameter
    its sample chose, so only its position streams and their row entries may differ from the fixture's."""
    from shared import codec

    monkeypatch.setattr(codec.ContextEncoding, "coder", coder)
    if chunk:
        monkeypatch.setattr(codec._BaseClasses, "chunk", chunk)
    changes = {}
    for name, (base, new, shape) in _ctx_fixture_states().items():
        if detect == "numpy":
            changes[name] = _change(base, new, shape)
        else:
            changes[name] = TensorChange.between(shape, new, base, encoding="ctx")
            assert changes[name].base.precoded is not None
    path = tmp_path / "d.safetensors"
    path.write_bytes(encode_delta(changes, version=3, base=2, total=6300, encoding="ctx", verify=True))
    # (safetensors orders header keys as it likes: compare the metadata and every stored array, not file bytes)
    with safe_open(str(path), framework="np") as ours, safe_open(str(FIXTURES / fixture), framework="np") as first:
        if coder == "range":
            assert ours.metadata() == first.metadata()
        assert {k: v for k, v in ours.metadata().items() if k != "tensors"} == \
            {k: v for k, v in first.metadata().items() if k != "tensors"}
        (info, arrays), (want_info, want_arrays) = _pinned_arrays(ours), _pinned_arrays(first)
        assert sorted(arrays) == sorted(want_arrays)
        if detect == "diff_bits" and coder == "zstd":
            for name, entry in want_info.items():
                got, want = info[name]["params"], entry["params"]
                if info[name].get("encoding") == entry.get("encoding") == "compact":
                    assert got == want
                    continue
                assert {k: got[k] for k in "nxpr"} == {k: want[k] for k in "nxpr"}
                assert [row[:3] for row in got["c"]] == [row[:3] for row in want["c"]]  # class, n_c, k_c
                skip, want_skip = (sum(r[5] + r[6] for r in p["c"]) for p in (got, want))  # the position streams
                assert np.array_equal(arrays[name][skip:], want_arrays[name][want_skip:]), name
            info, arrays = want_info, want_arrays  # (compared above)
        assert info == want_info
        for key, want in want_arrays.items():
            assert np.array_equal(arrays[key], want), key
    pf = resolve_context(read_patch_file(FIXTURES / fixture),
                         {name: base for name, (base, _, _) in _ctx_fixture_states().items()})
    for name, (base, new, _) in _ctx_fixture_states().items():
        dec = pf.tensors[name]
        rebuilt = base.copy()
        rebuilt[dec.positions] = dec.resolve(base[dec.positions])
        assert np.array_equal(rebuilt, new)


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 22])
@pytest.mark.parametrize("encoding", ["compact", "ctx"])
def test_diff_bits_finds_exactly_the_changes_across_chunks(monkeypatch, chunk, encoding):
    """The publisher's detection (one parallel read of both versions, chunk by chunk) returns what a plain numpy
    comparison does, and with ctx the tensor it encoded on the way holds the encoder's own classes and residual
    streams; only its position streams follow its own per-class modes and Rice parameters (a sample of the whole
    tensor here: within 2 % of the encoder's exact choices)."""
    from shared import codec

    monkeypatch.setattr(codec._BaseClasses, "chunk", chunk)
    base = _weights(20_011, 51)
    base[5:25] = np.arange(1, 21, dtype=np.uint16)  # a pooled tail
    new = _step(base, 1e-5, 52)
    new[-3:] = base[-3:] + 9  # changes in the last, partial block of 8 and chunk
    ch = TensorChange.between((20_011,), torch.from_numpy(new.view(np.int16)).view(torch.bfloat16), base,
                              encoding=encoding)
    want = np.flatnonzero(base != new)
    assert np.array_equal(ch.positions, want)
    assert np.array_equal(ch.new_bits, new[want]) and np.array_equal(ch.base_bits, base[want])
    enc = get_encoding("ctx")
    ours = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=ch.base)
    plain = enc.encode(want, new[want], base[want], base.size, base_context=base)
    if encoding == "compact":  # nothing coded on the way
        assert ours.params == plain.params and np.array_equal(ours.arrays[""], plain.arrays[""])
    else:
        got, exp = ours.params, plain.params
        assert {k: got[k] for k in "nxprz"} == {k: exp[k] for k in "nxprz"}
        assert [row[:3] for row in got["c"]] == [row[:3] for row in exp["c"]]  # class, n_c, k_c
        skip, exp_skip = (sum(r[5] + r[6] for r in p["c"]) for p in (got, exp))
        assert np.array_equal(ours.arrays[""][skip:], plain.arrays[""][exp_skip:])
        assert skip <= 1.02 * exp_skip + 8
        dec = enc.decode(ours.arrays, got, base.size, base_context=base)
        assert np.array_equal(dec.positions, want) and np.array_equal(dec.resolve(base[want]), new[want])
    assert TensorChange.between((4,), base[:4], base[:4], encoding=encoding) is None
    with pytest.raises(ValueError, match="cannot diff"):
        TensorChange.between((4,), base[:4], base[:5], encoding=encoding)



@pytest.mark.parametrize("encoding", ["compact", "ctx"])
def test_diff_bits_of_an_empty_tensor(encoding):
    empty = np.zeros(0, np.uint16)
    assert TensorChange.between((0, 4), empty, empty, encoding=encoding) is None


def test_warm_up_round_trips_every_position_coding_encoding():
    """codec.warm_up (what a process calls to load the compiled passes before its first publish or sync) detects,
    encodes and decodes with compact and both ctx paths, and raises on any inexact round trip."""
    from shared import codec

    assert codec.warm_up() >= 0.0


def test_diff_state_diffs_every_tensor_and_leaves_out_the_unchanged():
    old = {"a": _weights(5_000, 71), "b": _weights(300, 72), "same": _weights(10, 73)}
    new = {"a": _step(old["a"], 1e-5, 74), "b": _step(old["b"], 1e-5, 75), "same": old["same"].copy()}
    got = diff_state(new, old, encoding="ctx")
    assert sorted(got) == ["a", "b"]
    for name, ch in got.items():
        want = np.flatnonzero(old[name] != new[name])
        assert np.array_equal(ch.positions, want) and np.array_equal(ch.new_bits, new[name][want])
        assert ch.base.precoded is not None  # ctx: encoded on the way


# ------------------------------------------------------------------------------------- the residual coders (r)
def _round_trip(base: np.ndarray, new: np.ndarray) -> tuple[dict, dict]:
    ch = _change(base, new, (base.size,))
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    dec = enc.decode(out.arrays, out.params, base.size, base_context=base)
    assert np.array_equal(dec.positions, ch.positions)
    assert np.array_equal(dec.resolve(base[dec.positions]), ch.new_bits)
    return out.arrays, out.params


def test_both_fixtures_decode_with_the_default_writer_and_name_their_coder():
    """A reader whose writer codes zstd still reads files of the first coder (no "r" param: range)."""
    for fixture, coder in (("ctx-v1.safetensors", None), ("ctx-v2.safetensors", "zstd")):
        pf = read_patch_file(FIXTURES / fixture)
        assert json.loads(pf.metadata["tensors"])["a.weight"]["params"].get("r") == coder
        resolve_context(pf, {name: base for name, (base, _, _) in _ctx_fixture_states().items()})
        for name, (base, new, _) in _ctx_fixture_states().items():
            dec = pf.tensors[name]
            assert np.array_equal(dec.positions, np.flatnonzero(base != new))
            assert np.array_equal(dec.resolve(base[dec.positions]), new[dec.positions])


@pytest.mark.parametrize("coder", ["zstd", "range"])
def test_coder_round_trips_one_symbol_classes_many_classes_and_every_bucket(monkeypatch, coder):
    from shared import codec

    monkeypatch.setattr(codec.ContextEncoding, "coder", coder)
    # One class, every change the same symbol (+1 ulp): a one-symbol class, all buckets 0, all signs +.
    base = np.full(5000, 0x3F80, np.uint16)
    new = base.copy()
    new[::3] += 1
    _, params = _round_trip(base, new)
    assert len(params["c"]) == 1 and params.get("r", "range") == coder
    # One changed element only (a class of one symbol; 7 pad bits in the sign byte).
    new = base.copy()
    new[4321] -= 1
    _round_trip(base, new)
    # Many classes (exponents spread over ~100 binades) and residuals of every bucket, both signs, incl. +-32768.
    g = np.random.default_rng(5)
    base = (g.integers(0x0080, 0x7F00, 200_000) | (g.integers(0, 2, 200_000) << 15)).astype(np.uint16)
    mags = np.concatenate([[1, 2, 3, 4, 7, 8, 255, 256, 32767, 32768], 1 << g.integers(0, 16, 20_000)])
    mags = mags + g.integers(0, 2, mags.size) * (mags > 4)
    signs = np.where(g.integers(0, 2, mags.size) == 1, -1, 1)
    new = base.copy()
    at = g.choice(base.size, mags.size, replace=False)
    new[at] = (base[at].astype(np.int64) + signs * np.minimum(mags, 32768)).astype(np.uint16)
    _, params = _round_trip(base, new)
    assert len(params["c"]) > 50


def _zstd_tensor(seed: int = 61):
    base = _weights(30_000, seed)
    new = _step(base, 3e-6, seed + 1)
    new[:50] = base[:50] ^ np.uint16(0x00F0)  # wide residuals: an extra-bit stream
    ch = _change(base, new, (30_000,))
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=base)
    assert out.params["r"] == "zstd" and out.params["x"] > 0
    p = out.params
    signs_at = sum(row[5] + row[6] for row in p["c"])
    frame_at = signs_at + (p["n"] + 7) // 8
    return enc, base, ch, out, signs_at, frame_at


def _with(out, blob=None, **params):
    p = json.loads(json.dumps(out.params)) | params
    return {"": out.arrays[""] if blob is None else blob}, p


def test_zstd_coder_refuses_corrupt_or_truncated_streams():
    enc, base, ch, out, signs_at, frame_at = _zstd_tensor()
    blob, p = out.arrays[""], out.params
    frame_end = frame_at + p["z"]

    def refused(arrays, params, match):
        with pytest.raises(FormatError, match=match):
            enc.decode(arrays, params, base.size, base_context=base)

    # The frame cut short (the header's sizes follow it, or not): never a zstd traceback.
    cut = np.concatenate([blob[:frame_end - 5], blob[frame_end:]])
    refused(*_with(out, cut, z=p["z"] - 5), "bucket stream")
    refused(*_with(out, blob[:-1]), "payload")
    refused(*_with(out, z=p["z"] + 1), "payload")
    # A frame of the wrong number of buckets, and one with a bucket no residual has.
    for buckets, match in ((np.zeros(p["n"] - 1, np.uint8), "holds 29|buckets"),
                           (np.full(p["n"], 17, np.uint8), "bucket above 17")):
        frame = np.frombuffer(zstandard.ZstdCompressor(write_content_size=False).compress(buckets.tobytes()), np.uint8)
        refused(*_with(out, np.concatenate([blob[:frame_at], frame, blob[frame_end:]]), z=frame.size), match)
    # Extra bits that do not match the buckets: one byte short, one spare byte.
    refused(*_with(out, blob[:-1], x=p["x"] - 1), "extra-bit stream")
    refused(*_with(out, np.concatenate([blob, np.zeros(1, np.uint8)]), x=p["x"] + 1), "extra-bit stream")
    # Params that do not describe the coder's section.
    refused(*_with(out, r="huffman"), "unknown residual coder")
    refused(*_with(out, r=7), "unknown residual coder")
    refused({"": blob}, {k: v for k, v in p.items() if k != "z"}, "'z'")
    refused(*_with(out, c=[row + [2, 0] for row in p["c"]]), "entries")


def test_zstd_coder_corruption_is_refused_or_left_to_the_digest():
    """No checksum in the frame (the weights digest checks the applied result): a flipped byte of the coder's section
    raises a FormatError or decodes (then the digest judges it) -- never another exception; a flipped sign byte
    always decodes to other residuals."""
    enc, base, ch, out, signs_at, frame_at = _zstd_tensor()
    blob = out.arrays[""]

    def decode(i):
        bad = blob.copy()
        bad[i] ^= 0x5A
        return enc.decode({"": bad}, out.params, base.size, base_context=base)

    g = np.random.default_rng(3)
    for i in g.choice(np.arange(signs_at, frame_at), 20, replace=False):
        dec = decode(i)
        assert np.array_equal(dec.positions, ch.positions)
        assert not np.array_equal(dec.resolve(base[dec.positions]), ch.new_bits), i
    refused = 0
    for i in range(frame_at, frame_at + out.params["z"]):
        try:
            decode(i)
        except FormatError:
            refused += 1
    assert refused > 0  # zstd itself, or the bucket / extra-bit checks

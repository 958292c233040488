"""Unit tests of the replica's pieces that need no vLLM: the prepared-delta hand-off file, the typed update
description, and the checkpoint-coordinate arithmetic of a Placement (the views a loader makes at TP > 1 or for
transposed expert weights are built here with plain torch, exactly as a loader would)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rollout_space.patchmap import Placement, _contiguous_strides, _flat_alias
from rollout_space.prepared import PreparedReader, is_prepared, write_prepared
from rollout_space.updates import DwsUpdateInfo
from shared.errors import FormatError
from shared.formats import PatchFile
from shared.codec import DecodedTensor


def _pf(tensors, shapes, version=5, base=4):
    return PatchFile("delta", version, base, "raw", shapes, tensors, {})


def test_prepared_roundtrip_values_and_residuals_in_chunks(tmp_path):
    pos = np.array([0, 3, 7, 11], dtype=np.int64)
    vals = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    res = np.array([1, -1, 2, -300], dtype=np.int16)
    pf = _pf({"a": DecodedTensor(pos, values=vals), "b": DecodedTensor(pos, residual=res)},
             {"a": (3, 4), "b": (12,)})
    out = tmp_path / "p.safetensors"
    summary = write_prepared(pf, out, source="deltas/v00000005.safetensors")
    assert summary["changed"] == 8 and is_prepared(out) and not is_prepared(tmp_path / "missing")
    r = PreparedReader(out)
    assert (r.version, r.base) == (5, 4)
    assert r.tensors["a"].mode == "values" and r.tensors["b"].mode == "residual" and r.tensors["a"].shape == (3, 4)
    chunks = list(r.chunks("a", chunk=3))
    assert [c[0].tolist() for c in chunks] == [[0, 3, 7], [11]]
    assert torch.cat([c[1] for c in chunks]).numpy().view(np.uint16).tolist() == vals.tolist()
    assert torch.cat([c[1] for c in r.chunks("b")]).tolist() == res.tolist()


def test_prepared_refuses_nan_and_non_prepared_files(tmp_path):
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    with pytest.raises(FormatError, match="NaN"):
        write_prepared(_pf({"a": DecodedTensor(np.array([1]), values=nan)}, {"a": (4,)}), tmp_path / "x.st")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="not a dws prepared file"):
        PreparedReader(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("kw", [{"kind": "full"}, {"version": "3"}, {"path": ""}, {"verify": "yes"}])
def test_update_info_rejects(kw):
    with pytest.raises(ValueError):
        DwsUpdateInfo(**{"path": "/x", **kw})


def _placement(shape, src: torch.Tensor, dst: torch.Tensor) -> Placement:
    """What PatchMap._probe records for a loader that did ``dst.copy_(src)`` with ``src`` a view of the checkpoint
    tensor of ``shape``."""
    cs = _contiguous_strides(shape)
    dims = [None if z == 1 else next(j for j, c in enumerate(cs) if c == st and shape[j] > 1)
            for z, st in zip(src.shape, src.stride())]
    whole = tuple(src.shape) == shape and src.storage_offset() == 0 and src.is_contiguous() and dst.is_contiguous()
    return Placement("w", shape, _flat_alias(dst), tuple(src.shape), src.storage_offset(), tuple(src.stride()),
                     dst.storage_offset(), tuple(dst.stride()), tuple(dims), whole)


@pytest.mark.parametrize("layout", ["whole rows into a fused param", "TP column shard (dim 1)",
                                    "TP row shard (dim 0)", "transposed (expert weights)"])
def test_placement_maps_positions_like_the_loader_copies(layout):
    shape = (6, 8)
    ckpt = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)  # value == flat checkpoint position
    probe = torch.empty(shape)
    if layout == "whole rows into a fused param":
        param = torch.full((10, 8), -1.0)
        src, dst = probe, param[2:8]
    elif layout == "TP column shard (dim 1)":
        param = torch.full((6, 4), -1.0)
        src, dst = probe.narrow(1, 4, 4), param
    elif layout == "TP row shard (dim 0)":
        param = torch.full((3, 8), -1.0)
        src, dst = probe.narrow(0, 3, 3), param
    else:
        param = torch.full((8, 6), -1.0)
        src, dst = probe.t(), param
    pl = _placement(shape, src, dst)
    # the loader's real copy, from the real checkpoint tensor through the same view
    expected = param.clone()
    expected.as_strided(dst.shape, dst.stride(), dst.storage_offset()).copy_(
        ckpt.as_strided(src.shape, src.stride(), src.storage_offset()))
    positions = torch.arange(math.prod(shape))
    mask, off = pl.locate(positions)
    held = positions if mask is None else positions[mask]
    got = param.clone()
    got.view(-1)[off] = held.to(torch.float32)  # write "the position" at the located storage offsets
    assert torch.equal(got, expected)
    assert held.numel() == src.numel()  # exactly the elements this rank holds, each once


@pytest.mark.parametrize("extra", ["--port 9000", "--host=0.0.0.0", "--tensor-parallel-size 4", "-tp 2",
                                   "--worker-extension-cls x.Y"])
def test_vllm_args_cannot_override_what_the_replica_owns(extra, monkeypatch, capsys):
    from rollout_space.__main__ import parse_args

    monkeypatch.setenv("DWS_VLLM_ARGS", extra)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "m", "--bucket", "b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "DWS_VLLM_ARGS" in err and "may not set" in err and "Traceback" not in err


@pytest.mark.parametrize("var, value", [("DWS_POLL_INTERVAL", "fast"), ("DWS_UI", "flase"), ("PORT", "http"),
                                        ("DWS_TENSOR_PARALLEL_SIZE", "0"), ("DWS_MAX_N", "-3"),
                                        ("DWS_VERIFY", "sometimes")])
def test_a_bad_variable_is_a_one_line_error_naming_it(var, value, monkeypatch, capsys):
    from rollout_space.__main__ import parse_args

    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "m", "--bucket", "b"])
    assert exc.value.code == 2 and var in capsys.readouterr().err


def test_every_flag_names_its_variable_in_help(capsys):
    from rollout_space.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for var in ("DWS_MODEL", "DWS_BUCKET", "HOST", "PORT", "DWS_VLLM_PORT", "DWS_API_KEY", "DWS_POLL_INTERVAL",
                "DWS_VERIFY", "DWS_TENSOR_PARALLEL_SIZE", "DWS_CACHE_DIR", "DWS_GPU_MEMORY_UTILIZATION",
                "DWS_MAX_MODEL_LEN", "DWS_MAX_N", "DWS_SERVED_MODEL_NAME", "DWS_VLLM_ARGS", "DWS_VLLM_LOG", "DWS_UI"):
        assert f"[{var}]" in out, var


# ---- the gateway's SSE line splitter ------------------------------------------------------------------------------
def _split_sse(data: bytes, cuts: list[int]) -> list[bytes]:
    import asyncio

    from rollout_space.gateway import sse_lines

    async def chunks():
        edges = [0, *sorted(cuts), len(data)]
        for a, b in zip(edges, edges[1:]):
            yield data[a:b]

    async def collect():
        return [line async for line in sse_lines(chunks())]

    return asyncio.run(collect())


def test_sse_lines_cut_only_at_sse_line_ends_wherever_the_chunks_fall():
    """vLLM's JSON carries U+2028, U+2029, U+0085 and U+001C.. unescaped inside generated text; a splitter that cuts
    there (httpx's aiter_lines, str.splitlines) hands the client a data line that no longer parses."""
    text = '{"text":"a\u2028b\u2029c\x85d\x1ce\x0bf\x0cg"}'
    data = ("data: " + text + "\r\n\r\ndata: [DONE]\n\n: note\rlast").encode()
    want = [b"data: " + text.encode(), b"", b"data: [DONE]", b"", b": note", b"last"]
    assert _split_sse(data, []) == want
    for i in range(len(data) + 1):  # every single cut, the CRLF split across two chunks included
        assert _split_sse(data, [i]) == want, i
    assert _split_sse(data, list(range(len(data)))) == want  # one byte per chunk
    assert _split_sse(b"a\r", []) == [b"a"] and _split_sse(b"\r", []) == [b""] and _split_sse(b"", []) == []

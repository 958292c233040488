"""Fast checks of the dws plugin's decoding and validation (no engine)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from rollout_space.plugin import DwsUpdateInfo, PatchError, read_delta_file, resolve_decoder, validate_delta


@dataclass
class _Slice:
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


class FakeView:
    def __init__(self, tensors):
        self.t = tensors

    def __contains__(self, name):
        return name in self.t

    def __getitem__(self, name):
        return _Slice(tuple(self.t[name].shape), self.t[name])

    def gather(self, name, pos):
        return self.t[name].reshape(-1)[pos]


VIEW = FakeView({"a.weight": torch.zeros(4, 8, dtype=torch.bfloat16), "b.weight": torch.ones(8, dtype=torch.bfloat16)})


def test_valid_tuple_and_numpy_forms():
    bits = torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    out = validate_delta(VIEW, {
        "a.weight": (torch.tensor([0, 31]), torch.tensor([1.0, 2.0], dtype=torch.bfloat16)),
        "b.weight": (np.array([2, 5], dtype=np.int32), bits),
    })
    assert [n for n, _, _ in out] == ["a.weight", "b.weight"]
    assert out[1][1].dtype == torch.int64 and out[1][2].tolist() == [1.5, -2.0]


def test_residual_entries_resolve_against_served_base():
    class Residual:
        positions = np.array([1, 3], dtype=np.int64)
        values = None

        def resolve(self, base_bits):
            assert base_bits.dtype == np.uint16 and base_bits.tolist() == [0x3F80, 0x3F80]  # 1.0 in bf16
            return (base_bits + np.uint16(0x80)).astype(np.uint16)  # 1.0 -> 2.0

    out = validate_delta(VIEW, {"b.weight": Residual()})
    assert out[0][2].tolist() == [2.0, 2.0]


@pytest.mark.parametrize("entry, msg", [
    ((torch.tensor([32]), torch.tensor([1.0]).bfloat16()), "out of range"),
    ((torch.tensor([-1]), torch.tensor([1.0]).bfloat16()), "out of range"),
    ((torch.tensor([2, 1]), torch.tensor([1.0, 1.0]).bfloat16()), "sorted"),
    ((torch.tensor([1, 1]), torch.tensor([1.0, 1.0]).bfloat16()), "sorted"),
    ((torch.tensor([1]), torch.tensor([1.0])), "bfloat16"),
    ((torch.tensor([1.0]), torch.tensor([1.0]).bfloat16()), "int64"),
    ((torch.tensor([1, 2]), torch.tensor([1.0]).bfloat16()), "values"),
    ((torch.tensor([1]), torch.tensor([float("inf")]).bfloat16()), "NaN or Inf"),
    ((torch.tensor([1]),), "positions, values"),
])
def test_bad_entries(entry, msg):
    with pytest.raises(PatchError, match=msg):
        validate_delta(VIEW, {"a.weight": entry})


def test_unknown_name():
    with pytest.raises(PatchError, match="unknown tensor"):
        validate_delta(VIEW, {"c.weight": (torch.tensor([0]), torch.tensor([1.0]).bfloat16())})


def test_read_delta_file_roundtrip(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "d.safetensors"
    save_file({"a.weight.indices": torch.tensor([1, 2], dtype=torch.int32),
               "a.weight.values": torch.tensor([1.0, 2.0]).bfloat16()}, str(p))
    dec = read_delta_file(str(p))
    assert list(dec) == ["a.weight"] and dec["a.weight"][0].dtype == torch.int32
    save_file({"a.weight.indices": torch.tensor([1])}, str(p))
    with pytest.raises(PatchError):
        read_delta_file(str(p))
    assert resolve_decoder(None) is read_delta_file
    assert resolve_decoder("rollout_space.plugin:read_delta_file") is read_delta_file


@pytest.mark.parametrize("kw", [{"kind": "full"}, {"apply_mode": "fast"}, {"version": "3"}, {"path": ""}])
def test_update_info_rejects(kw):
    with pytest.raises(ValueError):
        DwsUpdateInfo(**{"path": "/x", **kw})

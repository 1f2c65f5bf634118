"""The stored-tensor layer: fused expert tensors split per expert, layouts, lazy per-expert reads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moepack.model.stored import (FusedSplit, Logical, RawTensor, Stored, StoredFormatError, apply_layout, decode,
                                  layout_shape, split_fused)


def _raw(path: Path, name: str, t: torch.Tensor) -> RawTensor:
    """The RawTensor of `t` saved alone in `path` (offset from the safetensors header)."""
    from moepack.model.checkpoint import read_safetensors_header

    save_file({name: t.contiguous()}, str(path))
    header, start = read_safetensors_header(path)
    a, b = header[name]["data_offsets"]
    dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
    return RawTensor(name, tuple(t.shape), dtype, path, start + a, b - a)


def test_layout_ops_and_shapes() -> None:
    t = torch.arange(24.0).reshape(2, 3, 4)  # (E, H, 2I) with 2I = 4
    assert torch.equal(apply_layout(t, ("even",)), t[..., ::2])
    assert torch.equal(apply_layout(t, ("odd", "T")), t[..., 1::2].transpose(-1, -2))
    assert torch.equal(apply_layout(t, ("half1",)), t[..., 2:])
    for ops in [("T",), ("even", "T"), ("half0",), ("half1", "T")]:
        assert layout_shape(tuple(t.shape), ops) == tuple(apply_layout(t, ops).shape)
    with pytest.raises(StoredFormatError):
        layout_shape((3, 5), ("even",))


def test_fused_split_reads_each_expert_lazily(tmp_path: Path) -> None:
    e, h, i = 3, 4, 2
    gate_up = torch.randn(e, h, 2 * i)  # (E, H, 2I), gate and up interleaved along the last axis
    raw = _raw(tmp_path / "w.safetensors", "layers.0.experts.gate_up_proj", gate_up)
    split = FusedSplit("layers.{bid}.experts.gate_up_proj",
                       (("layers.{bid}.experts.{xid}.gate_proj.weight", ("even", "T")),
                        ("layers.{bid}.experts.{xid}.up_proj.weight", ("odd", "T"))))
    logical = {raw.name: Logical(raw.name, raw.shape, raw.dtype, raw)}
    out = split_fused(logical, (split,), n_layers=1)
    assert raw.name not in out and len(out) == 2 * e
    for x in range(e):
        g = out[f"layers.0.experts.{x}.gate_proj.weight"]
        assert g.shape == (i, h)
        assert g.stored is not None and g.stored.parts[0].nbytes == raw.nbytes // e  # one expert's bytes
        assert torch.equal(decode(g.stored), gate_up[x, :, ::2].T)
        assert torch.equal(decode(out[f"layers.0.experts.{x}.up_proj.weight"].stored), gate_up[x, :, 1::2].T)


def test_entry_bounds_and_unknown_format(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "w.safetensors", "w", torch.zeros(2, 3))
    with pytest.raises(StoredFormatError):
        raw.entry(2)
    with pytest.raises(StoredFormatError, match="no decoder"):
        decode(Stored("nope", (raw,)))

"""The compressed checkpoint formats moepack reads as they ship: adapters (header entries + quantization_config →
logical float tensors, scale tensors consumed) and decoders (the read parts → the float tensor), registered in
`moepack.model.stored`.

    fp8                 DeepSeek-V3/R1, Kimi-K2, MiniMax-M2, GLM-4.5-FP8, Qwen3-FP8: e4m3 `weight` (R, C) + one
                        scale per block of `weight_block_size` (`weight_scale_inv`, (⌈R/b0⌉, ⌈C/b1⌉)); W = fp8 × scale
    compressed-tensors  Kimi-K2-Thinking's `pack-quantized` int4: `weight_packed` int32 (R, ⌈C/8⌉), eight unsigned
                        nibbles per word, lowest bits first, value = nibble − 8; `weight_scale` (R, ⌈C/g⌉) per
                        group of g columns; `weight_shape` (2,) = (R, C)
    mxfp4               gpt-oss's experts: `*_blocks` (.., R, G, 16) uint8, two E2M1 values per byte, low nibble
                        first; `*_scales` (.., R, G) uint8 E8M0 (2^(s−127)) per 32 values; decoded (.., R, 32·G),
                        then transposed to the bf16 checkpoint's (.., 32·G, R)

Every decoder computes in f32, where each of these products is exact or (fp8 × f32 scale) rounded once: there is
one correct answer, and a dequantized copy of the checkpoint holds the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from moepack.model.stored import (Logical, RawTensor, Stored, StoredFormatError, register_decoder, register_format,
                                  torch_dtype)

__all__ = ["SUPPORTED", "part_names", "E2M1_VALUES", "StackedRaw", "fused_parts"]

# quant_method values and what they are, for the message that refuses every other method.
SUPPORTED = ("fp8 (block-scaled e4m3)", "compressed-tensors (pack-quantized int4/int8, symmetric)", "mxfp4")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP8 = ("F8_E4M3", "F8_E5M2")


def _plain(r: RawTensor) -> Logical:
    return Logical(r.name, r.shape, r.dtype, r)


# The name suffixes of each format's parts after the logical tensor's name, in the order of `Stored.parts`.
_SUFFIXES = {"fp8_block": ("", "_scale_inv"), "int_pack": ("_packed", "_scale", "_shape")}


def part_names(name: str, stored: Stored) -> list[str] | None:
    """The checkpoint names of the stored parts of a logical tensor called `name` (FP8: name, name_scale_inv),
    when they can be written again as they are (a pruned checkpoint keeps the source's format); None for plain
    tensors and for fused slices that need a layout."""
    sfx = _SUFFIXES.get(stored.format)
    if sfx is None or stored.layout or not all(p.name.endswith(x) for p, x in zip(stored.parts, sfx)):
        return None
    return [name + x for x in sfx]





# ---- FP8 block-scaled ------------------------------------------------------------------------------------------
@register_format("fp8")
def fp8_tensors(raw: dict[str, RawTensor], q: dict[str, Any]) -> dict[str, Logical]:
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise StoredFormatError(f"quantization_config fp8 without a weight_block_size [rows, cols] ({block!r}): "
                                "moepack reads block-scaled FP8 (weight_scale_inv per block), as DeepSeek-V3 ships")
    out: dict[str, Logical] = {}
    for name, r in raw.items():
        if name.endswith(".weight_scale_inv"):
            if name[: -len("_scale_inv")] not in raw:
                raise StoredFormatError(f"{r.file}: scale {name!r} has no weight {name[:-len('_scale_inv')]!r}")
            continue
        scale = raw.get(name + "_scale_inv")
        if r.dtype not in _FP8:
            if scale is not None:
                raise StoredFormatError(f"{r.file}: {name} is {r.dtype} but has a weight_scale_inv beside it")
            out[name] = _plain(r)
            continue
        if scale is None:
            raise StoredFormatError(f"{r.file}: FP8 tensor {name!r} has no {name}_scale_inv; the checkpoint is "
                                    "incomplete (re-download the shard that holds it)")
        grid = tuple(math.ceil(n / b) for n, b in zip(r.shape, block))
        if len(r.shape) != 2 or scale.shape != grid:
            raise StoredFormatError(f"{r.file}: {name} {r.shape} with blocks {tuple(block)} needs a scale grid "
                                    f"{grid}; {name}_scale_inv is {scale.shape}")
        out[name] = Logical(name, r.shape, "F32", r, Stored("fp8_block", (r, scale), params=(("block", tuple(block)),)))
    return out


@register_decoder("fp8_block")
def fp8_block(parts: list, stored: Stored):  # -> torch.Tensor
    import torch

    w, scale = parts  # (R, C) e4m3, (⌈R/b0⌉, ⌈C/b1⌉) f32/bf16
    b0, b1 = stored.param("block")
    out = w.to(torch.float32)  # every e4m3 value is exact in f32
    s = scale.to(torch.float32)
    for i in range(s.shape[0]):  # one block row at a time: the only temporary is one (C,) row of scales
        out[i * b0:(i + 1) * b0].mul_(s[i].repeat_interleave(b1)[: out.shape[1]])
    return out


# ---- compressed-tensors pack-quantized int -----------------------------------------------------------------------
def _ct_weights_args(q: dict[str, Any]) -> dict[str, Any]:
    """The one weights scheme of a compressed-tensors config, checked to be what pack_quantized decodes here."""
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    schemes = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    fmts = {fmt} | {g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")}
    if fmts != {"pack-quantized"} or not schemes:
        raise StoredFormatError(f"compressed-tensors format {sorted(map(str, fmts))} is not one moepack reads; it "
                                "reads pack-quantized int weights (Kimi-K2-Thinking's)")
    if any(s != schemes[0] for s in schemes):
        raise StoredFormatError("compressed-tensors config_groups with different weight schemes; moepack reads one")
    w = schemes[0]
    ok = (w.get("type") == "int" and w.get("num_bits") in (4, 8) and w.get("symmetric") is True
          and w.get("strategy") in ("group", "channel") and (w.get("strategy") == "channel" or w.get("group_size")))
    if not ok:
        raise StoredFormatError(f"compressed-tensors weights {w} are not symmetric int4/int8 with group or channel "
                                "scales; moepack reads those (as Kimi-K2-Thinking ships)")
    return w


def _ct_columns(name: str, packed: RawTensor, scale: RawTensor, shape: RawTensor, bits: int, group: int | None) -> int:
    """C of a packed (R, ⌈C/per⌉) weight: from the header shapes when they fix it, else from `weight_shape`."""
    per = 32 // bits
    lo, hi = per * (packed.shape[1] - 1) + 1, per * packed.shape[1]
    if group:
        lo, hi = max(lo, group * (scale.shape[1] - 1) + 1), min(hi, group * scale.shape[1])
    if lo == hi:
        return hi
    rows, cols = (int(v) for v in shape.read().tolist())  # 2 integers: read only when the headers leave C open
    if rows != packed.shape[0] or not lo <= cols <= hi:
        raise StoredFormatError(f"{packed.file}: {name}_shape ({rows}, {cols}) disagrees with {name}_packed "
                                f"{packed.shape} and {name}_scale {scale.shape}")
    return cols


@register_format("compressed-tensors")
def compressed_tensors(raw: dict[str, RawTensor], q: dict[str, Any]) -> dict[str, Logical]:
    w = _ct_weights_args(q)
    bits = int(w["num_bits"])
    group = int(w["group_size"]) if w.get("strategy") == "group" else None
    parts = ("_packed", "_scale", "_shape")
    out: dict[str, Logical] = {}
    for name, r in raw.items():
        base = next((name[: -len(p)] for p in parts if name.endswith(".weight" + p)), None)
        if base is None:
            if name.endswith(".weight_zero_point"):
                raise StoredFormatError(f"{r.file}: {name}: asymmetric int weights (zero points); moepack reads "
                                        "symmetric ones")
            out[name] = _plain(r)
            continue
        if name != base + "_packed":
            continue
        missing = [base + p for p in parts if base + p not in raw]
        if missing:
            raise StoredFormatError(f"{r.file}: {name} has no {', '.join(missing)}; the checkpoint is incomplete")
        scale, shape = raw[base + "_scale"], raw[base + "_shape"]
        if r.dtype != "I32" or len(r.shape) != 2 or len(scale.shape) != 2 or scale.shape[0] != r.shape[0]:
            raise StoredFormatError(f"{r.file}: {name} {r.dtype} {r.shape} / {base}_scale {scale.shape} are not a "
                                    "pack-quantized int32 weight with per-row scales")
        cols = _ct_columns(base, r, scale, shape, bits, group)
        g = group or cols
        if scale.shape[1] != math.ceil(cols / g):
            raise StoredFormatError(f"{r.file}: {base}_scale {scale.shape} is not one scale per {g} of {cols} columns")
        stored = Stored("int_pack", (r, scale, shape), params=(("bits", bits), ("group", g), ("cols", cols)))
        out[base] = Logical(base, (r.shape[0], cols), "F32", r, stored)
    for name in raw:  # scales whose packed weight is absent would otherwise pass as unknown tensors
        if name.endswith((".weight_scale", ".weight_shape")) and name.rsplit("_", 1)[0] + "_packed" not in raw:
            raise StoredFormatError(f"{raw[name].file}: {name} has no {name.rsplit('_', 1)[0]}_packed")
    return out


@register_decoder("int_pack")
def int_pack(parts: list, stored: Stored):  # -> torch.Tensor
    import torch

    packed, scale, _ = parts  # (R, P) int32, (R, G) float, (2,) ints: the shape, already checked by the adapter
    bits, group, cols = stored.param("bits"), stored.param("group"), stored.param("cols")
    per, mask = 32 // bits, (1 << bits) - 1
    rows = packed.shape[0]
    q = torch.empty(rows, packed.shape[1], per, dtype=torch.int32)  # (R, P, per): word j's value i is column per·j+i
    for i in range(per):
        q[:, :, i] = (packed >> (bits * i)) & mask  # arithmetic shift: the mask drops the sign bits
    out = q.reshape(rows, -1)[:, :cols].to(torch.float32).sub_(1 << (bits - 1))  # (R, C) signed values
    s = scale.to(torch.float32)
    for j in range(s.shape[1]):
        out[:, j * group:(j + 1) * group].mul_(s[:, j:j + 1])
    return out


# ---- MXFP4 -----------------------------------------------------------------------------------------------------
_MX_LAYOUT = ("T",)  # the release stores (.., R, 32·G) with R the bf16 checkpoint's last axis


@register_format("mxfp4")
def mxfp4_tensors(raw: dict[str, RawTensor], q: dict[str, Any]) -> dict[str, Logical]:
    out: dict[str, Logical] = {}
    for name, r in raw.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in raw:
            continue
        if not name.endswith("_blocks"):
            out[name] = _plain(r)
            continue
        base = name[: -len("_blocks")]
        scale = raw.get(base + "_scales")
        if scale is None:
            raise StoredFormatError(f"{r.file}: {name} has no {base}_scales; the checkpoint is incomplete")
        if (r.dtype, scale.dtype) != ("U8", "U8") or len(r.shape) < 3 or r.shape[-1] != 16 \
                or scale.shape != r.shape[:-1]:
            raise StoredFormatError(f"{r.file}: {name} {r.dtype} {r.shape} / {base}_scales {scale.dtype} "
                                    f"{scale.shape} are not MXFP4 blocks (.., R, G, 16) with scales (.., R, G)")
        *lead, rows, g, _ = r.shape
        # bf16 holds every E2M1 value times a power of two exactly (the bf16 checkpoint's own dtype)
        out[base] = Logical(base, (*lead, 32 * g, rows), "BF16", r, Stored("mxfp4", (r, scale), layout=_MX_LAYOUT))
    return out


@register_decoder("mxfp4")
def mxfp4(parts: list, stored: Stored):  # -> torch.Tensor
    import torch

    blocks, scales = parts  # (.., R, G, 16) uint8, (.., R, G) uint8
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.float32)  # (.., R, G, 32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]  # low nibble first
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, scales.to(torch.int32).sub_(127).unsqueeze(-1).to(torch.float32))
    return out.reshape(*blocks.shape[:-2], -1)  # (.., R, 32·G); the layout's "T" gives (.., 32·G, R)


# ---- the way back: a pruned gpt-oss keeps its MXFP4 experts -----------------------------------------------------
@dataclass(frozen=True)
class StackedRaw:
    """Entries of one stored part stacked along a new first axis (the kept experts' `*_blocks` or `*_scales` of a
    pruned fused tensor): written as one tensor like a RawTensor, read one entry at a time."""

    name: str
    entries: tuple[RawTensor, ...]

    @property
    def dtype(self) -> str:
        return self.entries[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.entries), *self.entries[0].shape)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.entries)

    def read(self):  # -> torch.Tensor
        import torch

        out = torch.empty(self.shape, dtype=torch_dtype(self.dtype))  # (E, ..) as stored
        for i, p in enumerate(self.entries):
            out[i] = p.read()
        return out


class HasStored(Protocol):
    """What fused_parts reads of a checkpoint's TensorRef (moepack.model.checkpoint imports this module)."""

    stored: Stored | None


def fused_parts(name: str, ops: Sequence[tuple[str, ...]], members: Sequence[Sequence[HasStored]]
                ) -> list[tuple[str, StackedRaw]] | None:
    """The MXFP4 parts (`name`_blocks, `name`_scales) of stacked tensor `name` (gpt-oss's experts.gate_up_proj,
    experts.down_proj) from its per-expert tensors `members[e][j]`, each cut with the split's `ops[j]`: when every
    expert's members are the cuts of one whole stored entry, the entries stacked are the tensor as the release
    stores it. None when any member is not such a slice (then the caller writes the decoded tensor)."""
    per_part: list[list[RawTensor]] = [[], []]
    for refs in members:
        first = getattr(refs[0], "stored", None) if refs else None
        if first is None or len(refs) != len(ops):
            return None
        for r, o in zip(refs, ops):
            s = getattr(r, "stored", None)
            if s is None or s.format != "mxfp4" or s.parts != first.parts or s.layout != _MX_LAYOUT + tuple(o):
                return None
        for acc, p in zip(per_part, first.parts):
            acc.append(p)
    if not members:
        return None
    return [(name + sfx, StackedRaw(name + sfx, tuple(ps))) for sfx, ps in zip(("_blocks", "_scales"), per_part)]

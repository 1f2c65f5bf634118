"""How a checkpoint tensor is stored when it is not one plain float tensor of its own name and shape.

Two things make a tensor "stored": its layer's experts may be fused into one 3-D tensor (gpt-oss, Llama 4: every
expert's gate and up in `experts.gate_up_proj`), and its values may be kept in a compressed format (FP8 with block
scales, MXFP4, INT4 packs) with scale tensors beside them. moepack's stages see neither: the reader turns each into
per-expert, float `TensorRef`s whose `stored` field says how to make the values, and `decode(stored)` makes them
one tensor at a time, when a stage reads it.

    raw entries of the safetensors headers
      → format adapters (a quantization_config's value + scale tensors → one logical tensor)   `FORMAT_ADAPTERS`
      → fused-expert splits (one stacked tensor → one logical tensor per expert)            `split_fused`
      → the architecture's name templates (model.arch)

`Stored.layout` is applied after decoding, in order: "T" swaps the last two axes, "even"/"odd" take every other
entry of the last axis (gpt-oss interleaves gate and up columns), "half0"/"half1" its first/second half (Llama 4
concatenates them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from moepack.errors import MoepackError

if TYPE_CHECKING:
    import torch

__all__ = [
    "StoredFormatError",
    "RawTensor",
    "Stored",
    "FusedSplit",
    "Logical",
    "DECODERS",
    "FORMAT_ADAPTERS",
    "register_decoder",
    "register_format",
    "decode",
    "apply_layout",
    "layout_shape",
    "split_fused",
    "layout_view",
    "unlayout_shape",
    "join_fused",
    "fused_members",
    "DTYPE_BYTES",
    "torch_dtype",
]

# safetensors dtype → bytes per element (the safetensors format's own list).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_READ_CHUNK = 256 * 2**20  # bytes per read() call: Linux returns short reads above ~2 GiB


class StoredFormatError(MoepackError, ValueError):
    """Stored tensors that do not fit together (a scale tensor missing, shapes that disagree)."""


@dataclass(frozen=True)
class RawTensor:
    """One tensor exactly as a safetensors file holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    def entry(self, i: int) -> RawTensor:
        """Entry `i` along the first axis (one expert of a fused tensor): a contiguous run of bytes."""
        if not 0 <= i < self.shape[0]:
            raise StoredFormatError(f"{self.name}: index {i} outside its first axis ({self.shape[0]})")
        per = self.nbytes // self.shape[0]
        return replace(self, shape=self.shape[1:], offset=self.offset + i * per, nbytes=per)

    def read(self):  # -> torch.Tensor
        """The bytes as a tensor of `dtype` and `shape`, read with plain file reads (no memory map stays)."""
        import torch

        t = torch.empty(self.shape, dtype=torch_dtype(self.dtype))
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # (nbytes,) writable view of t
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.offset)
            pos = 0
            while pos < self.nbytes:
                n = f.readinto(buf[pos:pos + _READ_CHUNK])
                if not n:
                    raise StoredFormatError(f"{self.file}: truncated; tensor {self.name!r} ends past the end of "
                                            "the file")
                pos += n
        return t


@dataclass(frozen=True)
class Stored:
    """How one logical tensor is made: decode `parts` with `format`, then apply `layout`.

    format: "plain" (parts[0] as it is), or a registered compressed format ("fp8_block", "mxfp4", ...), whose
    decoder gets every part (values first, then scales) and `params`.
    """

    format: str
    parts: tuple[RawTensor, ...]
    layout: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def stored_nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def entry(self, i: int) -> Stored:
        """Entry `i` of every part's first axis (one expert of a fused, possibly compressed, tensor)."""
        return replace(self, parts=tuple(p.entry(i) for p in self.parts))


@dataclass(frozen=True)
class Logical:
    """A tensor as the architecture tables see it: a name, a float shape and dtype, and how it is stored (None:
    the raw tensor of that name is the tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    raw: RawTensor
    stored: Stored | None = None


@dataclass(frozen=True)
class FusedSplit:
    """One stacked expert tensor of an architecture, split into per-expert tensors.

    `template` names the stacked checkpoint tensor (`{bid}` = layer); `outputs` gives, for each per-expert tensor
    it holds, the name template (`{bid}`, `{xid}`) and the layout ops that cut it out of one expert's slice.
    """

    template: str
    outputs: tuple[tuple[str, tuple[str, ...]], ...]


Decoder = Callable[[list["torch.Tensor"], Stored], "torch.Tensor"]
DECODERS: dict[str, Decoder] = {"plain": lambda parts, stored: parts[0]}
# quantization_config["quant_method"] (or format name) → adapter(raw entries by name, quantization_config) →
# logical tensors by name. Adapters own the scale tensors: none of them survives as a tensor of its own.
FormatAdapter = Callable[[dict[str, RawTensor], dict[str, Any]], dict[str, Logical]]
FORMAT_ADAPTERS: dict[str, FormatAdapter] = {}


def register_decoder(name: str) -> Callable[[Decoder], Decoder]:
    def deco(fn: Decoder) -> Decoder:
        DECODERS[name] = fn
        return fn
    return deco


def register_format(quant_method: str) -> Callable[[FormatAdapter], FormatAdapter]:
    def deco(fn: FormatAdapter) -> FormatAdapter:
        FORMAT_ADAPTERS[quant_method] = fn
        return fn
    return deco


def torch_dtype(dtype: str):  # -> torch.dtype
    """The torch dtype of a safetensors dtype string."""
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
    return table[dtype]


def _even(t, odd: bool):
    return t[..., int(odd)::2]


def _half(t, second: bool):
    n = t.shape[-1] // 2
    return t[..., n:] if second else t[..., :n]


_OPS: dict[str, Callable[[Any], Any]] = {
    "T": lambda t: t.transpose(-1, -2),
    "even": lambda t: _even(t, False), "odd": lambda t: _even(t, True),
    "half0": lambda t: _half(t, False), "half1": lambda t: _half(t, True),
}


def apply_layout(t, layout: tuple[str, ...]):  # torch.Tensor -> torch.Tensor
    for op in layout:
        t = _OPS[op](t)
    return t.contiguous()


def layout_shape(shape: tuple[int, ...], layout: tuple[str, ...]) -> tuple[int, ...]:
    """The shape `apply_layout` gives a tensor of `shape` (no data)."""
    s = list(shape)
    for op in layout:
        if op == "T":
            s[-1], s[-2] = s[-2], s[-1]
        elif op in _OPS:
            if s[-1] % 2:
                raise StoredFormatError(f"cannot take {op} of an odd last axis ({shape})")
            s[-1] //= 2
        else:
            raise StoredFormatError(f"unknown layout op {op!r}")
    return tuple(s)


def decode(stored: Stored):  # -> torch.Tensor
    """The logical tensor's values (float), read and decoded from its parts."""
    if stored.format not in DECODERS:
        raise StoredFormatError(f"no decoder for stored format {stored.format!r}; known: {', '.join(DECODERS)}")
    t = DECODERS[stored.format]([p.read() for p in stored.parts], stored)
    return apply_layout(t, stored.layout)


def _plain(raw: RawTensor) -> Stored:
    return Stored("plain", (raw,))


def split_fused(logical: dict[str, Logical], splits: tuple[FusedSplit, ...], n_layers: int) -> dict[str, Logical]:
    """Replace every stacked expert tensor named by `splits` with one logical tensor per expert and output."""
    if not splits:
        return logical
    out = dict(logical)
    for split in splits:
        for layer in range(n_layers + 1):  # + 1: a multi-token-prediction layer, if the checkpoint has one
            name = split.template.replace("{bid}", str(layer))
            src = out.pop(name, None)
            if src is None:
                continue
            stored = src.stored or _plain(src.raw)
            for e in range(src.shape[0]):
                one = stored.entry(e)
                for template, ops in split.outputs:
                    per = template.replace("{bid}", str(layer)).replace("{xid}", str(e))
                    shape = layout_shape(src.shape[1:], ops)  # src.shape already has stored.layout applied
                    out[per] = Logical(per, shape, src.dtype, src.raw,
                                       replace(one, layout=stored.layout + ops))
    return out



# ---- the way back: per-expert tensors → the stacked tensor (the runtime's in-memory layout, pruned checkpoints) ----
def layout_view(t, layout: tuple[str, ...]):  # torch.Tensor -> torch.Tensor
    """`apply_layout` as a view of `t` (every op is a view): writing into it writes the entries of `t` that the
    layout reads, so a per-expert tensor goes back to its place in the stacked one."""
    for op in layout:
        t = _OPS[op](t)
    return t


def unlayout_shape(shape: tuple[int, ...], layout: tuple[str, ...]) -> tuple[int, ...]:
    """The shape of the slice that `layout` cuts a tensor of `shape` from (the inverse of `layout_shape`)."""
    s = list(shape)
    for op in reversed(layout):
        if op == "T":
            s[-1], s[-2] = s[-2], s[-1]
        elif op in _OPS:
            s[-1] *= 2
        else:
            raise StoredFormatError(f"unknown layout op {op!r}")
    return tuple(s)


def join_fused(split: FusedSplit, names: list[list[str]], load: Callable[[str], Any]):  # -> torch.Tensor
    """The stacked tensor of `split`, (E, *slice), from the per-expert tensors `names[e][j]` (output j of expert e,
    in the order of split.outputs), each loaded with `load` and placed at once: peak is the stacked tensor plus one
    expert's part."""
    import torch

    out = None
    for e, parts in enumerate(names):
        if len(parts) != len(split.outputs):
            raise StoredFormatError(f"{split.template}: expert {e} has {len(parts)} parts, expected "
                                    f"{len(split.outputs)}")
        for (_, ops), name in zip(split.outputs, parts):
            t = load(name)
            if out is None:
                out = torch.empty((len(names),) + unlayout_shape(tuple(t.shape), ops), dtype=t.dtype,
                                  device=t.device)
            layout_view(out[e], ops).copy_(t)
            del t
    return out


def fused_members(split: FusedSplit, layer: int, n_experts: int) -> list[list[str]]:
    """Names of the per-expert tensors of `split` in layer `layer`: [expert][output]."""
    return [[tpl.replace("{bid}", str(layer)).replace("{xid}", str(e)) for tpl, _ in split.outputs]
            for e in range(n_experts)]

"""Every byte-size fact of GGML types, in one place: which types moepack writes, the default type ladder,
llama.cpp's row-width fallback rule, and the bytes of a row, a tensor and a tensor as llama.cpp writes it.

All sizes come from gguf's GGML_QUANT_SIZES ((block size, bytes per block) per type), which `moepack.gguf.kernels`
checks against the libggml it loads, so these numbers are what ggml_row_size returns. Pure Python: nothing here
loads llama.cpp.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moepack.errors import MoepackError

__all__ = [
    "BlockSizeError",
    "QUANT_TYPES",
    "LADDER",
    "DEFAULT_REFERENCE",
    "parse_type",
    "bits_per_weight",
    "block_size",
    "fallback_type",
    "smallest_type",
    "row_bytes",
    "tensor_bytes",
    "written_bytes",
]

log = logging.getLogger(__name__)

T = GGMLQuantizationType
# Weight types llama.cpp quantizes weights to (llama-quantize's tensor types), roughly from most to fewest bits.
QUANT_TYPES: list[GGMLQuantizationType] = [
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q6_K, T.Q5_1, T.Q5_K, T.Q5_0, T.Q4_1, T.Q4_K, T.Q4_0, T.IQ4_NL, T.IQ4_XS,
    T.MXFP4, T.Q3_K, T.IQ3_S, T.IQ3_XXS, T.Q2_K, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.TQ2_0, T.IQ1_M, T.TQ1_0, T.IQ1_S,
]
# The type ladder of sensitivity and compress: every type llama-quantize offers for a weight of 256-multiple rows
# below F16, in order of bytes (Q3_K and IQ3_S tie; quality need not follow bytes: Q2_K is larger than IQ2_S and
# often worse). Its first type is the default reference (base) type of the ΔKLD measurements.
LADDER: tuple[str, ...] = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S",
                           "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
DEFAULT_REFERENCE = LADDER[0]

# llama-quant.cpp `tensor_type_fallback`: the type used when the row width is not a multiple of the block size.
_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    **dict.fromkeys([T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS], T.IQ4_NL),
    **dict.fromkeys([T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0], T.Q4_0),
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}


class BlockSizeError(MoepackError, ValueError):
    """A row width that is not a whole number of the type's blocks."""


def parse_type(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """'q4_k' / 'Q4_K' / the enum → GGMLQuantizationType, one of QUANT_TYPES."""
    if isinstance(name, GGMLQuantizationType):
        qtype: GGMLQuantizationType | None = name
    else:
        qtype = GGMLQuantizationType.__members__.get(str(name).strip().upper())
    if qtype not in QUANT_TYPES:
        raise MoepackError(f"unknown or unsupported GGML type {name!r}; valid: "
                           f"{', '.join(t.name for t in QUANT_TYPES)}")
    return qtype


def block_size(qtype: GGMLQuantizationType | str) -> int:
    """Weights per block: rows of this type must be a multiple of it."""
    return GGML_QUANT_SIZES[parse_type(qtype)][0]


def bits_per_weight(qtype: GGMLQuantizationType | str) -> float:
    block, nbytes = GGML_QUANT_SIZES[parse_type(qtype)]
    return 8.0 * nbytes / block


def smallest_type(types: Iterable[str]) -> str:
    """The type of the fewest bits per weight among `types` (the first of a tie): the default reference (base) of
    a ladder, and the type of its smallest model."""
    return min((parse_type(t).name for t in types), key=bits_per_weight)


def fallback_type(qtype: GGMLQuantizationType | str, n_per_row: int) -> GGMLQuantizationType:
    """The type llama.cpp writes for `qtype` on rows of `n_per_row`: itself if the block fits, else its fallback."""
    qtype = parse_type(qtype)
    if n_per_row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    if qtype not in _FALLBACK:
        raise MoepackError(f"{qtype.name} needs rows that are multiples of {GGML_QUANT_SIZES[qtype][0]} "
                           f"(got {n_per_row}) and llama.cpp defines no fallback for it; pick another type")
    fb = _FALLBACK[qtype]
    return fb if n_per_row % GGML_QUANT_SIZES[fb][0] == 0 else T.F16


def row_bytes(qtype: GGMLQuantizationType | str, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` weights (ggml_row_size); the row must be a whole number of blocks."""
    qtype = parse_type(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise BlockSizeError(f"{qtype.name} needs rows that are multiples of {block}, got {n_per_row}; use "
                             "fallback_type() as llama.cpp does")
    return n_per_row // block * size


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType | str) -> int:
    """Bytes of a tensor of `shape` (numpy order: rows are the last axis) stored in exactly `qtype`."""
    return math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])


def written_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType | str) -> int:
    """Bytes of a tensor requested at `qtype` as llama.cpp writes it: at its fallback type when the rows do not
    fit `qtype`'s blocks."""
    return tensor_bytes(shape, fallback_type(qtype, shape[-1]))

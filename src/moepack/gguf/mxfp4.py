"""gpt-oss's MXFP4 experts written as GGML's MXFP4 without re-quantizing: the source's own bytes, repacked.

Both formats hold 32 E2M1 codes and one E8M0 exponent per block, with the same code table (ggml's kvalues_mxfp4
are the E2M1 values doubled, and its scale is 2^(e−128): the same product as the release's 2^(e−127)), so the
scale byte is copied as it is and only the nibble order differs:

    release (HF)  `*_blocks` byte j = code 2j (low nibble) | code 2j+1 (high nibble), j < 16
    ggml          block_mxfp4 = {e, qs[16]}, qs[j] = code j (low nibble) | code j+16 (high nibble)

A GGUF tensor takes this path when its type is MXFP4 and every checkpoint tensor it is made of is an MXFP4 slice
whose layout only picks rows of the stored (R, 32·G) matrix (gpt-oss: gate = even rows of gate_up, up = odd rows,
down = all rows): then dequantizing the written tensor gives exactly the checkpoint's decoded values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moepack.gguf.tensors import OutTensor
from moepack.model.stored import RawTensor, apply_layout

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView, TensorRef

__all__ = ["FORMAT", "source_rows", "is_source", "repack", "source_bytes"]

FORMAT = "mxfp4"  # the Stored.format of the release's blocks/scales (moepack.model.formats)
_ROW_OPS = ("even", "odd", "half0", "half1")  # layout ops that select along the stored rows once transposed


def source_rows(ref: TensorRef) -> tuple[RawTensor, RawTensor, np.ndarray] | None:
    """(blocks (R, G, 16), scales (R, G), the rows of the stored matrix this tensor is) of a checkpoint tensor
    stored as one expert's MXFP4 slice; None when it is anything else."""
    stored = getattr(ref, "stored", None)
    if stored is None or stored.format != FORMAT or len(stored.parts[0].shape) != 3:
        return None
    lay = stored.layout
    # the adapter's "T" gives (32·G, R); row ops pick along R; a last "T" gives back (rows, 32·G)
    if len(lay) < 2 or lay[0] != "T" or lay[-1] != "T" or any(op not in _ROW_OPS for op in lay[1:-1]):
        return None
    import torch

    r = stored.parts[0].shape[0]
    rows = apply_layout(torch.arange(r).reshape(1, r), lay[1:-1])  # (1, rows): which stored rows, in order
    return stored.parts[0], stored.parts[1], rows.reshape(-1).numpy()


def is_source(view: CheckpointView, o: OutTensor) -> bool:
    """Whether GGUF tensor `o` can be written as MXFP4 from the source's own bytes (lossless)."""
    if not o.sources or o.transform not in ("stack", ""):
        return False
    for s in o.sources:
        got = source_rows(view.tensors.get(s))
        if got is None or (len(got[2]), 32 * got[0].shape[1]) != tuple(o.shape[-2:]):
            return False
    return True


def repack(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Release blocks (R, G, 16) uint8 + scales (R, G) uint8 → ggml block_mxfp4 rows (R, 17·G) uint8."""
    codes = np.empty((*blocks.shape[:-1], 32), dtype=np.uint8)  # (R, G, 32): code i of each block
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # (R, G, 16): ggml pairs code j with code j + 16
    out = np.concatenate([scales[..., None], qs], axis=-1)  # (R, G, 17): e first, as block_mxfp4
    return out.reshape(blocks.shape[0], -1)


def _one(ref: TensorRef) -> np.ndarray:
    src = source_rows(ref)
    assert src is not None
    blocks, scales, rows = src
    return repack(blocks.read().numpy()[rows], scales.read().numpy()[rows])  # (rows, 17·G)


def source_bytes(view: CheckpointView, o: OutTensor) -> np.ndarray:
    """The GGUF MXFP4 bytes of `o` from the source's blocks and scales: (E, bytes per expert) for stacked
    experts, (rows, row bytes) for one tensor. The caller checked `is_source(view, o)`."""
    if o.transform != "stack":
        return _one(view.tensors[o.sources[0]])
    per = [_one(view.tensors[s]).reshape(-1) for s in o.sources]
    return np.stack(per)  # (E, bytes per expert)

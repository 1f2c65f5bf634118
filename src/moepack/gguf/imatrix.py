"""llama.cpp's GGUF importance-matrix format (tools/imatrix/imatrix.cpp): write ours, read anyone's.

A file holds, per GGUF weight tensor `NAME`, `NAME.in_sum2` (sum of squared input activations, numpy shape (M, n):
M = experts for stacked expert tensors, else 1) and `NAME.counts` ((M, 1): tokens seen), both F32, plus the metadata
`general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`. Zero counts are
stored as they are; readers fall back to ones for such rows, as llama-quantize does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from moepack.errors import MoepackError

if TYPE_CHECKING:
    from moepack.stages.calibrate import CalibStats, ImatrixEntry
    from moepack.model.checkpoint import CheckpointView

__all__ = ["ImatrixError", "ImatrixFile", "imatrix_entries", "write_imatrix_gguf", "read_imatrix", "load_imatrix",
           "KEY_DATASETS", "KEY_CHUNK_COUNT", "KEY_CHUNK_SIZE"]

log = logging.getLogger(__name__)

# llama.cpp's own key names (imatrix.cpp's LLM_KV_IMATRIX_*), from gguf-py's table.
KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
_IN_SUM2, _COUNTS = ".in_sum2", ".counts"


class ImatrixError(MoepackError, ValueError):
    pass


@dataclass
class ImatrixFile:
    entries: dict[str, ImatrixEntry]  # GGUF tensor name → sums (M, n), counts (M,)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def imatrix_entries(stats: CalibStats, view: CheckpointView) -> dict[str, ImatrixEntry]:
    """Our statistics under llama.cpp's GGUF tensor names, in llama.cpp's layout.

    Stacked expert tensors keep one row per expert; a dense tensor stored per head (DeepSeek's attn_k_b) is
    flattened to one row, as llama.cpp's collector stores 3-D dense tensors.
    """
    from moepack.stages.calibrate import ImatrixEntry
    from moepack.gguf.names import GGUFNameError, gguf_tensor_name

    out: dict[str, ImatrixEntry] = {}
    for key, e in stats.imatrix.items():
        try:
            name = gguf_tensor_name(view, key)
        except GGUFNameError:
            log.debug("no GGUF name for %s; not in the imatrix file", key)
            continue
        sums, counts = e.sums, e.counts
        if ".experts." not in key and sums.shape[0] > 1:
            sums, counts = sums.reshape(1, -1), counts[:1]  # (1, M*n): one count per dense tensor
        out[name] = ImatrixEntry(sums, counts)
    return out


def write_imatrix_gguf(stats: CalibStats, view: CheckpointView, path: str | Path) -> Path:
    """Write `stats`' importance matrix as llama.cpp's GGUF imatrix (for `llama-quantize --imatrix`)."""
    path = Path(path)
    entries = imatrix_entries(stats, view)
    if not entries:
        raise ImatrixError(f"no importance-matrix entries map to llama.cpp tensor names for {view.root}")
    m = stats.manifest
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch=view.spec.gguf_arch)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama.cpp's imatrix files carry no architecture
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(KEY_DATASETS, [str(m.get("text", ""))])
    w.add_uint32(KEY_CHUNK_COUNT, int(m.get("n_sequences", 0)))
    w.add_uint32(KEY_CHUNK_SIZE, int(m.get("seq_len", 0)))
    for name in sorted(entries):  # llama.cpp sorts too: deterministic order
        e = entries[name]
        w.add_tensor(name + _IN_SUM2, np.ascontiguousarray(e.sums, dtype=np.float32))  # (M, n)
        w.add_tensor(name + _COUNTS, np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))  # (M, 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    zero = sum(int((e.counts == 0).sum()) for e in entries.values())
    log.info("imatrix: %d entries -> %s%s", len(entries), path,
             f" ({zero} matrices never used: llama-quantize falls back to ones)" if zero else "")
    return path


def read_imatrix(path: str | Path) -> ImatrixFile:
    """Parse a llama.cpp GGUF imatrix file (written by llama-imatrix or by moepack)."""
    from moepack.stages.calibrate import ImatrixEntry

    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"imatrix file not found: {p}")
    try:
        r = gguf.GGUFReader(p)
    except Exception as e:  # gguf's reader raises many kinds (ValueError, IndexError, ...) on a damaged file
        raise ImatrixError(f"{p}: not a GGUF file ({e}); the legacy .dat imatrix format is not supported, "
                           f"convert it with llama-imatrix --in-file {p.name} -o out.gguf") from None
    kind = _field_str(r, gguf.Keys.General.TYPE)
    if kind != gguf.GGUFType.IMATRIX:
        raise ImatrixError(f"{p}: general.type is {kind!r}, not 'imatrix'")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.name.endswith(_IN_SUM2):
            sums[t.name[: -len(_IN_SUM2)]] = np.array(t.data, dtype=np.float64).reshape(-1, int(t.shape[0]))
        elif t.name.endswith(_COUNTS):
            counts[t.name[: -len(_COUNTS)]] = np.array(t.data, dtype=np.float64).reshape(-1)
    bad = sorted(set(sums) ^ set(counts))
    if bad:
        raise ImatrixError(f"{p}: mismatched sums and counts for {bad[:3]}")
    entries = {n: ImatrixEntry(sums[n], counts[n]) for n in sorted(sums)}
    for n, e in entries.items():
        if e.sums.shape[0] != e.counts.shape[0]:
            raise ImatrixError(f"{p}: {n} has {e.sums.shape[0]} rows of sums but {e.counts.shape[0]} counts")
    datasets = _field_strs(r, KEY_DATASETS)
    return ImatrixFile(entries, datasets, _field_int(r, KEY_CHUNK_COUNT), _field_int(r, KEY_CHUNK_SIZE))


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name → mean squared input per column, (M, n) float32 (M = experts or 1), as llama-quantize
    computes it: sums / counts, ones where a matrix saw no token."""
    return {n: e.mean() for n, e in read_imatrix(path).entries.items()}


def _field_str(r, key: str) -> str | None:
    f = r.get_field(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")


def _field_strs(r, key: str) -> list[str]:
    f = r.get_field(key)
    if f is None:
        return []
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _field_int(r, key: str) -> int:
    f = r.get_field(key)
    return int(f.parts[f.data[0]][0]) if f is not None else 0

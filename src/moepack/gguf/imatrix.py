"""Importance matrices: llama.cpp's GGUF imatrix format (tools/imatrix/imatrix.cpp), our calibration statistics
under GGUF names, and the rows each GGUF tensor is quantized with. One reader (`read_imatrix` for a file,
`load_imatrix` for a file or a calibration run directory) and one writer (`write_imatrix_gguf`).

A file holds, per GGUF weight tensor `NAME`, `NAME.in_sum2` (sum of squared input activations, numpy shape (M, n):
M = experts for stacked expert tensors, else 1) and `NAME.counts` ((M, 1): tokens seen), both F32, plus the metadata
`general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`. Zero counts are
stored as they are; readers fall back to ones for such rows, as llama-quantize does.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import gguf
import numpy as np

from moepack.atomic import atomic_path
from moepack.errors import MoepackError
from moepack.gguf.linear_attn import QKVZ_SPLIT, tile_v_heads
from moepack.gguf.names import gguf_outputs
from moepack.gguf.tensors import OutTensor, TypedTensor
from moepack.model.arch import is_expert_key
from moepack.schema import CalibStats, ImatrixEntry

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView
    from moepack.schema import PrunePlan

__all__ = ["ImatrixError", "ImatrixFile", "imatrix_entries", "write_imatrix_gguf", "read_imatrix", "load_imatrix",
           "prune_imatrix", "imatrix_rows", "importance_rows", "imatrix_by_output",
           "KEY_DATASETS", "KEY_CHUNK_COUNT", "KEY_CHUNK_SIZE"]

log = logging.getLogger(__name__)

# llama.cpp's own key names (imatrix.cpp's LLM_KV_IMATRIX_*), from gguf-py's table.
KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
_IN_SUM2, _COUNTS = ".in_sum2", ".counts"
_EXPS_RX = re.compile(r"blk\.(\d+)\.ffn_\w+_exps\.")  # a stacked routed-expert GGUF tensor: gguf's FFN_*_EXP names


class ImatrixError(MoepackError, ValueError):
    pass


@dataclass
class ImatrixFile:
    entries: dict[str, ImatrixEntry]  # GGUF tensor name → sums (M, n), counts (M,)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        """GGUF tensor name → mean squared input per column, (M, n) float32, as llama-quantize computes it:
        sums / counts, ones where a matrix saw no token."""
        return {n: e.mean() for n, e in self.entries.items()}

    @classmethod
    def of_means(cls, values: Mapping[str, np.ndarray]) -> ImatrixFile:
        """{name: (E or 1, n) mean squared inputs} as a file llama-quantize reads back as those same means
        (in_sum2 = the mean, counts = 1)."""
        entries = {}
        for name, v in values.items():
            v = np.asarray(v, dtype=np.float32).reshape(-1, np.shape(v)[-1])  # (E, n)
            entries[name] = ImatrixEntry(v, np.ones(v.shape[0], dtype=np.float32))
        return cls(entries, ["moepack"], 1, 1)

    @classmethod
    def of_stats(cls, stats: CalibStats, view: CheckpointView) -> ImatrixFile:
        m = stats.manifest
        return cls(imatrix_entries(stats, view), [str(m.text or "")], m.n_sequences, m.seq_len)


def imatrix_entries(stats: CalibStats, view: CheckpointView) -> dict[str, ImatrixEntry]:
    """Our statistics under llama.cpp's GGUF tensor names, in llama.cpp's layout.

    Stacked expert tensors keep one row per expert; a dense tensor stored per head (DeepSeek's attn_k_b) is
    flattened to one row, as llama.cpp's collector stores 3-D dense tensors.
    """
    from moepack.gguf.names import GGUFNameError, gguf_tensor_name

    out: dict[str, ImatrixEntry] = {}
    for key, e in stats.imatrix.items():
        try:
            name = gguf_tensor_name(view, key)
        except GGUFNameError:
            log.debug("no GGUF name for %s; not in the imatrix file", key)
            continue
        sums, counts = e.sums, e.counts
        if not is_expert_key(key) and sums.shape[0] > 1:
            sums, counts = sums.reshape(1, -1), counts[:1]  # (1, M*n): one count per dense tensor
        if _transform_of(view, key) == "vtile_cols":  # Qwen3.5's ssm_out: input columns (value heads) tiled
            sums = tile_v_heads(sums, view.config, "vtile_cols")
        out[name] = ImatrixEntry(sums, counts)
        if key.endswith(".in_proj_qkvz.weight"):  # written as attn_qkv + attn_gate, both fed the same inputs
            for hf, _ in QKVZ_SPLIT:
                out[gguf_tensor_name(view, key.replace("in_proj_qkvz", hf))] = ImatrixEntry(sums, counts)
    return out


def _transform_of(view: CheckpointView, key: str) -> str:
    """The GGUF transform the architecture applies to checkpoint tensor `key` ("" when none or unknown)."""
    ref = view.tensors.get(key)
    return view.spec.extra.get("gguf_transforms", {}).get(ref.kind, "") if ref is not None else ""


def write_imatrix_gguf(imatrix: ImatrixFile, path: str | Path) -> Path:
    """Write `imatrix` as llama.cpp's GGUF imatrix (for `llama-quantize --imatrix`), atomically."""
    path = Path(path)
    if not imatrix.entries:
        raise ImatrixError(f"{path}: no importance-matrix entries map to llama.cpp tensor names")
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama.cpp's imatrix files carry no architecture
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(KEY_DATASETS, list(imatrix.datasets))
        w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):  # llama.cpp sorts too: deterministic order
            e = imatrix.entries[name]
            w.add_tensor(name + _IN_SUM2, np.ascontiguousarray(e.sums, dtype=np.float32))  # (M, n)
            w.add_tensor(name + _COUNTS, np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))  # (M, 1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    zero = sum(int((e.counts == 0).sum()) for e in imatrix.entries.values())
    log.info("imatrix: %d entries -> %s%s", len(imatrix.entries), path,
             f" ({zero} matrices never used: llama-quantize falls back to ones)" if zero else "")
    return path


def read_imatrix(path: str | Path) -> ImatrixFile:
    """Parse a llama.cpp GGUF imatrix file (written by llama-imatrix or by moepack)."""
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


def load_imatrix(path: str | Path, view: CheckpointView) -> dict[str, np.ndarray]:
    """Importance matrix → {GGUF tensor name: (M, n) float32 mean squared input}. `path` is a run directory
    (or its calib/) from `moepack calibrate`, or llama.cpp's imatrix GGUF (from llama-imatrix or moepack)."""
    p = Path(path)
    if p.is_dir():
        return ImatrixFile.of_stats(CalibStats.read(p), view).means()
    if not p.is_file():
        raise ImatrixError(f"{p}: no such imatrix file or run directory")
    return read_imatrix(p).means()


def _field_str(r: Any, key: str) -> str | None:
    f = r.get_field(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")


def _field_strs(r: Any, key: str) -> list[str]:
    f = r.get_field(key)
    if f is None:
        return []
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _field_int(r: Any, key: str) -> int:
    f = r.get_field(key)
    return int(f.parts[f.data[0]][0]) if f is not None else 0


# ---------------------------------------------------------------------------------------------------- rows

def prune_imatrix(imatrix: Mapping[str, np.ndarray], plan: PrunePlan) -> dict[str, np.ndarray]:
    """Keep the rows of the experts a prune plan kept (an imatrix of the original model for the pruned one)."""
    out = dict(imatrix)
    for name, im in imatrix.items():
        m = _EXPS_RX.match(name)
        kept = plan.kept(m.group(1)) if m else None
        rows = np.asarray(im).reshape(-1, np.shape(im)[-1])  # (E, n)
        if kept is not None and rows.shape[0] == plan.n_experts:
            out[name] = rows[np.asarray(kept, dtype=np.int64)]  # (E_kept, n)
    return out


def imatrix_rows(o: OutTensor, imatrix: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The tensor's importance rows: (S, n) for 3-D tensors (one row per expert or head slice, as llama-quantize
    slices it), (n,) for 2-D; None if there are none."""
    if not imatrix:
        return None
    im = imatrix.get(o.name)
    if im is None and o.transform != "k_b":  # k_b's inputs are q_nope, not kv_b's inputs
        im = imatrix.get(o.key)
    if im is None:
        return None
    flat = np.asarray(im, dtype=np.float32).reshape(-1)
    n, lead = o.n_per_row, (o.shape[0] if len(o.shape) == 3 else 1)
    if flat.size == lead * n:
        rows = flat.reshape(lead, n)  # (S, n)
    elif flat.size == n:
        rows = np.broadcast_to(flat, (lead, n))  # (S, n)
    elif o.transform == "stack" and flat.size % n == 0:
        raise ImatrixError(f"{o.name}: imatrix has {flat.size // n} expert rows but the tensor has {lead} experts; "
                           "calibrate the model you quantize (or keep prune_plan.json next to a pruned checkpoint)")
    else:
        log.warning("%s: imatrix of %d values does not fit rows of %d; quantizing without it", o.name, flat.size, n)
        return None
    return np.ascontiguousarray(rows) if len(o.shape) == 3 else rows[0]


def imatrix_by_output(view: CheckpointView, imatrix: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The importance rows of every tensor the GGUF of `view` holds, under its own name ((S, n) or (1, n)):
    e.g. DeepSeek's attn_v_b gets attn_kv_b's rows. For handing to llama_model_quantize."""
    out: dict[str, np.ndarray] = {}
    for o in gguf_outputs(view):
        if o.quantizable and (rows := imatrix_rows(o, imatrix)) is not None:
            out[o.name] = rows.reshape(-1, o.n_per_row)  # (S, n)
    return out


def importance_rows(t: TypedTensor, imatrix: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """Importance rows for quantizing `t`. The token embedding is looked up, not multiplied, so no imatrix (ours
    or llama-imatrix's) has it; when its type needs one, every column weighs the same."""
    from moepack.gguf.kernels import requires_imatrix

    rows = imatrix_rows(t.out, imatrix)
    if rows is None and imatrix and t.out.name == "token_embd.weight" and requires_imatrix(t.qtype):
        rows = np.ones(t.out.n_per_row, dtype=np.float32)  # (n,)
    return rows

"""llama.cpp's own quantization kernels, and the names of its file types, through ctypes (llama_model_quantize on
whole files: moepack.gguf.llama_quantize).

Why: gguf's numpy quantizers cover only the simple types and no importance matrix; the K/IQ kernels with an imatrix
live in the libggml-base that llama-cpp-python ships. Calling them gives byte for byte what `llama-quantize` writes,
so a plan measured here is the file users get. ctypes drops the GIL during each call, so a thread pool over row
chunks uses every core.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moepack.errors import MoepackError
from moepack.gguf.types import QUANT_TYPES, parse_type, row_bytes

__all__ = [
    "ftypes",
    "lib_dir",
    "quantize",
    "dequantize",
    "requires_imatrix",
    "parse_ftype",
]

log = logging.getLogger(__name__)

T = GGMLQuantizationType
_MIN_CHUNK = 32 * 512  # elements per task, llama-quant.cpp's min_chunk_size


def _names(items: Any) -> str:
    return ", ".join(items)


# ---------------------------------------------------------------------------------------------------- the library

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in the ggml.h shipped with llama-cpp-python (checked against gguf sizes at load)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT), ("from_float_ref", ctypes.c_void_p)]


def lib_dir() -> Path:
    """The directory of the llama.cpp libraries llama-cpp-python ships."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise MoepackError("llama-cpp-python is not installed; `pip install llama-cpp-python` (it builds libggml)")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@cache
def _lib() -> ctypes.CDLL:
    names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    path = lib_dir() / names.get(sys.platform, "libggml-base.so")
    if not path.exists():
        raise MoepackError(f"{path} not found; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(path))
    i64, sz, vp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    for fn, res, args in [("ggml_quantize_chunk", sz, [ctypes.c_int, vp, vp, i64, i64, i64, vp]),
                          ("ggml_quantize_init", None, [ctypes.c_int]),
                          ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
                          ("ggml_row_size", sz, [ctypes.c_int, i64]),
                          ("ggml_validate_row_data", ctypes.c_bool, [ctypes.c_int, vp, sz]),
                          ("ggml_get_type_traits", ctypes.POINTER(_TypeTraits), [ctypes.c_int])]:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    for t in QUANT_TYPES:  # an ABI drift would silently corrupt bytes: refuse instead
        tr = lib.ggml_get_type_traits(t.value).contents
        if (tr.blck_size, tr.type_size) != GGML_QUANT_SIZES[t]:
            raise MoepackError(f"libggml at {path} disagrees with the gguf package on {t.name} blocks "
                               f"({tr.blck_size}, {tr.type_size}) vs {GGML_QUANT_SIZES[t]}; align the two packages")
    return lib


_init_lock = threading.Lock()
_initialized: set[GGMLQuantizationType] = set()


def _init_type(qtype: GGMLQuantizationType) -> None:
    # IQ types build lookup grids on first use; do it once, outside the worker threads.
    with _init_lock:
        if qtype not in _initialized:
            _lib().ggml_quantize_init(qtype.value)
            _initialized.add(qtype)


def requires_imatrix(qtype: GGMLQuantizationType | str) -> bool:
    """ggml's hard requirement (IQ2_XXS, IQ2_XS, IQ1_S); llama-quantize also refuses IQ3_XXS, IQ2_S, IQ1_M without."""
    return bool(_lib().ggml_quantize_requires_imatrix(parse_type(qtype).value))


def _threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _row_chunks(n_rows: int, n_per_row: int, threads: int) -> list[tuple[int, int]]:
    """(first_row, n_rows) spans of at least _MIN_CHUNK elements, enough of them to keep `threads` busy."""
    per = max(1, min(-(-_MIN_CHUNK // n_per_row), -(-n_rows // threads)))
    return [(r, min(per, n_rows - r)) for r in range(0, n_rows, per)]


def _run(tasks: list[Any], fn: Any, threads: int) -> list[Any]:
    if threads <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with ThreadPoolExecutor(min(threads, len(tasks))) as pool:
        return list(pool.map(fn, tasks))


# ---------------------------------------------------------------------------------------------------- kernels

def _check_imatrix(imatrix: np.ndarray | None, lead: tuple[int, ...], n_per_row: int,
                   qtype: GGMLQuantizationType) -> np.ndarray | None:
    if imatrix is None:
        if requires_imatrix(qtype):
            raise MoepackError(f"{qtype.name} needs an importance matrix (ggml_quantize_requires_imatrix); "
                               "calibrate first or choose another type")
        return None
    want = (*lead[:-1], n_per_row)  # (n_per_row,) for 2-D data, (E, n_per_row) for 3-D
    im = np.asarray(imatrix, dtype=np.float32)
    if im.shape != want and im.shape != (n_per_row,):
        raise ValueError(f"imatrix shape {im.shape} does not match data: want {want}")
    if not np.isfinite(im).all():
        raise MoepackError("imatrix holds NaN or inf values; recalibrate")
    if (im.reshape(-1, n_per_row).max(axis=1) <= 0).any():  # (E, n): the kernels then zero the whole row
        log.warning("an imatrix row is all zeros (%s): its weights quantize to 0; llama-quantize uses 1s for "
                    "experts that saw no tokens", qtype.name)
    return np.ascontiguousarray(np.broadcast_to(im, want))  # (E, n_per_row) or (n_per_row,)


def quantize(data: np.ndarray, qtype: GGMLQuantizationType | str, imatrix: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """float32 (rows, n) or (E, rows, n) → uint8 (..., row_bytes), laid out exactly as ggml stores it.

    `imatrix` weighs the columns: (n,) for 2-D data, (E, n) (one row per expert, or (n,) for all) for 3-D.
    """
    qtype = parse_type(qtype)
    x = np.ascontiguousarray(data, dtype=np.float32)
    if x.ndim not in (2, 3):
        raise ValueError(f"quantize wants 2-D (rows, n) or 3-D (E, rows, n) data, got shape {x.shape}")
    n = x.shape[-1]
    rs = row_bytes(qtype, n)
    im = _check_imatrix(imatrix, x.shape[:-1], n, qtype)
    if qtype == T.F32:
        return x.view(np.uint8).copy()  # (..., 4n)
    out = np.empty((*x.shape[:-1], rs), dtype=np.uint8)  # (..., row_bytes)
    x3, out3 = x.reshape(-1, *x.shape[-2:]), out.reshape(-1, *out.shape[-2:])  # (E, rows, n), (E, rows, rs)
    im2 = None if im is None else im.reshape(-1, n)  # (E, n)
    _init_type(qtype)
    lib, nthr = _lib(), _threads(threads)

    def work(task: tuple[int, int, int]) -> int:
        e, r0, nr = task
        imp = None if im2 is None else im2[e].ctypes.data
        size = int(lib.ggml_quantize_chunk(qtype.value, x3[e].ctypes.data, out3[e].ctypes.data, r0 * n, nr, n, imp))
        if not lib.ggml_validate_row_data(qtype.value, out3[e, r0].ctypes.data, size):  # as llama-quant.cpp does
            raise MoepackError(f"{qtype.name} quantization produced invalid blocks (NaN/inf in the input?)")
        return size

    tasks = [(e, r0, nr) for e in range(x3.shape[0]) for r0, nr in _row_chunks(x3.shape[1], n, nthr)]
    written = sum(_run(tasks, work, nthr))
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes} ({qtype.name})")
    return out


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType | str, shape: tuple[int, ...] | list[int],
               threads: int | None = None) -> np.ndarray:
    """ggml bytes → float32 of `shape` (last dim = weights per row), via the type traits' to_float."""
    qtype = parse_type(qtype)
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    rs = row_bytes(qtype, n)
    buf = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)  # (bytes,)
    if buf.size != n_rows * rs:
        raise ValueError(f"{buf.size} bytes do not hold {shape} of {qtype.name} ({n_rows} rows x {rs} bytes)")
    if qtype == T.F32:
        return buf.view(np.float32).reshape(shape).copy()
    to_float = _lib().ggml_get_type_traits(qtype.value).contents.to_float
    if not to_float:
        raise MoepackError(f"libggml has no to_float for {qtype.name}")
    out = np.empty((n_rows, n), dtype=np.float32)  # (rows, n)
    nthr = _threads(threads)

    def work(span: tuple[int, int]) -> None:
        r0, nr = span
        to_float(buf[r0 * rs:].ctypes.data, out[r0].ctypes.data, nr * n)

    _run(_row_chunks(n_rows, n, nthr), work, nthr)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------- whole files

@cache
def ftypes() -> dict[str, int]:
    """llama.cpp file types (Q4_K_M, IQ2_XXS, ...) → LLAMA_FTYPE value, from llama_cpp's own constants."""
    import llama_cpp

    names = {k.removeprefix("LLAMA_FTYPE_MOSTLY_"): v for k, v in vars(llama_cpp).items()
             if k.startswith("LLAMA_FTYPE_MOSTLY_")}
    names["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    for alias in ("Q3_K", "Q4_K", "Q5_K"):  # llama-quantize's aliases for the _M mixtures
        names[alias] = names[alias + "_M"]
    return names


def parse_ftype(name: str) -> int:
    key = name.strip().upper()
    if key not in ftypes():
        raise MoepackError(f"unknown llama.cpp file type {name!r}; valid: {_names(sorted(ftypes()))}")
    return ftypes()[key]

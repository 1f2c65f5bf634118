"""`llama_model_quantize`: a whole GGUF re-typed by llama.cpp's own quantizer to one of its file-type mixtures
(Q4_K_M, IQ2_XXS, ...), with llama.cpp's imatrix GGUF; the uniform baselines llama-quantize makes. Through the
llama-cpp-python bindings; llama.cpp's log goes to ours for the call, and its last lines into the error.
"""
from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from moepack.atomic import atomic_path
from moepack.errors import MoepackError
from moepack.gguf.imatrix import read_imatrix
from moepack.gguf.kernels import parse_ftype
from moepack.gguf.types import parse_type

__all__ = ["quantize_gguf_ftype"]

log = logging.getLogger(__name__)


class _LlamaLog:
    """Routes llama.cpp's log into ours for the duration of one call, keeping the lines for error messages."""

    def __init__(self) -> None:
        import llama_cpp

        self.lines: list[str] = []
        self._llama_cpp = llama_cpp
        self._cb = llama_cpp.llama_log_callback(self._on_log)  # referenced here so ctypes keeps it alive

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        line = text.decode("utf-8", "replace")
        self.lines.append(line)
        log.debug("llama.cpp[%d]: %s", level, line.rstrip())

    def __enter__(self) -> _LlamaLog:
        self._llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: Any) -> None:
        from llama_cpp import _logger  # llama-cpp-python's own callback, restored

        self._llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def tail(self, n: int = 4) -> str:
        return " / ".join("".join(self.lines).strip().splitlines()[-n:])


def _imatrix_params(llama_cpp: Any, imatrix: Path, keep: list[Any]) -> tuple[Any, Any]:
    """The imatrix as llama.cpp's NULL-terminated llama_model_imatrix_data array, plus the KV notes
    llama-quantize adds (quantize.imatrix.*). `keep` holds every buffer the C side points into."""
    if not hasattr(llama_cpp, "llama_model_imatrix_data"):
        raise MoepackError("this llama-cpp-python passes the imatrix as a C++ std::map, which ctypes cannot build; "
                           "upgrade llama-cpp-python (>= 0.3.16 with llama_model_imatrix_data)")
    found = read_imatrix(imatrix)
    if not found.entries:
        raise MoepackError(f"{imatrix} holds no imatrix entries (<name>.in_sum2 / <name>.counts tensors)")
    values = found.means()  # as llama-quantize's loader computes it: in_sum2 / counts, ones where none were seen
    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()  # zeroed: the last entry ends the list
    for i, (name, v) in enumerate(values.items()):
        flat = np.ascontiguousarray(v.reshape(-1))  # (E*n,)
        keep += [name.encode(), flat]
        arr[i].name, arr[i].size = keep[-2], flat.size
        arr[i].data = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    kv = (llama_cpp.llama_model_kv_override * 5)()
    notes: list[tuple[str, int | str]] = [("quantize.imatrix.file", str(imatrix)[-127:]),
                                          ("quantize.imatrix.entries_count", len(values)),
                                          ("quantize.imatrix.chunks_count", int(found.chunk_count))]
    if found.datasets:
        notes.append(("quantize.imatrix.dataset", str(found.datasets[0])[-127:]))
    for o, (key, val) in zip(kv, notes):
        o.key = key.encode()
        if isinstance(val, int):
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, val
        else:
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, val.encode()[:127]
    keep += [arr, kv]
    return arr, kv


def quantize_gguf_ftype(src: Path, dst: Path, ftype: str, imatrix: Path | None = None, threads: int = 2,
                        tensor_types: Mapping[str, GGMLQuantizationType | str] | None = None) -> None:
    """Quantize GGUF `src` to llama.cpp's standard mixture `ftype` (Q4_K_M, IQ2_XXS, ...) with llama.cpp itself.

    `imatrix` is llama.cpp's imatrix GGUF; `tensor_types` maps regexes to types (llama-quantize --tensor-type).
    """
    import llama_cpp

    src, dst = Path(src), Path(dst)
    value = parse_ftype(ftype)
    if not src.is_file():
        raise MoepackError(f"{src} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = max(1, int(threads)), value
    keep: list[Any] = []
    if imatrix is not None:
        params.imatrix, params.kv_overrides = _imatrix_params(llama_cpp, Path(imatrix), keep)
    if tensor_types:
        tt = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for o, (pattern, t) in zip(tt, tensor_types.items()):
            keep.append(pattern.encode())
            o.pattern, o.type = keep[-1], parse_type(t).value
        params.tt_overrides = tt
    log.info("llama_model_quantize %s -> %s (%s)", src, dst, ftype)
    with atomic_path(dst) as tmp, _LlamaLog() as llog:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            why = [ln.split("failed to quantize:", 1)[1].strip() for ln in llog.lines if "failed to quantize:" in ln]
            reason = why[-1] if why else llog.tail()
            hint = "; pass imatrix= (llama.cpp's imatrix GGUF)" if "imatrix" in reason and imatrix is None else ""
            raise MoepackError(f"llama.cpp could not quantize {src} to {ftype}: {reason}{hint}")

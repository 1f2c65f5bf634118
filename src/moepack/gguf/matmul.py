"""How long llama.cpp's own CPU kernels take to multiply by a weight matrix of each GGML type: ggml's `mul_mat`,
run through ctypes on the libggml that llama-cpp-python ships (the kernels a user's llama.cpp runs).

Why measure and not count bytes: a decode step reads every active weight once, but the time per byte differs
several-fold between types on a CPU (the IQ types decode their grids, the K-quants do not), so a plan chosen for
KLD per byte alone can be smaller and slower. `seconds_per_row` (a plain product) and `seconds_per_expert_row`
(routed experts' `mul_mat_id`) are the measurements the speed model (moepack.stages.speed) is built from.

How: one quantized (rows, n) matrix of random weights is copied until the copies exceed twice the last-level cache
(a decode step's weights come from memory, not cache), and a graph multiplies every copy by the same (n, batch)
float32 input, as llama.cpp's graph does (the input is converted to the type's dot-product type inside mul_mat).
The median over repeats, divided by rows × copies, is the time per weight row for `batch` input columns.
"""
from __future__ import annotations

import ctypes
import logging
import os
import statistics
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from moepack.errors import MoepackError
from moepack.gguf.kernels import lib_dir, quantize, requires_imatrix
from moepack.gguf.types import parse_type, row_bytes

__all__ = ["seconds_per_row", "seconds_per_expert_row", "cache_bytes", "cpu_name"]

log = logging.getLogger(__name__)

_VP, _I64 = ctypes.c_void_p, ctypes.c_int64
_GRAPH_NODES = 2048  # ggml's default graph size (GGML_DEFAULT_GRAPH_SIZE): copies per graph stay below it


class _InitParams(ctypes.Structure):  # struct ggml_init_params (ggml.h)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml-cpu) with the signatures used here; own handles, so kernels.py's are untouched."""
    ext = {"darwin": "dylib"}.get(os.uname().sysname.lower(), "so")
    base, cpu = (ctypes.CDLL(str(lib_dir() / f"libggml-{n}.{ext}")) for n in ("base", "cpu"))
    for lib, fn, res, args in [
            (base, "ggml_init", _VP, [_InitParams]), (base, "ggml_free", None, [_VP]),
            (base, "ggml_new_tensor_2d", _VP, [_VP, ctypes.c_int, _I64, _I64]),
            (base, "ggml_new_tensor_3d", _VP, [_VP, ctypes.c_int, _I64, _I64, _I64]),
            (base, "ggml_mul_mat", _VP, [_VP, _VP, _VP]), (base, "ggml_mul_mat_id", _VP, [_VP, _VP, _VP, _VP]),
            (base, "ggml_new_graph", _VP, [_VP]),
            (base, "ggml_build_forward_expand", None, [_VP, _VP]), (base, "ggml_get_data", _VP, [_VP]),
            (base, "ggml_tensor_overhead", ctypes.c_size_t, []), (base, "ggml_graph_overhead", ctypes.c_size_t, []),
            (cpu, "ggml_cpu_init", None, []),
            (cpu, "ggml_graph_compute_with_ctx", ctypes.c_int, [_VP, _VP, ctypes.c_int])]:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    cpu.ggml_cpu_init()
    return base, cpu


def cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _matrix(qtype: str, rows: int, n: int) -> np.ndarray:
    """One (rows, n) random matrix of `qtype`, as ggml stores it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, n), dtype=np.float32) * 0.02  # (rows, n)
    if qtype in ("F32", "F16"):
        return np.ascontiguousarray(w.astype(np.float32 if qtype == "F32" else np.float16))
    if qtype == "BF16":
        return np.ascontiguousarray((w.view(np.uint32) >> 16).astype(np.uint16))
    imatrix = np.ones(n, np.float32) if requires_imatrix(qtype) or qtype.startswith("IQ") else None
    return quantize(w, qtype, imatrix=imatrix)


def _fill(tensor: int, array: np.ndarray) -> None:
    """Copy `array` into a ggml tensor's data (bound to a name while copied: a temporary's buffer could be freed
    before memmove reads it)."""
    base, _ = _libs()
    held = np.ascontiguousarray(array)
    ctypes.memmove(base.ggml_get_data(tensor), held.ctypes.data, held.nbytes)


def _context(mem: int) -> int:
    base, _ = _libs()
    ctx = base.ggml_init(_InitParams(mem, None, False))
    if not ctx:
        raise MoepackError(f"ggml_init could not allocate {mem:,} bytes to time matrix products")
    return ctx


def seconds_per_row(qtype: str, n: int, batch: int = 1, threads: int = 2, rows: int = 512, repeats: int = 5,
                    min_seconds: float = 0.02) -> float:
    """Median seconds ggml's mul_mat takes per (n,)-wide weight row of `qtype` against `batch` input columns, the
    weights out of cache (see the module docstring)."""
    t = parse_type(qtype)
    nbytes = row_bytes(t, n) * rows
    copies = max(1, min(_GRAPH_NODES // 4, -(-2 * cache_bytes() // nbytes) if batch < 16 else 1))
    q = _matrix(t.name, rows, n)
    base, _ = _libs()
    over = base.ggml_tensor_overhead() + 64  # a tensor's header and alignment
    data = _context(copies * (nbytes + over) + n * batch * 4 + over + 2**20)  # the weights and the input
    try:
        x = base.ggml_new_tensor_2d(data, 0, n, batch)  # (batch, n) f32 input
        _fill(x, np.random.default_rng(1).standard_normal((batch, n), dtype=np.float32))
        products = []
        for _ in range(copies):
            w = base.ggml_new_tensor_2d(data, t.value, n, rows)  # (rows, n) weights of type t
            _fill(w, q)
            products.append((w, None))
        # each computation allocates its work buffer in its graph's context: a fresh one per run
        mem = copies * (rows * batch * 4 + over) + base.ggml_graph_overhead() + 4 * n * batch * 4 + 4 * 2**20
        return _time(lambda ctx: _graph(ctx, products, x), mem, threads, repeats, min_seconds) / (rows * copies)
    finally:
        base.ggml_free(data)


_I32 = 26  # GGML_TYPE_I32


def seconds_per_expert_row(qtype: str, n: int, experts: int, used: int, tokens: int, threads: int = 2,
                           rows: int = 256, repeats: int = 5, min_seconds: float = 0.02) -> float:
    """Median seconds per (weight row × expert use × token) of ggml's `mul_mat_id`, as llama.cpp multiplies a MoE
    layer's experts: (experts, rows, n) weights of `qtype`, `tokens` inputs each routed to `used` experts. Successive
    products route to the next experts in turn (a decode step's experts are not the last step's), and the expert
    tensor is repeated until what is read exceeds twice the last-level cache: the weights come from memory."""
    t = parse_type(qtype)
    nbytes = row_bytes(t, n) * rows
    turns = max(1, experts // (used * tokens))  # products until every expert was read once
    copies = max(1, min(_GRAPH_NODES // (2 * turns), -(-2 * cache_bytes() // (nbytes * experts))))
    q = _matrix(t.name, rows, n)
    base, _ = _libs()
    over = base.ggml_tensor_overhead() + 64
    data = _context(copies * (experts * nbytes + over) + n * tokens * 4 + turns * (used * tokens * 4 + over) + 2**20)
    try:
        x = base.ggml_new_tensor_3d(data, 0, n, 1, tokens)  # (tokens, 1, n) f32 input, broadcast to each expert
        _fill(x, np.random.default_rng(1).standard_normal((tokens, n), dtype=np.float32))
        routes = []
        for g in range(turns):  # (tokens, used) expert ids of the g-th product
            ids = base.ggml_new_tensor_2d(data, _I32, used, tokens)
            start = (g * tokens + np.arange(tokens))[:, None] * used
            _fill(ids, ((start + np.arange(used)[None, :]) % experts).astype(np.int32))
            routes.append(ids)
        weights = []
        for _ in range(copies):
            w = base.ggml_new_tensor_3d(data, t.value, n, rows, experts)  # (experts, rows, n) weights of type t
            for e in range(experts):
                ctypes.memmove(base.ggml_get_data(w) + e * nbytes, q.ctypes.data, nbytes)
            weights.append(w)
        products = [(w, r) for w in weights for r in routes]
        mem = len(products) * (rows * used * tokens * 4 + over) + base.ggml_graph_overhead() + 8 * n * tokens * 4
        seconds = _time(lambda ctx: _graph(ctx, products, x), mem + 4 * 2**20, threads, repeats, min_seconds)
        return seconds / (rows * used * tokens * len(products))
    finally:
        base.ggml_free(data)


def _graph(ctx: int, products: list[tuple[int, int | None]], x: int) -> int:
    """A graph in `ctx` multiplying `x` by each (weights, expert routes): a plain `mul_mat` where the routes are None,
    else `mul_mat_id` as llama.cpp's MoE layers do."""
    base, _ = _libs()
    graph = base.ggml_new_graph(ctx)
    for w, ids in products:
        y = base.ggml_mul_mat(ctx, w, x) if ids is None else base.ggml_mul_mat_id(ctx, w, x, ids)
        base.ggml_build_forward_expand(graph, y)  # (batch, rows) | (tokens, used, rows)
    return graph


def _time(build: Callable[[int], int], mem: int, threads: int, repeats: int, min_seconds: float) -> float:
    """Median wall time of one graph computation (after one warm-up), repeated until `min_seconds` have passed;
    each in a fresh context of `mem` bytes made by `build(ctx) -> graph`."""
    base, cpu = _libs()
    times: list[float] = []
    while len(times) < repeats + 1 or sum(times[1:]) < min_seconds:
        ctx = _context(mem)
        try:
            graph = build(ctx)
            t0 = time.perf_counter()
            if cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) != 0:
                raise MoepackError("ggml_graph_compute failed while timing matrix products")
            times.append(time.perf_counter() - t0)
        finally:
            base.ggml_free(ctx)
    return statistics.median(times[1:])  # the first is the warm-up

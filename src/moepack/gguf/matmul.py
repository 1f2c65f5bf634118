"""How long llama.cpp's own CPU kernels take to multiply by a weight matrix of each GGML type: ggml's `mul_mat`,
run through ctypes on the libggml that llama-cpp-python ships (the kernels a user's llama.cpp runs).

Why measure and not count bytes: a decode step reads every active weight once, but the time per byte differs
several-fold between types on a CPU (the IQ types decode their grids, the K-quants do not), so a plan chosen for
KLD per byte alone can be smaller and slower. `row_cost` (a plain product) and `expert_row_cost` (routed experts'
`mul_mat_id`) are the measurements the speed model (moepack.stages.speed) is built from.

How: one quantized (rows, n) matrix of random weights is copied until the copies exceed twice the last-level cache
(a decode step's weights come from memory, not cache), and a graph multiplies every copy by the same (n, batch)
float32 input, as llama.cpp's graph does (the input is converted to the type's dot-product type inside mul_mat).
The median over repeats, divided by the copies, is one product's time; two row counts give its fixed part per
call and its part per weight row for `batch` input columns.
"""
from __future__ import annotations

import ctypes
import logging
import math
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

__all__ = ["row_cost", "expert_row_cost", "attention_cost", "attention_copies", "layer_ops_seconds", "fit_call_row",
           "cache_bytes", "cpu_name"]

log = logging.getLogger(__name__)

# How the kernels are timed, part of a cached table's key (moepack.stages.speed.default_table_path): a change to the
# method measures the tables again. 2: compute buffers reused (fresh ones timed their page faults); call + row fit.
# 3: a decode step's attention reads the KV cache from memory, not from the last-level cache.
METHOD = 3

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
            (base, "ggml_soft_max_ext", _VP, [_VP, _VP, _VP, ctypes.c_float, ctypes.c_float]),
            *[(base, f"ggml_{op}", _VP, [_VP, _VP]) for op in ("soft_max", "silu", "cont", "sum_rows")],
            *[(base, f"ggml_{op}", _VP, [_VP, _VP, _VP]) for op in ("add", "mul", "div", "get_rows")],
            (base, "ggml_rms_norm", _VP, [_VP, _VP, ctypes.c_float]),
            (base, "ggml_argsort_top_k", _VP, [_VP, _VP, ctypes.c_int]),
            (base, "ggml_permute", _VP, [_VP, _VP, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
            (base, "ggml_reshape_3d", _VP, [_VP, _VP, _I64, _I64, _I64]),
            (base, "ggml_view_2d", _VP, [_VP, _VP, _I64, _I64, ctypes.c_size_t, ctypes.c_size_t]),
            (base, "ggml_new_graph", _VP, [_VP]),
            (base, "ggml_build_forward_expand", None, [_VP, _VP]), (base, "ggml_get_data", _VP, [_VP]),
            (base, "ggml_tensor_overhead", ctypes.c_size_t, []), (base, "ggml_graph_overhead", ctypes.c_size_t, []),
            (cpu, "ggml_cpu_init", None, []),
            (cpu, "ggml_graph_plan", _CPlan, [_VP, ctypes.c_int, _VP]),
            (cpu, "ggml_graph_compute", ctypes.c_int, [_VP, ctypes.POINTER(_CPlan)])]:
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


def _out_of_cache(bytes_per_copy: int, nodes_per_copy: int) -> int:
    """Copies of what one timed computation reads, so that together they exceed twice the last-level cache (the data
    comes from memory, as a decode step's weights and KV cache do), within ggml's graph size."""
    return max(1, min(_GRAPH_NODES // nodes_per_copy, -(-2 * cache_bytes() // bytes_per_copy)))


def _within(memory: int, block_bytes: int) -> int:
    """Blocks per timed prompt graph: ATTENTION_COPIES, fewer where that many blocks would take more than `memory`
    bytes (one at least)."""
    return max(1, min(ATTENTION_COPIES, memory // max(1, block_bytes)))


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


def row_cost(qtype: str, n: int, batch: int = 1, threads: int = 2, rows: tuple[int, int] = (512, 2048),
             repeats: int = 5, min_seconds: float = 0.02) -> tuple[float, float]:
    """(seconds per call, seconds per (n,)-wide weight row) of ggml's mul_mat of `qtype` against `batch` input
    columns, the weights out of cache: a product of R rows takes call + R · row. Fitted on two row counts, since a
    call's fixed part (converting the input to the dot-product type, starting the threads) is a third of a
    512-row product at a 512-token batch."""
    return fit_call_row(rows, [_product_seconds(qtype, n, batch, threads, r, repeats, min_seconds) for r in rows])


def expert_row_cost(qtype: str, n: int, experts: int, used: int, tokens: int, threads: int = 2,
                    repeats: int = 5, min_seconds: float = 0.02) -> tuple[float, float]:
    """(seconds per call, seconds per (row × expert use × token)) of ggml's `mul_mat_id` (see
    `_expert_product_seconds`), fitted on two row counts per expert like `row_cost`; the larger one keeps the
    expert tensor under 1 GiB."""
    hi = max(48, min(768, 2**30 // (experts * row_bytes(parse_type(qtype), n))))
    rows = (hi // 3, hi)
    per = [_expert_product_seconds(qtype, n, experts, used, tokens, threads, r, repeats, min_seconds) for r in rows]
    call, row = fit_call_row(rows, per)
    return call, row / (used * tokens)


def fit_call_row(rows: tuple[int, int], seconds: list[float]) -> tuple[float, float]:
    """(call, row) of the line through (rows[i], seconds[i]); a call part below zero (timing noise) is taken as 0."""
    (a, b), (ta, tb) = rows, seconds
    row = (tb - ta) / (b - a)
    call = ta - a * row
    if call < 0 or row <= 0:
        return 0.0, tb / b
    return call, row


def _product_seconds(qtype: str, n: int, batch: int, threads: int, rows: int, repeats: int,
                     min_seconds: float) -> float:
    """Median seconds of one mul_mat of a (rows, n) `qtype` matrix by a (n, batch) input, the weights out of cache
    (see the module docstring)."""
    t = parse_type(qtype)
    nbytes = row_bytes(t, n) * rows
    copies = _out_of_cache(nbytes, 4) if batch < 16 else 1
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
        # the graph and its outputs; the work buffer is _time's own
        mem = copies * (rows * batch * 4 + over) + base.ggml_graph_overhead() + 4 * n * batch * 4 + 4 * 2**20
        return _time(lambda ctx: _graph(ctx, products, x), mem, threads, repeats, min_seconds) / copies
    finally:
        base.ggml_free(data)


_I32 = 26  # GGML_TYPE_I32


def _expert_product_seconds(qtype: str, n: int, experts: int, used: int, tokens: int, threads: int, rows: int,
                            repeats: int, min_seconds: float) -> float:
    """Median seconds of one ggml `mul_mat_id`, as llama.cpp multiplies a MoE layer's experts: (experts, rows, n)
    weights of `qtype`, `tokens` inputs each routed to `used` experts. Successive products route to the next experts
    in turn (a decode step's experts are not the last step's), and the expert tensor is repeated until what is read
    exceeds twice the last-level cache: the weights come from memory."""
    t = parse_type(qtype)
    nbytes = row_bytes(t, n) * rows
    turns = max(1, experts // (used * tokens))  # products until every expert was read once
    copies = _out_of_cache(nbytes * experts, 2 * turns)
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
        return seconds / len(products)
    finally:
        base.ggml_free(data)


_F16 = 1  # GGML_TYPE_F16: llama.cpp's default KV cache type
ATTENTION_COPIES = 4  # attention blocks per timed graph (a step's layers run one after another)


def attention_cost(n_head: int, n_head_kv: int, head_k: int, head_v: int, tokens: int, threads: int = 2,
                   n_kv: tuple[int, int] = (256, 1024), repeats: int = 5,
                   min_seconds: float = 0.02) -> tuple[float, float]:
    """(seconds per call, seconds per cached token) of one layer's attention as llama.cpp computes it without flash
    attention (llama-cpp-python's default): KQ = mul_mat(K, Q) over the F16 K cache, soft_max, KQV = mul_mat(V, KQ)
    over the transposed F16 V cache, for `tokens` query tokens; `n_head` query heads share `n_head_kv` cached
    heads (1 for MLA, whose latent is the cache). Fitted on two cache lengths, like `row_cost`."""
    return fit_call_row(n_kv, [_attention_seconds(n_head, n_head_kv, head_k, head_v, n, tokens, threads, repeats,
                                          min_seconds) for n in n_kv])


_ATTENTION_MEMORY = 2**30  # bytes a timed prompt attention graph may take: fewer copies where one block is larger
_OPS_MEMORY = 2**32  # the same for a layer's element-wise ops (their intermediates: 16 × the inputs, as reserved)


def attention_copies(cache_bytes_per_copy: int, tokens: int, block_bytes: int) -> int:
    """Attention blocks per timed graph. A decode step (few query tokens): enough that the K and V caches read exceed
    twice the last-level cache: between one token's attention in a layer and the next's, a whole step's weights
    stream through the cache, so llama.cpp reads the KV cache from memory (timed in cache, a Qwen3-30B-A3B layer's
    decode attention over 512 tokens read 0.13 ms; from memory 0.17, as llama.cpp's decode time grows with the
    context). A prompt: ATTENTION_COPIES, fewer where a block's scores take more than _ATTENTION_MEMORY (DeepSeek-V3's
    128 heads × 512 tokens × 1,024 cached: 1 GiB each)."""
    if tokens >= 16:
        return _within(_ATTENTION_MEMORY, block_bytes)
    return max(ATTENTION_COPIES, _out_of_cache(cache_bytes_per_copy, 3))


def _attention_seconds(n_head: int, n_head_kv: int, head_k: int, head_v: int, n_kv: int, tokens: int, threads: int,
                       repeats: int, min_seconds: float) -> float:
    base, _ = _libs()
    rng = np.random.default_rng(2)
    over = base.ggml_tensor_overhead() + 64
    sizes = [4 * head_k * tokens * n_head, 2 * head_k * n_kv * n_head_kv, 2 * n_kv * head_v * n_head_kv]
    scores = 3 * n_kv * tokens * n_head * 4 + 2 * head_v * tokens * n_head * 4  # one block's KQ, soft_max, KQV
    copies = attention_copies(sizes[1] + sizes[2], tokens, sum(sizes) + scores)
    data = _context(copies * (sum(sizes) + 3 * over) + 2**20)
    try:
        blocks = []
        for _ in range(copies):
            q = base.ggml_new_tensor_3d(data, 0, head_k, tokens, n_head)  # (n_head, tokens, head_k) f32 queries
            k = base.ggml_new_tensor_3d(data, _F16, head_k, n_kv, n_head_kv)  # (n_head_kv, n_kv, head_k) K cache
            v = base.ggml_new_tensor_3d(data, _F16, n_kv, head_v, n_head_kv)  # (n_head_kv, head_v, n_kv) V cache^T
            _fill(q, rng.standard_normal((n_head, tokens, head_k), dtype=np.float32))
            _fill(k, rng.standard_normal((n_head_kv, n_kv, head_k)).astype(np.float16))
            _fill(v, rng.standard_normal((n_head_kv, head_v, n_kv)).astype(np.float16))
            blocks.append((q, k, v))
        scale = 1.0 / float(np.sqrt(head_k))

        def graph(ctx: int) -> int:
            g = base.ggml_new_graph(ctx)
            for q, k, v in blocks:
                kq = base.ggml_mul_mat(ctx, k, q)  # (n_head, tokens, n_kv)
                kq = base.ggml_soft_max_ext(ctx, kq, None, scale, 0.0)
                base.ggml_build_forward_expand(g, base.ggml_mul_mat(ctx, v, kq))  # (n_head, tokens, head_v)
            return g

        mem = copies * (scores + 4 * over)
        mem += base.ggml_graph_overhead() + 4 * 2**20
        return _time(graph, mem, threads, repeats, min_seconds) / copies
    finally:
        base.ggml_free(data)


def layer_ops_seconds(hidden: int, n_head: int, n_head_kv: int, head: int, experts: int, used: int, ffn: int,
                      tokens: int, threads: int = 2, repeats: int = 5, min_seconds: float = 0.02) -> float:
    """Seconds one transformer layer spends in llama.cpp beyond its weight products and attention, for `tokens`
    tokens: the element-wise and routing ops of a MoE layer's graph (two RMS norms and the per-head q/k norms, a
    RoPE-sized element-wise op on q and k, storing K and V in the F16 cache, merging the heads, two residual adds;
    the router's soft_max, top-k, gathered and renormalised weights; SwiGLU over the `used` experts' `ffn`-wide
    outputs, their weighting and sum) — about 25 + k' graph nodes, each a thread barrier, which weigh in a decode
    step where every product is small. `experts` 0: a dense layer of width `ffn`."""
    base, _ = _libs()
    used = used if experts else 1
    shapes = {"x": (hidden, tokens), "q": (head, n_head, tokens), "k": (head, n_head_kv, tokens),
              "att": (head, tokens, n_head), "logits": (max(experts, 1), tokens), "gate": (ffn, used, tokens),
              "out": (hidden, used, tokens), "w_h": (hidden,), "w_d": (head,)}
    inputs = sum(4 * math.prod(v) + 512 for v in shapes.values())
    copies = _within(_OPS_MEMORY, 16 * inputs)  # one block of DeepSeek-V3's 512-token ops takes 7.5 GB
    data = _context(copies * inputs * 4 + 2**20)
    try:
        blocks = [_ops_inputs(data, shapes) for _ in range(copies)]

        def graph(ctx: int) -> int:
            g = base.ggml_new_graph(ctx)
            for t in blocks:
                for node in _layer_ops(ctx, t, experts, used, hidden, tokens):
                    base.ggml_build_forward_expand(g, node)
            return g

        return _time(graph, copies * 16 * inputs + 2**24, threads, repeats, min_seconds) / copies
    finally:
        base.ggml_free(data)


def _ops_inputs(data: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Random f32 tensors of `shapes` (ggml order) in `data`."""
    base, _ = _libs()
    rng = np.random.default_rng(3)
    out = {}
    for name, shape in shapes.items():
        ne = (*shape, 1)[:max(2, len(shape))]
        t = base.ggml_new_tensor_3d(data, 0, *ne) if len(ne) == 3 else base.ggml_new_tensor_2d(data, 0, *ne)
        _fill(t, rng.standard_normal(math.prod(shape), dtype=np.float32))
        out[name] = t
    return out


def _layer_ops(ctx: int, t: dict[str, int], experts: int, used: int, hidden: int, tokens: int) -> list[int]:
    """The graph nodes of one layer's element-wise and routing work (see layer_ops_seconds); shapes as in llama.cpp."""
    base, _ = _libs()
    eps = 1e-6
    norm = base.ggml_mul(ctx, base.ggml_rms_norm(ctx, t["x"], eps), t["w_h"])  # (tokens, hidden)
    q = base.ggml_mul(ctx, base.ggml_rms_norm(ctx, t["q"], eps), t["w_d"])  # (tokens, n_head, head): q norm
    k = base.ggml_mul(ctx, base.ggml_rms_norm(ctx, t["k"], eps), t["w_d"])
    q, k = base.ggml_mul(ctx, q, q), base.ggml_mul(ctx, k, k)  # RoPE's element-wise pass, as a same-size op
    nodes = [norm, q, k, base.ggml_cont(ctx, k), base.ggml_cont(ctx, t["k"])]  # K and V into the cache
    merged = base.ggml_cont(ctx, base.ggml_permute(ctx, t["att"], 0, 2, 1, 3))  # (tokens, n_head, head)
    h = base.ggml_add(ctx, t["x"], t["x"])  # the attention's residual
    nodes += [merged, h, base.ggml_mul(ctx, base.ggml_rms_norm(ctx, h, eps), t["w_h"])]
    out = t["out"]  # (tokens, k', hidden) expert outputs, weighted then summed over k'
    if experts:  # routing: probabilities, top-k', their weights gathered and renormalised
        probs = base.ggml_soft_max(ctx, t["logits"])  # (tokens, experts)
        top = base.ggml_argsort_top_k(ctx, probs, used)  # (tokens, k')
        w = base.ggml_get_rows(ctx, base.ggml_reshape_3d(ctx, probs, 1, experts, tokens), top)  # (tokens, k', 1)
        w = base.ggml_div(ctx, w, base.ggml_sum_rows(ctx, w))
        out = base.ggml_mul(ctx, out, w)
    nodes.append(base.ggml_mul(ctx, base.ggml_silu(ctx, t["gate"]), t["gate"]))  # SwiGLU: (tokens, k', ffn)
    acc = None
    for i in range(used):  # the k' slices (tokens, hidden), added one by one as llama.cpp does
        view = base.ggml_view_2d(ctx, out, hidden, tokens, 4 * hidden * used, 4 * hidden * i)
        acc = view if acc is None else base.ggml_add(ctx, acc, view)
    return nodes + [base.ggml_add(ctx, acc, h)]


def _graph(ctx: int, products: list[tuple[int, int | None]], x: int) -> int:
    """A graph in `ctx` multiplying `x` by each (weights, expert routes): a plain `mul_mat` where the routes are None,
    else `mul_mat_id` as llama.cpp's MoE layers do."""
    base, _ = _libs()
    graph = base.ggml_new_graph(ctx)
    for w, ids in products:
        y = base.ggml_mul_mat(ctx, w, x) if ids is None else base.ggml_mul_mat_id(ctx, w, x, ids)
        base.ggml_build_forward_expand(graph, y)  # (batch, rows) | (tokens, used, rows)
    return graph


class _CPlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


def _time(build: Callable[[int], int], mem: int, threads: int, repeats: int, min_seconds: float) -> float:
    """Median wall time of one computation of the graph `build(ctx)` makes in a context of `mem` bytes (after one
    warm-up), repeated until `min_seconds` have passed. The graph, its outputs and its work buffer are made once and
    reused, as llama.cpp reuses its compute buffers: fresh ones would time the page faults of first touching them
    (a prompt's attention scores are tens of MB)."""
    base, cpu = _libs()
    ctx = _context(mem)
    try:
        graph = build(ctx)
        plan = cpu.ggml_graph_plan(graph, threads, None)
        work = np.zeros(max(1, plan.work_size), np.uint8)  # held until the last computation
        plan.work_data = work.ctypes.data
        times: list[float] = []
        while len(times) < repeats + 1 or sum(times[1:]) < min_seconds:
            t0 = time.perf_counter()
            if cpu.ggml_graph_compute(graph, ctypes.byref(plan)) != 0:
                raise MoepackError("ggml_graph_compute failed while timing matrix products")
            times.append(time.perf_counter() - t0)
    finally:
        base.ggml_free(ctx)
    return statistics.median(times[1:])  # the first is the warm-up

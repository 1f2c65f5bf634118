"""Where llama.cpp keeps each tensor of a MoE on one GPU + CPU machine, and one quantization plan for two budgets.

The placement is llama.cpp's for MoEs larger than the GPU (`llama-server -ngl 99 -ot exps=CPU`): every layer is
offloaded to the GPU, then the tensors whose names match `exps` (the routed experts, `blk.N.ffn_{gate,up,down}_exps`)
are overridden back to system RAM; llama.cpp keeps its input layer (`token_embd`, read by row lookups) in RAM
whatever -ngl says. So, with `--gpu-memory G --memory M --ctx-size N`::

    GPU:  GPU-resident tensors  ≤ G − KV cache(N) − compute buffers(N) − GPU reserve
    RAM:  routed experts + token_embd  ≤ M − compute buffers(N) − reserve − GGUF overhead

The compute buffers are counted on both sides (llama.cpp reserves a graph buffer on each backend that runs part of
the graph; `compute_buffer_bytes` is the CPU-only estimate and errs large for the host side). Each reserve is 5 %
of its memory unless `--reserve` sets the RAM one. The two budgets are two knapsacks over the one sensitivity
table: `split_table` cuts it by placement, `moepack.stages.allocate.allocate` solves each side, `allocate_placed`
merges the two plans into one and records both sides in the plan's base["placement"].
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Iterable

from moepack.gguf.runtime import EXPERTS_ON_CPU
from moepack.schema import QuantPlan, SensitivityTable
from moepack.stages.allocate import MAX_WORK, AllocationError, allocate
from moepack.stages.budget import (DEFAULT_RESERVE_FRACTION, Budget, BudgetError, BudgetRequest, compute_buffer_bytes,
                                   format_size, gguf_overhead_bytes, kv_cache_bytes, parse_size)

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView

__all__ = ["RAM_PATTERNS", "on_gpu", "resident_bytes", "placed_budget", "describe_placed", "smallest_memories",
           "size_flag", "check_floors", "split_table", "allocate_placed"]

log = logging.getLogger(__name__)

# GGUF tensor names (regex search, as llama.cpp's -ot matches them) that stay in system RAM: the -ot patterns, and
# llama.cpp's input layer, which it never offloads.
RAM_PATTERNS = (*EXPERTS_ON_CPU, r"^token_embd\.")


def on_gpu(name: str) -> bool:
    """Whether the GGUF tensor `name` is GPU-resident under `-ngl 99 -ot exps=CPU`."""
    return not any(re.search(p, name) for p in RAM_PATTERNS)


def resident_bytes(sizes: Iterable[tuple[str, int]]) -> tuple[int, int]:
    """(GPU, RAM) sums of (GGUF tensor name, bytes) pairs."""
    gpu = ram = 0
    for name, n in sizes:
        gpu, ram = (gpu + n, ram) if on_gpu(name) else (gpu, ram + n)
    return gpu, ram


# ---------------------------------------------------------------------------------------------------- budgets

def _check_request(r: BudgetRequest) -> None:
    if r.memory is None or r.target_size is not None or r.target_bpw is not None:
        raise BudgetError("--gpu-memory needs --memory SIZE (the system RAM that holds the routed experts) and "
                          "--ctx-size N; it does not combine with --target-size or --target-bpw")
    if r.ctx is None:
        raise BudgetError("--gpu-memory needs --ctx-size N: the context length sizes the KV cache on the GPU")


def placed_budget(view: CheckpointView, request: BudgetRequest, overhead: int | None = None) -> Budget:
    """The GPU + RAM budgets of `request` (see the module doc); `weights` is their sum, `gpu_weights` the GPU's.
    A budget that leaves no room on one side raises `BudgetError` with the smallest memories that would."""
    _check_request(request)
    gpu, ram, ctx = parse_size(request.gpu_memory), parse_size(request.memory), int(request.ctx)
    kv = kv_cache_bytes(view, ctx, request.type_k, request.type_v)
    compute = compute_buffer_bytes(view, ctx, request.n_ubatch, request.flash_attn)
    overhead = gguf_overhead_bytes(view) if overhead is None else int(overhead)
    reserve = int(ram * DEFAULT_RESERVE_FRACTION) if request.reserve is None else parse_size(request.reserve)
    gpu_reserve = int(gpu * DEFAULT_RESERVE_FRACTION)
    gpu_weights = gpu - kv - compute - gpu_reserve
    ram_weights = ram - compute - reserve - overhead
    b = Budget(ram, kv, compute, reserve, gpu_weights + ram_weights, overhead, "memory", ctx, gpu_memory=gpu,
               gpu_reserve=gpu_reserve, gpu_weights=gpu_weights)
    check_floors(b, 1, 1, "")
    return b


def describe_placed(b: Budget) -> str:
    assert b.gpu_weights is not None and b.gpu_memory is not None
    return "\n".join([
        f"GPU memory        {format_size(b.gpu_memory)}",
        f"− KV cache        {format_size(b.kv_cache)}  (ctx {b.ctx})",
        f"− compute buffers {format_size(b.compute)}  (estimate)",
        f"− reserve         {format_size(b.gpu_reserve)}",
        f"= GPU tensors     {format_size(b.gpu_weights)}  (all but the routed experts and token_embd)",
        f"RAM               {format_size(b.memory or 0)}",
        f"− compute buffers {format_size(b.compute)}  (estimate)",
        f"− reserve         {format_size(b.reserve)}",
        f"− GGUF metadata   {format_size(b.overhead)}  (estimate)",
        f"= RAM tensors     {format_size(b.ram_weights or 0)}  (routed experts, -ot "
        f"{','.join(f'{k}={v}' for k, v in EXPERTS_ON_CPU.items())}; token_embd)"])


def _smallest(need: int, reserve: int | None) -> int:
    """The smallest memory m with m − reserve ≥ need, the reserve being 5 % of m unless given."""
    if reserve is not None:
        return need + reserve
    m = math.ceil(need / (1 - DEFAULT_RESERVE_FRACTION))
    while m - 1 - int((m - 1) * DEFAULT_RESERVE_FRACTION) >= need:
        m -= 1
    while m - int(m * DEFAULT_RESERVE_FRACTION) < need:
        m += 1
    return m


def smallest_memories(b: Budget, gpu_floor: int, ram_floor: int) -> tuple[int, int]:
    """(GPU memory, RAM) in bytes that leave `gpu_floor` and `ram_floor` bytes of tensors at b's context."""
    fraction = b.reserve == int((b.memory or 0) * DEFAULT_RESERVE_FRACTION)  # else --reserve set it
    return (_smallest(gpu_floor + b.kv_cache + b.compute, None),
            _smallest(ram_floor + b.compute + b.overhead, None if fraction else b.reserve))


def size_flag(n: int) -> str:
    """A size to type that is at least n bytes: GiB (or MiB below 1 GiB) rounded up to two decimals."""
    unit, scale = ("GiB", 2**30) if n >= 2**30 else ("MiB", 2**20)
    return f"{Decimal(-(-n * 100 // scale)) / 100}{unit}"


def check_floors(b: Budget, gpu_floor: int, ram_floor: int, what: str) -> None:
    """BudgetError when `what` (gpu_floor bytes of GPU-resident tensors, ram_floor in RAM) does not fit `b`; the
    message gives the smallest --gpu-memory and --memory that would fit it."""
    assert b.gpu_weights is not None and b.ram_weights is not None
    ram_weights = b.ram_weights
    short = [f"  {side}: {what} needs {format_size(floor)}, the budget leaves {format_size(left)}" if floor > 1
             else f"  {side}: nothing is left for tensors"
             for side, floor, left in (("GPU", gpu_floor, b.gpu_weights), ("RAM", ram_floor, ram_weights))
             if floor > left]
    if short:
        gpu, ram = smallest_memories(b, gpu_floor, ram_floor)
        raise BudgetError("the GPU + RAM budgets do not fit:\n" + "\n".join(short) + f"\n{describe_placed(b)}\n"
                          f"the smallest that fits: --gpu-memory {size_flag(gpu)} --memory {size_flag(ram)} "
                          f"({gpu:,} and {ram:,} bytes) at --ctx-size {b.ctx}; or lower --ctx-size or --keep")


# ---------------------------------------------------------------------------------------------------- the plan

def split_table(table: SensitivityTable) -> tuple[SensitivityTable, SensitivityTable]:
    """(GPU, RAM) tables: the groups of each placement; the fixed tensors (norms, routers, biases) on the GPU."""
    sides: dict[bool, list] = {True: [], False: []}
    for g in table.groups:
        where = {on_gpu(t) for t in g.tensors}
        if len(where) != 1:
            raise AllocationError(f"group {g.name} has tensors on the GPU and in RAM; it cannot be placed whole")
        sides[where.pop()].append(g)
    in_ram = [t for t in table.fixed if not on_gpu(t)]
    if in_ram:
        raise AllocationError(f"fixed tensors {', '.join(in_ram[:4])} would be in RAM, but the sensitivity table "
                              "records fixed bytes only in total; they cannot be placed")
    return (replace(table, groups=tuple(sides[True])),
            replace(table, groups=tuple(sides[False]), fixed_bytes=0, fixed={}))


def _side(table: SensitivityTable, budget: int, solver: str, max_work: int, where: str) -> QuantPlan:
    try:
        return allocate(table, budget, solver, max_work)
    except AllocationError as e:
        raise AllocationError(f"{where}: {e}") from None


def allocate_placed(table: SensitivityTable, gpu_bytes: int, ram_bytes: int, solver: str = "greedy",
                    max_work: int = MAX_WORK) -> QuantPlan:
    """One plan whose GPU-resident tensors fit `gpu_bytes` and whose RAM-resident ones fit `ram_bytes`, each side
    the lowest predicted ΔKLD the allocator finds for its budget."""
    gpu_t, ram_t = split_table(table)
    g = _side(gpu_t, gpu_bytes, solver, max_work, "GPU-resident tensors")
    r = _side(ram_t, ram_bytes, solver, max_work, "RAM-resident tensors (routed experts, token_embd)")
    dkld = g.predicted_dkld + r.predicted_dkld
    kld = table.base.get("kld")
    kld = float(kld) + dkld if isinstance(kld, (int, float)) and not isinstance(kld, bool) else None
    buckets = [q for q in (g.bucket_bytes, r.bucket_bytes) if q is not None]
    placement = {"override": ",".join(f"{k}={v}" for k, v in EXPERTS_ON_CPU.items()),
                 "gpu": {"budget_bytes": gpu_bytes, "bytes": g.predicted_bytes},
                 "ram": {"budget_bytes": ram_bytes, "bytes": r.predicted_bytes}}
    log.info("GPU tensors %s of %s, RAM tensors %s of %s", format_size(g.predicted_bytes), format_size(gpu_bytes),
             format_size(r.predicted_bytes), format_size(ram_bytes))
    return QuantPlan(solver, gpu_bytes + ram_bytes, g.predicted_bytes + r.predicted_bytes, table.fixed_bytes, dkld,
                     g.groups | r.groups, g.tensors | r.tensors, max(buckets) if buckets else None, kld,
                     table.base | {"placement": placement})

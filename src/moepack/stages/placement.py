"""Where llama.cpp keeps each tensor of a MoE on one GPU + CPU machine, and one quantization plan for two budgets.

The placement is llama.cpp's for MoEs larger than the GPU (`llama-server -ngl 99 -ot exps=CPU`): every layer is
offloaded to the GPU, then the tensors whose names match `exps` (the routed experts, `blk.N.ffn_{gate,up,down}_exps`)
are overridden back to system RAM; llama.cpp keeps its input layer (`token_embd`, read by row lookups) in RAM
whatever -ngl says. The GPU + RAM budgets of `--gpu-memory G --memory M --ctx-size N` are `moepack.stages.budget`'s;
they are two knapsacks over the one sensitivity table: `split_table` cuts it by placement,
`moepack.stages.allocate.allocate` solves each side, `allocate_placed` merges the two plans into one and records
both sides in the plan's base["placement"].
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Iterable

from moepack.gguf.runtime import EXPERTS_ON_CPU
from moepack.schema import QuantPlan, SensitivityTable
from moepack.stages.allocate import MAX_WORK, AllocationError, allocate
from moepack.stages.sizes import format_size

__all__ = ["RAM_PATTERNS", "on_gpu", "resident_bytes", "split_table", "allocate_placed"]

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

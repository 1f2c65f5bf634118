"""How many bytes the quantized weights may take: from a device (memory, context length) or a size target.

One path: a `BudgetRequest` (what the user asked for) and a checkpoint give a `Budget` through `budget_for`.

Device budget (``--memory SIZE --ctx-size N [--reserve SIZE]``)::

    weights = memory − KV cache(ctx) − compute buffers(ctx) − reserve − GGUF overhead

Size targets (``--target-size SIZE`` or ``--target-bpw X``) set the GGUF *file* size directly::

    weights = target − GGUF overhead,     target = floor(X · N / 8) for --target-bpw

where N is the parameter count of **every tensor of the checkpoint the budget is computed for** (norms, routers
and biases included — `CheckpointView.param_counts`, the same count `moepack inspect` reports as "total" and divides
by for its bits/weight). `moepack compress` computes it on the original checkpoint, before pruning, so
``--target-bpw 2.5`` means "a file of 2.5 bits per original parameter"; after pruning the bits per *kept* parameter
are higher.

GPU + RAM (``--gpu-memory G --memory M --ctx-size N``): two budgets, one per placement, llama.cpp's for MoEs larger
than the GPU (`llama-server -ngl 99 -ot exps=CPU`, see `moepack.stages.placement`: the routed experts and
token_embd in system RAM, the rest on the GPU)::

    GPU:  GPU-resident tensors  ≤ G − KV cache(N) − compute buffers(N) − GPU reserve
    RAM:  routed experts + token_embd  ≤ M − compute buffers(N) − reserve − GGUF overhead

The compute buffers are counted on both sides (llama.cpp reserves a graph buffer on each backend that runs part of
the graph; `compute_buffer_bytes` is the CPU-only estimate and errs large for the host side). Each reserve is 5 %
of its memory unless `--reserve` sets the RAM one.

`weights` is the number `moepack allocate` spends: the sum of the GGUF tensor data bytes (grouped tensors at their
chosen types plus the fixed F32 tensors). The KV cache, the compute buffers and the GGUF overhead (header,
metadata, tokenizer, tensor table, alignment padding) are estimated in `moepack.stages.footprint`; the caller passes
the overhead when it knows it exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from moepack.stages.footprint import DEFAULT_UBATCH, compute_buffer_bytes, gguf_overhead_bytes, kv_cache_bytes
from moepack.stages.sizes import BudgetError, format_size, parse_size, size_flag

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView

# BudgetError, parse_size and format_size are re-exported: a budget's users raise, read and print sizes with them.
__all__ = ["Budget", "BudgetRequest", "budget_for", "check_floors", "smallest_memories", "DEFAULT_RESERVE_FRACTION",
           "BudgetError", "parse_size", "format_size"]

log = logging.getLogger(__name__)

DEFAULT_RESERVE_FRACTION = 0.05  # of --memory (and of --gpu-memory), for the OS and the runtime's own bookkeeping


@dataclass(frozen=True)
class Budget:
    """Where the weight budget came from. All sizes in bytes; `weights` is what allocation may spend."""

    memory: int | None  # device memory (device budgets only)
    kv_cache: int
    compute: int
    reserve: int
    weights: int  # bytes for GGUF tensor data
    overhead: int = 0  # GGUF bytes that are not tensor data
    source: str = "memory"  # "memory" | "target_size" | "target_bpw"
    ctx: int | None = None
    target: int | None = None  # GGUF file size target (size targets only)
    bpw: float | None = None
    n_params: int | None = None  # parameter count --target-bpw refers to
    gpu_memory: int | None = None  # GPU memory (GPU + RAM budgets only; then `memory` is the RAM)
    gpu_reserve: int = 0
    gpu_weights: int | None = None  # of `weights`, the bytes of GPU-resident tensors (moepack.stages.placement)

    @property
    def ram_weights(self) -> int | None:
        """Of `weights`, the bytes of the tensors in RAM (GPU + RAM budgets only; None otherwise)."""
        return None if self.gpu_weights is None else self.weights - self.gpu_weights

    def sides(self) -> list[tuple[str | None, int]]:
        """(placement side, tensor bytes it may hold): ("gpu", ·) and ("ram", ·) for a GPU + RAM budget, else one
        (None, weights) for the whole file."""
        if self.gpu_weights is None or self.ram_weights is None:
            return [(None, self.weights)]
        return [("gpu", self.gpu_weights), ("ram", self.ram_weights)]

    @property
    def file_limit(self) -> int:
        """The largest GGUF file this budget allows (tensor data + overhead)."""
        return self.weights + self.overhead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.gpu_weights is not None:
            return _describe_placed(self)
        if self.source == "memory":
            lines = [f"device memory     {format_size(self.memory or 0)}",
                     f"− KV cache        {format_size(self.kv_cache)}  (ctx {self.ctx})",
                     f"− compute buffers {format_size(self.compute)}  (estimate)",
                     f"− reserve         {format_size(self.reserve)}",
                     f"− GGUF metadata   {format_size(self.overhead)}  (estimate)"]
        else:
            how = (f"{self.bpw:g} bits × {self.n_params:,} parameters" if self.source == "target_bpw"
                   else "--target-size")
            lines = [f"GGUF file target  {format_size(self.target or 0)}  ({how})",
                     f"− GGUF metadata   {format_size(self.overhead)}  (estimate)"]
        return "\n".join(lines + [f"= weights         {format_size(self.weights)}"])


def _describe_placed(b: Budget) -> str:
    from moepack.gguf.runtime import EXPERTS_ON_CPU  # light, but not needed to build the CLI's parser

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


# ---------------------------------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class BudgetRequest:
    """What the user asked for: exactly one of (memory + ctx), target_size or target_bpw, plus the runtime settings
    that size the KV cache and compute buffers; `budget_for` turns it into a `Budget` for one checkpoint."""

    memory: int | str | None = None  # device memory: bytes or a size such as "16GiB"
    ctx: int | None = None  # context length the device must hold
    reserve: int | str | None = None  # memory kept free (default DEFAULT_RESERVE_FRACTION of memory)
    target_size: int | str | None = None  # GGUF file size
    target_bpw: float | None = None  # GGUF file size as bits per parameter of the checkpoint
    type_k: str = "f16"  # KV cache K type at run time
    type_v: str | None = None  # KV cache V type (None: type_k)
    n_ubatch: int = DEFAULT_UBATCH
    flash_attn: bool = False
    gpu_memory: int | str | None = None  # GPU memory: then `memory` is system RAM (moepack.stages.placement)

    def source(self) -> str:
        """"memory", "target_size" or "target_bpw"; BudgetError, saying what to give, when the flags do not make
        exactly one budget."""
        if self.gpu_memory is not None:
            if self.memory is None or self.target_size is not None or self.target_bpw is not None:
                raise BudgetError("--gpu-memory needs --memory SIZE (the system RAM that holds the routed experts) "
                                  "and --ctx-size N; it does not combine with --target-size or --target-bpw")
            if self.ctx is None:
                raise BudgetError("--gpu-memory needs --ctx-size N: the context length sizes the KV cache on the GPU")
            return "memory"
        modes = [name for name, v in (("--memory", self.memory), ("--target-size", self.target_size),
                                      ("--target-bpw", self.target_bpw)) if v is not None]
        if len(modes) != 1:
            raise BudgetError("give exactly one of --memory SIZE --ctx-size N, --target-size SIZE or --target-bpw X"
                              + (f" (got {', '.join(modes)})" if modes else ""))
        if modes[0] == "--memory" and self.ctx is None:
            raise BudgetError("--memory needs --ctx-size N: the context length sizes the KV cache")
        if modes[0] != "--memory" and self.ctx is not None:
            log.info("--ctx-size is ignored with %s (the KV cache is only subtracted from --memory)", modes[0])
        return modes[0][2:].replace("-", "_")


def budget_for(request: BudgetRequest, view: CheckpointView, overhead: int | None = None) -> Budget:
    """The weight budget of `view` for `request` (see the module docstring): one budget, or with `gpu_memory` the
    two of a GPU + RAM machine. `overhead` (non-tensor GGUF bytes) defaults to `gguf_overhead_bytes`. Raises
    `BudgetError` at once when the settings leave no room for weights."""
    source = request.source()
    overhead = gguf_overhead_bytes(view) if overhead is None else int(overhead)
    if request.gpu_memory is not None:
        return _placed_budget(view, request, overhead)
    if source == "memory":
        return _device_budget(view, request, overhead)
    return _target_budget(view, request, source, overhead)


def _reserve(request: BudgetRequest, memory: int) -> int:
    return int(memory * DEFAULT_RESERVE_FRACTION) if request.reserve is None else parse_size(request.reserve)


def _device_budget(view: CheckpointView, r: BudgetRequest, overhead: int) -> Budget:
    memory, ctx = parse_size(r.memory), int(r.ctx)  # type: ignore[arg-type]  # source() checked both
    kv = kv_cache_bytes(view, ctx, r.type_k, r.type_v)
    compute = compute_buffer_bytes(view, ctx, r.n_ubatch, r.flash_attn)
    reserve = _reserve(r, memory)
    b = Budget(memory, kv, compute, reserve, memory - kv - compute - reserve - overhead, overhead, "memory", ctx)
    if b.weights <= 0:
        raise BudgetError(f"nothing is left for weights:\n{b.describe()}\nlower --ctx-size, --reserve or the KV cache "
                          "type (--cache-type-k q8_0), enable --flash-attn, or give more --memory")
    return b


def _target_budget(view: CheckpointView, r: BudgetRequest, source: str, overhead: int) -> Budget:
    if source == "target_size":
        target, bpw, n = parse_size(r.target_size), None, None  # type: ignore[arg-type]
    else:
        bpw = float(r.target_bpw)  # type: ignore[arg-type]
        if not (math.isfinite(bpw) and 0 < bpw <= 32):
            raise BudgetError(f"--target-bpw must be in (0, 32] bits per weight (got {r.target_bpw})")
        n = sum(view.param_counts().values())
        target = math.floor(bpw * n / 8)
    b = Budget(None, 0, 0, 0, target - overhead, overhead, source, None, target, bpw, n)
    if b.weights <= 0:
        raise BudgetError(f"the target {format_size(target)} does not even hold the GGUF metadata "
                          f"({format_size(overhead)}); give a larger target")
    return b


def _placed_budget(view: CheckpointView, r: BudgetRequest, overhead: int) -> Budget:
    """The GPU + RAM budgets (see the module doc); `weights` is their sum, `gpu_weights` the GPU's. A budget that
    leaves no room on one side raises `BudgetError` with the smallest memories that would."""
    gpu, ram, ctx = parse_size(r.gpu_memory), parse_size(r.memory), int(r.ctx)  # type: ignore[arg-type]
    kv = kv_cache_bytes(view, ctx, r.type_k, r.type_v)
    compute = compute_buffer_bytes(view, ctx, r.n_ubatch, r.flash_attn)
    reserve = _reserve(r, ram)
    gpu_reserve = int(gpu * DEFAULT_RESERVE_FRACTION)
    gpu_weights = gpu - kv - compute - gpu_reserve
    ram_weights = ram - compute - reserve - overhead
    b = Budget(ram, kv, compute, reserve, gpu_weights + ram_weights, overhead, "memory", ctx, gpu_memory=gpu,
               gpu_reserve=gpu_reserve, gpu_weights=gpu_weights)
    check_floors(b, 1, 1, "")
    return b


# ------------------------------------------------------------------------------------- what a GPU + RAM budget holds

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


def check_floors(b: Budget, gpu_floor: int, ram_floor: int, what: str) -> None:
    """BudgetError when `what` (gpu_floor bytes of GPU-resident tensors, ram_floor in RAM) does not fit the GPU +
    RAM budget `b`; the message gives the smallest --gpu-memory and --memory that would fit it."""
    assert b.gpu_weights is not None and b.ram_weights is not None
    short = [f"  {side}: {what} needs {format_size(floor)}, the budget leaves {format_size(left)}" if floor > 1
             else f"  {side}: nothing is left for tensors"
             for side, floor, left in (("GPU", gpu_floor, b.gpu_weights), ("RAM", ram_floor, b.ram_weights))
             if floor > left]
    if short:
        gpu, ram = smallest_memories(b, gpu_floor, ram_floor)
        raise BudgetError("the GPU + RAM budgets do not fit:\n" + "\n".join(short) + f"\n{_describe_placed(b)}\n"
                          f"the smallest that fits: --gpu-memory {size_flag(gpu)} --memory {size_flag(ram)} "
                          f"({gpu:,} and {ram:,} bytes) at --ctx-size {b.ctx}; or lower --ctx-size or --keep")

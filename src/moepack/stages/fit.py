"""Plan before you compress (or download): does a model fit a budget, at which retention, and what would make it.

For a device or size budget (`moepack.stages.budget`), `fit_report` answers for each retention `compress --keep
auto` tries (`RETENTIONS`, the one list): whether the model fits with every tensor at the ladder's smallest type
(compress's own feasibility check), the bits per kept weight the budget leaves, the largest uniform type and the
largest llama.cpp mixture (`moepack.stages.mixtures`) that fit, and, where it does not fit, which side (the file,
the GPU or the RAM) is short and by how much. `remedies` says what would make a retention fit, with numbers: more
memory, a smaller context, a quantized KV cache, flash attention. `uniform_bytes` is the one formula for "tensor
bytes with every tensor at one type at retention keep" (compress's feasibility and reference type, inspect's
tables). It reads no weights, so it works on a `moepack.model.shapes.config_view` of a config.json alone.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

from moepack.gguf.estimate import ESTIMATE_TYPES
from moepack.gguf.types import LADDER, smallest_type, written_bytes
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView
from moepack.model.pruned import kept_count
from moepack.stages.budget import DEFAULT_RESERVE_FRACTION, Budget, BudgetError, BudgetRequest, budget_for

__all__ = ["fit_report", "uniform_bytes", "remedies", "RETENTIONS"]

RETENTIONS = (1.0, 0.875, 0.75, 0.625)  # compress --keep auto's candidates, largest first; keep 1.0 always among them
_Classes = Counter  # (shape, quantizable, routed) → tensor count


def _classes(view: CheckpointView, side: str | None) -> _Classes:
    """The tensors of `view` by what sets their bytes; `side` "gpu"/"ram" keeps those placed there (memoised on
    the view: a report asks for them per retention and per remedy)."""
    from moepack.gguf.names import gguf_tensor_name
    from moepack.stages.placement import on_gpu

    memo = view.__dict__.setdefault("_fit_classes", {})
    if side in memo:
        return memo[side]
    out: _Classes = memo.setdefault(side, Counter())
    for t in view.tensors.values():
        if side is None or on_gpu(gguf_tensor_name(view, t)) == (side == "gpu"):
            out[t.shape, t.quantizable, t.role is Role.ROUTED_EXPERTS] += 1
    return out


def _bytes(classes: _Classes, type_name: str, kept: int, n_experts: int) -> int:
    total = 0
    for (shape, quantizable, routed), n in classes.items():
        b = written_bytes(shape, type_name if quantizable else "F32")
        total += n * (b * kept // n_experts if routed else b)  # as many expert tensors as kept
    return total


def uniform_bytes(view: CheckpointView, type_name: str, keep: float = 1.0, side: str | None = None) -> int:
    """Tensor bytes of `view` with every quantizable tensor at `type_name` (after llama.cpp's fallbacks for odd row
    widths) and the rest at F32; routed experts scaled to the experts retention `keep` keeps per layer
    (`kept_count`, rounded up per group; 1.0 for an already pruned view). `side` "gpu" or "ram" counts only the
    tensors placed there (moepack.stages.placement)."""
    return _bytes(_classes(view, side), type_name, kept_count(view, keep), view.facts.n_experts)


def _kept_params(view: CheckpointView, keep: float) -> int:
    counts = view.param_counts()
    routed = counts[Role.ROUTED_EXPERTS.value]
    return sum(counts.values()) - routed + routed * kept_count(view, keep) // view.facts.n_experts


def _sides(view: CheckpointView, budget: Budget) -> list[tuple[str | None, int, _Classes]]:
    return [(side, limit, _classes(view, side)) for side, limit in budget.sides()]


def _short(sides: list[tuple[str | None, int, _Classes]], t: str, kept: int, n: int) -> list[dict[str, Any]]:
    """Each side where every tensor at `t` does not fit: what it needs, what the budget leaves there."""
    out = []
    for side, limit, classes in sides:
        need = _bytes(classes, t, kept, n)
        if need > limit:
            out.append({"side": side or "file", "need": need, "left": limit, "short": need - limit})
    return out


def _mixtures(view: CheckpointView, keep: float, params: int, budget: Budget) -> dict[str, dict[str, Any]]:
    """Each standard mixture's bytes and bits per weight at retention `keep`, and whether it fits `budget` (with a
    GPU budget: the GPU-resident tensors within the GPU's share, the rest within the RAM's)."""
    from moepack.stages.mixtures import mixture_sizes
    from moepack.stages.placement import on_gpu

    placed = budget.gpu_weights is not None
    out = {}
    outs = view.__dict__.get("_fit_outs")
    if outs is None:
        from moepack.gguf.names import gguf_outputs

        outs = view.__dict__["_fit_outs"] = gguf_outputs(view)  # the same for every retention
    for t, size in mixture_sizes(view, keep, on_gpu=on_gpu if placed else None, outs=outs).items():
        m: dict[str, Any] = {"bytes": size.total, "routed_bytes": size.routed, "bpw": 8 * size.total / params,
                             "fits": size.total <= budget.weights}
        if size.gpu is not None and budget.gpu_weights is not None:
            m["gpu_bytes"] = size.gpu
            m["fits"] = size.gpu <= budget.gpu_weights and size.total - size.gpu <= budget.weights - budget.gpu_weights
        out[t] = m
    return out


def _retention(view: CheckpointView, budget: Budget, keep: float, ladder: tuple[str, ...],
               sides: list[tuple[str | None, int, _Classes]]) -> dict[str, Any]:
    kept, n = kept_count(view, keep), view.facts.n_experts
    params = _kept_params(view, keep)
    total = sides[0][2] if len(sides) == 1 else sides[0][2] + sides[1][2]
    fitting = {t: _bytes(total, t, kept, n) for t in ladder if not _short(sides, t, kept, n)}
    best = max(reversed(list(fitting)), key=fitting.__getitem__, default=None)  # the most bytes (fallbacks reorder)
    types = {t: {"bytes": _bytes(total, t, kept, n), "fits": not _short(sides, t, kept, n)} for t in ESTIMATE_TYPES}
    mixtures = _mixtures(view, keep, params, budget)
    fit_mix = [(m["bytes"], t) for t, m in mixtures.items() if m["fits"]]
    return {"keep": keep, "experts": kept, "params": params, "bpw": 8 * budget.weights / params,
            "fits": best is not None, "best_type": best, "best_type_bytes": fitting.get(best) if best else None,
            "best_mixture": max(fit_mix)[1] if fit_mix else None,
            "short": [] if best else _short(sides, smallest_type(ladder), kept, n),
            "types": types, "mixtures": mixtures}


def _fits_with(view: CheckpointView, request: BudgetRequest, keep: float, t: str) -> bool:
    try:
        b = budget_for(request, view)
    except BudgetError:
        return False
    return not _short(_sides(view, b), t, kept_count(view, keep), view.facts.n_experts)


def _largest_ctx(view: CheckpointView, request: BudgetRequest, keep: float, t: str) -> int | None:
    """The largest context (a multiple of 256, as llama.cpp pads it) below the requested one that fits."""
    lo, hi = 1, (int(request.ctx) - 1) // 256  # in units of 256 tokens
    if hi < 1 or not _fits_with(view, dataclasses.replace(request, ctx=256), keep, t):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits_with(view, dataclasses.replace(request, ctx=256 * mid), keep, t) else (lo, mid - 1)
    return 256 * lo


def _more_memory(view: CheckpointView, budget: Budget, keep: float, t: str) -> dict[str, Any]:
    from moepack.stages.budget import smallest_memories
    from moepack.stages.sizes import size_flag

    kept, n = kept_count(view, keep), view.facts.n_experts
    if budget.gpu_weights is not None:
        gpu = _bytes(_classes(view, "gpu"), t, kept, n)
        ram = _bytes(_classes(view, "ram"), t, kept, n)
        g, r = smallest_memories(budget, gpu, ram)
        return {"what": "more memory", "flags": f"--gpu-memory {size_flag(max(g, budget.gpu_memory or 0))} "
                f"--memory {size_flag(max(r, budget.memory or 0))}", "gpu_memory": g, "memory": r}
    need = _bytes(_classes(view, None), t, kept, n)
    if budget.source != "memory":
        return {"what": "a larger target", "flags": f"--target-size {size_flag(need + budget.overhead)}",
                "target": need + budget.overhead}
    fixed = budget.kv_cache + budget.compute + budget.overhead
    if budget.reserve != int((budget.memory or 0) * DEFAULT_RESERVE_FRACTION):  # --reserve gave it
        m = need + fixed + budget.reserve
    else:
        m = math.ceil((need + fixed) / (1 - DEFAULT_RESERVE_FRACTION))
        while m - 1 - int((m - 1) * DEFAULT_RESERVE_FRACTION) - fixed >= need:  # the reserve is floored: the
            m -= 1                                                                # smallest such memory, exactly
        while m - int(m * DEFAULT_RESERVE_FRACTION) - fixed < need:
            m += 1
    return {"what": "more memory", "flags": f"--memory {size_flag(m)}", "memory": m}


def remedies(view: CheckpointView, request: BudgetRequest, budget: Budget, keep: float,
             ladder: tuple[str, ...] = LADDER) -> list[dict[str, Any]]:
    """What would make retention `keep` fit with every tensor at the ladder's smallest type (what compress needs to
    start), each with its numbers: the memory (or target) that fits; for a device budget also the largest context,
    and whether a q8_0 / q4_0 KV cache or flash attention alone would do (with the bytes each frees)."""
    t = smallest_type(ladder)
    out = [_more_memory(view, budget, keep, t)]
    if budget.source != "memory" or request.ctx is None:
        return out
    ctx = _largest_ctx(view, request, keep, t)
    out.append({"what": "a smaller context", "flags": f"-c {ctx}" if ctx else None, "fits": ctx is not None})
    for what, changed in (("a q8_0 KV cache", dataclasses.replace(request, type_k="q8_0", type_v="q8_0")),
                          ("a q4_0 KV cache", dataclasses.replace(request, type_k="q4_0", type_v="q4_0")),
                          ("flash attention", dataclasses.replace(request, flash_attn=True))):
        if changed == request:
            continue
        try:
            after = dict(budget_for(changed, view).sides())
        except BudgetError:
            continue
        freed = {side or "file": after[side] - limit for side, limit in budget.sides()}
        flags = {"flash attention": "--flash-attn"}.get(what, f"--cache-type-k {changed.type_k} --cache-type-v "
                                                              f"{changed.type_v}")
        out.append({"what": what, "flags": flags, "freed": freed, "fits": _fits_with(view, changed, keep, t)})
    return out


def _verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer in one place: the largest retention that fits (keep 1.0: unpruned) and its best types, or none."""
    fit = next((r for r in rows if r["fits"]), None)
    if fit is None:
        last = rows[-1]
        return {"fits": False, "keep": None, "short": last["short"], "remedy_keep": last["keep"]}
    return {"fits": True, "keep": fit["keep"], "best_type": fit["best_type"], "best_mixture": fit["best_mixture"],
            "remedy_keep": None if fit["keep"] == rows[0]["keep"] else rows[0]["keep"], "short": rows[0]["short"]}


def fit_report(view: CheckpointView, request: BudgetRequest, ladder: tuple[str, ...] = LADDER) -> dict[str, Any]:
    """Budget, and for each retention in RETENTIONS: fits or not, bits per kept weight, the best uniform type and
    mixture that fit, the side short; the verdict, and what would make the unpruned model (or, when nothing fits,
    the smallest retention) fit."""
    budget = budget_for(request, view)
    sides = _sides(view, budget)
    rows = [_retention(view, budget, keep, ladder, sides) for keep in RETENTIONS]
    verdict = _verdict(rows)
    if verdict["remedy_keep"] is not None:
        verdict["remedies"] = remedies(view, request, budget, verdict["remedy_keep"], ladder)
    return {"budget": budget.to_dict(), "file_limit": budget.file_limit, "ladder_smallest": smallest_type(ladder),
            "retentions": rows, "verdict": verdict}

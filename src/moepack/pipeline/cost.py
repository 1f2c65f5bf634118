"""What a compress will cost before it runs: its stages, the wall time on this machine, peak RAM and scratch disk.

The cost model is docs/performance.md's ("DeepSeek-V3 on one 64-core machine"): per-core rates measured by
`bench/distributed_cost.py --v3-layer` on a quiet AMD EPYC (bench/results/compress_cost.json, 2026-12-04), applied
to this checkpoint's shapes, and scaled to this machine by a short timing probe (a float32 GEMM for the forward
passes, an IQ2_XXS quantization for the kernels; well under a second). Assumptions, as there: per-core rates scale
linearly with the threads; a forward costs in proportion to a layer's active weights per token; a probe rebuilds
every later layer from its reference-type bytes and runs the head. `--keep auto` measures up to four retentions:
the low figure is keep 1.0 measured and the others screened by their pruning-only KLD, the high one every retention
measured. Memory follows docs/distributed.md ("What each task needs in memory"): the probes' peak.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from moepack.gguf.types import smallest_type
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView
from moepack.model.pruned import kept_count
from moepack.pipeline.options import CompressOptions
from moepack.stages.budget import Budget, format_size

__all__ = ["CostEstimate", "timing_probe", "estimate_cost", "render_cost"]

log = logging.getLogger(__name__)

# Reference per-core rates (bench/results/compress_cost.json): core-seconds per token and active weight of a
# forward (and of calibration's), per bf16 byte built into a layer; float32 GEMM FLOP/s (the head); memcpy B/s.
REF_FORWARD, REF_CALIB, REF_BUILD, REF_FLOPS, REF_COPY = 2.007e-11, 1.819e-11, 6.047e-9, 110.5e9, 37.87e9
# Weights per second per core, (quantize with an importance matrix, dequantize), per ladder type.
REF_KERNELS = {"IQ1_S": (7.95e6, 2466e6), "IQ1_M": (9.21e6, 1444e6), "IQ2_XXS": (3.91e6, 308e6),
               "IQ2_XS": (2.08e6, 311e6), "IQ2_S": (5.90e6, 286e6), "Q2_K": (9.63e6, 1241e6),
               "IQ3_XXS": (2.69e6, 316e6), "Q3_K": (31.2e6, 959e6), "IQ3_S": (3.83e6, 297e6),
               "IQ4_XS": (5.92e6, 1163e6), "Q4_K": (11.85e6, 3840e6), "Q5_K": (11.29e6, 3368e6),
               "Q6_K": (38.3e6, 1157e6), "Q8_0": (325e6, 3985e6)}
WRITE_TYPE = "IQ2_XXS"  # the write term's kernel (a ~2.5 bpw plan is mostly 2-bit types)
PROBE_TYPE = "Q4_K"  # the timing probe's kernel: no lookup grids to build first, unlike the IQ types
def criteria_measured(opts: CompressOptions) -> int:
    """Pruning-only KLDs --criterion auto measures per retention: each of AUTO_CRITERIA, then (without --merge) the
    winner once more merged (moepack.pipeline.criterion.choose_pruning)."""
    from moepack.pipeline.criterion import AUTO_CRITERIA

    return len(AUTO_CRITERIA) + (opts.merge is None)


@functools.lru_cache(maxsize=1)
def timing_probe() -> dict[str, float]:
    """This machine's speed against the reference, one thread: {"forward": x, "kernels": y}, each the reference's
    rate over this machine's (2.0: twice as slow); measured once per process."""
    import numpy as np
    import torch

    from moepack.backends import torch_threads
    from moepack.gguf import kernels

    def best(fn: Any) -> float:
        fn()  # warm-up
        return min(_timed(fn) for _ in range(2))

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 2048, generator=g), torch.randn(1536, 2048, generator=g)  # (T, H), (out, H)
    with torch_threads(1):
        flops = 2 * 256 * 2048 * 1536 / best(lambda: torch.nn.functional.linear(x, w))
    a = np.random.default_rng(0).standard_normal((32, 7168), dtype=np.float32) * 0.02  # (rows, n)
    im = np.ones(7168, dtype=np.float32)
    wps = a.size / best(lambda: kernels.quantize(a, PROBE_TYPE, im, threads=1))
    return {"forward": REF_FLOPS / flops, "kernels": REF_KERNELS[PROBE_TYPE][0] / wps}


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class _Shape:
    """What the cost terms read off a checkpoint: weights per layer, active weights per token, the head."""

    params: int
    routed: int  # routed expert weights
    layer_weights: dict[int, int]
    active: dict[int, float]  # per layer, per token
    head: int  # output weights (vocab × hidden)
    max_tensor: int  # weights of the largest GGUF tensor (stacked experts)


def _shape(view: CheckpointView) -> _Shape:
    f = view.facts
    layers: dict[int, int] = {}
    routed_l: dict[int, int] = {}
    for t in view.tensors.values():
        if t.layer is None or t.layer >= f.n_layers:
            continue
        layers[t.layer] = layers.get(t.layer, 0) + t.numel
        if t.role is Role.ROUTED_EXPERTS:
            routed_l[t.layer] = routed_l.get(t.layer, 0) + t.numel
    share = f.top_k / max(1, f.n_experts)
    active = {i: w - routed_l.get(i, 0) * (1 - share) for i, w in layers.items()}
    routed = sum(routed_l.values())
    largest = max(routed_l.values(), default=0) // 3 or max(layers.values())  # a stacked projection
    return _Shape(sum(t.numel for t in view.tensors.values()), routed, layers, active, f.vocab * f.hidden, largest)


@dataclass
class CostEstimate:
    stages: list[str]
    seconds: tuple[float, float]  # wall seconds: (low, high), see the module doc
    per_retention: dict[float, float]  # wall seconds each retention adds when fully measured
    calibrate_s: float
    peak_ram: int | tuple[int, int]  # without --quant-cache: (as run, with --quant-cache)
    scratch: dict[str, int]  # run directory, output, optional caches
    scale: dict[str, float] = field(default_factory=dict)
    threads: int = 2


def _groups(view: CheckpointView, ladder: tuple[str, ...]) -> tuple[int, int, float]:
    """(groups, full-table probes, mean layers a probe runs) of the sensitivity table."""
    from moepack.stages.sensitivity.groups import plan_groups

    groups, _ = plan_groups(view, ladder=ladder)
    n = view.facts.n_layers
    depth = [n - g.layer if g.layer is not None else (0 if g.cls == "output" else n) for g in groups]
    return len(groups), sum(len(g.options) - 1 for g in groups), sum(depth) / max(1, len(depth))


def _retention_s(s: _Shape, kept: float, n_groups: int, n_full: int, depth: float, opts: CompressOptions,
                 scale: dict[str, float], full: bool) -> tuple[float, float]:
    """(core-seconds of one retention's tables, refinement and mixtures; core-seconds of one plan's KLD)."""
    from moepack.stages.sensitivity.fast import AUTO_LIMIT_S, PROXY_SAMPLE

    fwd, kern = scale["forward"], scale["kernels"]
    params = s.params - s.routed * (1 - kept)
    active = sum(s.active.values()) / max(1, len(s.active))
    layer_w = sum(s.layer_weights.values()) * (params / s.params) / max(1, len(s.layer_weights))
    ladder = [t for t in opts.ladder if t in REF_KERNELS]
    base, top = smallest_type(ladder), ladder[-1]  # fast mode probes each group at its highest type
    q = {t: REF_KERNELS[t][0] for t in ladder}
    dq = {t: REF_KERNELS[t][1] for t in ladder}
    head_s = 2 * s.head / REF_FLOPS
    tokens = opts.probe_tokens or opts.selection_tokens
    probe = (depth * layer_w * (1 / dq[base] + 8 / REF_COPY) * kern
             + tokens * (depth * active * REF_FORWARD + head_s) * fwd)
    sampled = {t: 1.0 if t in (base, top) else PROXY_SAMPLE for t in ladder}
    sampled[base] += PROXY_SAMPLE
    fast = params * sum(f / q[t] + f / dq[t] for t, f in sampled.items()) * kern + n_groups * probe
    full_s = params * sum(1 / q[t] for t in ladder) * kern + n_full * probe
    runs_full = full and (opts.sensitivity == "full" or (opts.sensitivity == "auto"
                                                        and n_full * probe / opts.threads <= AUTO_LIMIT_S))
    measure = (opts.selection_tokens * (len(s.active) * active * REF_FORWARD + head_s) * fwd
               + params / dq[base] * kern)  # one plan's selection KLD
    refs = 2 if runs_full else 1
    measured = refs * (1 + 3 * opts.refine) + opts.mixtures
    return fast + (full_s if runs_full else 0.0) + measured * measure, measure


def estimate_cost(view: CheckpointView, budget: Budget, opts: CompressOptions, keeps: list[float],
                  scale: dict[str, float] | None = None) -> CostEstimate:
    """The estimate for compressing `view` (the original checkpoint, or its config-only view) at `keeps`."""
    scale = scale or {"forward": 1.0, "kernels": 1.0}
    s = _shape(view)
    n_groups, n_full, depth = _groups(view, opts.ladder)
    fwd, kern = scale["forward"], scale["kernels"]
    bf16 = 2 * (s.params - s.head)
    calib = (opts.calib_tokens * sum(s.active.values()) * REF_CALIB + bf16 * REF_BUILD) * fwd
    full_ok = opts.reference is None and opts.sensitivity != "fast"
    per: dict[float, float] = {}
    criteria = report = 0.0
    for k in keeps:
        kept = kept_count(view, k) / max(1, view.facts.n_experts)
        per[k], measure = _retention_s(s, kept, n_groups, n_full, depth, opts, scale, full_ok)
        report = report or measure  # the chosen plan once more, on the report tokens
        if k < 1.0 and opts.criterion == "auto":
            criteria += criteria_measured(opts) * measure
    write = s.params / REF_KERNELS[WRITE_TYPE][0] * kern
    fixed = calib + criteria + write + report
    first = per[keeps[0]]
    low, high = fixed + first, fixed + sum(per.values())
    t = opts.threads
    return CostEstimate(_stages(opts, keeps), (low / t, high / t), {k: v / t for k, v in per.items()}, calib / t,
                        _peak_ram(view, s, opts), _scratch(view, s, budget, opts, n_groups), scale, t)


def _stages(opts: CompressOptions, keeps: list[float]) -> list[str]:
    sens = {"auto": "fast table from the ladder's smallest type, then a full one from the budget's own type when "
                    "it is estimated under 30 min", "fast": "fast table", "full": "full tables"}[opts.sensitivity]
    criteria = f"criterion ({criteria_measured(opts)} measured), " if opts.criterion == "auto" else ""
    per = (f"prune (a plan; lazy view), {criteria}"
           f"sensitivity ({sens}), allocate, refine ({opts.refine} passes), llama.cpp mixtures ({opts.mixtures})")
    return [f"calibrate ({opts.calib_tokens:,} tokens + {opts.selection_tokens:,} selection + report tokens)",
            f"for each retention of {', '.join(f'{k:g}' for k in keeps)}: {per}"
            + ("; a retention whose pruning alone costs more KLD than the best measured one is screened" if len(keeps)
               > 1 else ""), "write the GGUF once, at -o", "verify it in llama.cpp"]


def _peak_ram(view: CheckpointView, s: _Shape, opts: CompressOptions) -> int | tuple[int, int]:
    """The probes' peak (docs/distributed.md): base layers kept (up to 4 GiB), the probed and the next layer in f32,
    the f32 head, a 256 MiB logits batch, a 1 GiB dequantized cache, hidden states entering every layer, the
    reference probabilities and, without --quant-cache, the reference-type bytes of the whole model; or the
    sensitivity quantizer's largest tensor (24 bytes per weight) or a calibration layer, when larger."""
    from moepack.stages.fit import uniform_bytes

    f = view.facts
    layer = max(s.layer_weights.values())
    t = opts.probe_tokens or opts.selection_tokens
    base = uniform_bytes(view, smallest_type(opts.ladder))
    probe = (min(4 << 30, base) + 2 * 4 * layer + 4 * s.head + (256 << 20) + (1 << 30)
             + (f.n_layers + 1) * t * f.hidden * 4 + t * f.vocab * 4)
    calib = int(1.1 * 4 * layer) + opts.calib_tokens * f.hidden * 4 + 2 * f.vocab * f.hidden
    peak = int(max(probe, 24 * s.max_tensor, calib))
    return peak if opts.cache_dir else (int(max(probe + base, 24 * s.max_tensor, calib)), peak)


def _scratch(view: CheckpointView, s: _Shape, budget: Budget, opts: CompressOptions, n_groups: int) -> dict[str, int]:
    """Disk the run needs: the run directory (float32 input statistics per weight column, the token ids, tables and
    plans), the output written once at -o, and what --quant-cache / --save-pruned add."""
    stats = sum(4 * t.shape[-1] for t in view.tensors.values() if t.quantizable)
    run = stats + 8 * (opts.calib_tokens + 3 * opts.selection_tokens) + 4 * n_groups * len(opts.ladder) * 120 + (1 << 20)
    out = {"run directory": run, "output (at -o)": budget.file_limit}
    if opts.cache_dir:
        out["--quant-cache"] = sum(int(s.params * b) for b in (2 / 8, 8.5 / 8))  # the reference and top types whole
    if opts.save_pruned:
        out["--save-pruned"] = 2 * s.params
    return out


def _hours(sec: float) -> str:
    return f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.0f} min" if sec >= 60 else f"{sec:.0f} s"


def render_cost(e: CostEstimate) -> str:
    low, high = e.seconds
    span = _hours(low) if abs(high - low) < 1 else f"{_hours(low)} to {_hours(high)}"
    lines = ["compress plan (an estimate: docs/performance.md's cost model; this machine's speed from a timing "
             f"probe: forward {1 / e.scale['forward']:.2f}x, kernels {1 / e.scale['kernels']:.2f}x the reference "
             "machine's per core)"]
    lines += [f"  stage         {st}" for st in e.stages]
    more = ", ".join(f"keep {k:g} {_hours(v)}" for k, v in e.per_retention.items())
    lines.append(f"  wall time     {span} on {e.threads} threads (calibrate {_hours(e.calibrate_s)}; each retention "
                 f"fully measured: {more})")
    if isinstance(e.peak_ram, tuple):
        lines.append(f"  peak RAM      {format_size(e.peak_ram[0])}; {format_size(e.peak_ram[1])} with --quant-cache "
                     "DIR (the reference type's quantized tensors on disk instead)")
    else:
        lines.append(f"  peak RAM      {format_size(e.peak_ram)}")
    lines.append("  scratch disk  " + "; ".join(f"{k} {format_size(v)}" for k, v in e.scratch.items())
                 + "; no pruned checkpoint per retention")
    return "\n".join(lines)

"""Sensitivity: ΔKLD of the model's output for every tensor group raised from its base type to each ladder type.

Groups are one GGUF tensor class in one layer ("blk.3.ffn_down_exps", "blk.0.attn_kv_b" = attn_k_b + attn_v_b),
plus token_embd and output; each option's bytes are the GGUF bytes of the group's tensors at that type after
llama.cpp's row-width fallbacks (options that fall back to the bytes of a smaller one are dropped). Every weight is
fake-quantized exactly as the GGUF writer writes it (moepack.stages.sensitivity.fakequant: the writer's own code builds, types and
quantizes each GGUF tensor; ggml dequantizes it; it is mapped back to checkpoint tensors for transformers' own
modules). Each (tensor, type) is quantized once (in memory, or under `cache_dir`).

KLD mode: one forward with every group at its base type caches the hidden states entering every layer and keeps the
base layer modules; a probe (one group at one type) restarts at the group's layer, rebuilds only that layer and runs
the layers after it and the head (token_embd probes start at the embedding, output probes run only the head). KLD is
KL(reference ‖ model) per token, averaged; the reference is normally the original (unpruned) model on the same tokens.
Proxy mode: Σ_col importance[col] · Σ_row (w − q(w))² per tensor (importance = sum of squared inputs per token, so
experts weigh by how often they are routed; token_embd rows by token frequency), no forward. Both are always
reported when KLD is measured, with their Spearman rank agreement.

Output: sensitivity.json in allocate.py's schema; every field except "timing" is a deterministic function of the
inputs.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moepack.gguf import kernels as ggml
from moepack.gguf import writer as go
from moepack.pipeline import runstate
from moepack.model.arch import Role
from moepack.errors import MoepackError
from moepack.backends import Backend, LocalBackend, torch_threads
from moepack.stages.sensitivity.fakequant import FakeQuantWeights, QuantStore
from moepack.gguf.names import OutTensor, gguf_group_name, gguf_outputs
from moepack.model.runner import LayerRunner
from moepack.stages.sensitivity.probes import ProbeInputs, _head_batch, _reference, _typed_base, run_probes, run_quantize

if TYPE_CHECKING:
    from moepack.stages.calibrate import CalibStats
    from moepack.model.checkpoint import CheckpointView

__all__ = [
    "DEFAULT_LADDER",
    "DEFAULT_BASE",
    "MODES",
    "SensitivityError",
    "GroupOption",
    "GroupSpec",
    "plan_groups",
    "measure_sensitivity",
    "plan_kld",
    "spearman",
    "save_json",
    "parse_base",
]

log = logging.getLogger(__name__)

FORMAT = "moepack.sensitivity/1"
DEFAULT_LADDER = ("IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
DEFAULT_BASE = "IQ2_XXS"
MODES = ("kld", "proxy", "both")  # "both" = "kld": the proxy comes free with the quantization


class SensitivityError(MoepackError, ValueError):
    """Sensitivity cannot be measured as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------------- groups

@dataclass(frozen=True)
class GroupOption:
    type: str  # the requested (ladder) type; the plan names it and the writer applies the same fallbacks
    typed: tuple[go.TypedTensor, ...]  # one per GGUF tensor of the group, as the writer resolves it

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.typed)

    @property
    def written(self) -> tuple[GGMLQuantizationType, ...]:
        return tuple(t.qtype for t in self.typed)


@dataclass(frozen=True)
class GroupSpec:
    name: str  # "blk.3.ffn_down_exps", "token_embd"
    cls: str  # gguf_group_name: "ffn_down_exps"
    role: Role
    layer: int | None
    outs: tuple[OutTensor, ...]
    options: tuple[GroupOption, ...]  # options[0] is the base

    @property
    def sources(self) -> frozenset[str]:
        return frozenset(s for o in self.outs for s in o.sources)


def parse_base(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """"routed_experts=IQ2_XXS,attention=Q4_K" (or "Q4_K" for every group) → {key: type name}."""
    if spec is None:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else (
        (kv.split("=", 1) if "=" in kv else ("default", kv)) for kv in str(spec).split(",") if kv.strip())
    return {k.strip(): ggml.parse_type(v).name for k, v in items}


def _base_for(base: Mapping[str, str], g_name: str, cls: str, role: Role) -> str:
    for key in (g_name, cls, role.value, "default", "*"):
        if key in base:
            return base[key]
    return DEFAULT_BASE


def _typed(o: OutTensor, qtype: str, imatrix: Mapping[str, np.ndarray] | None) -> go.TypedTensor | None:
    """The writer's resolution of `o` at `qtype`; None where llama.cpp cannot write it (no fallback, no imatrix)."""
    try:
        t = go.resolve_types([o], qtype)[0]
    except MoepackError:
        return None
    if t.qtype != GGMLQuantizationType.F32 and ggml.requires_imatrix(t.qtype) and go.importance_rows(t, imatrix) is None:
        return None
    return t


def _candidates(base: str, ladder: list[str]) -> list[str]:
    """The base, then the ladder types above it (the ladder is in upgrade order)."""
    if base in ladder:
        return ladder[ladder.index(base):]
    return [base] + [t for t in ladder if ggml.bits_per_weight(t) > ggml.bits_per_weight(base)]


def _options(name: str, outs: list[OutTensor], cands: list[str],
             imatrix: Mapping[str, np.ndarray] | None) -> list[GroupOption]:
    opts: list[GroupOption] = []
    seen: set[tuple[GGMLQuantizationType, ...]] = set()
    for t in cands:
        typed = [_typed(o, t, imatrix) for o in outs]
        if any(x is None for x in typed):
            log.debug("%s: %s cannot be written (row width or importance matrix); skipped", name, t)
            continue
        opt = GroupOption(t, tuple(typed))  # type: ignore[arg-type]
        if opt.written in seen or (opts and opt.bytes < opts[0].bytes):
            continue  # the same bytes as a smaller option after fallbacks, or smaller than the base
        seen.add(opt.written)
        opts.append(opt)
    if not opts:
        raise SensitivityError(f"group {name} can be written at none of {', '.join(cands)} (row width "
                               f"{outs[0].n_per_row}); add a type that suits it to the ladder or --base")
    if opts[0].type != cands[0]:
        log.info("%s: base %s cannot be written here; its base is %s", name, cands[0], opts[0].type)
    return opts


def plan_groups(view: Any, base: Mapping[str, str] | None = None, ladder: Iterable[str] = DEFAULT_LADDER,
                imatrix: Mapping[str, np.ndarray] | None = None) -> tuple[list[GroupSpec], list[OutTensor]]:
    """(groups with their options, fixed F32 tensors) of the GGUF that `view` becomes."""
    base = parse_base(base)
    ladder = [ggml.parse_type(t).name for t in ladder]
    by_name: dict[str, list[OutTensor]] = {}
    fixed: list[OutTensor] = []
    for o in gguf_outputs(view):
        if not o.quantizable:
            fixed.append(o)
            continue
        cls = gguf_group_name(view, o.sources[0])
        by_name.setdefault(cls if o.layer is None else f"blk.{o.layer}.{cls}", []).append(o)
    groups = []
    for name, outs in by_name.items():
        cls = name.rsplit(".", 1)[-1]
        cands = _candidates(_base_for(base, name, cls, outs[0].role), ladder)
        groups.append(GroupSpec(name, cls, outs[0].role, outs[0].layer, tuple(outs),
                                tuple(_options(name, outs, cands, imatrix))))
    known = {g.name for g in groups} | {g.cls for g in groups} | {g.role.value for g in groups} | {"default", "*"}
    if unknown := sorted(set(base) - known):
        raise SensitivityError(f"--base names {', '.join(unknown)}, which this model has no group of; use roles "
                               f"({', '.join(sorted({g.role.value for g in groups}))}), tensor classes (e.g. "
                               f"{groups[0].cls}) or group names")
    return groups, fixed


# ---------------------------------------------------------------------------------------------------- imatrix

def _prune_plan(view: Any, prune_plan: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The prune plan behind `view`: given, saved next to a pruned checkpoint, or rebuilt from a lazy pruned view
    (only its {"n_experts", "layers": {L: {"kept"}}}, which is what slicing an imatrix needs)."""
    if prune_plan is not None:
        return prune_plan
    plan_path = Path(view.root) / "prune_plan.json"
    base = getattr(view, "base", None)
    if base is not None and getattr(view, "sources", None):
        layers: dict[str, dict[str, list[int]]] = {}
        for name, ref in view.tensors.items():
            if ref.role is Role.ROUTED_EXPERTS:
                kept = layers.setdefault(str(ref.layer), {"kept": [0] * view.facts.n_experts})["kept"]
                kept[ref.expert] = base.tensors[view.sources[name][0]].expert
        return {"n_experts": base.facts.n_experts, "layers": layers, "rebuilt": True}
    if plan_path.is_file():
        return json.loads(plan_path.read_text())
    return None


def _prepare_imatrix(view: Any, imatrix: CalibStats | Mapping[str, np.ndarray] | None,
                     prune_plan: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """(the writer's importance matrix {GGUF name: (S|1, n) mean squared input}, proxy column weights: squared
    inputs per calibration token, so an expert weighs by how often it is routed; means when only those are given)."""
    if imatrix is None:
        return None, None
    if hasattr(imatrix, "imatrix") and hasattr(imatrix, "manifest"):
        from moepack.gguf.imatrix import imatrix_entries

        entries = imatrix_entries(imatrix, view)
        im = {name: e.mean() for name, e in entries.items()}  # as gguf_out.load_imatrix builds it
        n_tok = max(1, int(imatrix.manifest.get("tokens", 1)))
        weights = {name: (e.sums / n_tok).astype(np.float32) for name, e in entries.items()}  # (S, n)
    else:
        im = {k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()}
        weights = dict(im)
    plan = _prune_plan(view, prune_plan)
    if plan is not None:  # an imatrix of the original model: keep the kept experts' rows, as the writer does
        im, weights = go.prune_imatrix(im, plan), go.prune_imatrix(weights, plan)
    return im, weights


# ---------------------------------------------------------------------------------------------------- output

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0 with ties averaged."""
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(cnt)
    return ((ends - cnt + ends - 1) / 2.0)[inv]


def spearman(a: Iterable[float], b: Iterable[float]) -> float | None:
    """Spearman rank correlation (ties averaged); None for fewer than 3 pairs or a constant side."""
    x, y = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if x.size < 3 or x.size != y.size:
        return None
    rx, ry = _ranks(x) - (x.size - 1) / 2.0, _ranks(y) - (y.size - 1) / 2.0
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return None if den == 0 else float((rx * ry).sum() / den)


def _agreement(groups: list[GroupSpec], proxy: Mapping[tuple[str, str], float],
               kld: Mapping[tuple[str, str], float], base_kld: float) -> dict[str, Any]:
    keys = [(g.name, o.type) for g in groups for o in g.options[1:]]
    out: dict[str, Any] = {"spearman": spearman([proxy[k] for k in keys], [kld[k] - base_kld for k in keys]),
                           "n": len(keys), "by_type": {}}
    for t in sorted({k[1] for k in keys}):
        ks = [k for k in keys if k[1] == t]
        out["by_type"][t] = spearman([proxy[k] for k in ks], [kld[k] - base_kld for k in ks])
    return out


def _header_type(name: str) -> str:
    """A type whose name is as long as `name`'s and that needs no importance matrix (the header is estimated
    without one): the metadata is then as long as with `name`."""
    block = GGML_QUANT_SIZES[ggml.parse_type(name)][0]
    for t in [ggml.parse_type(name)] + ggml.QUANT_TYPES:
        if len(t.name) == len(name) and GGML_QUANT_SIZES[t][0] == block and not ggml.requires_imatrix(t):
            return t.name
    return name


def _overhead(view: Any, groups: list[GroupSpec], fixed: list[OutTensor], base: dict[str, Any],
              prune_plan: Mapping[str, Any] | None) -> int | None:
    """GGUF bytes outside the tensor data, for a plan with the longest type names and every tensor's worst
    alignment padding (the writer's own header writer; 1 KiB more for plan notes)."""
    longest = {o.name: max((opt.type for opt in g.options), key=len) for g in groups for o in g.outs}
    plan = {"version": 1, "solver": "greedy", "budget_bytes": 10 ** 15, "predicted_bytes": 10 ** 15,
            "fixed_bytes": 10 ** 15, "bucket_bytes": 10 ** 15, "predicted_dkld": -1.2345678901234567e-05,
            "predicted_kld": 1.2345678901234567, "groups": {g.name: longest[g.outs[0].name] for g in groups},
            "base": base}
    types = {k: _header_type(v) for k, v in longest.items()}
    if prune_plan is not None and "rebuilt" in prune_plan:
        log.warning("the GGUF overhead estimate lacks the prune plan's metadata; pass prune_plan=")
        prune_plan = None
    quiet = logging.getLogger("gguf.gguf_writer")
    level, quiet.level = quiet.level, logging.WARNING  # its INFO lines name a temporary file
    try:
        head = go.overhead_bytes(view, default_type=None, tensor_types=types, quant_plan=plan,
                                 prune_plan=prune_plan)
    except MoepackError as e:
        log.warning("GGUF overhead not estimated: %s", e)
        return None
    finally:
        quiet.setLevel(level)
    pad = go.ALIGNMENT
    worst = sum(max(-t.nbytes % pad for t in (opt.typed[i] for opt in g.options))
                for g in groups for i in range(len(g.outs)))
    return head + worst + sum(-(o.numel * 4) % pad for o in fixed) + 1024


def _table(groups: list[GroupSpec], fixed: list[OutTensor], proxy: dict[tuple[str, str], float],
           kld: dict[tuple[str, str], float] | None, base_kld: float | None, base: dict[str, Any]) -> dict[str, Any]:
    out_groups = []
    for g in groups:
        opts = []
        for i, opt in enumerate(g.options):
            k = (g.name, opt.type)
            d: dict[str, Any] = {"type": opt.type, "bytes": opt.bytes}
            if kld is not None:
                d["dkld"] = 0.0 if i == 0 else kld[k] - base_kld
                d["kld"] = base_kld if i == 0 else kld[k]
            else:
                d["dkld"] = 0.0 if i == 0 else proxy[k]
            d["proxy"] = 0.0 if i == 0 else proxy[k]
            if any(t.qtype != t.requested for t in opt.typed):
                d["written"] = {t.out.name: t.qtype.name for t in opt.typed}
            opts.append(d)
        out_groups.append({"name": g.name, "class": g.cls, "role": g.role.value, "layer": g.layer,
                           "tensors": [o.name for o in g.outs], "options": opts})
    return {"version": 1, "format": FORMAT, "base": base,
            "fixed_bytes": sum(o.numel * 4 for o in fixed), "fixed": {o.name: "F32" for o in fixed},
            "groups": out_groups}


def _proxies(store: QuantStore, groups: list[GroupSpec]) -> dict[tuple[str, str], float]:
    """Proxy ΔKLD of each upgrade: −(err_base − err_t), summed over the group's tensors."""
    out = {}
    for g in groups:
        errs = [sum(store.err(t.out.name, t.qtype) for t in opt.typed) for opt in g.options]
        for opt, e in zip(g.options[1:], errs[1:]):
            out[(g.name, opt.type)] = e - errs[0]
    return out


# ---------------------------------------------------------------------------------------------------- entry point

def measure_sensitivity(view: CheckpointView, ids: Any, *, reference_logits: Any = None,
                        reference_view: CheckpointView | None = None,
                        imatrix: CalibStats | Mapping[str, np.ndarray] | None = None,
                        base: str | Mapping[str, str] | None = None, ladder: Iterable[str] = DEFAULT_LADDER,
                        mode: str = "kld", threads: int = 2, progress: bool = True, batch_size: int = 8,
                        cache_dir: str | Path | None = None, prune_plan: Mapping[str, Any] | None = None,
                        keep_layers_bytes: int = 4 << 30, backend: Backend | None = None,
                        tasks: int | None = None) -> dict[str, Any]:
    """sensitivity.json (allocate.py's schema) of `view` on token ids (N, L); see the module docstring.

    base: {role | tensor class | group name | "default": type} (or one type for all); IQ2_XXS where unnamed.
    reference_logits (N, L, V) or reference_view (normally the unpruned model) give the reference; default: `view`
    unquantized. imatrix: calibration statistics (or {GGUF name: (E|1, n) mean squared input}), of this model or
    of the model it was pruned from (`prune_plan`, or prune_plan.json next to a pruned checkpoint, or the lazy
    pruned view's own mapping then selects the kept experts' rows, as the writer does).
    cache_dir: keep quantized tensors on disk (large models; on Ray, storage every worker sees). threads: torch and
    quantization threads, here and in each task. backend: where quantization and probes run (moepack.stages.sensitivity.probes;
    default in-process), in `tasks` bins of groups (default: one per task slot); the table is the same for every
    backend and number of tasks.
    """
    if mode not in MODES:
        raise SensitivityError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if tasks is not None and tasks < 1:
        raise SensitivityError(f"tasks must be at least 1 (got {tasks})")
    run = _Run(list(ladder), mode, threads, progress, batch_size, None if cache_dir is None else str(cache_dir),
               keep_layers_bytes, backend or LocalBackend(), tasks)
    with torch_threads(threads):
        return _measure_sensitivity(view, _check_ids(view, ids), reference_logits, reference_view, imatrix, base,
                                    prune_plan, run)


@dataclass(frozen=True)
class _Run:
    """How measure_sensitivity runs (its keyword settings)."""

    ladder: list[str]
    mode: str
    threads: int
    progress: bool
    batch_size: int
    cache_dir: str | None
    keep_bytes: int
    backend: Backend
    tasks: int | None


def plan_kld(view: CheckpointView, ids: Any, tensor_types: Mapping[str, str], *, reference_logits: Any = None,
             reference_view: CheckpointView | None = None,
             imatrix: CalibStats | Mapping[str, np.ndarray] | None = None,
             prune_plan: Mapping[str, Any] | None = None, threads: int = 2, batch_size: int = 8,
             progress: bool = False) -> float:
    """Mean KLD vs the reference of `view` with every GGUF tensor at its type in `tensor_types` (a quant plan's
    "tensors"), fake-quantized exactly as the writer writes them: the KLD a plan really gets, without a GGUF."""
    with torch_threads(threads):
        ids_t = _check_ids(view, ids)
        im, _ = _prepare_imatrix(view, imatrix, _prune_plan(view, prune_plan))
        typed = [t for t in go.resolve_types(gguf_outputs(view), None, tensor_types) if t.out.quantizable]
        store = QuantStore(view, im, threads=threads)
        store.quantize([(t.out, [t]) for t in typed], progress)
        ref, _ = _reference(view, ids_t, reference_logits, reference_view, batch_size)
        runner = LayerRunner(view, loader=FakeQuantWeights(view, store, {t.out.name: t.qtype for t in typed}))
        with torch.inference_mode():
            h = runner.run(runner.embed(ids_t), batch_size=batch_size, inplace=True)
        return ref.kld(runner, h, _head_batch(ids_t, view.facts.vocab))


def _check_ids(view: Any, ids: Any) -> torch.Tensor:
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if ids_t.ndim != 2 or ids_t.numel() == 0:
        raise SensitivityError(f"token ids must be (sequences, length), got shape {tuple(ids_t.shape)}")
    if int(ids_t.max()) >= view.facts.vocab or int(ids_t.min()) < 0:
        raise SensitivityError(f"token ids outside the vocabulary of {view.facts.vocab}")
    return ids_t


def _measure_sensitivity(view: Any, ids: torch.Tensor, reference_logits: Any, reference_view: Any, imatrix: Any,
                         base: Any, prune_plan: Any, run: _Run) -> dict[str, Any]:
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    prune_plan = _prune_plan(view, prune_plan)
    im, proxy_w = _prepare_imatrix(view, imatrix, prune_plan)
    base_map = parse_base(base)
    groups, fixed = plan_groups(view, base_map, run.ladder, im)
    freq = np.bincount(ids.reshape(-1).numpy(), minlength=view.facts.vocab) / ids.numel()  # (V,)
    store = QuantStore(view, im, proxy_weights=proxy_w, token_freq=freq, threads=run.threads, cache_dir=run.cache_dir)
    inp = ProbeInputs(run.backend.view_arg(view), im, proxy_w, freq, run.threads, run.cache_dir,
                      {n: t.name for n, t in _typed_base(groups).items()}, run.batch_size, run.keep_bytes)
    run_quantize(run.backend, store, groups, inp, "all" if run.mode == "proxy" else "base", run.tasks, run.progress)
    timing["quantize_s"] = time.perf_counter() - t0
    kld = base_kld = None
    info: dict[str, Any] = {"measure": "proxy" if run.mode == "proxy" else "kld",
                            "types": dict(sorted(base_map.items())),
                            "default_type": base_map.get("default", base_map.get("*", DEFAULT_BASE)),
                            "ladder": [ggml.parse_type(t).name for t in run.ladder], "fingerprint": view.fingerprint(),
                            "writer": go.WRITER_ID, "imatrix": im is not None, "sequences": int(ids.shape[0]),
                            "seq_len": int(ids.shape[1]), "tokens": int(ids.numel())}
    if run.mode != "proxy":
        t1 = time.perf_counter()
        ref, info["reference"] = _reference(view, ids, reference_logits, reference_view, run.batch_size)
        timing["reference_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        base_kld, kld = run_probes(run.backend, view, store, groups, inp, ids, ref, run.tasks, run.progress)
        timing["probes_s"] = time.perf_counter() - t1
        info["kld"] = base_kld
    proxy = _proxies(store, groups)
    table = _table(groups, fixed, proxy, kld, base_kld, info)
    if (oh := _overhead(view, groups, fixed, info, prune_plan)) is not None:
        table["overhead_bytes"] = oh
    if kld is not None:
        table["proxy"] = {"weighting": "imatrix squared inputs per token; token_embd rows by token frequency",
                          **_agreement(groups, proxy, kld, base_kld)}
    timing["total_s"] = time.perf_counter() - t0
    table["timing"] = {k: round(v, 3) for k, v in timing.items()} | {"probes": len(kld or {}), "threads": run.threads,
                                                                      "backend": run.backend.name}
    return table


def save_json(obj: Any, path: str | Path) -> Path:
    """Write sensitivity.json atomically."""
    return runstate.save_json(obj, path, indent=1)

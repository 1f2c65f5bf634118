"""Sensitivity: ΔKLD of the model's output for every tensor group moved from its base type to each other ladder type.

Groups and their type options: moepack.stages.sensitivity.groups. Every weight is fake-quantized exactly as the GGUF
writer writes it (moepack.stages.sensitivity.fakequant: the writer's own code builds, types and quantizes each GGUF
tensor; ggml dequantizes it; it is mapped back to checkpoint tensors for transformers' own modules). Each
(tensor, type) is quantized once (in memory, or under `cache_dir`).

KLD mode: one forward with every group at its base type caches the hidden states entering every layer and keeps the
base layer modules; a probe (one group at one type) restarts at the group's layer, rebuilds only that layer and runs
the layers after it and the head (token_embd probes start at the embedding, output probes run only the head). KLD is
KL(reference ‖ model) per token, averaged (moepack.model.metrics); the reference is normally the original (unpruned)
model on the same tokens. Proxy mode: Σ_col importance[col] · Σ_row (w − q(w))² per tensor (importance = sum of
squared inputs per token, so experts weigh by how often they are routed; token_embd rows by token frequency), no
forward. Both are always reported when KLD is measured, with their Spearman rank agreement
(moepack.stages.sensitivity.table).

Which probes run (config.sensitivity, moepack.stages.sensitivity.fast): "full" probes every (group, type); "fast"
one type per group, every other type's ΔKLD predicted from it and the proxy (no forward per type); "auto" starts
fast and completes the full table when the time it would take, measured on those probes, is under the limit.

Output: a SensitivityTable (sensitivity.json, moepack.schema); every field except "timing" is a deterministic
function of the inputs (with sensitivity "auto", base["sensitivity"] records whether the time estimate kept the
table fast).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moepack.backends import Backend, LocalBackend, torch_threads
from moepack.gguf.imatrix import ImatrixFile, prune_imatrix
from moepack.gguf.metadata import WRITER_ID
from moepack.gguf.names import gguf_outputs
from moepack.gguf.types import LADDER, parse_type
from moepack.gguf.writer import resolve_types
from moepack.model.checkpoint import CheckpointView
from moepack.model.runner import LayerRunner
from moepack.schema import SENSITIVITY_FORMAT, CalibStats, PrunePlan, SensitivityTable
from moepack.stages.sensitivity.fakequant import FakeQuantWeights, QuantStore
from moepack.stages.sensitivity.fast import (AUTO_LIMIT_S, FAST_PROBE, PROXY_SAMPLE, check_sensitivity_mode, predict,
                                             predict_domains, run_sensitivity)
from moepack.stages.sensitivity.groups import SensitivityError, default_reference, parse_reference, plan_groups
from moepack.stages.sensitivity.probes import EMBED, StoreInputs, head_batch, reference_logprobs, run_quantize
from moepack.stages.sensitivity.table import agreement, overhead, proxies, table_groups


__all__ = [
    "MODES",
    "SensitivityConfig",
    "measure_sensitivity",
    "plan_kld",
    "PlanKLD",
    "prune_plan_of",
    "prepare_imatrix",
]

log = logging.getLogger(__name__)

MODES = ("kld", "proxy", "both")  # "both" = "kld": the proxy comes free with the quantization


@dataclass(frozen=True)
class SensitivityConfig:
    """How sensitivity is measured.

    base: {role | tensor class | group name | "default": type} (or one type for all); the ladder's smallest type where
    unnamed. cache_dir: keep quantized tensors on disk (large models; on Ray, storage every worker sees). threads:
    torch and quantization threads, here and in each task. tasks: bins of groups on the backend (default one per
    task slot); the table is the same for every backend and number of tasks. keep_layers_bytes: base layers kept
    built between probes. sensitivity, auto_limit_s, fast_probe: which probes run (moepack.stages.sensitivity.fast);
    proxy_sample: the fraction of rows a fast table's types not probed are quantized on for their proxy error.
    """

    reference: str | Mapping[str, str] | None = None
    ladder: tuple[str, ...] = LADDER
    mode: str = "kld"
    threads: int = 2
    progress: bool = True
    batch_size: int = 8
    cache_dir: str | Path | None = None
    keep_layers_bytes: int = 4 << 30
    tasks: int | None = None
    sensitivity: str = "auto"  # full: every (group, type) probed; fast: one per group; auto: by the estimate
    auto_limit_s: float = AUTO_LIMIT_S
    fast_probe: int = FAST_PROBE
    proxy_sample: float = PROXY_SAMPLE
    weights: tuple[float, ...] | None = None  # per sequence of the ids: its weight in every mean KLD (None: alike)
    # the calibration domains' names and each sequence's domain (an index): every ΔKLD is also kept per domain
    domains: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None

    def validate(self) -> None:
        check_sensitivity_mode(self.sensitivity)
        if not 0.0 < self.proxy_sample <= 1.0:
            raise SensitivityError(f"proxy_sample is a fraction of rows in (0, 1] (got {self.proxy_sample})")
        if self.mode not in MODES:
            raise SensitivityError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.tasks is not None and self.tasks < 1:
            raise SensitivityError(f"tasks must be at least 1 (got {self.tasks})")
        if (self.labels is None) != (self.domains is None) or self.labels is not None and self.domains is not None \
                and any(not 0 <= x < len(self.domains) for x in self.labels):
            raise SensitivityError("labels index the named domains, one per sequence; give both or neither")


# ---------------------------------------------------------------------------------------------------- imatrix

def prune_plan_of(view: CheckpointView, prune_plan: PrunePlan | None) -> PrunePlan | None:
    """The prune plan behind `view`: given, the lazy pruned view's own, or saved next to a pruned checkpoint."""
    if prune_plan is not None:
        return prune_plan
    if getattr(view, "plan", None) is not None:
        return view.plan
    return PrunePlan.beside(view.root)


def prepare_imatrix(view: CheckpointView, imatrix: CalibStats | Mapping[str, np.ndarray] | None,
                    prune_plan: PrunePlan | None = None
                    ) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """(the writer's importance matrix {GGUF name: (S|1, n) mean squared input}, proxy column weights: squared
    inputs per calibration token, so an expert weighs by how often it is routed; means when only those are given).
    An imatrix of the model `view` was pruned from (`prune_plan_of`) gets the kept experts' rows."""
    if imatrix is None:
        return None, None
    prune_plan = prune_plan_of(view, prune_plan)
    if isinstance(imatrix, CalibStats):
        entries = ImatrixFile.of_stats(imatrix, view).entries
        im = {name: e.mean() for name, e in entries.items()}  # as load_imatrix builds it
        n_tok = max(1, imatrix.manifest.tokens)
        weights = {name: (e.sums / n_tok).astype(np.float32) for name, e in entries.items()}  # (S, n)
    else:
        im = {k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()}
        weights = dict(im)
    if prune_plan is not None:  # an imatrix of the original model: keep the kept experts' rows, as the writer does
        im, weights = prune_imatrix(im, prune_plan), prune_imatrix(weights, prune_plan)
    return im, weights


# ---------------------------------------------------------------------------------------------------- entry point

def measure_sensitivity(view: CheckpointView, ids: Any, config: SensitivityConfig = SensitivityConfig(), *,
                        reference_view: CheckpointView | None = None, reference_logits: Any = None,
                        imatrix: CalibStats | Mapping[str, np.ndarray] | None = None,
                        prune_plan: PrunePlan | None = None, backend: Backend | None = None) -> SensitivityTable:
    """The sensitivity table of `view` on token ids (N, L); see the module docstring.

    reference_logits (N, L, V) or reference_view (normally the unpruned model) give the reference; default: `view`
    unquantized. imatrix: calibration statistics (or {GGUF name: (E|1, n) mean squared input}), of this model or
    of the model it was pruned from (`prune_plan`, the lazy pruned view's own plan, or prune_plan.json next to a
    pruned checkpoint then selects the kept experts' rows, as the writer does). backend: where quantization and
    probes run (moepack.stages.sensitivity.probes; default in-process).
    """
    config.validate()
    with torch_threads(config.threads):
        return _measure(view, _check_ids(view, ids), reference_logits, reference_view, imatrix,
                        prune_plan_of(view, prune_plan), config, backend or LocalBackend())


def plan_kld(view: CheckpointView, ids: Any, tensor_types: Mapping[str, str], *, reference_logits: Any = None,
             reference_view: CheckpointView | None = None,
             imatrix: CalibStats | Mapping[str, np.ndarray] | None = None,
             prune_plan: PrunePlan | None = None, threads: int = 2, batch_size: int = 8,
             progress: bool = False) -> float:
    """Mean KLD vs the reference of `view` with every GGUF tensor at its type in `tensor_types` (a quant plan's
    "tensors"), fake-quantized exactly as the writer writes them: the KLD a plan really gets, without a GGUF."""
    return PlanKLD(view, ids, reference_logits=reference_logits, reference_view=reference_view, imatrix=imatrix,
                   prune_plan=prune_plan, threads=threads, batch_size=batch_size)(tensor_types, progress)


class PlanKLD:
    """`plan_kld` of many plans of one view on the same tokens (compress's allocated plan, refinement moves,
    llama.cpp's mixtures), with the same numbers: the reference distribution is computed once, a (tensor, type)
    the last plan used is not quantized again, and a plan's forward restarts at the first layer whose tensor types
    differ from the last plan's (the hidden states entering each layer are kept; the forward runs layer by layer,
    every sequence through a layer before the next, as plan_kld's single pass does). Memory: one plan's quantized
    tensors and n_layers + 1 hidden states (N, L, H)."""

    def __init__(self, view: CheckpointView, ids: Any, *, reference_logits: Any = None,
                 reference_view: CheckpointView | None = None,
                 imatrix: CalibStats | Mapping[str, np.ndarray] | None = None, prune_plan: PrunePlan | None = None,
                 threads: int = 2, batch_size: int = 8) -> None:
        self.view, self.threads, self.batch_size = view, threads, batch_size
        self.ids = _check_ids(view, ids)
        self._reference = (reference_logits, reference_view)
        self.imatrix, _ = prepare_imatrix(view, imatrix, prune_plan)
        self.store = QuantStore(view, self.imatrix, threads=threads)
        self.outs = gguf_outputs(view)
        self._ref: Any = None  # ReferenceLogProbs, on the first plan
        self._keys: list[tuple[tuple[str, str], ...]] = []  # per entry of _hidden: the types it was computed with
        self._hidden: list[torch.Tensor] = []  # (N, L, H): [0] the embedding's output, [i + 1] leaving layer i

    def _stage_keys(self, types: Mapping[str, GGMLQuantizationType],
                    n_layers: int) -> list[tuple[tuple[str, str], ...]]:
        """Per hidden state: the types of every tensor it depends on (the embedding, then each layer's)."""
        by: list[list[tuple[str, str]]] = [[] for _ in range(n_layers + 1)]
        for o in self.outs:
            if o.name in types and (o.layer is not None and o.layer < n_layers or EMBED in o.sources):
                by[0 if o.layer is None else o.layer + 1].append((o.name, types[o.name].name))
        keys, acc = [], ()
        for part in by:
            acc = acc + tuple(sorted(part))
            keys.append(acc)
        return keys

    def __call__(self, tensor_types: Mapping[str, str], progress: bool = False) -> float:
        return self.measure(tensor_types, progress)[0]

    def measure(self, tensor_types: Mapping[str, str], progress: bool = False) -> tuple[float, np.ndarray]:
        """(mean KLD, per-token KLD (N, L)) of the plan `tensor_types`."""
        with torch_threads(self.threads):
            typed = [t for t in resolve_types(self.outs, None, tensor_types) if t.out.quantizable]
            used = {(t.out.name, t.qtype.name) for t in typed}
            kept = self.store.entries(k for k in self.store.entries() if k in used)
            self.store = QuantStore(self.view, self.imatrix, threads=self.threads)  # only this plan's bytes
            self.store.absorb(kept)
            self.store.quantize([(t.out, [t]) for t in typed if (t.out.name, t.qtype.name) not in kept], progress)
            if self._ref is None:
                self._ref, _ = reference_logprobs(self.view, self.ids, *self._reference, self.batch_size)
            types = {t.out.name: t.qtype for t in typed}
            runner = LayerRunner(self.view, loader=FakeQuantWeights(self.view, self.store, types))
            keys = self._stage_keys(types, runner.n_layers)
            same = next((i for i, (a, b) in enumerate(zip(keys, self._keys)) if a != b), len(self._keys))
            del self._hidden[same:]
            with torch.inference_mode():
                if not self._hidden:
                    self._hidden.append(runner.embed(self.ids))
                for i in range(len(self._hidden) - 1, runner.n_layers):
                    self._hidden.append(runner.run(self._hidden[i], i, i + 1, batch_size=self.batch_size))
            self._keys = keys
            rows: list[np.ndarray] = []
            mean = self._ref.kld(runner, self._hidden[-1], head_batch(self.ids, self.view.facts.vocab), rows)
            return mean, np.concatenate(rows)  # (N, L)


def _check_ids(view: CheckpointView, ids: Any) -> torch.Tensor:
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if ids_t.ndim != 2 or ids_t.numel() == 0:
        raise SensitivityError(f"token ids must be (sequences, length), got shape {tuple(ids_t.shape)}")
    if int(ids_t.max()) >= view.facts.vocab or int(ids_t.min()) < 0:
        raise SensitivityError(f"token ids outside the vocabulary of {view.facts.vocab}")
    return ids_t


def _base_info(view: CheckpointView, ids: torch.Tensor, cfg: SensitivityConfig, base_map: dict[str, str],
               has_imatrix: bool) -> dict[str, Any]:
    """The table's "base": how it was measured (copied into the quant plan)."""
    return {"measure": "proxy" if cfg.mode == "proxy" else "kld", "types": dict(sorted(base_map.items())),
            "default_type": base_map.get("default", base_map.get("*", default_reference(cfg.ladder))),
            "ladder": [parse_type(t).name for t in cfg.ladder], "fingerprint": view.fingerprint(),
            "writer": WRITER_ID, "imatrix": has_imatrix, "sequences": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "tokens": int(ids.numel())}


def _labels(cfg: SensitivityConfig, ids: torch.Tensor) -> np.ndarray | None:
    """Each sequence's domain index (N,), with at least two domains named; else None."""
    if cfg.labels is None or cfg.domains is None or len(cfg.domains) < 2:
        return None
    if len(cfg.labels) != ids.shape[0]:
        raise SensitivityError(f"{len(cfg.labels)} domain labels for {ids.shape[0]} sequences")
    return np.asarray(cfg.labels, dtype=np.int64)


def _domain_info(names: tuple[str, ...], labels: np.ndarray, weights: np.ndarray | None,
                 base: tuple[float, ...]) -> dict[str, Any]:
    """The table's base["domains"]: the names, the all-base KLD per domain, and per domain the coefficient of its
    plain mean in the table's (weighted) mean KLD: Σ of its sequences' weights / sequences, so that an option's
    dkld is Σ_d coef_d · domains_d."""
    w = np.ones(len(labels)) if weights is None else weights
    coef = np.bincount(labels, weights=w, minlength=len(names)) / len(labels)
    return {"names": list(names), "coef": [float(c) for c in coef], "kld": [float(x) for x in base]}


def _measure(view: CheckpointView, ids: torch.Tensor, reference_logits: Any, reference_view: CheckpointView | None,
             imatrix: Any, prune_plan: PrunePlan | None, cfg: SensitivityConfig, backend: Backend) -> SensitivityTable:
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    im, proxy_w = prepare_imatrix(view, imatrix, prune_plan)
    base_map = parse_reference(cfg.reference)
    groups, fixed = plan_groups(view, base_map, list(cfg.ladder), im)
    freq = np.bincount(ids.reshape(-1).numpy(), minlength=view.facts.vocab) / ids.numel()  # (V,)
    cache_dir = None if cfg.cache_dir is None else str(cfg.cache_dir)
    settings = StoreInputs(backend.view_arg(view), im, proxy_w, freq, cfg.threads, cache_dir)
    store = settings.store(view)
    run_quantize(backend, store, groups, settings, "all" if cfg.mode == "proxy" else "base", cfg.tasks, cfg.progress)
    timing["quantize_s"] = time.perf_counter() - t0
    kld = base_kld = predicted = probed = None
    info = _base_info(view, ids, cfg, base_map, im is not None)
    ran: dict[str, Any] = {}
    if cfg.mode != "proxy":
        t1 = time.perf_counter()
        weights = None if cfg.weights is None else np.asarray(cfg.weights, dtype=np.float64)
        labels = _labels(cfg, ids)
        ref, info["reference"] = reference_logprobs(view, ids, reference_logits, reference_view, cfg.batch_size,
                                                    weights, labels)

        timing["reference_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        probed = run_sensitivity(cfg.sensitivity, backend, view, store, groups, settings, ids, ref,
                                 cfg.batch_size, cfg.keep_layers_bytes, cfg.tasks, cfg.progress,
                                 cfg.auto_limit_s, cfg.fast_probe, cfg.proxy_sample)
        base_kld, kld, ran = probed.base_kld, probed.kld, probed.ran
        if probed.base_domains is not None and labels is not None and cfg.domains is not None:
            info["domains"] = _domain_info(cfg.domains, labels, weights, probed.base_domains)
        timing["probes_s"] = time.perf_counter() - t1
        info["kld"], info["sensitivity"] = base_kld, ran["sensitivity"]
        if "proxy_sample" in ran:  # a fast table: the types not probed have errors from this fraction of rows
            info["proxy_sample"] = ran["proxy_sample"]
    proxy = proxies(store, groups)
    if ran.get("sensitivity") == "fast":
        assert kld is not None and base_kld is not None
        predicted = predict(groups, proxy, kld, base_kld)
    per_domain = None
    if probed is not None and probed.base_domains is not None:
        per_domain = predict_domains(groups, proxy, probed.domains, probed.base_domains, probed.kld, probed.base_kld)
    head = overhead(view, groups, fixed, info, prune_plan)
    agree = None if kld is None else {
        "weighting": "imatrix squared inputs per token; token_embd rows by token frequency",
        **agreement(groups, proxy, kld, base_kld)}
    timing["total_s"] = time.perf_counter() - t0
    sampled = set(store.sampled_errors()) - set(store.entries())  # (tensor, type) errors from a row sample alone
    timed = {k: round(v, 3) for k, v in timing.items()} | {"probes": len(kld or {}), "threads": cfg.threads,
                                                           "backend": backend.name, "sampled_errors": len(sampled),
                                                           } | ran.get("auto", {})
    if "s_per_probe" in ran:  # a fast table: its probes' own seconds each (candidates.full_estimate_s)
        timed["s_per_probe"] = ran["s_per_probe"]
    return SensitivityTable(table_groups(groups, proxy, kld, base_kld, predicted, per_domain), sum(o.numel * 4 for o in fixed), info,
                            {o.name: "F32" for o in fixed}, head, SENSITIVITY_FORMAT, agree, timed)

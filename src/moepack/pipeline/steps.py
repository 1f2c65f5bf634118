"""The per-retention stages of `moepack compress`, each recorded in the run directory (moepack.rundir) under every
input it depends on: pruning to a retention (a plan and a lazy view, no checkpoint) and its sensitivity table."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from moepack.backends import Backend
from moepack.gguf.metadata import WRITER_ID
from moepack.model.checkpoint import CheckpointView
from moepack.model.pruned import pruned_view
from moepack.pipeline.candidates import Candidate
from moepack.pipeline.criterion import Pruning
from moepack.pipeline.options import CompressError, CompressOptions
from moepack.rundir import RunDir
from moepack.schema import CalibStats, PrunePlan, SensitivityTable

__all__ = ["prune_stage", "probe_ids", "sensitivity_stage"]

log = logging.getLogger(__name__)


def prune_stage(run: RunDir, ref: CheckpointView, stats: CalibStats, keep: float, how: Pruning,
                opts: CompressOptions) -> Candidate:
    """Retention `keep` pruned as `how` says (criterion, α, merge options) as an unmeasured candidate: its prune plan
    (prune_plan-rKEEP.json, with the merges where `how` merges) and the lazy view of the model it leaves; no pruned
    checkpoint is written (`--save-pruned` writes the chosen one), every stage reads the original's tensors. Keep 1.0
    with k' as it is: `ref` itself."""
    from moepack.stages.prune import PruneOptions, plan_prune

    if keep >= 1.0 and opts.top_k is None:
        return Candidate(keep, ref, None)
    path = run.layout.prune_plan(keep)
    popts = PruneOptions(keep=keep, alpha=how.alpha, criterion=how.criterion, top_k=opts.top_k, merge=how.merge)
    m = stats.manifest
    key = {"model": ref.fingerprint(), "calib": m.text_sha256, "calib_tokens": m.tokens, "selection": m.selection_tokens,
           "calib_shards": m.shards, "options": dataclasses.asdict(popts)}
    run.stage(f"prune-r{keep:g}", key, path,  # timed as the stage
              lambda: plan_prune(ref, run.root, popts, progress=opts.progress).write(path))
    plan = PrunePlan.read(path)
    return Candidate(keep, pruned_view(ref, plan), plan)


def probe_ids(selection: np.ndarray | None, probe_tokens: int | None) -> np.ndarray | None:
    """The selection sequences (N, L) the sensitivity probes run on: the first ceil(probe_tokens / L) of them, at
    least one (None: all). Fewer probe tokens make a table cheaper in proportion (the forward is most of a probe);
    the plans built from it are still measured on every selection token."""
    if selection is None or probe_tokens is None:
        return selection
    if probe_tokens < 1:
        raise CompressError(f"probe tokens must be at least 1 (got {probe_tokens})")
    return selection[:max(1, -(-probe_tokens // selection.shape[1]))]


def _sensitivity_key(cand: Candidate, ref: CheckpointView, stats: CalibStats, base: str,
                     opts: CompressOptions) -> dict[str, Any]:
    from moepack.stages.sensitivity.fast import PROXY_SAMPLE

    plan = cand.prune_plan
    key = {"model": cand.view.fingerprint(), "reference": ref.fingerprint(), "calib": stats.manifest.text_sha256,
           "calib_tokens": stats.manifest.tokens, "base": base, "ladder": list(opts.ladder),
           "sensitivity": opts.sensitivity,
           "prune": plan.to_dict()["layers"] if plan is not None else None, "top_k": cand.view.facts.top_k,
           "writer": WRITER_ID}  # the table holds the writer's overhead_bytes
    if opts.sensitivity != "full":  # a fast table's errors of the types not probed come from this row fraction
        key["proxy_sample"] = PROXY_SAMPLE
    if stats.manifest.shards != 1:  # sums in another order: the imatrix may differ in its last bits
        key["calib_shards"] = stats.manifest.shards
    return key


def _probe_labels(stats: CalibStats, ids: np.ndarray | None) -> tuple[int, ...] | None:
    """The calibration domain of each probe sequence (the first of the selection's), with several domains."""
    if ids is None or stats.selection_domain is None or len(stats.domain_names) < 2:
        return None
    return tuple(int(x) for x in stats.selection_domain[: ids.shape[0]])


def sensitivity_stage(run: RunDir, ref: CheckpointView, stats: CalibStats, cand: Candidate, base: str,
                      opts: CompressOptions, backend: Backend | None, reference: str | None = None) -> SensitivityTable:
    """The sensitivity table of candidate `cand` from reference type `base` in mode opts.sensitivity, cached in the
    run directory under every input it depends on (`reference` names the file of a second reference type's table:
    RunLayout.sensitivity)."""
    from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity

    path = run.layout.sensitivity(cand.keep, reference)
    key = _sensitivity_key(cand, ref, stats, base, opts)
    ids = probe_ids(stats.selection, opts.probe_tokens)
    if ids is not None and stats.selection is not None and ids.shape[0] < stats.selection.shape[0]:
        key["probe_tokens"] = int(ids.size)
    if stats.domain_scales is not None:  # every KLD weighs its domain by these (moepack.pipeline.robust)
        key["domain_scales"] = [float(x) for x in stats.domain_scales]
    labels = _probe_labels(stats, ids)
    if labels is not None:  # every ΔKLD kept per domain too (moepack.pipeline.repair)
        key["per_domain"] = len(stats.domain_names)

    def work() -> None:
        if ids is None:
            raise CompressError("calibration kept no held-out tokens for sensitivity; use a longer --calib-text")
        if "probe_tokens" in key:
            log.info("sensitivity probes on %d of the %d selection tokens (--probe-tokens)", ids.size,
                     stats.selection.size)
        weights = stats.selection_weights(len(ids))
        cfg = SensitivityConfig(reference=base, ladder=opts.ladder, threads=opts.threads, progress=opts.progress,
                                cache_dir=opts.cache_dir, sensitivity=opts.sensitivity,
                                weights=None if weights is None else tuple(float(w) for w in weights),
                                domains=None if labels is None else tuple(stats.domain_names), labels=labels)
        measure_sensitivity(cand.view, ids, cfg, reference_view=ref, imatrix=stats, prune_plan=cand.prune_plan,
                            backend=backend).write(path)

    tag = f"-{reference}" if reference else ""
    run.stage(f"sensitivity-r{cand.keep:g}{tag}", key, path, work)
    return SensitivityTable.read(path)  # from the file: a reused stage and a fresh one give the same table

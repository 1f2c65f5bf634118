"""Expert pruning and top-k adjustment: calibration statistics → `prune_plan.json` + a pruned HF checkpoint.

Importance per routed expert (criterion "score", the paper's): I_e = α·f̂_e + (1−α)·ŝ_e with f (share of routed
token slots) and s (mean routing weight when selected) each divided by its per-layer maximum. Every MoE layer keeps
the same number ⌈R·E⌉ of experts (llama.cpp has one expert count per model); group-limited routers keep the same
number in every group unless `--groups collapse`. The pruned checkpoint renumbers the kept experts, slices router
rows and e_score_correction_bias, and updates config.json; it is written tensor by tensor.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moepack.atomic import atomic_path, save_json
from moepack.errors import MoepackError
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.model.formats import fused_parts, part_names
from moepack.model.fused import StackedView, stacked_view
from moepack.model.pruned import (PrunedView, default_top_k, group_limited, kept_count, mtp_layers, pruned_view,
                                  selection_groups)
from moepack.model.runner import moe_layers
from moepack.model.stored import RawTensor
from moepack.rundir import RunDir
from moepack.schema import (CalibManifest, CalibStats, PruneGroups, PruneLayer, PrunePlan,
                            RouterStats, TopKRow, calib_dir)
from moepack.stages.merge import MergeOptions, merge_plan

__all__ = [
    "PruneError",
    "PruneOptions",
    "CRITERIA",
    "importance",
    "select_experts",
    "plan_shape",
    "PlanShape",
    "make_plan",
    "write_checkpoint",
    "active_bytes_per_token",
    "top_k_auto",
    "auto_candidates",
    "run_prune",
    "plan_prune",
]

log = logging.getLogger(__name__)

CRITERIA = ("score", "frequency", "reap", "random")
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
         "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
         "tiktoken.model", "hy.tiktoken")
_SHARD_BYTES = 4 << 30


class PruneError(MoepackError, ValueError):
    pass


@dataclass
class PruneOptions:
    keep: float = 0.75  # retention R in (0, 1]
    alpha: float = 0.5  # weight of frequency vs. score in the "score" criterion
    criterion: str = "score"
    top_k: int | str | None = None  # None: max(1, round(R·k)); an int; or "auto"
    groups: str = "preserve"  # "preserve" | "collapse"
    seed: int = 0  # for criterion "random"
    kld_tol: float = 0.01  # --top-k auto: smallest k' whose mean KLD is within this (nats) of the best
    batch_size: int = 8
    merge: MergeOptions | None = None  # fold the dropped experts into kept ones (stages.merge); None: discard them


# ---- selection -------------------------------------------------------------------------------------------------
def importance(r: RouterStats, criterion: str, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-expert importance (E,) of one layer; higher is kept first."""
    if criterion == "score":
        f, s = r.freq, r.score
        return alpha * f / max(f.max(), 1e-30) + (1.0 - alpha) * s / max(s.max(), 1e-30)
    if criterion == "frequency":
        return r.freq.astype(np.float64)
    if criterion == "reap":
        return r.saliency.astype(np.float64)
    if criterion == "random":
        return rng.random(len(r.counts))
    raise PruneError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def select_experts(scores: np.ndarray, n_keep: int, n_group: int = 1) -> list[int]:
    """Ids of the kept experts, ascending: top `n_keep` by score, the same number from each of `n_group` groups."""
    e = len(scores)
    per, size = n_keep // n_group, e // n_group
    kept: list[int] = []
    for g in range(n_group):
        grp = scores[g * size:(g + 1) * size]
        order = np.argsort(-grp, kind="stable")[:per]  # ties: lower id first
        kept += [g * size + int(i) for i in order]
    return sorted(kept)


@dataclass(frozen=True)
class PlanShape:
    """The counts and group settings a prune plan will have."""

    n_keep: int
    top_k: int
    n_group: int  # selection groups (1: global top)
    new_groups: tuple[int, int] | None  # (n_group, topk_group) for config.json, None: leave as is
    notes: tuple[str, ...]


def _check_options(view: CheckpointView, opts: PruneOptions) -> None:
    if not moe_layers(view):
        raise PruneError(f"{view.root}: no MoE layers; nothing to prune")
    if not 0.0 < opts.keep <= 1.0:
        raise PruneError(f"--keep {opts.keep} is outside (0, 1]; it is the share of routed experts kept per layer")
    if not 0.0 <= opts.alpha <= 1.0:
        raise PruneError(f"--alpha {opts.alpha} is outside [0, 1]")
    if opts.criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {opts.criterion!r}; choose one of {', '.join(CRITERIA)}")
    if opts.groups not in ("preserve", "collapse"):
        raise PruneError(f"--groups {opts.groups!r}: choose preserve or collapse")


def plan_shape(view: CheckpointView, opts: PruneOptions) -> PlanShape:
    """Counts and group settings of the pruned model; raises PruneError for anything infeasible."""
    _check_options(view, opts)
    f = view.facts
    notes: list[str] = []
    n_keep, n_group = kept_count(view, opts.keep, opts.groups), selection_groups(view, opts.groups)
    if n_keep != kept_count(view, opts.keep, "collapse"):
        notes.append(f"kept count rounded up to {n_keep} so that each of the {n_group} groups keeps the same number")
    new_groups = None
    if group_limited(view) and opts.groups == "collapse":
        new_groups = (1, 1)
        notes.append("groups collapsed into one: routing is no longer group-limited")
    elif f.n_group and f.n_group > 1 and n_group == 1 and n_keep % f.n_group:
        new_groups = (1, 1)  # router not group-limited: keep config.json consistent
    top_k = _top_k(view, opts, n_keep)
    grouped = n_group > 1
    reach = n_keep if not grouped else (f.topk_group or n_group) * (n_keep // n_group)
    if top_k > reach:
        where = f"the {f.topk_group} selected groups x {n_keep // n_group} kept experts" if grouped else \
            f"{n_keep} kept experts"
        raise PruneError(f"top-k {top_k} exceeds the experts a token can reach ({reach} = {where}); "
                         f"lower --top-k or raise --keep")
    if view.spec.extra.get("group_top2") and (n_keep // n_group) < 2:
        raise PruneError(f"{f.arch} routing scores each group by its top-2 experts, so every group needs at "
                         f"least 2 kept experts (got {n_keep // n_group}); raise --keep or use --groups collapse")
    return PlanShape(n_keep, top_k, n_group, new_groups, tuple(notes))


def _top_k(view: CheckpointView, opts: PruneOptions, n_keep: int) -> int:
    if opts.top_k is None or opts.top_k == "auto":
        return min(default_top_k(opts.keep, view.facts.top_k), n_keep)
    kk = int(opts.top_k)
    if kk < 1:
        raise PruneError(f"--top-k {kk}: a token needs at least one routed expert")
    if kk > n_keep:
        raise PruneError(f"--top-k {kk} exceeds the {n_keep} experts kept per layer; lower --top-k or raise --keep")
    return kk


def _check_fingerprint(view: CheckpointView, manifest: CalibManifest) -> None:
    if manifest.fingerprint != view.fingerprint():
        raise PruneError(f"calibration statistics are from another model (fingerprint {manifest.fingerprint}, "
                         f"{manifest.model}); this model is {view.fingerprint()}: rerun moepack "
                         f"calibrate on {view.root}")


def _check_calib(view: CheckpointView, stats: CalibStats) -> None:
    _check_fingerprint(view, stats.manifest)
    missing = [m for m in moe_layers(view) if m not in stats.router]
    if missing:
        raise PruneError(f"calibration statistics lack MoE layer(s) {missing}; rerun moepack calibrate")


def _groups(view: CheckpointView, sh: PlanShape, opts: PruneOptions) -> PruneGroups:
    f = view.facts
    mode = "preserve" if sh.n_group > 1 else (opts.groups if group_limited(view) else "none")
    return PruneGroups(mode=mode, n_group=f.n_group, topk_group=f.topk_group, kept_per_group=sh.n_keep // sh.n_group,
                       n_group_new=sh.new_groups[0] if sh.new_groups else f.n_group,
                       topk_group_new=sh.new_groups[1] if sh.new_groups else f.topk_group)


def make_plan(view: CheckpointView, stats: CalibStats, opts: PruneOptions) -> PrunePlan:
    """The prune plan: kept expert ids per layer with all scores, k', groups and the choices made."""
    _check_calib(view, stats)
    sh = plan_shape(view, opts)
    rng = np.random.default_rng(opts.seed)
    layers: dict[str, PruneLayer] = {}
    for layer in moe_layers(view):
        scores = importance(stats.router[layer], opts.criterion, opts.alpha, rng)
        kept = select_experts(scores, sh.n_keep, sh.n_group)
        layers[str(layer)] = PruneLayer(kept=kept, removed=[e for e in range(len(scores)) if e not in kept],
                                        scores=[float(s) for s in scores])
    f = view.facts
    policy = "auto" if opts.top_k == "auto" else ("default" if opts.top_k is None else "fixed")
    plan = PrunePlan(
        model=str(view.root), model_fingerprint=view.fingerprint(),
        calib=stats.manifest.text, calib_fingerprint=stats.manifest.fingerprint,
        criterion=opts.criterion, alpha=opts.alpha, keep=opts.keep, seed=opts.seed,
        normalisation="frequency and score each divided by its per-layer maximum",
        n_experts=f.n_experts, n_kept=sh.n_keep, top_k=f.top_k, top_k_new=sh.top_k, top_k_policy=policy,
        groups=_groups(view, sh, opts), notes=list(sh.notes) + _extra_layer_note(view), layers=layers,
        top_k_table=[],
    )
    return plan if opts.merge is None else merge_plan(view, stats, plan, opts.merge)


def _extra_layer_note(view: CheckpointView) -> list[str]:
    extra = mtp_layers(view)
    if not extra:
        return []
    return [f"tensors of layer(s) {extra} beyond num_hidden_layers (multi-token prediction) are not written: "
            f"their experts were not calibrated"]


# ---- streaming writer ------------------------------------------------------------------------------------------
def _stored_parts(view: CheckpointView, n: str) -> list[tuple[str, RawTensor]] | None:
    """The source's own tensors for `n` (FP8 values and block scales, int4 packs, the kept experts' MXFP4 blocks
    and scales stacked), renamed with it: a pruned checkpoint keeps the source's format. None: `n` is written as
    loaded (plain, sliced or fused): so is every tensor of a view with merged experts."""
    if getattr(getattr(view, "inner", view), "merged", False):
        return None
    if isinstance(view, StackedView) and n in view.members and view.inner is not None:  # gpt-oss MXFP4 experts
        split, names = view.members[n]
        return fused_parts(n, [ops for _, ops in split.outputs],
                           [[view.inner.tensors[m] for m in per] for per in names])  # type: ignore[return-value]
    stored = getattr(view.tensors[n], "stored", None)  # bench/scale.py's synthetic refs have none
    rows = view.sources[n][1] if isinstance(view, PrunedView) and n in view.sources else None
    names = part_names(n, stored) if stored is not None and rows is None else None
    return None if names is None else list(zip(names, stored.parts))


def _all_decoded(view: CheckpointView) -> bool:
    """Whether `view` reads compressed tensors of which none can be written as stored: they are written decoded,
    and the source's quantization_config would no longer be true."""
    refs = [*view.tensors.values(), *getattr(getattr(view, "inner", None), "tensors", {}).values()]
    compressed = any(getattr(r, "stored", None) is not None and r.stored.format != "plain" for r in refs)
    return compressed and not any(_stored_parts(view, n) for n in view.tensors)


def _write_safetensors(view: CheckpointView, names: list[str], path: Path) -> dict[str, int]:
    """One safetensors file, header first (from the refs), then each tensor's bytes as it is loaded. Returns the
    bytes of each tensor written (a stored tensor's parts under their own names)."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    items: list[tuple[str, RawTensor | None, int]] = []  # (name, stored part or None: load `name`, bytes)
    for n in names:
        parts = _stored_parts(view, n)
        items += [(pn, p, p.nbytes) for pn, p in parts] if parts else [(n, None, view.tensors[n].nbytes)]
    off = 0
    for n, p, nb in items:
        dtype, shape = (p.dtype, p.shape) if p is not None else (view.tensors[n].dtype, view.tensors[n].shape)
        header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for n, p, nb in items:
            t = (p.read() if p is not None else view.load(n)).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
            if raw.size != nb:
                raise PruneError(f"{n}: {raw.size} bytes loaded, {nb} expected")
            f.write(raw)  # the buffer itself: no bytes copy of a large tensor
            del t, raw  # before the next load: never two large tensors (lm_head, embed_tokens) at once
    return {n: nb for n, _, nb in items}


def _shards(view: CheckpointView, names: list[str], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = view.tensors[n].nbytes
        if shards[-1] and size + nb > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    return shards


def _prepare_out(out: Path, src: Path) -> None:
    if out.resolve() == src.resolve():
        raise PruneError(f"-o {out} is the input checkpoint; choose a new directory")
    if out.exists() and any(out.iterdir()) and not (out / "prune_plan.json").is_file():
        raise PruneError(f"{out} exists and is not a moepack prune output; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    for p in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        p.unlink()


def write_checkpoint(view: CheckpointView, out_dir: str | Path, max_shard_bytes: int = _SHARD_BYTES,
                     progress: bool = True) -> Path:
    """Write `view` (e.g. a PrunedView) as a Hugging Face checkpoint, tensor by tensor; copies tokenizer files."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    src = view.source.root if isinstance(view, PrunedView) and view.source is not None else view.root
    _prepare_out(out, src)
    view = stacked_view(view)  # gpt-oss, Llama 4: experts stacked again, as transformers loads them
    names = sorted(view.tensors)
    shards = _shards(view, names, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(tqdm(shards, desc="write", unit="shard", disable=not progress or len(shards) < 2)):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        written = _write_safetensors(view, shard, out / fname)
        weight_map.update({n: fname for n in written})
        total += sum(written.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        save_json(index, out / "model.safetensors.index.json")
    save_json({k: v for k, v in view.config.items() if k != "quantization_config" or not _all_decoded(view)},
              out / "config.json")
    for name in _COPY:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for p in list(src.glob("*.py")) + list(src.glob("*.jinja")):  # remote code, chat templates
        shutil.copy2(p, out / p.name)
    return out


# ---- top-k -----------------------------------------------------------------------------------------------------
def active_bytes_per_token(view: CheckpointView) -> int:
    """Weight bytes one decoded token reads: all dense weights, k of E experts per MoE layer, one embedding row."""
    f = view.facts
    total = 0.0
    for ref in view.tensors.values():
        if ref.role is Role.ROUTED_EXPERTS:
            total += ref.nbytes * f.top_k / max(1, f.n_experts)
        elif ref.role is Role.EMBEDDING:
            total += ref.nbytes / max(1, ref.shape[0])
        else:
            total += ref.nbytes
    return int(total)


def top_k_auto(view: CheckpointView, plan: PrunePlan, ids: np.ndarray, candidates: list[int],
               tol: float, batch_size: int = 8, reference: Any = None,
               progress: bool = True) -> tuple[int, list[TopKRow]]:
    """Measure each candidate k' (KLD vs the unpruned model on `ids` (N, L), active bytes); pick the smallest k'
    whose mean KLD is within `tol` of the best. `reference`: a KLDReference of `view` on `ids` to reuse."""
    from moepack.model.runner import KLDReference, LayerRunner

    if reference is None:
        reference = KLDReference(LayerRunner(view), ids, min(moe_layers(view)), batch_size,
                                 progress="reference" if progress else False)
    table: list[TopKRow] = []
    for k in candidates:
        pv = pruned_view(view, plan, top_k=k)
        m = reference.variant(LayerRunner(pv), progress=f"top-k {k}" if progress else False)
        table.append(TopKRow(top_k=k, **m, active_bytes=active_bytes_per_token(pv)))
        log.info("top-k %d: mean KLD %.4f, active bytes/token %d", k, m["kld_mean"], table[-1].active_bytes)
    best = min(r.kld_mean for r in table)
    chosen = min(r.top_k for r in table if r.kld_mean <= best + tol)
    return chosen, table


def auto_candidates(plan: PrunePlan, view: CheckpointView, opts: PruneOptions) -> list[int]:
    """The k' that `--top-k auto` measures: from the default k' up to the original k, as far as tokens reach."""
    lo, hi = default_top_k(opts.keep, view.facts.top_k), view.facts.top_k
    g = plan.groups
    reach = plan.n_kept if g.mode != "preserve" else g.topk_group * g.kept_per_group
    return [k for k in range(lo, hi + 1) if k <= min(plan.n_kept, reach)] or [plan.top_k_new]


# ---- stage -----------------------------------------------------------------------------------------------------
def _base_plan(view: CheckpointView, calib: str | Path, opts: PruneOptions) -> tuple[PrunePlan, CalibStats]:
    plan_shape(view, opts)  # validates the options before anything is read
    _check_fingerprint(view, CalibManifest.read(calib_dir(calib)))
    stats = CalibStats.read(calib)
    record = {k: v for k, v in dataclasses.asdict(opts).items() if k != "merge" or v is not None}
    plan = dataclasses.replace(make_plan(view, stats, opts), options=record,
                               calib_dir=str(calib_dir(calib).resolve()),
                               active_bytes_per_token=dict(original=active_bytes_per_token(view)))
    return plan, stats


def _finish_plan(view: CheckpointView, plan: PrunePlan, stats: CalibStats, opts: PruneOptions,
                 progress: bool) -> PrunePlan:
    """k' measured (--top-k auto) and the pruned model's active bytes per token added."""
    if opts.top_k == "auto":
        if stats.selection is None:
            raise PruneError("--top-k auto needs held-out tokens, and this calibration has none; rerun moepack "
                             "calibrate with a longer text or a larger --sens-tokens")
        cands = auto_candidates(plan, view, opts)
        plan = plan.with_top_k(*top_k_auto(view, plan, stats.selection, cands, opts.kld_tol, opts.batch_size,
                                           progress=progress))
    return dataclasses.replace(plan, active_bytes_per_token={**plan.active_bytes_per_token,
                                                             "pruned": active_bytes_per_token(pruned_view(view, plan))})


def plan_prune(view: CheckpointView, calib: str | Path, opts: PruneOptions, progress: bool = True) -> PrunePlan:
    """The prune stage's plan, with no checkpoint written: `pruned_view(view, plan)` is the pruned model, read lazily
    (what compress measures and writes its candidates through)."""
    plan, stats = _base_plan(view, calib, opts)
    return _finish_plan(view, plan, stats, opts, progress)


def run_prune(model_dir: str | Path, calib: str | Path, out_dir: str | Path, opts: PruneOptions,
              progress: bool = True) -> PrunePlan:
    """The prune stage: validate, plan, (measure k'), write the pruned checkpoint and OUT_DIR/prune_plan.json, a
    stage of OUT_DIR as a run directory (moepack.rundir: a finished output from the same model, statistics and
    options is reused; its plan, written last, is the stage's artifact)."""
    view = open_checkpoint(model_dir)
    plan, stats = _base_plan(view, calib, opts)
    out = Path(out_dir)
    path = out / "prune_plan.json"

    def work() -> None:
        done = _finish_plan(view, plan, stats, opts, progress)
        write_checkpoint(pruned_view(view, done), out, progress=progress)
        done.write(path)  # last: marks the output complete
        log.info("pruned %s: %d of %d experts per layer, top-k %d -> %s", view.root, done.n_kept, done.n_experts,
                 done.top_k_new, out)

    d = plan.to_dict()
    key = {k: d.get(k) for k in ("model_fingerprint", "calib_fingerprint", "calib_dir", "options", "layers")}
    if not RunDir(out).stage("prune", key, path, work):
        log.info("reusing pruned checkpoint in %s (same model, statistics and options)", out)
    return PrunePlan.read(path)


"""The work of the sensitivity stage as tasks on a backend (moepack.backends): quantizing tensor groups, the
reference distribution, the all-base forward that every probe restarts from, and the probes themselves.

Order of work, and where each part runs:

1. `quantize_task` per bin of groups (tasks): every group's tensors at their base type (KLD mode), or at every
   option type (proxy mode). The bytes come back to the driver's store, or stay under `cache_dir` (shared storage)
   where the tasks wrote them.
2. In the driver, once: the reference distribution (`reference_logprobs`) and one forward with every group at its
   base type, keeping the hidden states entering every layer (`Prober`).
3. `probe_task` per bin of groups (tasks): quantizes its groups' upgrade types (each needed by this task only),
   then probes each picked (group, type) (all upgrades; or one per group in fast mode,
   moepack.stages.sensitivity.fast, where the types not probed get their proxy error from a row sample alone,
   QuantStore.sample_errors) from the cached hidden states, with the base bytes, hidden states and reference
   shared by every task (sent once; read zero-copy on Ray). Layer-major: the groups entering at one layer are
   probed together, so each base layer after it is built once for all their probes (`Prober.probe_many`; a layer
   too large to keep built was rebuilt per probe); their upgrade bytes are dropped after them.

A probe's KLD depends only on its group, type and these shared inputs (a kept base layer and a rebuilt one hold the
same weights), so any split into bins, in-process or on Ray, gives bitwise the same numbers for the same threads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moepack.backends import Backend, ViewRef, as_tensor, layer_f32_bytes, open_view, partition, torch_threads
from moepack.model import metrics
from moepack.model.checkpoint import CheckpointView
from moepack.model.runner import LayerRunner
from moepack.stages.sensitivity.fakequant import FakeQuantWeights, QuantStore
from moepack.stages.sensitivity.groups import GroupOption, GroupSpec, SensitivityError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["StoreInputs", "QuantizeInputs", "ProbeInputs", "ReferenceLogProbs", "Prober", "typed_base",
           "quantize_groups", "head_batch", "reference_logprobs", "quantize_task", "probe_task", "run_quantize",
           "run_probes", "base_state", "probe_bins", "Pick", "Errors", "Domains", "EMBED"]

log = logging.getLogger(__name__)

EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"  # the names LayerRunner reads them by
_HEAD_ELEMS = 1 << 26  # logits elements per head batch (256 MiB in float32)

Pick = Mapping[str, tuple[str, ...]]  # group name → the option types to probe


def typed_base(groups: list[GroupSpec]) -> dict[str, GGMLQuantizationType]:
    """GGUF tensor name → the type written with every group at its base."""
    return {o.name: t.qtype for g in groups for o, t in zip(g.outs, g.options[0].typed)}


def quantize_groups(store: QuantStore, groups: list[GroupSpec], progress: bool) -> None:
    """Every option type of every group's tensors, in `store`."""
    store.quantize([(o, [opt.typed[i] for opt in g.options]) for g in groups for i, o in enumerate(g.outs)],
                   progress)


class _ProbeRunner(LayerRunner):
    """LayerRunner whose base-configuration layers are built once and kept (up to `keep_bytes`); the layers in
    `fresh` (the probed one) are rebuilt from the current weights every time."""

    def __init__(self, view: CheckpointView, weights: FakeQuantWeights, keep_bytes: int) -> None:
        super().__init__(view, loader=weights)
        self.fresh: set[int] = set()
        self._kept: dict[int, nn.Module] = {}
        self._room = keep_bytes
        self.pinned: dict[int, nn.Module] = {}  # a base layer built once for every probe passing through it

    def layer(self, i: int, weight_override: Any = None) -> nn.Module:
        if i in self.fresh or weight_override is not None:
            return super().layer(i, weight_override)
        if i in self.pinned:
            return self.pinned[i]
        if i in self._kept:
            return self._kept[i]
        module = super().layer(i)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        if size <= self._room:
            self._kept[i], self._room = module, self._room - size
        return module


# ---------------------------------------------------------------------------------------------------- KLD

class ReferenceLogProbs:
    """The reference's log-probabilities per head batch, and the mean KLD of a model's head against them
    (moepack.model.metrics: summed term by term, each batch in float64)."""

    def __init__(self, batches: Iterable[torch.Tensor], weights: np.ndarray | None = None,
                 labels: np.ndarray | None = None) -> None:
        self.lp: list[torch.Tensor] = [metrics.log_probs(z) for z in batches]  # (B, L, V) each
        self.n_tokens = sum(int(x[..., 0].numel()) for x in self.lp)
        bounds = np.cumsum([0] + [len(x) for x in self.lp])
        # per head batch (B,): each sequence's weight in the mean (moepack.pipeline.robust: domains weighed by their
        # own KLD level); None: every token alike
        self.w: list[torch.Tensor] | None = None
        if weights is not None:
            self.w = [torch.as_tensor(np.asarray(weights[a:b], dtype=np.float64)) for a, b in zip(bounds, bounds[1:])]
        # per head batch (B,): each sequence's calibration domain, for per-domain ΔKLDs; None: one domain
        self.labels: list[np.ndarray] | None = None
        if labels is not None:
            self.labels = [np.asarray(labels[a:b], dtype=np.int64) for a, b in zip(bounds, bounds[1:])]

    @property
    def n_domains(self) -> int:
        return 0 if self.labels is None else 1 + max((int(x.max()) for x in self.labels if len(x)), default=-1)

    def arrays(self) -> tuple[list[np.ndarray] | None, ...]:
        """(log p, weights or None, domain labels or None), each per head batch, as numpy: plain data for tasks."""
        return ([t.numpy() for t in self.lp], None if self.w is None else [w.numpy() for w in self.w], self.labels)

    @classmethod
    def from_arrays(cls, arrays: tuple[list[np.ndarray] | None, ...]) -> ReferenceLogProbs:
        ref = cls([])
        lp, w, labels = (*arrays, None, None)[:3]
        assert lp is not None
        ref.lp = [as_tensor(a) for a in lp]
        ref.n_tokens = sum(int(a[..., 0].size) for a in lp)
        ref.w = [torch.as_tensor(x) for x in w] if w is not None else None
        ref.labels = labels
        return ref

    def domain_means(self, rows: list[np.ndarray]) -> tuple[float, ...] | None:
        """Per domain the plain mean KLD of per-token KLDs `rows` (one (B, L) per head batch, as `kld` appends
        them); None with one domain."""
        if self.labels is None or self.n_domains < 2:
            return None
        sums, counts = np.zeros(self.n_domains), np.zeros(self.n_domains)
        for lab, r in zip(self.labels, rows):
            sums += np.bincount(lab, weights=r.sum(axis=1), minlength=self.n_domains)
            counts += np.bincount(lab, minlength=self.n_domains) * r.shape[1]
        return tuple(float(s / c) if c else 0.0 for s, c in zip(sums, counts))

    @torch.inference_mode()
    def kld(self, runner: LayerRunner, h_final: torch.Tensor, head_batch: int,
            tokens: list[np.ndarray] | None = None) -> float:
        """Mean KL(reference ‖ runner's head on h_final (N, L, H)) over all tokens; each batch's per-token KLDs
        (B, L) appended to `tokens` when given (per-domain judgements need them)."""
        mean = metrics.KLDMean()
        for i, b0 in enumerate(range(0, h_final.shape[0], head_batch)):
            lq = metrics.log_probs(runner.logits(h_final[b0:b0 + head_batch]))  # (B, L, V)
            kld = metrics.token_kld(self.lp[i], lq)  # (B, L)
            mean.add(kld if self.w is None else kld.double() * self.w[i][:, None])
            if tokens is not None:
                tokens.append(kld.double().numpy())
        return mean.total / self.n_tokens


def head_batch(ids: torch.Tensor, vocab: int) -> int:
    """Sequences per head batch: about _HEAD_ELEMS logits at a time."""
    return max(1, _HEAD_ELEMS // max(1, ids.shape[1] * vocab))


def reference_logprobs(view: CheckpointView, ids: torch.Tensor, reference_logits: Any,
                       reference_view: CheckpointView | None, batch_size: int,
                       weights: np.ndarray | None = None,
                       labels: np.ndarray | None = None) -> tuple[ReferenceLogProbs, str]:
    """(the reference distribution on `ids` (N, L), what it is): given logits (N, L, V), the reference model's
    forward, or `view` itself unquantized. `weights` (N,): each sequence's weight in every mean KLD; `labels` (N,):
    each sequence's calibration domain (per-domain ΔKLDs)."""
    hb = head_batch(ids, view.facts.vocab)
    if reference_logits is not None:
        z = torch.as_tensor(reference_logits)
        if tuple(z.shape[:2]) != tuple(ids.shape) or z.shape[-1] != view.facts.vocab:
            raise SensitivityError(f"reference logits {tuple(z.shape)} do not match ids {tuple(ids.shape)} "
                                   f"and vocabulary {view.facts.vocab}")
        return ReferenceLogProbs((z[b:b + hb] for b in range(0, z.shape[0], hb)), weights, labels), "logits"
    ref_view = reference_view if reference_view is not None else view
    if ref_view.facts.vocab != view.facts.vocab:
        raise SensitivityError(f"the reference model's vocabulary ({ref_view.facts.vocab}) differs from the "
                               f"model's ({view.facts.vocab}); pass the model this one was pruned from")
    runner = LayerRunner(ref_view)
    with torch.inference_mode():
        h = runner.run(runner.embed(ids), batch_size=batch_size, inplace=True)
        ref = ReferenceLogProbs((runner.logits(h[b:b + hb]) for b in range(0, h.shape[0], hb)), weights, labels)
    runner.release()
    return ref, "self" if reference_view is None else str(ref_view.root)


# ---------------------------------------------------------------------------------------------------- probes

class Prober:
    """Base forward with cached hidden states (or given ones), then one probe per (group, option)."""

    def __init__(self, view: CheckpointView, weights: FakeQuantWeights, ids: torch.Tensor, ref: ReferenceLogProbs, batch_size: int,
                 keep_bytes: int, hidden: list[torch.Tensor] | None = None) -> None:
        self.view, self.weights, self.ids, self.ref, self.bs = view, weights, ids, ref, batch_size
        self.runner = _ProbeRunner(view, weights, keep_bytes)
        self.n = self.runner.n_layers
        self.hb = head_batch(ids, view.facts.vocab)
        self.head_name = _HEAD if _HEAD in view.tensors else EMBED  # tied embeddings: token_embd is the head
        self.base_kld: float | None = None
        self.base_domains: tuple[float, ...] | None = None  # per-domain mean KLD of the all-base model
        self.hidden = hidden  # hidden states entering layer L; [n]: after the last
        if hidden is None:
            with torch.inference_mode():
                self.hidden = [self.runner.embed(ids)]
                for i in range(self.n):
                    self.hidden.append(self.runner.run(self.hidden[-1], i, i + 1, batch_size=batch_size))
            rows = [] if ref.labels is not None else None  # per-token KLDs only where domains split them
            self.base_kld = ref.kld(self.runner, self.hidden[-1], self.hb, rows)
            self.base_domains = ref.domain_means(rows or [])

    @torch.inference_mode()
    def probe(self, group: GroupSpec, option: GroupOption) -> float:
        return self.probe_many([(group, option)])[0]

    @torch.inference_mode()
    def probe_many(self, probes: list[tuple[GroupSpec, GroupOption]],
                   domains: list[tuple[float, ...] | None] | None = None) -> list[float]:
        """KLD of each (group, option), layer-major: each probe enters at its group's first layer (its layers
        rebuilt at its types) and each base layer after it is built once for all the probes passing through it,
        not once per probe (a layer too large to keep built). Every sequence goes through a layer in the same
        batches as one probe at a time, so the numbers are the same. Each probe's per-domain mean KLDs are
        appended to `domains` when given (ReferenceLogProbs.domain_means)."""
        types = [{o.name: t.qtype for o, t in zip(g.outs, opt.typed)} for g, opt in probes]
        layers = [{o.layer for o in g.outs if o.layer is not None} for g, _ in probes]
        live: dict[int, torch.Tensor] = {}
        for j, (g, _) in enumerate(probes):
            if EMBED in g.sources:
                live[j] = self._with(types[j], set(), lambda: self.runner.embed(self.ids))
        for i in range(self.n):
            live |= {j: self.hidden[i] for j, (g, _) in enumerate(probes)
                     if j not in live and _start(g, self.n) == i}
            ours = [j for j in live if i in layers[j]]
            for j in ours:
                live[j] = self._with(types[j], layers[j], lambda: self.runner.run(live[j], i, i + 1,
                                                                                 batch_size=self.bs))
            rest = [j for j in live if i not in layers[j]]
            if rest:
                self.runner.pinned = {i: self.runner.layer(i)}
                for j in rest:
                    live[j] = self.runner.run(live[j], i, i + 1, batch_size=self.bs)
                self.runner.pinned = {}
        out = []
        for j, (g, _) in enumerate(probes):
            h = live.pop(j, self.hidden[self.n])  # output probes: only the head
            rows: list[np.ndarray] | None = [] if domains is not None and self.ref.labels is not None else None
            if self.head_name not in g.sources:
                out.append(self.ref.kld(self.runner, h, self.hb, rows))
            else:
                self.runner.release()  # rebuild the head from the probed weights
                out.append(self._with(types[j], set(), lambda: self.ref.kld(self.runner, h, self.hb, rows)))
                self.runner.release()
            if domains is not None:
                domains.append(self.ref.domain_means(rows or []))
        return out

    def _with(self, override: dict[str, GGMLQuantizationType], fresh: set[int], work: Any) -> Any:
        """work() with `override` on the base types and the layers `fresh` rebuilt from them."""
        self.weights.override, self.runner.fresh = override, fresh
        try:
            return work()
        finally:
            self.weights.override, self.runner.fresh = {}, set()


# ---------------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class StoreInputs:
    """How every quantize and probe task (and the driver) builds its QuantStore: plain data, sent once."""

    view: CheckpointView | ViewRef  # the checkpoint view in-process; a ViewRef on Ray (Backend.view_arg)
    imatrix: Mapping[str, np.ndarray] | None
    proxy_weights: Mapping[str, np.ndarray] | None
    token_freq: np.ndarray | None  # (V,)
    threads: int
    cache_dir: str | None

    def store(self, view: CheckpointView) -> QuantStore:
        return QuantStore(view, self.imatrix, proxy_weights=self.proxy_weights, token_freq=self.token_freq,
                          threads=self.threads, cache_dir=self.cache_dir)


@dataclass(frozen=True)
class QuantizeInputs:
    """What every quantize task of one stage shares."""

    store: StoreInputs
    which: str  # "base": each group's base type; "all": every option type
    progress: bool  # inner progress bars (one in-process task)


@dataclass(frozen=True)
class ProbeInputs:
    """What every probe task shares: the store settings, the all-base state every probe restarts from."""

    store: StoreInputs
    base: Mapping[str, str]  # GGUF tensor name → written type name, every group at its base
    base_raw: Mapping[tuple[str, str], tuple[Any, float]]  # QuantStore.entries of the base types
    ids: np.ndarray  # (N, L)
    hidden: list[np.ndarray]  # (N, L, H) entering each layer, all at base; [n]: after the last
    ref: tuple[list[np.ndarray], ...]  # ReferenceLogProbs.arrays()
    batch_size: int
    keep_bytes: int
    progress: bool  # inner progress bars (one in-process task)
    pick: Pick | None = None  # None: every upgrade of every group
    errors: bool = True  # quantize every upgrade type for its proxy error, not only the probed ones
    sample: float = 1.0  # the fraction of rows the types not probed are quantized on for their error (1: whole)


def quantize_task(groups: list[GroupSpec], inp: QuantizeInputs) -> dict[tuple[str, str], tuple[Any, float]]:
    """Quantize `groups` at their base type (which="base") or every option type ("all"): store entries."""
    view = open_view(inp.store.view)
    with torch_threads(inp.store.threads):
        store = inp.store.store(view)
        store.quantize([(o, [opt.typed[i] for opt in (g.options[:1] if inp.which == "base" else g.options)])
                        for g in groups for i, o in enumerate(g.outs)], inp.progress)
    return store.entries()


Errors = dict[tuple[str, str], float]  # (GGUF tensor, type) → proxy error


Domains = dict[tuple[str, str], tuple[float, ...]]  # (group, type) → its probe's mean KLD per calibration domain


def probe_task(groups: list[GroupSpec], inp: ProbeInputs) -> tuple[Errors, Errors, dict[tuple[str, str], float],
                                                                     Domains]:
    """Quantize each group's upgrade types and probe them: ({(tensor, type): proxy error of the whole tensor},
    {(tensor, type): proxy error from a row sample (types not probed, `inp.sample` < 1)}, {(group, type): KLD},
    {(group, type): KLD per domain} (empty with one domain))."""
    from tqdm.auto import tqdm

    view = open_view(inp.store.view)
    errs: Errors = {}
    kld: dict[tuple[str, str], float] = {}
    dom: Domains = {}
    with torch_threads(inp.store.threads):
        store = inp.store.store(view)
        store.absorb(inp.base_raw)
        weights = FakeQuantWeights(view, store, {k: GGMLQuantizationType[v] for k, v in inp.base.items()})
        prober = Prober(view, weights, torch.as_tensor(np.array(inp.ids)), ReferenceLogProbs.from_arrays(inp.ref),
                        inp.batch_size, inp.keep_bytes, hidden=[as_tensor(h) for h in inp.hidden])
        picked = {g.name: _picked(g, inp.pick) for g in groups}
        by_start: dict[int, list[GroupSpec]] = {}
        for g in groups:  # layer-major: the probes entering at one layer share every base layer after it
            by_start.setdefault(_start(g, prober.n), []).append(g)
        with tqdm(total=sum(map(len, picked.values())), desc="probes", unit="probe", disable=not inp.progress) as bar:
            for start in sorted(by_start):
                have = set(store.entries())
                for g in by_start[start]:
                    whole = g.options[1:] if inp.errors and inp.sample >= 1.0 else picked[g.name]
                    store.quantize([(o, [opt.typed[i] for opt in whole]) for i, o in enumerate(g.outs)])
                    if inp.errors and inp.sample < 1.0:  # errors alone: no probe or writer needs these bytes
                        probed = {opt.type for opt in picked[g.name]}
                        rest = [opt for opt in g.options[1:] if opt.type not in probed]
                        store.sample_errors([(o, [opt.typed[i] for opt in rest], g.options[0].typed[i])
                                             for i, o in enumerate(g.outs)], inp.sample)
                probes = [(g, opt) for g in by_start[start] for opt in picked[g.name]]
                per: list[tuple[float, ...] | None] = []
                for (g, opt), v, d in zip(probes, prober.probe_many(probes, per), per):
                    kld[(g.name, opt.type)] = v
                    if d is not None:
                        dom[(g.name, opt.type)] = d
                bar.update(len(probes))
                new = set(store.entries()) - have
                errs.update({k: e for k, (_, e) in store.entries(new).items()})
                store.forget(new)
        prober.runner.release()
    return errs, store.sampled_errors(), kld, dom


def _picked(g: GroupSpec, pick: Pick | None) -> list[GroupOption]:
    """The upgrade options of `g` to probe."""
    return list(g.options[1:]) if pick is None else [o for o in g.options[1:] if o.type in pick.get(g.name, ())]


def _start(g: GroupSpec, n_layers: int) -> int:
    layers = [o.layer for o in g.outs if o.layer is not None]
    return 0 if EMBED in g.sources else min(layers) if layers else n_layers


def run_quantize(backend: Backend, store: QuantStore, groups: list[GroupSpec], settings: StoreInputs, which: str,
                 tasks: int | None, progress: bool) -> None:
    """Stage 1 on `backend`: the entries land in the driver's `store`."""
    n_types = [1 if which == "base" else len(g.options) for g in groups]
    costs = [sum(o.numel for o in g.outs) * k for g, k in zip(groups, n_types)]
    bins = partition(costs, tasks or backend.slots(settings.threads))
    inp = QuantizeInputs(settings, which, progress and backend.local and len(bins) == 1)
    # the largest GGUF tensor: f32 source, its dequantized copy, the difference, its float64 square, the bytes
    mem = 24 * max(o.numel for g in groups for o in g.outs)
    for entries in backend.map(quantize_task, [[groups[i] for i in b] for b in bins], inp,
                               desc=f"quantize {which}", num_cpus=settings.threads, memory=mem, progress=progress):
        store.absorb(entries)


def base_state(view: CheckpointView, store: QuantStore, groups: list[GroupSpec], settings: StoreInputs, ids: torch.Tensor,
               ref: ReferenceLogProbs, batch_size: int, keep_bytes: int,
               progress: bool) -> tuple[float, tuple[float, ...] | None, ProbeInputs]:
    """Stage 2: the all-base forward here; (base KLD, its mean per domain, what every probe task shares)."""
    base = typed_base(groups)
    weights = FakeQuantWeights(view, store, base)
    prober = Prober(view, weights, ids, ref, batch_size, keep_bytes)
    base_kld, base_dom, hidden = prober.base_kld, prober.base_domains, [h.numpy() for h in prober.hidden]
    del prober, weights  # its kept layers: each task keeps its own
    base_keys = {(o.name, t.qtype.name) for g in groups for o, t in zip(g.outs, g.options[0].typed)}
    assert base_kld is not None
    return base_kld, base_dom, ProbeInputs(settings, {k: t.name for k, t in base.items()}, store.entries(base_keys),
                                 ids.numpy(), hidden, ref.arrays(), batch_size, keep_bytes, progress)


def probe_bins(backend: Backend, view: CheckpointView, store: QuantStore, groups: list[GroupSpec], inp: ProbeInputs,
               tasks: int | None, domains: Domains | None = None) -> dict[tuple[str, str], float]:
    """Stage 3 on `backend`: the probes `inp.pick` names (all by default); {(group, type): KLD}, and their KLDs per
    domain into `domains` when given. The proxy errors of the types quantized land in the driver's `store`."""
    n = len(inp.hidden) - 1
    costs = [len(_picked(g, inp.pick)) * (n - _start(g, n) + 1) for g in groups]
    bins = partition(costs, tasks or backend.slots(inp.store.threads))
    inp = replace(inp, progress=inp.progress and backend.local and len(bins) == 1)
    mem = (min(inp.keep_bytes, n * layer_f32_bytes(view)) + 3 * layer_f32_bytes(view) + 2 * _HEAD_ELEMS * 4
           + sum(h.nbytes for h in inp.hidden) + sum(a.nbytes for xs in inp.ref if xs is not None for a in xs))
    kld: dict[tuple[str, str], float] = {}
    for errs, sampled, part, dom in backend.map(probe_task, [[groups[i] for i in b] for b in bins], inp, desc="probes",
                                           num_cpus=inp.store.threads, memory=mem, progress=inp.progress):
        store.absorb({k: (None, e) for k, e in errs.items()})
        store.absorb_sampled(sampled)
        kld.update(part)
        if domains is not None:
            domains.update(dom)
    return kld


def run_probes(backend: Backend, view: CheckpointView, store: QuantStore, groups: list[GroupSpec], settings: StoreInputs,
               ids: torch.Tensor, ref: ReferenceLogProbs, batch_size: int, keep_bytes: int, tasks: int | None,
               progress: bool) -> tuple[float, dict[tuple[str, str], float]]:
    """Stages 2 and 3, every probe: (base KLD, {(group, type): KLD})."""
    base_kld, _, inp = base_state(view, store, groups, settings, ids, ref, batch_size, keep_bytes, progress)
    return base_kld, probe_bins(backend, view, store, groups, inp, tasks)

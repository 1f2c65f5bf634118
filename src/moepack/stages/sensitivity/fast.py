"""Fast sensitivity: one probe per tensor group, every other type's ΔKLD predicted from llama.cpp's kernels alone.

The loss increase of a quantized model is close to linear in each layer's weighted quantization error (the
linearity theorem of HIGGS, Malinovskii et al. 2024: ΔLoss ≈ Σ_l α_l · error_l). So per group one probe at one
ladder type t* measures ΔKLD(t*) and learns α_g = ΔKLD(t*) / Δerr(t*), where Δerr(t) = err(t) − err(base) is the
imatrix-weighted squared error of the group's tensors (QuantStore's proxy; quantize and dequantize only, no
forward); every other type, below the base (Δerr > 0: a positive ΔKLD) or above it, is predicted as α_g · Δerr(t),
so a long ladder costs no more forward passes. The probed type keeps its measurement. Δerr(t) of the types not
probed needs no bytes, only an error: it is measured on a PROXY_SAMPLE fraction of each tensor's rows and scaled to
the whole (QuantStore.sample_errors), so those types cost a fraction of a quantization; the base and the probed
type are quantized whole (the probes and the writer compute with them). A probe's measured ΔKLD can
come out with the wrong sign (noise on a group that barely matters: an upgrade that hurts); α_g is then 0.

Forward-pass cost: one probe per group instead of one per (group, type). `auto` runs these probes first, times
them, and estimates the rest of the full table (remaining probes × measured seconds per probe); above `limit_s`
the table stays fast, below it the remaining probes run and the table is full (the same numbers as `full`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from moepack.backends import Backend
from moepack.model.checkpoint import CheckpointView
from moepack.stages.sensitivity.fakequant import QuantStore
from moepack.stages.sensitivity.groups import GroupSpec, SensitivityError
from moepack.stages.sensitivity.probes import Domains, Pick, ReferenceLogProbs, StoreInputs, base_state, probe_bins

__all__ = ["SENSITIVITY_MODES", "AUTO_LIMIT_S", "FAST_PROBE", "PROXY_SAMPLE", "check_sensitivity_mode", "fast_pick",
           "predict", "predict_domains", "Probed", "run_sensitivity"]

log = logging.getLogger(__name__)

SENSITIVITY_MODES = ("auto", "fast", "full")
AUTO_LIMIT_S = 1800.0  # auto: a full table estimated to take longer than this stays fast
FAST_PROBE = -1  # the upgrade probed in fast mode, as an index into the group's upgrades (-1: the highest)
# Fast mode: the fraction of each tensor's rows (per expert of a stacked tensor) on which the types not probed are
# quantized for their proxy error. Chosen by bench/fast_sample.py on both fixtures (docs/performance.md):
PROXY_SAMPLE = 1 / 8


def check_sensitivity_mode(mode: str) -> None:
    if mode not in SENSITIVITY_MODES:
        raise SensitivityError(f"unknown sensitivity {mode!r}; choose one of {', '.join(SENSITIVITY_MODES)}")


def fast_pick(groups: list[GroupSpec], at: int = FAST_PROBE) -> dict[str, tuple[str, ...]]:
    """{group: (the one type probed,)} for every group with another option; `at` indexes them in order of bytes
    (clamped; -1: the largest)."""
    out = {}
    for g in groups:
        ups = g.options[1:]
        if ups:
            out[g.name] = (ups[max(-len(ups), min(at, len(ups) - 1))].type,)
    return out


def predict(groups: list[GroupSpec], proxy: Mapping[tuple[str, str], float], kld: Mapping[tuple[str, str], float],
            base_kld: float) -> dict[tuple[str, str], float]:
    """ΔKLD of every option but the base: measured where probed, else α_g · Δerr with α_g from the group's
    probe (`predict_domains` with the mean as its one domain)."""
    for g in groups:
        if len(g.options) > 1 and not any((g.name, o.type) in kld for o in g.options[1:]):
            raise SensitivityError(f"group {g.name} has no probe to learn its coefficient from")
    one = predict_domains(groups, proxy, {k: (v,) for k, v in kld.items()}, (base_kld,), kld, base_kld)
    return {k: v[0] for k, v in one.items()}


def predict_domains(groups: list[GroupSpec], proxy: Mapping[tuple[str, str], float], domains: Domains,
                    base: tuple[float, ...], kld: Mapping[tuple[str, str], float], base_kld: float) -> Domains:
    """`predict` per calibration domain: ΔKLD per domain of every option but the base, measured where probed (a
    full table: every one), else α_g,d · Δerr with α_g,d from the group's probe on that domain's tokens; 0 where
    `predict`'s α_g is (no Δerr, or the probe's mean has the wrong sign), so that the coefficient-weighted sum of
    the α_g,d stays α_g."""
    out: Domains = {}
    for g in groups:
        keys = [(g.name, o.type) for o in g.options[1:]]
        probed = [k for k in keys if k in domains]
        if not probed:
            continue
        k0 = probed[0]
        de = proxy[k0]
        alpha = ([(m - b) / de for m, b in zip(domains[k0], base)] if de and (kld[k0] - base_kld) / de > 0
                 else [0.0] * len(base))
        out.update({k: tuple(m - b for m, b in zip(domains[k], base)) if k in domains
                    else tuple(a * proxy[k] for a in alpha) for k in keys})
    return out


@dataclass
class Probed:
    """What the probes measured: the all-base KLD, each probe's KLD, what ran ({"sensitivity": "fast" | "full",
    "probes", for a fast table "proxy_sample" (the row fraction of the types not probed) and "s_per_probe", for auto
    the estimate it decided on}), and, with several calibration domains, both per domain."""

    base_kld: float
    kld: dict[tuple[str, str], float]
    ran: dict[str, Any]
    base_domains: tuple[float, ...] | None = None
    domains: Domains = field(default_factory=dict)


def run_sensitivity(mode: str, backend: Backend, view: CheckpointView, store: QuantStore, groups: list[GroupSpec],
              settings: StoreInputs, ids: torch.Tensor, ref: ReferenceLogProbs, batch_size: int, keep_bytes: int,
              tasks: int | None, progress: bool, limit_s: float = AUTO_LIMIT_S, at: int = FAST_PROBE,
              sample: float = PROXY_SAMPLE) -> Probed:
    """The probes of `mode` (see Probed)."""
    check_sensitivity_mode(mode)
    base_kld, base_dom, inp = base_state(view, store, groups, settings, ids, ref, batch_size, keep_bytes, progress)
    dom: Domains = {}

    def done(kld: dict[tuple[str, str], float], ran: dict[str, Any]) -> Probed:
        return Probed(base_kld, kld, ran, base_dom, dom)

    n_full = sum(len(g.options) - 1 for g in groups)
    if mode == "full":
        kld = probe_bins(backend, view, store, groups, inp, tasks, dom)
        return done(kld, {"sensitivity": "full", "probes": len(kld)})
    pick = fast_pick(groups, at)
    t0 = time.perf_counter()
    kld = probe_bins(backend, view, store, groups, replace(inp, pick=pick, sample=sample), tasks, dom)
    per_probe = (time.perf_counter() - t0) / max(1, len(kld))
    if len(kld) == n_full:  # every upgrade probed: nothing was sampled
        return done(kld, {"sensitivity": "full", "probes": len(kld)})
    info: dict[str, Any] = {"sensitivity": "fast", "probes": len(kld), "proxy_sample": sample,
                            "s_per_probe": round(per_probe, 3)}  # the table's timing: what a full one would cost
    if mode == "fast":
        return done(kld, info)
    rest: Pick = {g.name: tuple(o.type for o in g.options[1:] if (g.name, o.type) not in kld) for g in groups}
    estimate = (n_full - len(kld)) * per_probe
    info["auto"] = {"full_estimate_s": round(estimate, 1), "limit_s": limit_s, "s_per_probe": round(per_probe, 3)}
    go = estimate <= limit_s
    log.info("sensitivity auto: the full table needs %d more probes, about %.0f s at %.2f s per probe measured on "
             "%d; %s", n_full - len(kld), estimate, per_probe, len(kld),
             "measuring them (full)" if go else f"above {limit_s:.0f} s: keeping the fast table")
    if not go:
        return done(kld, info)
    kld |= probe_bins(backend, view, store, groups, replace(inp, pick=rest, errors=False), tasks, dom)
    # the remaining types were quantized whole for their probes: their whole errors replace the sampled ones
    return done(kld, {"sensitivity": "full", "probes": len(kld), "auto": info["auto"]})

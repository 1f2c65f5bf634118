"""`moepack compress` with expert merging (issue 31): --merge merges every pruned candidate and the GGUF records the
merges (llama.cpp runs it: compress verifies); --criterion auto measures merging beside the criteria and merges iff
that measures lower; a fixed --criterion without --merge discards the dropped experts."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import gguf
import numpy as np
import pytest

from conftest import small_compress_options
from moepack.cli import main
from moepack.gguf.keys import Keys
from moepack.model.checkpoint import open_checkpoint
from moepack.pipeline.criterion import AUTO_CRITERIA, choose_pruning
from moepack.pipeline.summary_text import render_summary
from moepack.schema import RunSummary
from moepack.stages.calibrate import calibrate
from moepack.stages.merge import MergeOptions

SMALL: dict[str, Any] = {"calib_tokens": 512, "seq_len": 64, "selection_tokens": 128,
                         "ladder": "IQ2_XXS,IQ3_S,Q4_K,Q8_0"}
RUNS = {  # run name → compress flags; all at keep 0.75 (6 of 8 experts), in one run directory (one calibration)
    "merge": small_compress_options("--merge", "--merge-similarity", "weight", fast=True, **SMALL),
    "auto": small_compress_options("--sensitivity", "fast", "--refine", "0", **SMALL),
    "fixed": small_compress_options(fast=True, **SMALL),  # --criterion score
}


@dataclasses.dataclass
class Run:
    summary: RunSummary
    plan: dict[str, Any]  # the run directory's prune_plan-r0.75.json
    gguf_plan: dict[str, Any]  # the GGUF's moepack.prune_plan
    printed: str


@pytest.fixture(scope="module")
def runs(shared_tiny_model, tmp_path_factory) -> dict[str, Run]:
    import io
    from contextlib import redirect_stdout

    model = shared_tiny_model("qwen3_moe", tokenizer=True, vocab=320)
    tmp = tmp_path_factory.mktemp("compress-merge")
    target = sum(open_checkpoint(model).param_counts().values())  # 8 bits per weight: small rows fall back
    out: dict[str, Run] = {}
    for name, flags in RUNS.items():
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["compress", str(model), "--target-size", f"{target}B", "--keep", "0.75",
                         "-o", str(tmp / f"{name}.gguf"), "--run-dir", str(tmp / "run"), *flags]) == 0
        field = gguf.GGUFReader(tmp / f"{name}.gguf").fields[Keys.PRUNE_PLAN]
        out[name] = Run(RunSummary.read(tmp / "run" / "summary.json"),
                        json.loads((tmp / "run" / "prune_plan-r0.75.json").read_text()),
                        json.loads(field.contents()), buf.getvalue())
    return out


def test_merge_merges_the_candidate_and_the_gguf_records_it(runs: dict[str, Run]) -> None:
    r = runs["merge"]
    want = dataclasses.asdict(MergeOptions(similarity="weight"))
    assert r.summary.merge == want and r.summary.chosen_candidate()["merge"] == want
    assert r.summary.criterion == "score" and r.summary.chosen_candidate()["criteria"] is None  # fixed criterion
    assert r.summary.verify_error is None  # llama.cpp loaded the merged file and generated
    assert r.gguf_plan == r.plan and r.plan["merge"]["similarity"] == "weight"
    for layer, groups in r.plan["merge"]["layers"].items():
        merged = sorted(m for g in groups for m in g["members"][1:])
        assert merged == r.plan["layers"][layer]["removed"] and len(merged) == 2  # 8 - 6 experts, each merged
    assert "merging       each dropped expert folded into its most weight-similar kept one" in r.printed


def test_criterion_auto_measures_merging_and_merges_iff_lower(runs: dict[str, Run]) -> None:
    r = runs["auto"]
    cand = r.summary.chosen_candidate()
    *criteria, merged = cand["criteria"]
    assert [(t["criterion"], t["alpha"]) for t in criteria] == list(AUTO_CRITERIA)
    assert not any(t.get("merge") for t in criteria) and merged["merge"] == dataclasses.asdict(MergeOptions())
    best = min(criteria, key=lambda t: t["prune_kld"])
    assert (merged["criterion"], merged["alpha"]) == (best["criterion"], best["alpha"])  # the winner, merged
    merges = merged["prune_kld"] < best["prune_kld"]
    assert (r.summary.merge is not None) == merges == ("merge" in r.plan) == ("merge" in r.gguf_plan)
    assert cand["prune_kld"] == min(best["prune_kld"], merged["prune_kld"])
    assert (r.summary.criterion, r.summary.alpha) == (best["criterion"], best["alpha"])
    assert "merged" in render_summary(r.summary).split("criterion at keep 0.75")[1]


def test_a_fixed_criterion_never_merges(runs: dict[str, Run]) -> None:
    r = runs["fixed"]
    assert r.summary.merge is None and r.summary.chosen_candidate()["merge"] is None
    assert r.summary.chosen_candidate()["criteria"] is None
    assert "merge" not in r.plan and "merge" not in r.gguf_plan and "merging" not in r.printed


def test_choose_pruning_merges_only_when_it_measures_lower(shared_tiny_model, caplog) -> None:
    """With a stand-in KLD: merging taken when lower, not when equal or higher; --merge measures every criterion
    merged; statistics without the expert output Gram measure merging by weight similarity, and say so."""
    src = shared_tiny_model("qwen3_moe", tokenizer=True, vocab=320)
    view = open_checkpoint(src)
    ids = np.random.default_rng(1).integers(0, 256, (4, 24))  # (N, L)
    stats = calibrate(view, ids, progress=False, selection=ids[:2])
    for merged_kld, merges in ((0.1, True), (0.2, False), (0.3, False)):
        p = choose_pruning(view, stats, 0.75, lambda v: merged_kld if v.merged else 0.2)  # noqa: B023
        assert (p.merge is not None) == merges and p.prune_kld == min(merged_kld, 0.2)
        assert len(p.tried) == len(AUTO_CRITERIA) + 1
    given = MergeOptions(weighting="frequency")
    p = choose_pruning(view, stats, 0.75, lambda v: 0.1 if v.merged else 0.2, merge=given)
    assert p.merge == given and len(p.tried) == len(AUTO_CRITERIA)
    assert all(t["merge"] == dataclasses.asdict(given) for t in p.tried)
    old = dataclasses.replace(stats, router={k: dataclasses.replace(r, out_gram=None) for k, r in stats.router.items()})
    with caplog.at_level(logging.INFO):
        p = choose_pruning(view, old, 0.75, lambda v: 0.1 if v.merged else 0.2)
    assert p.merge == MergeOptions(similarity="weight") and p.tried[-1]["merge"]["similarity"] == "weight"
    assert "merging is measured by weight similarity" in caplog.text

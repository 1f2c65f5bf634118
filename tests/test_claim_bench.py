"""bench/claim.py's pure parts: the per-size verdict, the Unsloth-style hand rule, paths kept out of the results."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import claim  # noqa: E402


def _ev(kld: float, half: float, size: int) -> dict:
    return {"kld_mean": kld, "kld_ci95_low": kld - half, "kld_ci95_high": kld + half, "size_bytes": size}


def test_verdict_needs_all_three():
    uni = _ev(0.10, 0.005, 1000)
    assert claim.verdict(_ev(0.07, 0.005, 1000), uni)["holds"]  # 30 % lower, same size, CIs apart
    assert claim.verdict(_ev(0.075, 0.005, 1000), uni)["kld_reduction"] == pytest.approx(0.25)
    short = claim.verdict(_ev(0.08, 0.005, 1000), uni)  # 20 % lower: below the goal
    assert not short["holds"] and short["cis_apart"] and short["no_larger"]
    larger = claim.verdict(_ev(0.05, 0.005, 1001), uni)
    assert not larger["holds"] and not larger["no_larger"]
    wide = claim.verdict(_ev(0.07, 0.03, 1000), uni)  # 30 % lower but the CIs overlap
    assert not wide["holds"] and not wide["cis_apart"]
    assert claim.verdict(None, uni) is None and claim.verdict(_ev(0.07, 0.0, 1), None) is None
    assert claim._verdict_cell(wide) == "falls short: CIs overlap"
    assert claim._verdict_cell(short) == "falls short: reduction below 25 %"
    worse = claim.verdict(_ev(0.2, 0.005, 1000), uni)  # twice the KLD: its CI is apart, on the wrong side
    assert claim._verdict_cell(worse) == "falls short: KLD higher"


def test_unsloth_rule_steps_above_the_routed_experts():
    from moepack.gguf.names import gguf_outputs
    from moepack.model.arch import Role
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(ROOT / "models" / "tiny-deepseek-v3")
    plan = claim.unsloth_plan(view, "IQ2_XXS")
    lad = claim._ladder()
    step = {n: lad.index(t) - lad.index("IQ2_XXS") for n, t in plan.items()}
    roles = {o.name: o.role for o in gguf_outputs(view) if o.quantizable}
    assert set(plan) == set(roles)
    for name, role in roles.items():
        if role is Role.ROUTED_EXPERTS:
            assert step[name] == ("ffn_down" in name), name
        elif role in (Role.ATTENTION, Role.SHARED_EXPERTS, Role.DENSE_FFN, Role.OUTPUT):
            assert step[name] == claim.HAND_STEPS, name
    assert {Role.ATTENTION, Role.SHARED_EXPERTS, Role.ROUTED_EXPERTS} <= set(roles.values())
    # a larger base never gives a smaller file: fitting_bases' "largest first" is the largest file that fits
    sizes = [claim.plan_bytes(view, claim.unsloth_plan(view, t)) for t in lad]
    assert sizes == sorted(sizes)


def test_results_hold_no_absolute_paths(tmp_path):
    work = tmp_path / "work"
    obj = {"file": work / "fx" / "a.gguf", "error": f"{ROOT}/models/x: bad; {work}/fx/b.gguf too",
           "nested": [ROOT / "docs" / "results.md"]}
    out = claim._portable(obj, work)
    assert out == {"file": "fx/a.gguf", "error": "models/x: bad; fx/b.gguf too", "nested": ["docs/results.md"]}


def test_reproduce_names_every_cell_held():
    """Runs that add fixtures or size points one at a time resume into one JSON: its command makes all of them."""
    cells = {"models/tiny-qwen3-moe": ["Q3_K_M", "IQ2_XXS"], "models/tiny-deepseek-v3": ["IQ2_XXS"]}
    results = {"fixtures": {Path(m).name: {"model": m, "cells": dict.fromkeys(fs, {})} for m, fs in cells.items()}}
    cmd = claim.reproduce(results, ["--models", "models/tiny-qwen3-moe", "--ftypes", "Q3_K_M", "--ctx", "256"])
    assert cmd == "python bench/claim.py --ctx 256 --ftypes IQ2_XXS Q3_K_M"  # both fixtures: the default models
    del results["fixtures"]["tiny-deepseek-v3"]
    assert claim.reproduce(results, ["--ftypes=Q3_K_M"]) == \
        "python bench/claim.py --models models/tiny-qwen3-moe --ftypes IQ2_XXS Q3_K_M"


def test_commits_line_names_each_cells_commit():
    rec = {"cells": {"IQ2_XXS": {"commit": "abc1234"}, "Q2_K": {"commit": "abc1234"}, "Q4_K_M": {}}}
    assert claim.commits_line(rec) == "Measured at commit abc1234: IQ2_XXS, Q2_K; not recorded: Q4_K_M."
    assert claim.code_commit() is None or len(claim.code_commit().split("+")[0]) >= 7


def test_a_calibration_text_gets_its_own_results_and_a_relative_name_in_the_settings(tmp_path):
    """Cells calibrated on other text never resume into (or overwrite) the default (stories) results, and the
    settings name the text without an absolute path."""
    stories = argparse.Namespace(calib_text=claim.CALIB_TEXT, work=None, out=None, md=None, png=None)
    claim._default_paths(stories)
    assert (stories.out, stories.md) == (ROOT / "bench/results/claim.json", ROOT / "docs/results.md")
    bundled = argparse.Namespace(calib_text=Path("bundled"), work=None, out=None, md=tmp_path / "page.md", png=None)
    claim._default_paths(bundled)
    assert bundled.calib_text is None  # compress's own default text
    assert bundled.out == ROOT / "bench/results/claim-bundled.json" and bundled.md == tmp_path / "page.md"
    assert bundled.work == ROOT / "out/bench-claim-bundled"
    assert bundled.png == ROOT / "docs/results-bundled-pareto.png"
    other = argparse.Namespace(calib_text=ROOT / "data/calib/code.txt", work=None, out=None, md=None, png=None)
    claim._default_paths(other)
    assert other.out == ROOT / "bench/results/claim-code.json"
    for ns in (stories, bundled):
        for k in ("calib_tokens", "seq_len", "sens_tokens", "ctx", "eval_tokens"):
            setattr(ns, k, 1)
    assert claim.settings(stories)["calib_text"] == "`data/calib/stories.txt`"
    assert claim.settings(bundled)["calib_text"].startswith("bundled")

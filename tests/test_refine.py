"""Interaction refinement (moepack.pipeline.refine): measured moves of the allocated plan never make it worse on the
selection tokens, never leave the budget, find the better swap when groups interact, and are recorded."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import DATA
from moepack.pipeline.refine import byte_sides, candidate_moves, refine
from moepack.schema import QuantPlan, SensitivityTable
from moepack.schema.tables import Group, Option
from moepack.stages.allocate import allocate

BASE_KLD = 0.05


def _table(dklds: dict[str, tuple[float, ...]], sizes: tuple[int, ...] = (100, 200, 300)) -> SensitivityTable:
    """One group per name, its options IQ2_XXS < Q4_K < Q6_K at `sizes` bytes, ΔKLD as given (base first)."""
    types = ("IQ2_XXS", "Q4_K", "Q6_K")
    groups = tuple(Group(n, (f"{n}.weight",), tuple(Option(t, b, float(d)) for t, b, d in zip(types, sizes, ds)))
                   for n, ds in dklds.items())
    return SensitivityTable(groups, 10, {"kld": BASE_KLD}, {"norm.weight": "F32"})


def _additive(table: SensitivityTable):
    """The measure the table's model predicts: all-base KLD plus each group's ΔKLD at its type."""
    def kld(tensors: dict[str, str]) -> float:
        return BASE_KLD + math.fsum(next(o.dkld for o in g.options if o.type == tensors[g.tensors[0]])
                                    for g in table.groups)
    return kld


def _bytes(table: SensitivityTable, plan: QuantPlan) -> int:
    return table.fixed_bytes + sum(next(o.bytes for o in g.options if o.type == plan.groups[g.name])
                                   for g in table.groups)


def test_a_planted_interaction_is_found_by_a_swap() -> None:
    """a and b each save the most alone, but together they fix the same error (+0.004 when both are up): the
    additive plan takes both; the measured swap b down, c up is better, and refinement takes it, then stops."""
    table = _table({"a": (0, -0.010, -0.011), "b": (0, -0.009, -0.010), "c": (0, -0.008, -0.009)})
    plan = allocate(table, 10 + 3 * 100 + 200)  # two upgrades to Q4_K
    assert plan.groups == {"a": "Q4_K", "b": "Q4_K", "c": "IQ2_XXS"}
    additive = _additive(table)
    calls: list[dict[str, str]] = []

    def measure(tensors: dict[str, str]) -> float:
        calls.append(tensors)
        both = tensors["a.weight"] != "IQ2_XXS" and tensors["b.weight"] != "IQ2_XXS"
        return additive(tensors) + (0.004 if both else 0.0)

    kld = measure(plan.tensors)
    new, new_kld, rec = refine(table, plan, kld, measure, passes=5)
    measured = list(calls)
    assert new.groups == {"a": "Q4_K", "b": "IQ2_XXS", "c": "Q4_K"}
    assert new_kld == pytest.approx(BASE_KLD - 0.018) and new_kld == measure(new.tensors)
    assert new.tensors["norm.weight"] == "F32" and new.solver == "greedy refined"
    assert _bytes(table, new) == new.predicted_bytes <= plan.budget_bytes
    # recorded: the allocated plan predicted vs measured, and the move kept with its prediction
    assert rec.allocated_predicted_kld == pytest.approx(BASE_KLD - 0.019) == plan.predicted_kld
    assert rec.allocated_kld == pytest.approx(BASE_KLD - 0.015)
    assert rec.accepted == [{"pass": 1, "steps": [["b", "Q4_K", "IQ2_XXS"], ["c", "IQ2_XXS", "Q4_K"]],
                             "bytes": new.predicted_bytes, "predicted_kld": pytest.approx(BASE_KLD - 0.018),
                             "measured_kld": new_kld}]
    assert new.predicted_kld == pytest.approx(BASE_KLD - 0.018)
    assert rec.gain == pytest.approx(0.003) and rec.passes == 2  # the second pass found nothing better
    assert len(rec.tried) == len(measured) - 1
    assert all(t["measured_delta"] >= 0 for t in rec.tried if t["pass"] == 2)
    assert len({tuple(sorted(c.items())) for c in measured}) == len(measured)  # no plan measured twice
    d = rec.to_dict()
    assert d["measured"] == len(rec.tried) and d["gain"] == rec.gain and json.dumps(d)


def test_an_additive_world_leaves_the_plan_alone() -> None:
    """When the measured effects are the table's, no move measures better than the optimal plan: the plan object
    itself comes back after one pass, and every measured move's measured change equals its prediction."""
    table = _table({"a": (0, -0.010, -0.012), "b": (0, -0.006, -0.007), "c": (0, -0.002, -0.003)})
    plan = allocate(table, 10 + 3 * 100 + 250, solver="exact")
    measure = _additive(table)
    new, kld, rec = refine(table, plan, measure(plan.tensors), measure)
    assert new is plan and kld == rec.allocated_kld == rec.kld and rec.gain == 0
    assert rec.passes == 1 and rec.accepted == [] and 1 <= len(rec.tried) <= 3
    assert all(t["measured_delta"] == pytest.approx(t["predicted_delta"]) for t in rec.tried)


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_and_within_the_budget(seed: int) -> None:
    """With measured KLDs made up from the types (any interaction at all), the plan returned measures no higher
    than the allocated one, fits the budget, and each kept move lowered the measured KLD."""
    import random

    rng = random.Random(seed)
    table = _table({f"g{i}": (0, -rng.uniform(0, 0.01), -rng.uniform(0.01, 0.02)) for i in range(6)},
                   sizes=(100, 150 + rng.randrange(60), 280))
    plan = allocate(table, 10 + 600 + rng.randrange(50, 600))

    def measure(tensors: dict[str, str]) -> float:
        return random.Random(str(sorted(tensors.items()))).uniform(0.01, 0.05)

    kld = measure(plan.tensors)
    new, new_kld, rec = refine(table, plan, kld, measure, passes=6)
    assert new_kld <= kld and new_kld == measure(new.tensors)
    assert _bytes(table, new) <= plan.budget_bytes
    assert [a["measured_kld"] for a in rec.accepted] == sorted((a["measured_kld"] for a in rec.accepted),
                                                               reverse=True)
    assert all(a["bytes"] <= plan.budget_bytes for a in rec.accepted)
    assert len(rec.tried) <= 3 * rec.passes


def test_moves_keep_each_side_of_a_placed_budget() -> None:
    """With a GPU + RAM placement, a swap may not move bytes from the RAM side (routed experts) to the GPU side."""
    from moepack.stages.placement import on_gpu

    names = {"blk.0.attn_q": (0, -0.01, -0.02), "blk.0.ffn_up_exps": (0, -0.02, -0.03)}
    table = _table(names)
    assert [on_gpu(g.tensors[0]) for g in table.groups] == [True, False]
    placement = {"gpu": {"budget_bytes": 10 + 100, "bytes": 110}, "ram": {"budget_bytes": 200, "bytes": 200}}
    plan = QuantPlan("greedy", 310, 310, 10, -0.02, {"blk.0.attn_q": "IQ2_XXS", "blk.0.ffn_up_exps": "Q4_K"},
                     {"blk.0.attn_q.weight": "IQ2_XXS", "blk.0.ffn_up_exps.weight": "Q4_K", "norm.weight": "F32"},
                     base={"kld": BASE_KLD, "placement": placement})
    sides = byte_sides(table, plan)
    assert candidate_moves(table, [0, 1], sides) == []  # unplaced, the swap experts down, attention up would fit
    assert candidate_moves(table, [0, 1], [((True, True), 300)]) != []
    new, _, rec = refine(table, plan, 0.03, lambda t: pytest.fail("no move fits, none is measured"))
    assert new is plan and rec.passes == 1 and rec.tried == []


def test_unknown_types_are_not_refined() -> None:
    table = _table({"a": (0, -0.01, -0.02)})
    plan = QuantPlan("mixture Q4_K_M", 400, 110, 10, 0.0, {"a": "mixed"}, {"a.weight": "Q5_K"})
    new, kld, rec = refine(table, plan, 0.02, lambda t: pytest.fail("measured"))
    assert new is plan and kld == 0.02 and rec.skipped and rec.passes == 0


def test_the_cli_default_mirrors_the_options() -> None:
    from moepack.cli.compress import REFINE
    from moepack.pipeline.options import REFINE_PASSES, CompressOptions

    assert REFINE == REFINE_PASSES == CompressOptions().refine


def test_a_negative_refine_is_refused(tmp_path: Path, capsys) -> None:
    from moepack.cli import main

    out = tmp_path / "x.gguf"
    assert main(["compress", str(tmp_path), "--target-size", "1M", "-o", str(out), "--refine", "-1"]) != 0
    assert "--refine must be 0" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    out = tmp_path_factory.mktemp("m") / "qwen3"
    return build_tiny_model("qwen3_moe", out, tokenizer=True, hidden=256, ffn=256, n_experts=8, top_k=2, vocab=512)


def test_compress_records_refinement_on_selection_tokens(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """End to end on a tiny model: the summary holds the allocated plan's predicted and measured selection KLD and
    each kept move; the plan written is never measured above the allocated one, fits the budget, and refinement
    measured only on the selection tokens (the report tokens are measured once, for the chosen plan)."""
    from moepack.cli import main
    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.measure import KLDMeter

    seen: list[object] = []
    real = KLDMeter.plan_kld

    def spy(self, *args, ids=None, **kw):
        seen.append(ids)
        return real(self, *args, ids=ids, **kw)

    monkeypatch.setattr(KLDMeter, "plan_kld", spy)
    target = 2 * sum(open_checkpoint(model).param_counts().values()) // 4
    out, run_dir = tmp_path / "x.gguf", tmp_path / "run"
    assert main(["compress", str(model), "--target-size", f"{target}B", "-o", str(out), "--run-dir", str(run_dir),
                 "--calib-text", str(DATA / "tinystories-valid.txt"), "--calib-tokens", "1024", "--seq-len", "128",
                 "--sens-tokens", "256", "--keep", "1.0", "--ladder", "IQ2_XXS,IQ3_XXS,Q4_K,Q6_K",
                 "--refine", "2"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    f = summary["refinement"]
    assert f == summary["candidates"][0]["refinement"] and f["skipped"] is None
    assert isinstance(f["allocated_predicted_kld"], float) and f["allocated_kld"] > 0
    assert f["kld"] <= f["allocated_kld"] and summary["selection_kld"] <= f["kld"]
    assert 1 <= f["passes"] <= 2 and f["measured"] == len(f["tried"]) <= 6
    plan = json.loads((run_dir / "quant_plan-r1.json").read_text())
    assert plan["predicted_bytes"] <= plan["budget_bytes"]
    if f["accepted"]:
        assert f["accepted"][-1]["measured_kld"] == f["kld"] and f["gain"] > 0
    # every measure before the report is on the selection tokens: the allocated plan, the moves, the mixtures
    report = [i for i in seen if i is not None]
    assert len(report) == 1 and seen[-1] is report[0]
    refs = summary["candidates"][0]["references"]  # each reference type: its allocated plan and its moves
    assert f["measured"] in [r["refine_measured"] for r in refs]
    assert len(seen) - 1 == sum(1 + r["refine_measured"] for r in refs) + len(summary["mixtures"]["mixtures"]) + \
        (summary["mixtures"]["seeded_kld"] is not None)
    assert "refinement (selection KLD): allocated plan predicted" in capsys.readouterr().out

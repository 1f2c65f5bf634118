"""Allocation under a byte budget: property tests over random sensitivity tables, schema checks, CLI."""
from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepack.cli import main
from moepack.schema import SchemaError, SensitivityTable
from moepack.stages.allocate import (MAX_WORK, AllocationError, allocate, file_budget, objective, smallest,
                                     solve_exact, solve_greedy)

EPS = 1e-9


@st.composite
def tables(draw, max_groups: int = 6, max_options: int = 5) -> SensitivityTable:
    """Small random tables: base first with dkld 0; other options smaller (downgrades, mostly worse) or larger
    (upgrades, mostly better), and quality need not follow bytes."""
    groups = []
    for g in range(draw(st.integers(1, max_groups))):
        base = draw(st.integers(0, 200))
        opts = [{"type": "T0", "bytes": base, "dkld": 0.0}]
        for o in range(1, draw(st.integers(1, max_options))):
            extra = draw(st.integers(-base, 300))
            hi = 0.1 if extra >= 0 else 1.0
            opts.append({"type": f"T{o}", "bytes": base + extra,
                         "dkld": draw(st.floats(-1.0 if extra >= 0 else -0.1, hi, allow_nan=False,
                                                allow_infinity=False))})
        groups.append({"name": f"g{g}", "tensors": [f"blk.{g}.w", f"blk.{g}.v"], "options": opts})
    return SensitivityTable.from_dict({"fixed_bytes": draw(st.integers(0, 100)), "groups": groups})


@st.composite
def tables_and_budgets(draw) -> tuple[SensitivityTable, int]:
    t = draw(tables())
    return t, t.min_bytes + draw(st.integers(0, t.max_bytes - t.min_bytes + 50))


def _true_bytes(t: SensitivityTable, choice: list[int]) -> int:
    return t.fixed_bytes + sum(g.options[c].bytes for g, c in zip(t.groups, choice))


def _brute_force(t: SensitivityTable, budget: int) -> float:
    best = math.inf
    for choice in itertools.product(*(range(len(g.options)) for g in t.groups)):
        if _true_bytes(t, list(choice)) <= budget:
            best = min(best, objective(t, list(choice)))
    return best


def _best_single_gain(t: SensitivityTable) -> float:
    """The largest gain of one move from the greedy's start (each group's smallest option)."""
    start = smallest(t)
    return max([0.0] + [g.options[s].dkld - o.dkld for g, s in zip(t.groups, start) for o in g.options])


@settings(max_examples=150, deadline=None)
@given(tables_and_budgets(), st.sampled_from(["greedy", "exact"]))
def test_plan_never_exceeds_budget(tb: tuple[SensitivityTable, int], solver: str) -> None:
    t, budget = tb
    plan = allocate(t, budget, solver)
    assert plan.predicted_bytes <= budget
    # The plan's bytes, recomputed from the types it names, are the predicted bytes.
    by_type = {g.name: {o.type: o for o in g.options} for g in t.groups}
    assert plan.predicted_bytes == t.fixed_bytes + sum(by_type[g][ty].bytes for g, ty in plan.groups.items())
    assert set(plan.tensors) == {n for g in t.groups for n in g.tensors}
    if solver == "exact" and _true_bytes(t, [0] * len(t.groups)) <= budget:
        assert plan.predicted_dkld <= EPS  # never worse than all-base where it fits


@settings(max_examples=150, deadline=None)
@given(tables_and_budgets())
def test_exact_is_optimal_and_greedy_is_close(tb: tuple[SensitivityTable, int]) -> None:
    t, budget = tb
    exact, q = solve_exact(t, budget)
    greedy = solve_greedy(t, budget)
    assert q >= 1 and _true_bytes(t, exact) <= budget and _true_bytes(t, greedy) <= budget
    assert q == 1 or q == _gcd_of_extras(t)  # small tables: no rounding, the DP is exact
    assert objective(t, exact) <= objective(t, greedy) + EPS
    assert objective(t, exact) == pytest.approx(_brute_force(t, budget), abs=EPS)
    # LP bound of the multiple-choice knapsack: greedy loses at most one upgrade's gain.
    assert objective(t, greedy) - objective(t, exact) <= _best_single_gain(t) + EPS


def _gcd_of_extras(t: SensitivityTable) -> int:
    return math.gcd(*(o.bytes - min(x.bytes for x in g.options) for g in t.groups for o in g.options)) or 1


@settings(max_examples=80, deadline=None)
@given(tables(), st.data())
def test_exact_is_monotone_in_budget(t: SensitivityTable, data) -> None:
    b1 = t.min_bytes + data.draw(st.integers(0, t.max_bytes - t.min_bytes))
    b2 = b1 + data.draw(st.integers(0, 200))
    o1 = allocate(t, b1, "exact").predicted_dkld
    o2 = allocate(t, b2, "exact").predicted_dkld
    assert o2 <= o1 + EPS


@settings(max_examples=60, deadline=None)
@given(tables_and_budgets())
def test_rounded_exact_stays_within_budget_and_beats_greedy(tb: tuple[SensitivityTable, int]) -> None:
    """A tiny work limit forces buckets of many bytes: costs round up, the budget still holds."""
    t, budget = tb
    exact = allocate(t, budget, "exact", max_work=40)
    greedy = allocate(t, budget, "greedy")
    assert exact.predicted_bytes <= budget
    assert exact.predicted_dkld <= greedy.predicted_dkld + EPS


def test_greedy_gap_on_random_instances() -> None:
    """Report how far the paper's greedy falls from the optimum on 300 small random instances."""
    rng = random.Random(5)
    gaps, rel = [], []
    for _ in range(300):
        groups = []
        for g in range(rng.randint(2, 8)):
            base = rng.randint(50, 500)
            opts = [{"type": "T0", "bytes": base, "dkld": 0.0}]
            b, d = base, 0.0
            for o in range(1, rng.randint(2, 6)):
                b, d = b + rng.randint(10, 400), d - rng.uniform(0.0, 0.3)
                opts.append({"type": f"T{o}", "bytes": b, "dkld": d})
            groups.append({"name": f"g{g}", "tensors": [f"t{g}"], "options": opts})
        t = SensitivityTable.from_dict({"groups": groups})
        budget = t.min_bytes + rng.randint(0, t.max_bytes - t.min_bytes)
        ex, gr = objective(t, solve_exact(t, budget)[0]), objective(t, solve_greedy(t, budget))
        gaps.append(gr - ex)
        rel.append((gr - ex) / -ex if ex < 0 else 0.0)
        assert gr - ex <= _best_single_gain(t) + EPS
    mean_rel, worst = sum(rel) / len(rel), max(rel)
    optimal = sum(g <= EPS for g in gaps) / len(gaps)
    print(f"greedy vs exact on 300 instances: optimal in {optimal:.0%}, mean gap {mean_rel:.2%} of the optimal "
          f"gain, worst {worst:.1%}")
    assert mean_rel < 0.05


def test_hundred_groups_eight_options() -> None:
    """Realistic scale: 100 groups × 8 types with bytes of real tensor sizes; exact stays within the work limit."""
    rng = random.Random(0)
    bpw = [2.06, 2.5, 3.06, 3.44, 4.5, 5.5, 6.56, 8.5]
    groups = []
    for g in range(100):
        n = rng.choice([2**16, 2**20, 3 * 2**20])
        s = rng.uniform(0.001, 0.05)
        groups.append({"name": f"g{g}", "tensors": [f"blk.{g}.w"], "options": [
            {"type": f"T{i}", "bytes": int(n * b / 8), "dkld": 0.0 if i == 0 else -s * (1 - 2 ** (-(b - 2.06)))}
            for i, b in enumerate(bpw)]})
    t = SensitivityTable.from_dict({"fixed_bytes": 4096, "groups": groups})
    budget = t.min_bytes + (t.max_bytes - t.min_bytes) // 3
    _, q = solve_exact(t, budget)
    assert 800 * ((budget - t.min_bytes) // q + 1) <= MAX_WORK
    ex, gr = allocate(t, budget, "exact"), allocate(t, budget, "greedy")
    assert ex.predicted_bytes <= budget and gr.predicted_bytes <= budget
    assert ex.predicted_dkld <= gr.predicted_dkld + EPS
    assert budget - gr.predicted_bytes < 0.01 * budget  # the greedy leaves little unspent


# ------------------------------------------------------------------------------------------------ errors, schema

def _table(**over) -> dict:
    d = {"base": {"kld": 0.5}, "fixed_bytes": 100, "overhead_bytes": 50, "fixed": {"output_norm.weight": "F32"},
         "groups": [
             {"name": "blk.0.ffn_down_exps", "tensors": ["blk.0.ffn_down_exps.weight"],
              "options": [{"type": "IQ2_XXS", "bytes": 1000, "dkld": 0.0},
                          {"type": "Q4_K", "bytes": 2000, "dkld": -0.1},
                          {"type": "Q8_0", "bytes": 4000, "dkld": -0.12}]},
             {"name": "blk.0.attn_q", "tensors": ["blk.0.attn_q.weight"],
              "options": [{"type": "IQ2_XXS", "bytes": 500, "dkld": 0.0},
                          {"type": "Q4_K", "bytes": 1000, "dkld": -0.2}]},
         ]}
    d.update(over)
    return d


@pytest.mark.parametrize("solver", ["greedy", "exact"])
def test_infeasible_budget_states_the_minimum(solver: str) -> None:
    t = SensitivityTable.from_dict(_table())
    assert t.min_bytes == 1600
    with pytest.raises(AllocationError, match=r"minimum achievable size .*1,600 bytes"):
        allocate(t, 1599, solver)
    assert allocate(t, 1600, solver).groups == {"blk.0.ffn_down_exps": "IQ2_XXS", "blk.0.attn_q": "IQ2_XXS"}


def _moves_table() -> SensitivityTable:
    """Two groups measured from a mid-ladder base: `experts` barely cares, `attn` much; Q2_K is larger than IQ2_S
    and worse (quality not monotone in bytes)."""
    return SensitivityTable.from_dict({"fixed_bytes": 10, "groups": [
        {"name": "experts", "tensors": ["e"], "options": [
            {"type": "IQ3_XXS", "bytes": 980, "dkld": 0.0}, {"type": "IQ1_S", "bytes": 500, "dkld": 0.05},
            {"type": "IQ2_S", "bytes": 820, "dkld": 0.004}, {"type": "Q2_K", "bytes": 840, "dkld": 0.008},
            {"type": "Q4_K", "bytes": 1440, "dkld": -0.001}]},
        {"name": "attn", "tensors": ["a"], "options": [
            {"type": "IQ3_XXS", "bytes": 98, "dkld": 0.0}, {"type": "IQ1_S", "bytes": 50, "dkld": 0.4},
            {"type": "IQ2_S", "bytes": 82, "dkld": 0.05}, {"type": "Q2_K", "bytes": 84, "dkld": 0.2},
            {"type": "Q6_K", "bytes": 210, "dkld": -0.03}]}]})


@pytest.mark.parametrize("solver", ["greedy", "exact"])
def test_moves_both_ways_from_the_base(solver: str) -> None:
    """Options below the base are downgrades: the minimum is every group at its smallest option, a budget below
    the all-base size downgrades the group that cares least, and at the all-base size bytes move from the
    insensitive group to the sensitive one."""
    t = _moves_table()
    assert t.min_bytes == 10 + 500 + 50 and smallest(t) == [1, 1]
    assert allocate(t, t.min_bytes, solver).groups == {"experts": "IQ1_S", "attn": "IQ1_S"}
    mid = allocate(t, 10 + 820 + 98, solver)
    if solver == "exact":  # the greedy spends on attn's best ratio first (Q6_K) and then cannot afford experts' IQ2_S
        assert mid.groups == {"experts": "IQ2_S", "attn": "IQ3_XXS"}
    assert mid.predicted_dkld <= 0.05 - 0.03 + EPS
    plan = allocate(t, 10 + 980 + 98, solver)  # all-base fits, and a trade beats it
    assert plan.groups == {"experts": "IQ2_S", "attn": "Q6_K"}
    assert plan.predicted_dkld == pytest.approx(0.004 - 0.03)


@pytest.mark.parametrize("solver", ["greedy", "exact"])
def test_an_option_worse_than_a_smaller_one_is_skipped(solver: str) -> None:
    """Q2_K is larger than IQ2_S and worse: with bytes for either, the plan takes IQ2_S; with more, the solvers
    step past Q2_K straight to the next better option (no "next step up" through it)."""
    t = _moves_table()
    assert allocate(t, 10 + 500 + 84, solver).groups["attn"] == "IQ2_S"
    assert allocate(t, 10 + 500 + 98, solver).groups["attn"] == "IQ3_XXS"


def test_plan_contents() -> None:
    t = SensitivityTable.from_dict(_table())
    plan = allocate(t, 2600, "exact")
    assert plan.groups == {"blk.0.ffn_down_exps": "IQ2_XXS", "blk.0.attn_q": "Q4_K"}
    assert plan.tensors == {"output_norm.weight": "F32", "blk.0.ffn_down_exps.weight": "IQ2_XXS",
                            "blk.0.attn_q.weight": "Q4_K"}
    assert plan.predicted_bytes == 2100 and plan.predicted_dkld == pytest.approx(-0.2)
    assert plan.predicted_kld == pytest.approx(0.3)
    assert SensitivityTable.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("change, message", [
    ({"groups": [{"name": "a", "tensors": ["x"], "options": []}]}, "non-empty list"),
    ({"groups": [{"name": "a", "tensors": ["x"], "options": [{"type": "A", "bytes": 5, "dkld": 0.1}]}]}, "dkld 0"),
    ({"groups": [{"name": "a", "tensors": ["x"], "options": [{"type": "A", "bytes": -5, "dkld": 0}]}]}, "non-negative"),
    ({"groups": [{"name": "a", "tensors": ["x"], "options": [{"type": "A", "bytes": 5, "dkld": 0},
                                                             {"type": "A", "bytes": 6, "dkld": -1}]}]}, "twice"),
    ({"groups": [{"name": "a", "tensors": ["x"], "options": [{"type": "A", "bytes": 5, "dkld": 0}]},
                 {"name": "b", "tensors": ["x"], "options": [{"type": "A", "bytes": 5, "dkld": 0}]}]},
     "groups a and b"),
    ({"groups": [{"name": "a", "tensors": [], "options": [{"type": "A", "bytes": 5, "dkld": 0}]}]}, "tensors"),
    ({"version": 2}, "version"),
    ({"groups": "x"}, "groups"),
])
def test_schema_errors(change: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        SensitivityTable.from_dict(_table(**change))


def test_target_size_needs_the_tables_overhead() -> None:
    """A file-size target is the tensor budget plus the GGUF's other bytes; a table without them is refused rather
    than read as 0 bytes (which would let the file exceed the target)."""
    t = SensitivityTable.from_dict(_table())
    assert file_budget(t, 2650) == 2600
    with pytest.raises(AllocationError, match="no overhead_bytes"):
        file_budget(SensitivityTable.from_dict(_table(overhead_bytes=None)), 2650)


def test_unknown_solver() -> None:
    with pytest.raises(AllocationError, match="greedy, exact"):
        allocate(SensitivityTable.from_dict(_table()), 5000, "magic")


# --------------------------------------------------------------------------------------------------------- CLI

def test_cli_writes_plan(tmp_path: Path, capsys) -> None:
    sens = tmp_path / "sensitivity.json"
    sens.write_text(json.dumps(_table()))
    out = tmp_path / "run" / "quant_plan.json"
    assert main(["allocate", "--sensitivity", str(sens), "--target-size", "2650B", "--solver", "exact",
                 "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["budget_bytes"] == 2600  # the target less the table's overhead_bytes
    assert plan["predicted_bytes"] <= plan["budget_bytes"] and plan["solver"] == "exact"
    assert {"tensors", "groups", "predicted_dkld", "predicted_bytes", "budget_bytes"} <= set(plan)
    assert sorted(p.name for p in out.parent.iterdir()) == ["quant_plan.json"]  # no temporary left behind
    assert "Q4_K" in capsys.readouterr().out


def test_cli_infeasible(tmp_path: Path, capsys) -> None:
    sens = tmp_path / "sensitivity.json"
    sens.write_text(json.dumps(_table()))
    assert main(["allocate", "--sensitivity", str(sens), "--target-size", "1.6kB", "-o",
                 str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "minimum achievable file size" in err and "1,650 bytes" in err
    assert not (tmp_path / "p.json").exists()


def test_allocate_is_pure_python() -> None:
    code = "import sys, moepack.stages.allocate; bad = {'torch', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)

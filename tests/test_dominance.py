"""compress is never worse than llama.cpp's own mixtures: its selection KLD is at most the best fitting mixture's,
and when a mixture measures lower (here: a one-type ladder the allocator cannot spend the budget with) the
mixture's plan is what gets written."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import pytest

from conftest import FAST_SEARCH, small_compress_options
from moepack.cli import main

SMALL = small_compress_options("--keep", "1.0")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    out = tmp_path_factory.mktemp("m") / "qwen3"
    return build_tiny_model("qwen3_moe", out, tokenizer=True, hidden=256, ffn=256, n_experts=8, top_k=2, vocab=512)


def _target(model: Path, divisor: int) -> int:
    from moepack.model.checkpoint import open_checkpoint

    return 2 * sum(open_checkpoint(model).param_counts().values()) // divisor


def _run(model: Path, tmp_path: Path, target: int, *extra: str) -> tuple[dict, Path]:
    out, run_dir = tmp_path / "x.gguf", tmp_path / "run"
    assert main(["compress", str(model), "--target-size", f"{target}B", "-o", str(out), "--run-dir", str(run_dir),
                 *SMALL, *extra]) == 0
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def _mixture_file(view, run_dir: Path, name: str, short: bool) -> int:
    """The bytes of the GGUF compress would write of mixture `name` (its records short or not)."""
    from moepack.gguf.writer import SHORT_RECORD
    from moepack.pipeline.dominance import mixture_file_bytes, mixture_plan
    from moepack.schema import QuantPlan, SensitivityTable
    from moepack.stages.mixtures import mixture_sizes

    table = SensitivityTable.read(run_dir / "sensitivity-r1.json")
    plan = mixture_plan(view, table, name, mixture_sizes(view, ftypes=(name,))[name],
                        QuantPlan.read(run_dir / "quant_plan-r1.json"))
    if short:
        plan = dataclasses.replace(plan, base=plan.base | {SHORT_RECORD: True})
    return mixture_file_bytes(view, plan)


@pytest.mark.slow
def test_plan_is_never_worse_than_the_fitting_mixtures(model: Path, tmp_path: Path, capsys) -> None:
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.mixtures import mixture_sizes

    summary, run_dir = _run(model, tmp_path, _target(model, 4))
    m, limit = summary["mixtures"], summary["budget"]["weights"] + summary["budget"]["overhead"]
    view = open_checkpoint(model)
    assert 1 <= len(m["mixtures"]) <= 3
    listed = [x["tensor_bytes"] for x in m["mixtures"]]
    assert listed == sorted(listed, reverse=True)
    assert all(_mixture_file(view, run_dir, x["name"], "record" in x) <= limit for x in m["mixtures"])
    sizes = mixture_sizes(view)
    assert [sizes[x["name"]].total for x in m["mixtures"]] == listed  # the bytes the mixtures table predicts
    # the largest fitting ones: every mixture left out is either over the budget, even with its records short, or
    # smaller than those measured
    for name, s in sizes.items():
        if name not in {x["name"] for x in m["mixtures"]}:
            assert s.total <= min(listed) or _mixture_file(view, run_dir, name, True) > limit, name
    assert summary["selection_kld"] <= min(x["kld"] for x in m["mixtures"])
    assert summary["selection_kld"] <= m["allocated_kld"]
    assert "llama.cpp mixtures" in capsys.readouterr().out


@pytest.mark.slow
def test_a_better_mixture_is_taken(model: Path, tmp_path: Path, capsys) -> None:
    """With IQ2_XXS as the only type, the allocated plan leaves most of a ~4 bpw budget unspent; the largest
    fitting mixture measures lower, and its types are the ones written."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.mixtures import mixture_types

    summary, _ = _run(model, tmp_path, _target(model, 4), "--ladder", "IQ2_XXS", "--base", "IQ2_XXS")
    m = summary["mixtures"]
    best = min(m["mixtures"], key=lambda x: x["kld"])
    assert best["kld"] < m["allocated_kld"]
    assert m["chosen"] == f"mixture {best['name']}" and m["best_mixture"] == best["name"]
    assert summary["selection_kld"] == best["kld"]
    want = {k: v.name for k, v in mixture_types(open_checkpoint(model), best["name"]).items()}
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    assert written == want
    assert f"plan: mixture {best['name']}" in capsys.readouterr().out


def _table(view):
    """A sensitivity table over `view`'s quantizable tensors, one group each, ladder IQ2_XXS < Q4_K < Q6_K with
    made-up ΔKLD falling with bits."""
    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.types import written_bytes
    from moepack.schema import SensitivityTable
    from moepack.schema.tables import Group, Option

    groups, fixed, fixed_bytes = [], {}, 0
    for t in gguf_outputs(view):
        if not t.quantizable:
            fixed[t.name], fixed_bytes = "F32", fixed_bytes + written_bytes(t.shape, "F32")
            continue
        opts = tuple(Option(ty, written_bytes(t.shape, ty), -d) for ty, d in (("IQ2_XXS", 0), ("Q4_K", 2), ("Q6_K", 3)))
        groups.append(Group(t.name, (t.name,), opts))
    return SensitivityTable(tuple(groups), fixed_bytes, {}, fixed)


def test_greedy_seeded_from_a_mixture_only_upgrades_it(model: Path) -> None:
    """Seeded from Q4_K_M, each group starts at the mixture's type (or the largest option below its bytes, for
    types off the ladder) and the greedy only spends the bytes left: never below that start, within the budget."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.dominance import mixture_plan, seeded_plan, snap_to_options
    from moepack.stages.allocate import allocate
    from moepack.stages.mixtures import mixture_sizes

    view = open_checkpoint(model)
    table = _table(view)
    size = mixture_sizes(view, ftypes=("Q4_K_M",))["Q4_K_M"]
    budget = size.total + 50_000
    mix = mixture_plan(view, table, "Q4_K_M", size, allocate(table, budget))
    assert mix.predicted_bytes == size.total and mix.budget_bytes == budget
    start = snap_to_options(table, mix.tensors, {t.name: t.shape for t in gguf_outputs(view)})
    seeded = seeded_plan(view, table, mix, budget)
    assert seeded is not None and seeded.predicted_bytes <= budget
    for g, c in zip(table.groups, start):
        if mix.tensors[g.name] in ("IQ2_XXS", "Q4_K", "Q6_K"):
            assert g.options[c].type == mix.tensors[g.name]
        chosen = next(o for o in g.options if o.type == seeded.groups[g.name])
        assert chosen.bytes >= g.options[c].bytes  # upgrades only
    assert any(g.options[c].type != seeded.groups[g.name] for g, c in zip(table.groups, start))  # spent the slack


# ---------------------------------------------------------------------------------------------- the size of a mixture

def _llama_file(model: Path, ftype: str, out: Path) -> int:
    """Bytes of llama.cpp's `ftype` file of `model`, made as bench/claim.py makes a size point (moepack quantize
    --ftype: llama_model_quantize); without an importance matrix, so without the keys llama.cpp adds for one: the
    tightest budget."""
    from moepack.gguf.quantize import quantize_model

    quantize_model(model, out, ftype=ftype, threads=1, progress=False)
    return out.stat().st_size


@pytest.mark.slow
def test_the_mixture_of_the_target_size_is_measured_and_the_reserve_is_what_is_written(model: Path,
                                                                                        tmp_path: Path) -> None:
    """At a --target-size of llama.cpp's own Q3_K_S file, Q3_K_S is among the mixtures measured (with moepack's
    full records its file would be over: they are written short) and the file is within the budget; the bytes
    compress reserves for its metadata are at least, and within a few hundred bytes of, what the writer writes for
    the allocated plan."""
    from moepack.gguf.imatrix import load_imatrix
    from moepack.gguf.writer import SHORT_RECORD, write_gguf
    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.budget_check import reserve
    from moepack.pipeline.recipe import budget_record
    from moepack.schema import QuantPlan, SensitivityTable
    from moepack.stages.allocate import allocate
    from moepack.stages.budget import Budget
    from moepack.stages.mixtures import mixture_sizes

    target = _llama_file(model, "Q3_K_S", tmp_path / "llama.gguf")
    summary, run_dir = _run(model, tmp_path, target, *FAST_SEARCH)  # the mixtures measured do not depend on it
    view = open_checkpoint(model)
    measured = {x["name"]: x for x in summary["mixtures"]["mixtures"]}
    assert "Q3_K_S" in measured
    assert _mixture_file(view, run_dir, "Q3_K_S", False) > target  # moepack's full records would push it out
    assert measured["Q3_K_S"].get("record") == "short"
    # the mixture the speed floor compares with: Q3_K_S, or a larger one that fits as well
    sizes = mixture_sizes(view)
    assert sizes[summary["speed"]["mixture"]["name"]].total >= sizes["Q3_K_S"].total
    size = (tmp_path / "x.gguf").stat().st_size
    assert size <= target
    plan = QuantPlan.read(run_dir / "quant_plan-r1.json")
    if plan.base.get("mixture"):  # a mixture chosen: the file is exactly the size predicted when it was judged
        assert size == _mixture_file(view, run_dir, plan.base["mixture"], bool(plan.base.get(SHORT_RECORD)))

    budget = Budget(**summary["budget"])
    table = SensitivityTable.read(run_dir / "sensitivity-r1.json")
    held = reserve(table, budget)
    allocated = allocate(table, budget.file_limit - held)
    out = tmp_path / "allocated.gguf"
    write_gguf(view, out, allocated, imatrix=load_imatrix(run_dir, view), progress=False, default_type=None,
               recipe={"budget": budget_record(budget), "solver": f"{allocated.solver} refined"})
    written = out.stat().st_size - sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
    assert written <= held <= written + 768, (held, written)


def test_a_seeded_start_a_few_bytes_over_steps_down_where_it_loses_least(model: Path) -> None:
    """The snapped mixture can be a little over the budget (tiny-qwen3-moe at Q3_K_M's size: 3,111 bytes); the
    greedy then starts from it stepped down by the cheapest measured loss per byte, not from nothing."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.dominance import mixture_plan, seeded_plan, snap_to_options
    from moepack.stages.allocate import allocate, fit_start
    from moepack.stages.mixtures import mixture_sizes

    view = open_checkpoint(model)
    table = _table(view)
    size = mixture_sizes(view, ftypes=("Q4_K_M",))["Q4_K_M"]
    start = snap_to_options(table, mixture_plan(view, table, "Q4_K_M", size, allocate(table, size.total + 50_000))
                            .tensors, {t.name: t.shape for t in gguf_outputs(view)})
    used = table.fixed_bytes + sum(g.options[c].bytes for g, c in zip(table.groups, start))
    budget = used - 1  # one byte short
    fitted = fit_start(table, start, budget)
    assert table.fixed_bytes + sum(g.options[c].bytes for g, c in zip(table.groups, fitted)) <= budget
    moved = [i for i, (a, b) in enumerate(zip(start, fitted)) if a != b]
    assert len(moved) == 1  # one step down was enough
    assert fit_start(table, start, used) == start  # a start that fits is left alone
    mix = mixture_plan(view, table, "Q4_K_M", size, allocate(table, budget))
    assert seeded_plan(view, table, mix, budget) is not None  # before: "greedy start ... over the budget"

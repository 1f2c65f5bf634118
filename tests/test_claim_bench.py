"""bench/: the claim's pure parts (the per-size verdict, the Unsloth-style hand rule, paths kept out of the results,
in bench/common.py), and the rules that keep bench/ readable: no script imports another script or the tests, no
module is over 450 lines, what the scripts read from compress's result is a field of RunSummary, and `make bench`
reruns every benchmark docs/ cites (outside `make test`)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from conftest import ROOT, bench_common

common = bench_common()
BENCH = ROOT / "bench"
LIBRARIES = {"common", "claim_page"}  # bench/common.py, and the claim's page (bench/claim_page.py): the bench
# modules that scripts (and tests) import
MAX_LINES = 450
IMPORTERS = {"import_module", "run_path", "run_module", "spec_from_file_location", "__import__"}


def _ev(kld: float, half: float, size: int) -> dict:
    return {"kld_mean": kld, "kld_ci95_low": kld - half, "kld_ci95_high": kld + half, "size_bytes": size}


def test_verdict_needs_all_three():
    uni = _ev(0.10, 0.005, 1000)
    assert common.verdict(_ev(0.07, 0.005, 1000), uni)["holds"]  # 30 % lower, same size, CIs apart
    assert common.verdict(_ev(0.075, 0.005, 1000), uni)["kld_reduction"] == pytest.approx(0.25)
    short = common.verdict(_ev(0.08, 0.005, 1000), uni)  # 20 % lower: below the goal
    assert not short["holds"] and short["cis_apart"] and short["no_larger"]
    larger = common.verdict(_ev(0.05, 0.005, 1001), uni)
    assert not larger["holds"] and not larger["no_larger"]
    wide = common.verdict(_ev(0.07, 0.03, 1000), uni)  # 30 % lower but the CIs overlap
    assert not wide["holds"] and not wide["cis_apart"]
    assert common.verdict(None, uni) is None and common.verdict(_ev(0.07, 0.0, 1), None) is None
    assert common.verdict_cell(wide) == "falls short: CIs overlap"
    assert common.verdict_cell(short) == "falls short: reduction below 25 %"
    worse = common.verdict(_ev(0.2, 0.005, 1000), uni)  # twice the KLD: its CI is apart, on the wrong side
    assert common.verdict_cell(worse) == "falls short: KLD higher"


def test_unsloth_rule_steps_above_the_routed_experts():
    from moepack.gguf.names import gguf_outputs
    from moepack.model.arch import Role
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(ROOT / "models" / "tiny-deepseek-v3")
    plan = common.unsloth_plan(view, "IQ2_XXS")
    lad = common.ladder()
    step = {n: lad.index(t) - lad.index("IQ2_XXS") for n, t in plan.items()}
    roles = {o.name: o.role for o in gguf_outputs(view) if o.quantizable}
    assert set(plan) == set(roles)
    for name, role in roles.items():
        if role is Role.ROUTED_EXPERTS:
            assert step[name] == ("ffn_down" in name), name
        elif role in (Role.ATTENTION, Role.SHARED_EXPERTS, Role.DENSE_FFN, Role.OUTPUT):
            assert step[name] == common.HAND_STEPS, name
    assert {Role.ATTENTION, Role.SHARED_EXPERTS, Role.ROUTED_EXPERTS} <= set(roles.values())
    # a larger base never gives a smaller file: the claim's "largest base that fits" is the largest file that fits
    sizes = [common.plan_bytes(view, common.unsloth_plan(view, t)) for t in lad]
    assert sizes == sorted(sizes)


def test_results_hold_no_absolute_paths(tmp_path):
    work = tmp_path / "work"
    obj = {"file": work / "fx" / "a.gguf", "error": f"{ROOT}/models/x: bad; {work}/fx/b.gguf too",
           "nested": [ROOT / "docs" / "results.md"]}
    out = common.portable(obj, work)
    assert out == {"file": "fx/a.gguf", "error": "models/x: bad; fx/b.gguf too", "nested": ["docs/results.md"]}
    assert common.rel(ROOT / "docs" / "results.md") == "docs/results.md"


def test_reproduce_names_every_cell_held():
    """Runs that add fixtures or size points one at a time resume into one JSON: its command makes all of them."""
    cells = {"models/tiny-qwen3-moe": ["Q3_K_M", "IQ2_XXS"], "models/tiny-deepseek-v3": ["IQ2_XXS"]}
    results = {"fixtures": {Path(m).name: {"model": m, "cells": dict.fromkeys(fs, {})} for m, fs in cells.items()}}
    cmd = common.reproduce(results, ["--models", "models/tiny-qwen3-moe", "--ftypes", "Q3_K_M", "--ctx", "256"])
    assert cmd == "python bench/claim.py --ctx 256 --ftypes IQ2_XXS Q3_K_M"  # both fixtures: the default models
    del results["fixtures"]["tiny-deepseek-v3"]
    assert common.reproduce(results, ["--ftypes=Q3_K_M"]) == \
        "python bench/claim.py --models models/tiny-qwen3-moe --ftypes IQ2_XXS Q3_K_M"


def test_commits_line_names_each_cells_commit():
    rec = {"cells": {"IQ2_XXS": {"commit": "abc1234"}, "Q2_K": {"commit": "abc1234"}, "Q4_K_M": {}}}
    assert common.commits_line(rec) == "Measured at commit abc1234: IQ2_XXS, Q2_K; not recorded: Q4_K_M."
    assert common.code_commit() is None or len(common.code_commit().split("+")[0]) >= 7


def test_a_calibration_text_gets_its_own_results_and_a_relative_name_in_the_settings(tmp_path):
    """Cells calibrated on other text never resume into (or overwrite) the default (stories) results, and the
    settings name the text without an absolute path."""
    stories = argparse.Namespace(calib_text=common.CALIB_TEXT, work=None, out=None, md=None, png=None)
    common.default_paths(stories)
    assert (stories.out, stories.md) == (ROOT / "bench/results/claim.json", ROOT / "docs/results.md")
    bundled = argparse.Namespace(calib_text=Path("bundled"), work=None, out=None, md=tmp_path / "page.md", png=None)
    common.default_paths(bundled)
    assert bundled.calib_text is None  # compress's own default text
    assert bundled.out == ROOT / "bench/results/claim-bundled.json" and bundled.md == tmp_path / "page.md"
    assert bundled.work == ROOT / "out/bench-claim-bundled"
    assert bundled.png == ROOT / "docs/results-bundled-pareto.png"
    other = argparse.Namespace(calib_text=ROOT / "data/calib/code.txt", work=None, out=None, md=None, png=None)
    common.default_paths(other)
    assert other.out == ROOT / "bench/results/claim-code.json"
    for ns in (stories, bundled):
        for k in ("calib_tokens", "seq_len", "selection_tokens", "ctx", "eval_tokens"):
            setattr(ns, k, 1)
    assert common.settings(stories)["calib_text"] == "`data/calib/stories.txt`"
    assert common.settings(bundled)["calib_text"].startswith("bundled")


def test_a_page_section_replaces_its_old_copies(tmp_path):
    md, begin, end = tmp_path / "page.md", "<!-- b -->", "<!-- e -->"
    md.write_text(f"# Page\n\n{begin}\nold\n{end}\n\nafter\n\n{begin}\nolder copy\n{end}\n")
    common.write_section(md, f"{begin}\nnew\n{end}\n", begin, end)
    assert md.read_text().rstrip("\n") == f"# Page\n\n{begin}\nnew\n{end}\n\nafter"
    common.write_section(tmp_path / "fresh.md", f"{begin}\nx\n{end}\n", begin, end)
    assert (tmp_path / "fresh.md").read_text() == f"\n\n{begin}\nx\n{end}\n"


@pytest.fixture
def claim_page(monkeypatch):
    """bench/claim_page.py, imported as the scripts import it (bench/ first on sys.path)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("claim_page")


def test_a_domain_point_holds_falls_short_or_is_worse(claim_page):
    uni = _ev(0.10, 0.005, 1000)
    kind = claim_page.kind
    assert kind(common.verdict(_ev(0.07, 0.005, 1000), uni)) == "holds"
    assert kind(common.verdict(_ev(0.08, 0.005, 1000), uni)) == "short"  # 20 % lower
    assert kind(common.verdict(_ev(0.104, 0.005, 1000), uni)) == "short"  # higher, but the CIs overlap
    assert kind(common.verdict(_ev(0.12, 0.005, 1000), uni)) == "worse"  # its CI above the uniform file's
    assert kind(common.verdict(_ev(0.05, 0.005, 1001), uni)) == "worse"  # a larger file
    assert kind(None) is None


def test_the_page_counts_the_measured_points_and_lists_the_rest(claim_page, tmp_path):
    """Two domains, three size points: IQ1_S measured on both, IQ2_XXS on one, Q2_K not yet; an old-layout row (one
    "eval", on stories) reads as the stories domain."""
    uni, good, worse = _ev(0.10, 0.005, 1000), _ev(0.05, 0.005, 990), _ev(0.2, 0.005, 990)
    how = {"keep": 0.75, "n_experts": [3, 4], "top_k": 2, "criterion": "score", "started_from": "allocated"}
    cells = {"IQ1_S": {"ftype": "IQ1_S", "target_bytes": 1000, "uniform": {"file": "u", "evals": {"stories": uni, "code": uni}},
                       "moepack": {"file": "m", "evals": {"stories": good, "code": worse}, **how}},
             "IQ2_XXS": {"ftype": "IQ2_XXS", "target_bytes": 2000, "uniform": {"file": "u2", "eval": uni},
                         "moepack": {"file": "m2", "eval": good, **how}}}
    settings = {"goal": 0.25, "keep": "auto", "criterion": "auto", "sensitivity": "auto", "calib_text": "bundled",
                "calib_tokens": 1, "seq_len": 1, "sens_tokens": 1, "ctx": 8, "eval_text": "data/tinystories-valid.txt",
                "hand_steps": 3, "paper_prune": {"keep": 0.75, "criterion": "score", "alpha": 0.5}}
    results = claim_page.migrate({"settings": settings, "domains": ["stories", "code"], "fixtures": {"fx": {
        "model": "models/fx", "points": {"IQ1_S": 1, "IQ2_XXS": 2, "Q2_K": 3}, "cells": cells}}})
    assert cells["IQ2_XXS"]["uniform"]["evals"] == {"stories": uni} and set(cells["IQ2_XXS"]["verdicts"]) == {"stories"}
    done, todo = claim_page.points(results)
    assert sorted(k for *_, k in done) == ["holds", "holds", "worse"]
    assert todo == {"fx": ["IQ2_XXS (code)", "Q2_K"]}
    page = claim_page.markdown(results, {}, "x.json")
    assert "never worse at 2 and at least 25 % lower at 2** (fx: 2 and 2 of 3)" in page
    assert "| IQ1_S | 0.001 | −50 % ✓ | +100 % ✗ |" in page and "| IQ2_XXS | 0.002 | −50 % ✓ | — |" in page
    assert "Not measured yet: fx: IQ2_XXS (code), Q2_K." in page and "is not met" in page


# ---- bench/'s structure ------------------------------------------------------------------------------------------
def bench_import_problems(path: Path, bench: Path = BENCH) -> list[str]:
    """What a bench module imports that it must not: another bench script (only the library is shared), a test
    module, anything found by editing sys.path or loaded by file name."""
    scripts = {p.stem for p in bench.glob("*.py")} - LIBRARIES - {path.stem}
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests"}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
        else:
            names = []
        for name in names:
            top = name.split(".")[0]
            if name.startswith(".") or top in scripts:
                found.append(f"line {node.lineno}: imports the script {name} (move what it shares to common.py)")
            elif top in tests:
                found.append(f"line {node.lineno}: imports the tests' {name} (move what they share to common.py or "
                             "the package)")
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            found.append(f"line {node.lineno}: edits or reads sys.path (a script's own folder is already on it)")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in IMPORTERS:
            found.append(f"line {node.lineno}: loads a module by name or file")
    return found


def test_no_bench_script_imports_another_script_or_the_tests():
    bad = {p.name: f for p in sorted(BENCH.glob("*.py")) if (f := bench_import_problems(p))}
    assert not bad, f"bench/ modules import what they must not: {bad}"


def test_the_bench_import_check_catches_what_it_should(tmp_path):
    (tmp_path / "common.py").write_text("import json\n")
    (tmp_path / "other.py").write_text("X = 1\n")
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nsys.path.insert(0, 'tests')\nfrom common import ROOT\nfrom other import X\n"
                     "import conftest\nfrom test_published_configs import within\nimport importlib\n"
                     "importlib.import_module('other')\nfrom moepack.cli import main\n")
    found = " | ".join(bench_import_problems(probe, tmp_path))
    assert found.count("line ") == 5, found
    for what in ("line 2: edits", "script other", "tests' conftest", "tests' test_published_configs", "line 8: loads"):
        assert what in found, (what, found)


def test_no_bench_module_is_too_long():
    long = {p.name: n for p in sorted(BENCH.glob("*.py")) if (n := len(p.read_text(encoding="utf-8").splitlines()))
            > MAX_LINES}
    assert not long, f"bench/ modules over {MAX_LINES} lines (move what scripts share to common.py): {long}"


def test_what_the_benches_import_from_moepack_exists():
    """The scripts are not run by the tests and import most of moepack inside functions: a renamed module or name
    shows here, not hours into a benchmark."""
    import importlib
    import importlib.util

    def has(module: object, name: str) -> bool:
        return hasattr(module, name) or importlib.util.find_spec(f"{module.__name__}.{name}") is not None

    missing = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moepack"):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as e:
                    missing.append(f"{path.name}:{node.lineno}: {node.module} ({e})")
                    continue
                missing += [f"{path.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                            if not has(module, a.name)]
    assert not missing, f"bench/ imports what moepack no longer has: {missing}"


def _compress_result_reads(path: Path) -> list[tuple[int, str]]:
    """(line, attribute) of each attribute a bench module reads from the result of a `compress(...)` call."""
    found = []
    for fn in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.FunctionDef)):
        results = {t.id for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                   and getattr(n.value.func, "id", None) == "compress" for t in n.targets if isinstance(t, ast.Name)}
        found += [(n.lineno, n.attr) for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id in results]
    return found


def test_benches_read_only_what_a_run_summary_holds():
    """compress returns a RunSummary; the scripts are not run by the tests, so a renamed field would only show in a
    long benchmark run: every attribute they read from compress's result must be one of its fields or properties."""
    from moepack.schema import RunSummary

    known = {f.name for f in dataclasses.fields(RunSummary)} | {n for n in dir(RunSummary) if not n.startswith("_")}
    reads = {p.name: r for p in sorted(BENCH.glob("*.py")) if (r := _compress_result_reads(p))}
    assert {"claim.py", "domain.py", "probe_tokens.py", "reference.py"} <= set(reads)  # the check sees them
    bad = {name: [f"line {line}: .{attr}" for line, attr in r if attr not in known] for name, r in reads.items()}
    assert not any(bad.values()), f"not in RunSummary: {bad}"


def test_make_bench_reruns_every_benchmark_the_docs_cite():
    rules = {t: (pre, recipe) for t, pre, recipe in
             re.findall(r"^([\w-]+):([^\n]*)\n((?:\t[^\n]*\n)*)", (ROOT / "Makefile").read_text(), re.M)}
    run = set(re.findall(r"bench/(\w+)\.py", "".join(r for t, (_, r) in rules.items() if t.startswith("bench"))))
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    cited = {m for p in pages for m in re.findall(r"bench/(\w+)\.py", p.read_text(encoding="utf-8"))} - LIBRARIES
    assert cited and not cited - run, f"cited in docs/ but not in `make bench`: {sorted(cited - run)}"
    assert set(rules["bench"][0].split()) == {t for t in rules if t.startswith("bench-")}
    assert "bench" not in " ".join(rules["test"]), "`make test` must not run the benchmarks"


def _kld(mean: float, half: float) -> dict[str, float]:
    return {"kld_mean": mean, "kld_ci95_low": mean - half, "kld_ci95_high": mean + half}


def test_domain_bench_judges_dropped_and_merged_keep_auto(monkeypatch) -> None:
    """bench/domain.py: pruning pays where keep auto pruned and beat quant-only with CIs apart at no larger size;
    merged counts as better than dropped only with CIs apart; the page's counts come from those verdicts."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))
    domain = importlib.import_module("domain")

    def row(keep: float, size: int, mean: float, half: float) -> dict:
        return {"file": "f", "keep": keep, "top_k": 4, "n_experts": [int(64 * keep), 64], "size_bytes": size,
                "eval": {d: _kld(mean, half) for d in common.DOMAINS}, "candidates": [
                    {"keep": 1.0, "kld": 0.12}, {"keep": keep, "kld": mean, "prune_kld": 0.01}]}

    pt = {"budget_bpw": 2.5, "file_limit": 1000, "quant_only": row(1.0, 990, 0.12, 0.003),
          "auto": row(0.75, 990, 0.035, 0.001), "auto_merge": row(0.75, 990, 0.030, 0.001), "llama_best": None}
    v = domain.verdict(pt, "code")
    assert v["auto"]["pruning_paid"] and v["auto_merge"]["pruning_paid"] and v["merge_better"]
    pt["auto_merge"] = row(0.75, 990, 0.0345, 0.001)  # lower, but the CIs overlap
    assert not domain.verdict(pt, "code")["merge_better"]
    pt["auto"] = row(1.0, 990, 0.12, 0.003)  # kept every expert: nothing to pay
    assert not domain.verdict(pt, "code")["auto"]["pruning_paid"]
    pt["verdict"] = {"code": domain.verdict(pt, "code")}
    results = {"model": "m", "params": 1, "seconds": 60, "command": "python bench/domain.py",
               "settings": {"calib_tokens": 1, "sens_tokens": 1, "base": "IQ1_S", "ladder": ["IQ1_S"],
                            "criterion": "score", "eval_tokens": 1, "ctx": 256},
               "domains": [{"domain": "code", "points": [pt], "mixtures": [{"method": "llama.cpp IQ1_S",
                                                                             "size_bytes": 2000}]}]}
    page = domain.markdown(results, "python bench/domain.py")
    assert "keep auto, dropped: pruning paid at 0 of 1" in page and "keep auto, merged: pruning paid at 1 of 1" in page
    assert "| 1: 0.1200; 0.75: 0.0345 |" in page  # what each retention measured (merged)

"""`moepack compress` end to end on a tiny random model: fits the budget, runs in llama.cpp, resumes after a kill."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from conftest import DATA, small_compress_options
from moepack.cli import main

CALIB = DATA / "tinystories-valid.txt"
SMALL = small_compress_options()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    out = tmp_path_factory.mktemp("m") / "qwen3"
    return build_tiny_model("qwen3_moe", out, tokenizer=True, hidden=256, ffn=256, n_experts=8, top_k=2, vocab=512)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _bf16_bytes(model: Path) -> int:
    from moepack.model.checkpoint import open_checkpoint

    return 2 * sum(open_checkpoint(model).param_counts().values())


@pytest.mark.slow
def test_compress_fits_budget_and_runs(model: Path, tmp_path: Path, capsys, caplog) -> None:
    import logging

    target = _bf16_bytes(model) // 5
    out, saved = tmp_path / "x.gguf", tmp_path / "pruned"
    with caplog.at_level(logging.INFO):
        assert main(["compress", str(model), "--target-size", f"{target}B", "--keep", "0.75", "-o", str(out),
                     "--save-pruned", str(saved), *SMALL]) == 0
    text = capsys.readouterr().out
    _check_plan_printed_first(caplog)
    _check_saved_pruned(saved, out)
    assert out.stat().st_size <= target
    assert "6 of 8 per MoE layer" in text and "top-k 2" in text  # keep 0.75: 6 of 8, k' = round(1.5) = 2
    reader = gguf.GGUFReader(out)
    assert reader.fields["qwen3moe.expert_count"].parts[-1][0] == 6
    quant_types = {t.tensor_type.name for t in reader.tensors} - {"F32"}
    assert len(quant_types) >= 2, quant_types  # the allocation mixed types
    assert not list(tmp_path.glob("*.tmp"))
    _check_run_command(out, text)
    _check_criterion_auto(out.with_name(out.name + ".run"), text)
    _check_references(out.with_name(out.name + ".run"), text)
    _check_speed(out.with_name(out.name + ".run"), text)


def test_reference_types_smallest_then_budget_type(model: Path) -> None:
    """compress measures from the ladder's smallest type (fast) and then from the budget's own uniform type (the
    largest whose every tensor fits); one reference where they agree, in fast mode (the smallest) or where --base
    names one."""
    import dataclasses

    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.options import CompressOptions
    from moepack.pipeline.reference import budget_type, reference_types
    from moepack.stages.budget import Budget
    from moepack.stages.fit import uniform_bytes

    view = open_checkpoint(model)
    opts = CompressOptions(ladder=("IQ2_XXS", "IQ3_S", "Q4_K", "Q8_0"))
    at = {t: uniform_bytes(view, t) for t in opts.ladder}

    def budget(weights: int) -> Budget:
        return Budget(memory=None, kv_cache=0, compute=0, reserve=0, weights=weights)

    assert budget_type(view, budget(at["Q4_K"]), opts.ladder) == "Q4_K"
    assert budget_type(view, budget(at["Q4_K"] - 1), opts.ladder) == "IQ3_S"
    assert budget_type(view, budget(at["IQ2_XXS"] - 1), opts.ladder) == "IQ2_XXS"  # none fits: the smallest
    assert reference_types(view, budget(at["Q8_0"] + 10), opts) == ["IQ2_XXS", "Q8_0"]
    assert reference_types(view, budget(at["Q8_0"] + 10), dataclasses.replace(opts, sensitivity="fast")) == \
        ["IQ2_XXS"]
    assert reference_types(view, budget(at["IQ3_S"] - 1), opts) == ["IQ2_XXS"]
    assert reference_types(view, budget(at["Q8_0"]), dataclasses.replace(opts, reference="Q4_K")) == ["Q4_K"]


def test_the_budget_types_full_table_runs_when_the_smallest_types_timing_affords_it(monkeypatch) -> None:
    """After the smallest type's fast table, auto measures the budget type's full table only when its estimate
    (every option of every group at the fast table's seconds per probe) is under the auto limit; full always, fast
    never, and never on a table that recorded no timing."""
    from types import SimpleNamespace

    from moepack.pipeline import reference
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.sensitivity import fast

    table = SimpleNamespace(timing={"probes": 4, "probes_s": 2.0},  # 0.5 s per probe
                            groups=[SimpleNamespace(options=[0, 1, 2, 3])] * 4)  # 3 options beyond the base each
    assert reference.full_estimate_s(table) == 6.0
    measured = SimpleNamespace(timing=table.timing | {"s_per_probe": 0.25}, groups=table.groups)
    assert reference.full_estimate_s(measured) == 3.0  # the probes' own seconds, when the table recorded them
    auto = CompressOptions()
    assert auto.sensitivity == "auto" and reference.budget_reference_affordable(table, auto)
    monkeypatch.setattr(fast, "AUTO_LIMIT_S", 5.0)
    assert not reference.budget_reference_affordable(table, auto)
    assert reference.budget_reference_affordable(table, CompressOptions(sensitivity="full"))
    monkeypatch.setattr(fast, "AUTO_LIMIT_S", 1e9)
    assert not reference.budget_reference_affordable(table, CompressOptions(sensitivity="fast"))
    assert not reference.budget_reference_affordable(SimpleNamespace(timing=None, groups=table.groups), auto)


def _check_plan_printed_first(caplog) -> None:
    """Every compress logs its plan (stages, predicted wall time, peak RAM, scratch disk) before the first stage."""
    messages = [r.getMessage() for r in caplog.records]
    plan = next(i for i, m in enumerate(messages) if m.startswith("compress plan"))
    first_stage = next(i for i, m in enumerate(messages) if "calibrat" in m.lower() and i != plan)
    assert plan < first_stage
    for needle in ("wall time", "peak RAM", "scratch disk", "calibrate", "for each retention of 0.75"):
        assert needle in messages[plan], needle


def _check_saved_pruned(saved: Path, out: Path) -> None:
    """--save-pruned writes the chosen retention's checkpoint (and nothing is written per retention otherwise): it
    opens with 6 of 8 experts and its prune plan; quantizing it is the same model the GGUF holds."""
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(saved)
    assert view.facts.n_experts == 6 and (saved / "prune_plan.json").is_file()
    assert gguf.GGUFReader(out).fields["general.name"].contents() == "qwen3"  # the source's name, not a temp dir


def _check_run_dir_bounded(run_dir: Path, out: Path, model: Path) -> None:
    """The run directory holds calibration statistics, sensitivity tables, prune and quant plans, stage records and
    the summary: no pruned checkpoint per retention, no second copy of the output."""
    allowed = re.compile(r"calib/(manifest\.json|stats\.safetensors)|stages/[\w.=-]+\.json|summary\.json"
                         r"|(sensitivity|quant_plan|prune_plan)-r[\d.]+(-\w+)?\.json")
    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    assert files and all(allowed.fullmatch(f) for f in files), [f for f in files if not allowed.fullmatch(f)]
    assert not list(run_dir.rglob("*.gguf")) and not list(run_dir.rglob("*.safetensors.index.json"))
    stats = (run_dir / "calib" / "stats.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    assert total < stats + (1 << 20) < out.stat().st_size < _bf16_bytes(model), (total, stats)


def _check_references(run_dir: Path, printed: str) -> None:
    """Each reference type measured is in the summary with its refined plan's selection KLD (the smallest type's
    table fast); the plan kept is the lower one's (or a llama.cpp mixture that measured lower still; or the lower one
    moved to faster types by the speed floor)."""
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    (cand,) = summary["candidates"]
    refs = cand["references"]
    assert len(refs) == 2 and refs[0]["base"] == "IQ2_XXS" and refs[1]["base"] != "IQ2_XXS", refs
    assert refs[0]["sensitivity"] == "fast" and refs[1]["sensitivity"] == "full"  # the smallest's: fast
    moved = cand.get("speed_limited") or {}  # the speed floor may move the lower one to faster types afterwards
    assert min(cand["kld"], moved.get("kld_before", cand["kld"])) <= min(r["kld"] for r in refs)
    assert (run_dir / "sensitivity-r0.75.json").is_file() and (run_dir / "sensitivity-r0.75-IQ2_XXS.json").is_file()
    assert "reference types (selection KLD" in printed


def _check_criterion_auto(run_dir: Path, printed: str) -> None:
    """The default --criterion auto measured every criterion's pruning-only KLD at keep 0.75 and pruned with the
    lowest; the summary lists each."""
    import json

    from moepack.pipeline.criterion import AUTO_CRITERIA

    summary = json.loads((run_dir / "summary.json").read_text())
    (cand,) = summary["candidates"]
    *tried, merged = cand["criteria"]  # the last: the winner measured with merging (tests/test_compress_merge.py)
    assert [(t["criterion"], t["alpha"]) for t in tried] == list(AUTO_CRITERIA) and merged["merge"]
    best = min(tried, key=lambda t: t["prune_kld"])
    assert (summary["criterion"], summary["alpha"]) == (best["criterion"], best["alpha"])
    assert cand["prune_kld"] == min(best["prune_kld"], merged["prune_kld"])
    plan = json.loads((run_dir / "prune_plan-r0.75.json").read_text())
    assert plan["criterion"] == best["criterion"]
    assert "criterion at keep 0.75" in printed


def _check_speed(run_dir: Path, printed: str) -> None:
    """summary.json and the printed summary hold the plan's predicted tokens per second and the same-size llama.cpp
    mixture's, from kernel times of this machine."""
    import json

    sp = json.loads((run_dir / "summary.json").read_text())["speed"]
    assert sp["decode_tps"] > 0 and sp["prompt_tps"] > 0 and sp["threads"] == 2
    assert sp["mixture"]["decode_tps"] > 0 and "measured on this machine" in sp["kernels"]
    assert {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "output"} <= set(sp["decode_ms_by_class"])
    assert f"decode {sp['decode_tps']:,.0f}" in printed


def _check_run_command(out: Path, printed: str) -> None:
    """summary.json and the printed summary hold the llama.cpp command line; what it says loads the file."""
    import json
    import shlex

    from moepack.gguf.runtime import load_llama

    cmd = json.loads((out.parent / (out.name + ".run") / "summary.json").read_text())["llama_command"]
    assert f"run it:        {cmd}" in printed
    argv = shlex.split(cmd)
    assert argv[0] == "llama-server" and argv[argv.index("-m") + 1] == str(out) and "--no-repack" in argv
    llm = load_llama(argv[argv.index("-m") + 1], n_ctx=int(argv[argv.index("-c") + 1]), repack=False)
    assert llm.n_ctx() == int(argv[argv.index("-c") + 1])
    llm.close()


@pytest.mark.slow
def test_keep_auto_screens_retentions(model: Path, tmp_path: Path, capsys) -> None:
    """--keep auto measures keep 1.0 fully, then screens smaller retentions by what pruning alone costs: one whose
    pruning KLD is already above the best measured candidate gets no sensitivity table; the best measured one wins."""
    import json

    out, run_dir = tmp_path / "x.gguf", tmp_path / "run"
    target = _bf16_bytes(model) // 3  # ~5 bpw: quantization costs little next to removing experts
    assert main(["compress", str(model), "--target-size", f"{target}B", "-o", str(out),  # the default: --keep auto
                 "--run-dir", str(run_dir), *SMALL]) == 0
    assert "screened" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    cands = summary["candidates"]
    assert [c["keep"] for c in cands] == [1.0, 0.875, 0.75, 0.625] and not cands[0]["screened"]
    measured = [c for c in cands if not c["screened"]]
    lowest = min(measured, key=lambda c: c["kld"])
    tie = summary["speed"].get("tie_break")  # retentions within the lowest one's KLD CI: the fastest predicted
    if tie is None:
        assert summary["keep"] == lowest["keep"] and summary["selection_kld"] == lowest["kld"]
    else:
        assert tie["lowest_kld"] == lowest["keep"] and summary["keep"] == tie["chosen"] in tie["tied"]
        chosen, lowest_tps = tie["decode_tps"][f"{tie['chosen']:g}"], tie["decode_tps"][f"{tie['lowest_kld']:g}"]
        assert chosen == lowest_tps or chosen == max(tie["decode_tps"].values()) >= 1.1 * lowest_tps
    _check_report_tokens(run_dir, summary)
    _check_run_dir_bounded(run_dir, out, model)
    screened = [c for c in cands if c["screened"]]
    assert screened
    for c in screened:
        assert c["kld"] is None and not (run_dir / f"sensitivity-r{c['keep']:g}.json").exists()
        if c["same_as"] is None:
            assert c["prune_kld"] >= min(m["kld"] for m in measured if m["keep"] > c["keep"])
    assert out.stat().st_size <= target


def _check_report_tokens(run_dir: Path, summary: dict) -> None:
    """The reported KLD is measured on tokens after the selection tokens in the calibration text, which no choice
    saw: the same plan measured there differs from its selection KLD."""
    import numpy as np

    from moepack.schema import CalibStats

    from moepack.model.textdata import tokenize_file

    stats = CalibStats.read(run_dir)
    assert stats.report is not None and stats.report.shape == stats.selection.shape == (2, 128)  # --sens-tokens 256
    ids = tokenize_file(Path(stats.manifest.model), CALIB, 1024 + 512)  # statistics, selection, report in order
    assert np.array_equal(stats.selection.ravel(), ids[1024:1280]) and np.array_equal(stats.report.ravel(), ids[1280:])
    assert summary["report_tokens"] == stats.report.size
    assert not np.array_equal(stats.report, stats.selection)
    assert summary["report_kld"] > 0 and summary["report_kld"] != summary["selection_kld"]
    from moepack.schema import RunSummary

    assert RunSummary.read(run_dir / "summary.json").result_kld == summary["report_kld"]  # what report and card show


@pytest.mark.slow
def test_keep_auto_skips_retentions_that_cannot_fit(model: Path, tmp_path: Path) -> None:
    """Under a budget only a pruned model fits, --keep auto passes over keep 1.0 before measuring it (no
    sensitivity table) instead of failing, and the file comes from a smaller retention."""
    import json

    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.fit import uniform_bytes
    from moepack.stages.footprint import gguf_overhead_bytes

    view = open_checkpoint(model)
    weights = (uniform_bytes(view, "IQ2_XXS", 1.0) + uniform_bytes(view, "IQ2_XXS", 0.75)) // 2
    target = weights + gguf_overhead_bytes(view)
    out, run_dir = tmp_path / "x.gguf", tmp_path / "run"
    assert main(["compress", str(model), "--target-size", f"{target}B", "--keep", "auto", "-o", str(out),
                 "--run-dir", str(run_dir), *SMALL]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    first = summary["candidates"][0]
    assert first["keep"] == 1.0 and first["infeasible"] and not (run_dir / "sensitivity-r1.json").exists()
    assert summary["keep"] < 1.0 and out.stat().st_size <= target


def test_infeasible_budget_fails_at_once(model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.gguf"
    t0 = time.time()
    assert main(["compress", str(model), "--target-size", "20kB", "-o", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "smallest achievable" in err or "metadata" in err
    assert time.time() - t0 < 30 and not out.exists()


def test_bad_keep_is_rejected(model: Path, tmp_path: Path, capsys) -> None:
    assert main(["compress", str(model), "--target-size", "1MB", "--keep", "1.5", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--keep must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupted_compress_resumes_to_same_bytes(model: Path, tmp_path: Path) -> None:
    """Kill compress mid-way (after calibration), rerun: finished stages are reused and the bytes are identical
    to an uninterrupted run."""
    target = f"{_bf16_bytes(model) // 4}B"
    out, run = tmp_path / "x.gguf", tmp_path / "x.run"
    cmd = [sys.executable, "-m", "moepack.cli", "compress", str(model), "--target-size", target, "-o", str(out),
           "--run-dir", str(run), "--keep", "0.75", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a loaded machine calibrates slowly
    done = run / "stages" / "calibrate.json"  # the stage record, written once calib/ is complete
    while not done.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written at the output path
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing calibration statistics" in r.stderr
    resumed = _sha(out)
    # The same command from scratch, at the same paths (plans in the metadata name the run directory).
    import shutil

    shutil.rmtree(run)
    out.unlink()
    assert main(["compress", str(model), "--target-size", target, "-o", str(out), "--run-dir", str(run),
                 "--keep", "0.75", *SMALL]) == 0
    assert _sha(out) == resumed


def test_keep_defaults_to_auto() -> None:
    """Without --keep, compress searches the retention with keep 1.0 among the candidates (never a fixed 0.75 that
    may remove experts the model needs); prune keeps its explicit default."""
    from moepack.cli import build_parser
    from moepack.pipeline.options import KEEP_AUTO_CANDIDATES, CompressOptions

    p = build_parser()
    assert p.parse_args(["compress", "m", "-o", "x.gguf", "--target-bpw", "3"]).keep == "auto"
    assert p.parse_args(["compress", "m", "-o", "x.gguf", "--target-bpw", "3", "--keep", "0.75"]).keep == 0.75
    assert CompressOptions().keep == "auto" and 1.0 in KEEP_AUTO_CANDIDATES


def test_dry_run_prints_the_cost_of_deepseek_v3_from_its_config(tmp_path: Path, capsys) -> None:
    """`compress --dry-run` on DeepSeek-V3's config.json alone: the budget, the stages, a wall time that grows with
    each retention measured, peak RAM (less with --quant-cache) and scratch disk; nothing is written."""
    from conftest import ROOT

    out = tmp_path / "v3.gguf"
    argv = ["compress", str(ROOT / "data" / "configs" / "deepseek-v3"), "--memory", "128GB", "-c", "8192", "-t", "64",
            "-o", str(out), "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "= weights" in text and "for each retention of 1, 0.875, 0.75, 0.625" in text
    wall = re.search(r"wall time +([\d.]+) (h|min|s) to ([\d.]+) (h|min|s) on 64 threads", text)
    assert wall and float(wall.group(3)) > float(wall.group(1)), text
    ram = re.search(r"peak RAM +[\d.]+ GiB \(([\d,]+) bytes\); [\d.]+ GiB \(([\d,]+) bytes\) with --quant-cache", text)
    assert ram and int(ram.group(2).replace(",", "")) < int(ram.group(1).replace(",", "")), text
    assert "scratch disk" in text and "no pruned checkpoint per retention" in text
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(argv[:-1] + ["--keep", "0.75", "--dry-run"]) == 0
    assert "for each retention of 0.75:" in capsys.readouterr().out

"""`moepack report` on the run directory of a compress run on a tiny random model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import small_compress_options
from moepack.cli import main
from moepack.schema import RunSummary, SchemaError

SMALL = small_compress_options()


def test_report_from_compress_run(tiny_model, tmp_path: Path, capsys) -> None:
    from moepack.model.checkpoint import open_checkpoint

    model = tiny_model("qwen3_moe", tokenizer=True, hidden=256, ffn=256, n_experts=8, top_k=2, vocab=512)
    target = 2 * sum(open_checkpoint(model).param_counts().values()) // 5  # a fifth of bf16
    run_dir, out = tmp_path / "run", tmp_path / "x.gguf"
    assert main(["compress", str(model), "--target-size", f"{target}B", "-o", str(out), "--run-dir", str(run_dir),
                 "--keep", "0.75", *SMALL]) == 0
    pareto = tmp_path / "p.png"
    pareto.write_bytes(b"\x89PNG\r\n\x1a\n")  # any file: the page only links a copy
    page = tmp_path / "page" / "r.md"
    capsys.readouterr()
    assert main(["report", str(run_dir), "-o", str(page), "--pareto", str(pareto)]) == 0
    text = page.read_text()
    for section in ("Experts kept per layer", "Type per tensor", "Sensitivity", "Size vs KLD"):
        assert section in text
    for png in ("r-experts.png", "r-types.png", "r-pareto.png"):
        assert f"]({png})" in text and (page.parent / png).stat().st_size > 0
    assert "6 of 8" in text
    assert text.count("| blk.") >= 5  # sensitivity rows
    assert not list(page.parent.glob("*.tmp*"))


def test_report_rejects_non_run_dir(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.md")]) == 2
    assert "compress run directory" in capsys.readouterr().err


def test_run_summary_contract(tmp_path: Path, capsys) -> None:
    """summary.json through its one reader: the result KLD is the report KLD, else the selection KLD; summaries
    written before the format was named read the same; a damaged one is refused with what to redo."""
    s = RunSummary(out=str(tmp_path / "x.gguf"), run_dir=str(tmp_path), keep=0.75, top_k=2, n_experts=[6, 8],
                   budget={"from": "target_size"}, file_bytes=1000, predicted_bytes=990, bpw=2.5,
                   types={"ffn_up_exps": {"Q4_K": 2}}, selection_kld=0.02, report_kld=0.03, report_tokens=256)
    s.write(tmp_path / "summary.json")
    back = RunSummary.read(tmp_path / "summary.json")
    assert back == s and back.result_kld == 0.03
    old = s.to_dict()
    del old["format"]
    (tmp_path / "summary.json").write_text(json.dumps(old | {"report_kld": None, "measured_kld": 0.02}))
    assert RunSummary.read(tmp_path / "summary.json").result_kld == 0.02
    page = tmp_path / "r.md"
    assert main(["report", str(tmp_path), "-o", str(page)]) == 0  # a summary alone: the page says what it knows
    assert "KLD vs the original on the held-out selection tokens every choice was measured on" in page.read_text()
    for bad, field in (({"keep": "0.75"}, "keep"), ({"n_experts": [6]}, "n_experts"), ({"format": "x/2"}, "format")):
        (tmp_path / "summary.json").write_text(json.dumps(old | bad))
        with pytest.raises(SchemaError, match=field):
            RunSummary.read(tmp_path / "summary.json")
    assert main(["report", str(tmp_path), "-o", str(page)]) == 2
    assert "rerun `moepack compress`" in capsys.readouterr().err

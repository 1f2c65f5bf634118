"""`moepack report` on the run directory of a compress run on a tiny random model."""
from __future__ import annotations

from pathlib import Path

from conftest import DATA
from moepack.cli import main

SMALL = ["--calib-text", str(DATA / "tinystories-valid.txt"), "--calib-tokens", "1024", "--seq-len", "128",
         "--sens-tokens", "256",
         "--ladder", "IQ2_XXS,IQ2_S,IQ3_XXS,IQ3_S,Q4_K,Q5_K,Q6_K,Q8_0"]  # short: the whole ladder costs test time


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

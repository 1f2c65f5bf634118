"""The model card (`moepack report RUN_DIR -o DIR/README.md`) and the GGUF's recipe, on a compress run of a tiny
random model: front matter first and parseable, every number equal to the run's files, charts beside it."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import gguf
import pytest

from conftest import DATA, build_tiny_model, small_compress_options
from moepack.cli import main
from moepack.gguf.recipe import read_recipe, types_by_class
from moepack.schema import RunSummary

SMALL = small_compress_options()
REPO = "acme/tiny-moe"
LICENSE = "cdla-sharing-1.0"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A compress run (keep 0.75 of 8 experts) with an eval report in its run directory; the source model has a
    card with a license and a config naming its hub repo id."""
    from moepack.model.checkpoint import open_checkpoint

    root = tmp_path_factory.mktemp("card")
    model = build_tiny_model("qwen3_moe", root / "model", tokenizer=True, hidden=256, ffn=256, n_experts=8, top_k=2,
                             vocab=512)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"_name_or_path": REPO}))
    (model / "README.md").write_text(f"---\nlicense: {LICENSE}\ntags: [moe]\n---\n# tiny\n")
    target = 2 * sum(open_checkpoint(model).param_counts().values()) // 5
    out, run_dir = root / "out" / "tiny.gguf", root / "run"
    out.parent.mkdir()
    assert main(["compress", str(model), "--target-size", f"{target}B", "-o", str(out), "--run-dir", str(run_dir),
                 "--keep", "0.75", *SMALL]) == 0
    assert main(["eval", str(out), "--reference", str(model), "--text", str(DATA / "tinystories-train.txt"),
                 "--window", "64", "--tokens", "256", "--no-speed", "--threads", "1",
                 "--cache-dir", str(root / "cache"), "--json-out", str(run_dir / "eval.json")]) == 0
    return {"model": model, "out": out, "run": run_dir}


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML block that opens the card, parsed (pyyaml when installed, else a strict check of our subset)."""
    assert text.startswith("---\n")
    block = text[4:text.index("\n---\n", 4)]
    try:
        import yaml
    except ImportError:
        out: dict[str, Any] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith("- "):
                out[key].append(json.loads(line[2:]))
            else:
                key, sep, value = line.partition(": ")
                assert re.fullmatch(r"[a-z_]+", key.rstrip(":")), line
                key = key.rstrip(":")
                out[key] = json.loads(value) if sep else []
        return out
    return yaml.safe_load(block)


@pytest.mark.slow
def test_gguf_recipe_matches_the_plan(run) -> None:
    summary = json.loads((run["run"] / "summary.json").read_text())
    reader = gguf.GGUFReader(run["out"])
    assert reader.fields["general.quantized_by"].contents() == "moepack"
    recipe = read_recipe(run["out"])
    assert recipe["keep"] == summary["keep"] == 0.75 and recipe["top_k"] == summary["top_k"]
    assert [recipe["experts"]["kept"], recipe["experts"]["of"]] == summary["n_experts"] == [6, 8]
    plan = json.loads((run["run"] / "quant_plan-r0.75.json").read_text())["tensors"]
    quantized = {n: t for n, t in plan.items() if t != "F32"}
    assert recipe["types"] == types_by_class(quantized)  # rows of 256: no fallbacks, the plan is what is written
    assert recipe["types"] == types_by_class({t.name: t.tensor_type.name for t in reader.tensors
                                              if t.name in quantized})
    b = summary["budget"]
    assert recipe["budget"]["from"] == "target_size" and recipe["budget"]["target"] == b["target"]
    assert recipe["budget"]["file_limit"] == b["weights"] + b["overhead"] >= run["out"].stat().st_size


def test_model_card(run, tmp_path: Path, capsys) -> None:
    page = tmp_path / "share" / "README.md"
    assert main(["report", str(run["run"]), "-o", str(page)]) == 0
    assert str(page) in capsys.readouterr().out
    text = page.read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == REPO and meta["license"] == LICENSE and meta["quantized_by"] == "moepack"
    assert {"gguf", "moe", "moepack", "qwen3moe"} <= set(meta["tags"])
    assert meta["library_name"] == "gguf" and meta["pipeline_tag"] == "text-generation"
    size = run["out"].stat().st_size
    assert f"| size | {size:,} bytes" in text
    summary = json.loads((run["run"] / "summary.json").read_text())
    assert f"| bits per weight | {summary['bpw']:.3f}" in text
    sp = summary["speed"]  # predicted from this machine's kernel times, beside the same-size llama.cpp mixture's
    assert f"| speed | predicted tokens per second on {sp['kernels']}: decode {sp['decode_tps']:,.0f}" in text
    assert f"llama.cpp's {sp['mixture']['name']} of the unpruned model" in text
    result = RunSummary.read(run["run"] / "summary.json")  # the result: report KLD, else selection KLD
    assert f"(fake-quantized forward): {result.result_kld:.5f}." in text
    assert "| routed experts kept per MoE layer | 6 of 8 (keep 0.75)" in text
    assert "| experts used per token (k') | 2 |" in text
    assert f"--target-size {summary['budget']['target']}B" in text  # a unit: the flag refuses a bare number
    for cls, counts in read_recipe(run["out"])["types"].items():
        assert f"| `{cls}` | " + ", ".join(f"{t} × {n}" for t, n in sorted(counts.items())) + " |" in text
    assert "## Evaluation" in text and "| model | size MiB |" in text and "`tiny.gguf`" in text  # the eval table
    assert "llama-server -m tiny.gguf -c " in text  # the run's command, naming the file as shared
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert {"README-experts.png", "README-types.png"} <= set(links)
    for png in links:
        assert (page.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(page.parent.glob("*.tmp*"))


def test_card_flag_writes_beside_the_gguf(run, capsys) -> None:
    card = run["out"].with_name("README.md")
    try:
        assert main(["report", str(run["run"]), "--card"]) == 0
        assert card.read_text().startswith("---\n") and card.with_name("README-types.png").is_file()
    finally:
        for p in card.parent.glob("README*"):
            p.unlink()


def test_run_report_page_unchanged(run, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    assert main(["report", str(run["run"]), "-o", str(page)]) == 0
    assert page.read_text().startswith("# moepack compress report")


def test_card_errors_write_nothing(run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "share" / "README.md"
    assert main(["report", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err
    partial = tmp_path / "partial"  # a run stopped before it finished: plans, no summary
    shutil.copytree(run["run"], partial, ignore=shutil.ignore_patterns("summary.json", "*.gguf"))
    assert main(["report", str(partial), "-o", str(out)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    moved = tmp_path / "moved"  # the GGUF gone from both places summary.json knows
    shutil.copytree(run["run"], moved, ignore=shutil.ignore_patterns("*.gguf"))
    summary = json.loads((moved / "summary.json").read_text())
    (moved / "summary.json").write_text(json.dumps(summary | {"out": str(tmp_path / "gone.gguf")}))
    assert main(["report", str(moved), "--card"]) == 2
    assert "GGUF" in capsys.readouterr().err
    assert not out.parent.exists()


def test_pareto_from_measured_retentions(tmp_path: Path) -> None:
    from moepack.eval.report import pareto_chart, pareto_points

    candidates = [{"keep": 1.0, "top_k": 2, "kld": 0.003, "tensor_bytes": 2_000_000},
                  {"keep": 0.75, "top_k": 2, "kld": 0.002, "tensor_bytes": 1_900_000},
                  {"keep": 0.5, "top_k": 2, "kld": None, "tensor_bytes": None}]  # screened
    sizes, points = pareto_points(candidates, None)
    assert sizes == "tensor" and [p[1] for p in points] == [2_000_000, 1_900_000]
    assert pareto_points(candidates[:1], None) == ("", [])  # one point: no trade-off
    pareto_chart(points, sizes, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_base_model_and_license_of_a_source(tmp_path: Path) -> None:
    from moepack.eval.card import base_model_id, front_matter, source_license

    snap = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert base_model_id(snap) == "deepseek-ai/DeepSeek-V3"
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))  # a path, not a repo id
    assert base_model_id(local) is None and source_license(local) is None
    (local / "config.json").write_text(json.dumps({"license": "mit"}))
    assert source_license(local) == "mit"
    head = front_matter({"base_model": None, "license": "mit", "tags": ["gguf", "a: b"]})
    assert "base_model" not in head and _front_matter(head + "\n") == {"license": "mit", "tags": ["gguf", "a: b"]}


def test_card_names_calibration_runs_and_build(run, tmp_path: Path) -> None:
    """The calibration text and its domain, llama-cli / llama-server / ollama lines with the verified context, and
    the llama.cpp build compress verified the file with."""
    page = tmp_path / "share" / "README.md"
    assert main(["report", str(run["run"]), "-o", str(page)]) == 0
    text = page.read_text()
    calib = text[text.index("## Calibration"):text.index("## Evaluation")]
    assert "`tinystories-valid.txt`" in calib and "| domain | tinystories-valid" in calib
    assert "1,024 for the statistics, 256 selection tokens" in calib
    summary = json.loads((run["run"] / "summary.json").read_text())
    ctx = re.search(r" -c (\d+)", summary["llama_command"]).group(1)
    assert f"llama-cli -m tiny.gguf -c {ctx}" in text and f"llama-server -m tiny.gguf -c {ctx}" in text
    assert f"PARAMETER num_ctx {ctx}" in text and "ollama create tiny -f Modelfile && ollama run tiny" in text
    assert summary["runtime"].startswith("llama-cpp-python ") and f"Verified by `moepack compress` with " \
        f"{summary['runtime']}" in text


def test_card_finds_the_eval_beside_the_gguf_and_fills_no_license_silently(run, tmp_path: Path) -> None:
    """The demo writes eval.json beside the GGUF, not in the run directory: the card finds it there. A source whose
    card names no licence gets a placeholder the user must fill, never a bare "other"."""
    from moepack.eval.card import LICENSE_PLACEHOLDER, license_fields

    share = tmp_path / "share"
    run_dir = tmp_path / "run"
    shutil.copytree(run["run"], run_dir, ignore=shutil.ignore_patterns("eval.json"))
    share.mkdir()
    gguf_path = share / run["out"].name
    shutil.copy(run["out"], gguf_path)
    shutil.copy(run["run"] / "eval.json", share / "eval.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary | {"out": str(gguf_path)}))
    assert main(["report", str(run_dir), "--card"]) == 0
    text = (share / "README.md").read_text()
    assert "| model | size MiB |" in text and "No eval report" not in text
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "README.md").write_text("---\nlicense: other\n---\n")
    assert license_fields(bare) == {"license": "other", "license_name": LICENSE_PLACEHOLDER}
    (bare / "README.md").write_text("---\nlicense: other\nlicense_name: deepseek\nlicense_link: LICENSE\n---\n")
    assert license_fields(bare) == {"license": "other", "license_name": "deepseek", "license_link": "LICENSE"}
    (bare / "README.md").unlink()
    assert license_fields(bare)["license_name"] == LICENSE_PLACEHOLDER

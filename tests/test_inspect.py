"""Reader and `moepack inspect` on tiny random models of every supported architecture."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, DATA, build_tiny_model, fixture_dir
from moepack.model.arch import Role
from moepack.cli import main
from moepack.model.checkpoint import CheckpointError, open_checkpoint
from moepack.stages.fit import uniform_bytes


def _inspect_json(capsys, path: Path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_every_arch(arch: str, tiny_model, capsys) -> None:
    path = tiny_model(arch, n_experts=4, top_k=2, hidden=256, ffn=256)  # K-quant widths: no fallback
    d = _inspect_json(capsys, path)
    assert d["architecture"] == arch
    assert d["routed_experts"] == 4 and d["top_k"] == 2
    # Parameter counts cover every tensor and agree with the model transformers builds.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    n_model = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert d["params_total"] == n_model
    biases = 2 * d["expert_ffn"] + d["hidden"] if arch == "gpt_oss" else 0  # gpt-oss: gate, up, down biases
    assert d["params"][Role.ROUTED_EXPERTS.value] == len(d["moe_layers"]) * 4 * (
        3 * d["hidden"] * d["expert_ffn"] + biases)
    assert d["bf16_bytes"] == 2 * n_model
    est = d["gguf_estimates"]
    assert est["Q8_0"] > est["Q4_K"] >= est["Q3_K"] >= est["Q2_K"] >= est["IQ2_XXS"] > est["IQ1_S"] > 0
    if arch.startswith("deepseek"):
        assert d["dense_layers"] == [0] and d["shared_experts"] == 1 and d["routing"]["n_group"] == 4
        assert d["routing"]["topk_group"] == 2
    if arch == "deepseek_v3":
        assert d["routing"]["scoring"] == "sigmoid" and d["routing"]["bias"]


def test_inspect_text_output(tiny_model, capsys) -> None:
    path = tiny_model("deepseek_v3")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for needle in ("deepseek_v3", "sigmoid + correction bias", "groups 4", "IQ2_XXS", "routed_experts"):
        assert needle in out


def test_sharded_checkpoint_reads_like_single(tmp_path: Path) -> None:
    one = build_tiny_model("qwen3_moe", tmp_path / "one")
    import transformers

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(one).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = open_checkpoint(one), open_checkpoint(sharded)
    assert len({t.file for t in b.tensors.values()}) > 1
    assert {n: t.shape for n, t in a.tensors.items()} == {n: t.shape for n, t in b.tensors.items()}
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert torch.equal(a.load(name), b.load(name))
    assert uniform_bytes(a, "Q4_K") == uniform_bytes(b, "Q4_K")


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    one = build_tiny_model("qwen3_moe", tmp_path / "one")
    import transformers

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(one).save_pretrained(sharded, max_shard_size="100KB")
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(sharded)


def test_unsupported_architecture_lists_supported(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'llama'" in err
    assert all(a in err for a in ARCHS)
    assert "Traceback" not in err


def test_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_lying_safetensors_header(tiny_model, capsys) -> None:
    path = tiny_model("olmoe")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (len(data) * 2).to_bytes(8, "little")  # header length beyond the file
    f.write_bytes(bytes(data))
    assert main(["inspect", str(path)]) == 2
    assert "header length" in capsys.readouterr().err


def test_deepseek_fixture_facts(capsys) -> None:
    d = _inspect_json(capsys, fixture_dir("tiny-deepseek-v3"))
    assert d["routed_experts"] >= 16 and d["top_k"] >= 4
    assert d["routing"]["scoring"] == "sigmoid" and d["routing"]["bias"]
    assert d["routing"]["n_group"] >= 4 and d["routing"]["topk_group"] >= 2
    assert d["dense_layers"] == [0] and d["shared_experts"] == 1


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_fixture_perplexity_within_card_bound(name: str) -> None:
    """The trained fixture loads in transformers and keeps the perplexity its model card promises."""
    import transformers

    from moepack.model.textdata import chunk_tokens, tokenize_file

    path = fixture_dir(name)
    card = (path / "README.md").read_text()
    bound = float(re.search(r"stays below \*\*([\d.]+)\*\*", card).group(1))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_experts_per_tok"] >= 4
    if name == "tiny-deepseek-v3":
        assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.from_numpy(chunk_tokens(tokenize_file(path, DATA / "tinystories-valid.txt", 8 * 256), 256))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert torch.exp(torch.tensor(loss)).item() < bound


def test_inspect_plans_from_a_config_alone(capsys) -> None:
    """DeepSeek-V3's config.json only, a 128 GB device at 8k context (the paper's case): the budget adds up, keep
    0.75 leaves more bits per kept weight than keep 1.0, and a type 'fits' exactly when its estimate is in budget."""
    from conftest import ROOT
    from moepack.cli import main

    cfg = ROOT / "data" / "configs" / "deepseek-v3"
    assert main(["inspect", str(cfg), "--memory", "128GB", "-c", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    b, fit = d["fit"]["budget"], d["fit"]
    assert b["memory"] == 128 * 10**9 and b["ctx"] == 8192
    assert b["weights"] + b["overhead"] + b["kv_cache"] + b["compute"] + b["reserve"] <= b["memory"]
    from moepack.pipeline.options import KEEP_AUTO_CANDIDATES

    rows = fit["retentions"]
    assert tuple(r["keep"] for r in rows) == KEEP_AUTO_CANDIDATES == (1.0, 0.875, 0.75, 0.625)  # what compress tries
    r1, r75 = rows[0], rows[2]
    assert r75["bpw"] > r1["bpw"]
    assert r1["params"] == d["params_total"] and r75["params"] < r1["params"]
    for r in fit["retentions"]:
        assert all(v["fits"] == (v["bytes"] <= b["weights"]) for v in r["types"].values())
    assert r75["types"]["IQ1_S"]["bytes"] < r1["types"]["IQ1_S"]["bytes"]
    assert main(["inspect", str(cfg), "--memory", "128GB", "-c", "8192"]) == 0
    assert "bits per kept weight" in capsys.readouterr().out


def _fit(capsys, cfg: str, *budget: str) -> tuple[dict, str]:
    from conftest import ROOT

    path = str(ROOT / "data" / "configs" / cfg)
    from moepack.cli.inspect import render_fit

    assert main(["inspect", path, *budget, "--json"]) == 0  # the text is the same report rendered
    fit = json.loads(capsys.readouterr().out)["fit"]
    return fit, render_fit(fit)


def test_inspect_verdict_for_deepseek_v3_at_128gb(capsys) -> None:
    """Unpruned V3 is short of 128 GB by a stated amount; the largest retention that fits is named with its types;
    each retention's row says fits or not; the remedies for keep 1 come with numbers, and the memory named fits."""
    from moepack.model.shapes import open_for_planning
    from moepack.stages.budget import BudgetRequest, budget_for

    fit, text = _fit(capsys, "deepseek-v3", "--memory", "128GB", "-c", "8192")
    v, rows = fit["verdict"], fit["retentions"]
    assert v["fits"] and v["keep"] == 0.875 and not rows[0]["fits"] and all(r["fits"] for r in rows[1:])
    (short,) = rows[0]["short"]
    assert short["side"] == "file" and short["short"] == short["need"] - short["left"] > 0
    assert short["left"] == fit["budget"]["weights"]
    assert "verdict       fits pruned: keep 0.875 (224 experts per layer) at IQ1_S" in text
    assert "the file is short by 12.2 GiB at IQ1_S" in text
    remedies = {r["what"]: r for r in v["remedies"]}
    assert {"more memory", "a smaller context", "a q8_0 KV cache", "flash attention"} <= set(remedies)
    assert not remedies["flash attention"]["fits"] and remedies["flash attention"]["freed"]["file"] > 0
    from conftest import ROOT

    view = open_for_planning(ROOT / "data" / "configs" / "deepseek-v3")
    more = remedies["more memory"]["memory"]  # the smallest memory whose budget holds keep 1 at IQ1_S
    assert budget_for(BudgetRequest(memory=more, ctx=8192), view).weights >= short["need"]
    assert budget_for(BudgetRequest(memory=more - 1, ctx=8192), view).weights < short["need"]
    assert "more memory: --memory 132.03GiB" in text


def test_inspect_verdict_when_nothing_fits_and_when_all_fits(capsys) -> None:
    """V3 on a 24 GB GPU + 64 GB RAM at 32k: no retention fits, the RAM side is short, and what would fit is said;
    Qwen3-30B-A3B at 128 GB fits unpruned at Q8_0. The RAM budget line names its compute buffers."""
    fit, text = _fit(capsys, "deepseek-v3", "--gpu-memory", "24GB", "--memory", "64GB", "-c", "32768")
    v = fit["verdict"]
    assert not v["fits"] and v["remedy_keep"] == 0.625 and [s["side"] for s in v["short"]] == ["ram"]
    assert "does not fit at any retention compress tries (down to keep 0.625" in text
    assert "the RAM side is short" in text
    assert re.search(r"RAM 59\.6 GiB \(compute buffers \d", text)
    assert re.search(r"more memory: --gpu-memory \S+ --memory \S+", text)
    fit, text = _fit(capsys, "qwen3-30b-a3b", "--memory", "128GB", "-c", "32768")
    assert fit["verdict"]["keep"] == 1.0 and fit["verdict"]["best_type"] == "Q8_0"
    assert "verdict       fits unpruned at Q8_0" in text and "to fit" not in text


def test_one_formula_for_uniform_bytes(tiny_model, capsys) -> None:
    """inspect's tables (its size estimates and each retention's types) and compress's feasibility check are one
    formula, `uniform_bytes`: kept experts rounded up per group (keep 0.875 of 8 experts in 4 groups keeps 8, not
    7)."""
    from moepack.stages.budget import BudgetRequest
    from moepack.stages.fit import RETENTIONS, fit_report

    path = tiny_model("deepseek_v3", n_experts=8, hidden=256, ffn=256)
    view = open_checkpoint(path)
    fit = fit_report(view, BudgetRequest(target_size="1GB"))
    assert tuple(r["keep"] for r in fit["retentions"]) == RETENTIONS
    for r in fit["retentions"]:
        for t, v in r["types"].items():
            assert v["bytes"] == uniform_bytes(view, t, r["keep"]), (t, r["keep"])
    assert uniform_bytes(view, "Q8_0", 0.875) == uniform_bytes(view, "Q8_0", 1.0)  # 7 rounds up to 8 in 4 groups
    d = _inspect_json(capsys, path)
    assert d["gguf_estimates"] == {t: uniform_bytes(view, t) for t in d["gguf_estimates"]} and d["gguf_estimates"]


def _resave(path: Path, extra: dict[str, torch.Tensor] | None = None, drop_config: str | None = None) -> None:
    from safetensors.torch import load_file, save_file

    if extra:
        sd = load_file(path / "model.safetensors")
        sd.update(extra)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    if drop_config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop(drop_config)
        (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_tensors_are_an_error_not_dropped(tiny_model) -> None:
    """A tensor no layout names would be missing from the GGUF: refused. DeepSeek-V3's multi-token-prediction
    tensors (past num_hidden_layers) and saved rotary buffers are not part of the served model: ignored."""
    path = tiny_model("deepseek_v3")
    _resave(path, {"model.layers.2.eh_proj.weight": torch.zeros(4, 8),
                   "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})
    view = open_checkpoint(path)
    assert not [n for n in view.tensors if "eh_proj" in n or "inv_freq" in n]
    _resave(path, {"model.layers.0.mlp.mystery.weight": torch.zeros(4, 8)})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) are not part of any deepseek_v3 layout.*mystery"):
        open_checkpoint(path)


def test_missing_config_keys_are_named(tiny_model) -> None:
    """No silent 0 for a key the model needs: the error names it; the GGUF writer refuses invented metadata."""
    from moepack.gguf.metadata import WriteError
    from moepack.gguf.writer import overhead_bytes

    path = tiny_model("qwen3_moe")
    _resave(path, drop_config="rms_norm_eps")
    with pytest.raises(WriteError, match="config.json has no rms_norm_eps"):
        overhead_bytes(open_checkpoint(path))
    _resave(path, drop_config="vocab_size")
    with pytest.raises(CheckpointError, match="config.json has no vocab_size"):
        open_checkpoint(path)

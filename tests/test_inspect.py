"""Reader and `moepack inspect` on tiny random models of every supported architecture."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, DATA, build_tiny_model, fixture_dir
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointError, open_checkpoint
from moepack.cli import main
from moepack.gguf.estimate import estimate_size


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
    assert d["params"][Role.ROUTED_EXPERTS.value] == len(d["moe_layers"]) * 4 * 3 * d["hidden"] * d["expert_ffn"]
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
    assert estimate_size(a, "Q4_K") == estimate_size(b, "Q4_K")


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
    r1, r75 = fit["retentions"]
    assert (r1["keep"], r75["keep"]) == (1.0, 0.75) and r75["bpw"] > r1["bpw"]
    assert r1["params"] == d["params_total"] and r75["params"] < r1["params"]
    for r in fit["retentions"]:
        assert all(v["fits"] == (v["bytes"] <= b["weights"]) for v in r["types"].values())
    assert r75["types"]["IQ1_S"]["bytes"] < r1["types"]["IQ1_S"]["bytes"]
    assert main(["inspect", str(cfg), "--memory", "128GB", "-c", "8192"]) == 0
    assert "bits per kept weight" in capsys.readouterr().out


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

"""Families added for issue 27: MiniMax-M2 (minimax_m2), dots.llm1 (dots1), Hunyuan-A13B (hunyuan_v1_moe), end to
end on tiny random models as Hugging Face saves them: `compress --keep 0.75` writes a file llama.cpp loads and
generates from, the pruned checkpoint loads in transformers, the family's tokenizer split rules tokenize a
multilingual sample as Hugging Face does, routing statistics follow the family's router (sigmoid + correction
bias), Hunyuan's released rope, tied embeddings and config form. The F32 logits
check (≤ 1e-3 vs transformers), inspect, calibrate, prune, shapes and config-only checks are the suites
parametrized over conftest.ARCHS."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import build_tiny_model, small_compress_options
from family_checks import completion_tokens, compress_keep_075, gguf_token_ids, hf_token_ids
from moepack.gguf.writer import write_gguf
from moepack.model.checkpoint import open_checkpoint

FAMILIES = ("minimax_m2", "dots1", "hunyuan_v1_moe")
# tokenizer.ggml.pre for each family's split rules (dots.llm1 ships Qwen2's tokenizer). Hunyuan-A13B's own vocabulary
# is tiktoken (no tokenizer.json, the converter names it "hunyuan"); llama.cpp runs "hunyuan" with Qwen2's regex,
# which is the tokenizer.json form tested here.
PRE = {"minimax_m2": "minimax-m2", "dots1": "qwen2", "hunyuan_v1_moe": "qwen2"}
# compress at its cheapest: few tokens, a two-type ladder of 32-wide blocks (so width-64 models), one criterion, no
# refinement passes
SMALL = small_compress_options(calib_tokens=256, seq_len=64, selection_tokens=128, ladder="Q4_0,Q8_0", fast=True)
SAMPLE = ("Hello World! It's 2026; they'll say \"naïve café\".\n\n"
          "def add(a, b):\n    return a + b  # 1234567 + 89\n\t\tindented\n"
          "中文分词测试，日本語のテキスト。한국어 🤖🎉 emoji  \n   trailing   spaces\n")


def _tiny(arch: str, root: Path, **kw) -> Path:
    return build_tiny_model(arch, root / arch, tokenizer=True, vocab=512, **kw)


@pytest.mark.parametrize("arch", FAMILIES)
def test_tokenizer_matches_hf(arch: str, tmp_path: Path) -> None:
    d = _tiny(arch, tmp_path)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == PRE[arch]
    assert gguf_token_ids(out, SAMPLE) == hf_token_ids(d, SAMPLE)


def test_o200k_pre_tokenizer_named_by_vocabulary() -> None:
    """The same o200k split is "minimax-m2" with MiniMax's end-of-turn token in the vocabulary, else "gpt-4o"."""
    from conftest import _O200K_SPLIT
    from moepack.gguf.vocab import pre_tokenizer_name

    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _O200K_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": pre}) == "gpt-4o"
    assert pre_tokenizer_name({"pre_tokenizer": pre, "added_tokens": [{"id": 7, "content": "[e~["}]}) == "minimax-m2"


@pytest.mark.parametrize("arch", ["minimax_m2", "dots1"])
def test_routing_statistics_follow_the_correction_bias(arch: str, tmp_path: Path) -> None:
    """Sigmoid + e_score_correction_bias routers (MiniMax-M2: beside its gate under block_sparse_moe; dots1: inside
    mlp.gate): an expert whose bias is -1e4 is never chosen, calibration sees that, and pruning drops it and slices
    the bias with the router rows."""
    from safetensors.torch import load_file, save_file

    from moepack.model.pruned import pruned_view
    from moepack.stages.calibrate import calibrate
    from moepack.stages.prune import PruneOptions, make_plan

    d = build_tiny_model(arch, tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    biases = [n for n in sd if n.endswith("e_score_correction_bias")]
    for n in biases:
        sd[n][5] = -1e4
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    view = open_checkpoint(d)
    assert view.facts.router_bias and view.facts.scoring == "sigmoid"
    assert len(biases) == len(view.facts.moe_layers) > 0
    ids = np.random.default_rng(0).integers(0, 256, (4, 24))
    stats = calibrate(view, ids, progress=False)
    for r in stats.router.values():
        assert r.counts[5] == 0 and r.counts.sum() == ids.size * view.facts.top_k
    plan = make_plan(view, stats, PruneOptions(keep=0.75, criterion="frequency"))
    pv = pruned_view(view, plan)
    for name in biases:
        kept = plan.kept(view.tensors[name].layer)
        assert 5 not in kept and len(kept) == 6
        assert pv.tensors[name].shape == (6,)
        assert np.array_equal(pv.load(name).numpy(), sd[name].numpy()[kept])


@pytest.mark.parametrize("arch", FAMILIES)
def test_compress_runs_in_llama_cpp_and_pruned_loads_in_transformers(arch: str, tmp_path: Path, capsys) -> None:
    import torch
    import transformers

    from moepack.model.runner import LayerRunner

    d = _tiny(arch, tmp_path)
    view = open_checkpoint(d)
    target = sum(view.param_counts().values())  # half the bf16 size: at width 64 metadata is a large part
    out, pruned = compress_keep_075(d, tmp_path, target, SMALL)
    assert "6 of 8 per MoE layer" in capsys.readouterr().out
    fields = gguf.GGUFReader(out).fields
    assert fields[f"{view.spec.gguf_arch}.expert_count"].contents() == 6
    assert completion_tokens(out) > 0
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg[view.spec.n_experts_key] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    ids = torch.as_tensor(np.random.default_rng(1).integers(0, 512, (1, 16)))
    with torch.no_grad():
        ref = model(ids).logits
    got = LayerRunner(open_checkpoint(pruned)).forward(ids)
    assert torch.isfinite(ref).all() and (got - ref).abs().max().item() < 1e-4


def test_hunyuan_ntk_alpha_rope_and_tied_embeddings(tmp_path: Path) -> None:
    """Hunyuan-A13B's config as released: "dynamic" rope with a fixed alpha (NTK-alpha: the base stretched to
    theta * alpha^(d / (d - 2))), tied embeddings (no output tensor; llama.cpp reuses token_embd), top-k as a
    per-layer list. The F32 GGUF's logits match transformers'."""
    import torch
    import transformers

    from conftest import tiny_config, write_tiny_tokenizer
    from moepack.gguf.runtime import load_llama

    rope = {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}
    kw = tiny_config("hunyuan_v1_moe", vocab=512) | dict(tie_word_embeddings=True, rope_scaling=rope)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("hunyuan_v1_moe", **kw))
    model.eval().save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", "bpe", 512)
    out = write_gguf(open_checkpoint(tmp_path / "m"), tmp_path / "m.gguf", progress=False).path
    reader = gguf.GGUFReader(out)
    head_dim = kw["head_dim"]
    want_base = 10000.0 * 1000.0 ** (head_dim / (head_dim - 2))
    assert np.isclose(reader.fields["hunyuan-moe.rope.freq_base"].contents(), want_base, rtol=1e-6)
    assert "output.weight" not in {t.name for t in reader.tensors}
    ids = np.random.default_rng(0).integers(1, 512, 64)
    llm = load_llama(out, n_ctx=128, n_threads=2, type_k=0, type_v=0, logits_all=True)
    llm.eval(ids.tolist())
    got = np.array(llm.scores[: len(ids)])  # (T, V)
    llm.close()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)[None]).logits[0].numpy()  # (T, V)
    assert np.abs(got - ref).max() < 1e-3


def _hunyuan_release_config(cfg: dict, n_layers: int) -> dict:
    """A hunyuan_v1_moe config.json in the form Tencent released Hunyuan-A13B's: model_type "hunyuan", per-layer
    lists, attention_head_dim, remote-code flags."""
    cfg = dict(cfg, model_type="hunyuan", attention_head_dim=cfg.get("head_dim"), use_mixed_mlp_moe=True,
               use_qk_norm=True, use_cla=False, moe_intermediate_size=[cfg["intermediate_size"]] * n_layers,
               num_shared_expert=[1] * n_layers)
    cfg.pop("head_dim", None)
    return cfg


def test_hunyuan_released_config_form(tmp_path: Path) -> None:
    """model_type "hunyuan" (the release's) reads and runs as transformers' hunyuan_v1_moe; from config alone the
    A13B dimensions give the published 80B total / 13B active."""
    import torch

    from moepack.gguf.estimate import describe
    from moepack.model.runner import LayerRunner
    from moepack.model.shapes import config_view

    d = build_tiny_model("hunyuan_v1_moe", tmp_path / "m")
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 16)))
    want = LayerRunner(open_checkpoint(d)).forward(ids)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(_hunyuan_release_config(cfg, cfg["num_hidden_layers"])))
    view = open_checkpoint(d)
    assert view.spec.model_type == "hunyuan" and view.facts.top_k == 2 and view.facts.n_shared_experts == 1
    assert torch.equal(LayerRunner(view).forward(ids), want)
    a13b = {"hidden_size": 4096, "intermediate_size": 3072, "head_dim": 128, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_experts": 64, "moe_topk": [8] * 32, "num_hidden_layers": 32,
            "vocab_size": 128167, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}, "max_position_embeddings": 32768}
    (tmp_path / "a13b").mkdir()
    (tmp_path / "a13b" / "config.json").write_text(json.dumps(_hunyuan_release_config(a13b, 32)))
    desc = describe(config_view(tmp_path / "a13b"))
    assert round(desc["params_total"] / 1e9) == 80 and round(desc["params_active"] / 1e9) == 13

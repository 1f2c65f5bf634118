"""GLM-4.5 family (`glm4_moe` → llama.cpp `glm4moe`), Kimi-K2 (`kimi_k2` → `deepseek2`) and ERNIE-4.5-MoE
(`ernie4_5_moe` → `ernie4_5-moe`) end to end: compress writes a file llama.cpp loads and generates from, the pruned
checkpoint loads in transformers and its F32 GGUF gives transformers' logits; GLM's tokenizer, MTP layer, Air variant
(no q/k norm) and group-limited routing; ERNIE's (1, E) router bias, tied embeddings and MTP tensors; GLM-5
(`glm_moe_dsa` → `glm-dsa`: DeepSeek-V3's MLA + MoE with a DSA indexer, whose top-k here exceeds the context).

The parametrized checks over conftest.ARCHS (F32 logits, inspect, calibrate, prune, shapes, config-only) cover
these families too; these are the per-family ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from conftest import (DATA, TOKENIZER_KIND, _GLM_SPLIT, build_tiny_model, small_compress_options, tiny_config,
                      write_tiny_tokenizer)
from family_checks import completion_tokens, compress_keep_075, gguf_logits, hf_logits
from moepack.cli import main
from moepack.gguf.writer import write_gguf
from moepack.model.checkpoint import open_checkpoint

# arch → (config key of the routed expert count, layer 1's router correction bias, expert_gating_func written)
FAMILIES = {"glm4_moe": ("n_routed_experts", "model.layers.1.mlp.gate.e_score_correction_bias", 2),
            "kimi_k2": ("n_routed_experts", "model.layers.1.mlp.gate.e_score_correction_bias", 2),
            "ernie4_5_moe": ("moe_num_experts", "model.layers.1.mlp.moe_statics.e_score_correction_bias", None),
            "glm_moe_dsa": ("n_routed_experts", "model.layers.1.mlp.gate.e_score_correction_bias", 2)}
# shorter than test_compress's: fewer tokens and types, one criterion, the fast table, no refinement passes
SMALL = small_compress_options(calib_tokens=512, seq_len=64, selection_tokens=128, ladder="IQ2_XXS,Q4_K,Q8_0", fast=True)
# English, Python, Chinese, digits, emoji and whitespace runs (issue 27's multilingual sample)
SAMPLE = ("Hello, World! It's 2026.\n\ndef f(x):\n    return x ** 2  # square\n\t\t中文分词测试，你好世界。"
          " 1234567 3.14159 🙂🚀  trailing   spaces\n\n\n")


def _llama(path: Path, **kw: Any):
    from moepack.gguf.runtime import load_llama

    return load_llama(path, n_ctx=128, n_threads=2, type_k=0, type_v=0, **kw)


def _meta(path: Path) -> dict[str, Any]:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.") or
            k in ("tokenizer.ggml.pre", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")}


def _ids(n: int = 48, vocab: int = 512) -> np.ndarray:
    return np.random.default_rng(0).integers(1, vocab, n)


def _variant(arch: str, out: Path, **overrides: Any) -> Path:
    """A tiny checkpoint with config overrides (e.g. GLM-4.5-Air: no q/k norm) and its family's tokenizer."""
    import transformers

    cfg = transformers.AutoConfig.for_model(arch, **(tiny_config(arch, vocab=512) | overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a random correction bias (a buffer in GLM, a parameter in ERNIE)
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.rand_like(t) * 0.1)
    model.save_pretrained(out)
    write_tiny_tokenizer(out, TOKENIZER_KIND[arch], 512)
    return out


# ---------------------------------------------------------------------------------------------------- compress

@pytest.mark.parametrize("arch", FAMILIES)
def test_compress_keep_075_runs_in_llama_cpp_and_pruned_checkpoint_loads(arch: str, tmp_path: Path, capsys) -> None:
    src = build_tiny_model(arch, tmp_path / "m", tokenizer=True, vocab=512)  # width 64: K-quants fall back
    bf16 = 2 * sum(open_checkpoint(src).param_counts().values())
    out, pruned = compress_keep_075(src, tmp_path, bf16 // 2, tuple(SMALL))
    text = capsys.readouterr().out
    assert "6 of 8 per MoE layer" in text  # keep 0.75 of 8 experts
    count_key, bias, gating = FAMILIES[arch]
    gguf_arch = open_checkpoint(src).spec.gguf_arch
    meta = _meta(out)
    assert meta[f"{gguf_arch}.expert_count"] == 6 and meta.get(f"{gguf_arch}.expert_gating_func") == gating
    assert meta[f"{gguf_arch}.leading_dense_block_count"] == 1 and meta[f"{gguf_arch}.expert_shared_count"] == 1
    assert completion_tokens(out) > 0
    # the pruned checkpoint: transformers loads it, routes over 6 experts, and its F32 GGUF gives the same logits
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg[count_key] == 6
    view, kept = open_checkpoint(pruned), json.loads((pruned / "prune_plan.json").read_text())["layers"]["1"]["kept"]
    assert torch.equal(view.load(bias).reshape(-1), open_checkpoint(src).load(bias).reshape(-1)[kept])  # (E,), (1, E)
    f32 = write_gguf(view, tmp_path / "pruned.gguf", progress=False).path
    ids = _ids()
    assert np.abs(gguf_logits(f32, ids) - hf_logits(pruned, ids)).max() < 1e-3


# ---------------------------------------------------------------------------------------------------- GLM

def test_glm_metadata_and_tokenizer_as_llama_cpp_expects(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    d = build_tiny_model("glm4_moe", tmp_path / "m", tokenizer=True, vocab=512)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    meta = _meta(out)
    cfg = json.loads((d / "config.json").read_text())
    head_dim = cfg["head_dim"]
    assert meta["glm4moe.rope.dimension_count"] == head_dim // 2  # partial_rotary_factor 0.5
    assert meta["glm4moe.attention.key_length"] == head_dim and meta["glm4moe.expert_weights_scale"] == 2.5
    assert "glm4moe.nextn_predict_layers" not in meta  # the MTP layer is not written
    assert "glm4moe.expert_group_count" not in meta  # one group: not group-limited
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"blk.1.post_attention_norm.weight", "blk.1.attn_q.bias", "blk.1.attn_q_norm.weight",
            "blk.1.exp_probs_b.bias", "blk.1.ffn_up_shexp.weight", "blk.0.ffn_up.weight"} <= names
    assert "blk.1.ffn_norm.weight" not in names
    # tokenizer: llama.cpp's "glm4" pre-tokenizer, GLM's special tokens, the same ids as Hugging Face's tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert meta["tokenizer.ggml.pre"] == "glm4"
    assert meta["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|user|>")
    assert meta["tokenizer.ggml.eom_token_id"] == tok.token_to_id("<|observation|>")
    want = tok.encode(SAMPLE).ids
    llm = _llama(out, vocab_only=True)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    with_bos = llm.tokenize(SAMPLE.encode(), add_bos=True, special=False)
    llm.close()
    assert got == want and with_bos == want  # glm4 adds no BOS


def test_glm_pre_tokenizer_name() -> None:
    from moepack.gguf.vocab import pre_tokenizer_name

    def tok(added: list[str]) -> dict[str, Any]:
        steps = [{"type": "Split", "pattern": {"Regex": _GLM_SPLIT}, "behavior": "Isolated"},
                 {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
                "added_tokens": [{"id": i, "content": a, "special": True} for i, a in enumerate(added)]}

    assert pre_tokenizer_name(tok(["<|endoftext|>", "[gMASK]", "<sop>"])) == "glm4"
    assert pre_tokenizer_name(tok(["<|begin_of_text|>"])) == "llama-bpe"  # the same regex without GLM's vocabulary


def test_glm_air_variant_and_group_limited_routing(tmp_path: Path) -> None:
    """GLM-4.5-Air has no q/k norms; a router with 2 groups of which 1 is used: llama.cpp's group selection (the
    expert_group_count keys) gives transformers' logits, and config.json alone derives the checkpoint's tensors."""
    from moepack.model.shapes import config_view

    d = _variant("glm4_moe", tmp_path / "air", use_qk_norm=False, n_group=2, topk_group=1, num_hidden_layers=3,
                     first_k_dense_replace=1)
    view = open_checkpoint(d)
    assert not [n for n in view.tensors if n.endswith(("q_norm.weight", "k_norm.weight"))]
    out = write_gguf(view, tmp_path / "air.gguf", progress=False).path
    meta = _meta(out)
    assert meta["glm4moe.expert_group_count"] == 2 and meta["glm4moe.expert_group_used_count"] == 1
    ids = _ids()
    assert np.abs(gguf_logits(out, ids) - hf_logits(d, ids)).max() < 1e-3
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((d / "config.json").read_text())
    derived = config_view(tmp_path / "cfg")
    assert {n: t.shape for n, t in derived.tensors.items()} == {n: t.shape for n, t in view.tensors.items()}


def test_glm_mtp_layer_is_left_out(tmp_path: Path) -> None:
    """GLM-4.5 checkpoints carry a multi-token-prediction layer at index num_hidden_layers (its own eh_proj, enorm,
    hnorm, shared_head.* besides a full MoE layer): not calibrated, not written to the GGUF, not in the pruned
    checkpoint, whose config then says num_nextn_predict_layers 0."""
    import transformers
    from safetensors.torch import load_file, save_file

    from moepack.stages.calibrate import calibrate
    from moepack.stages.prune import PruneOptions, run_prune

    src = build_tiny_model("glm4_moe", tmp_path / "m", tokenizer=True, vocab=512)
    sd = load_file(src / "model.safetensors")
    sd.update({n.replace("layers.1.", "layers.2."): t.clone() for n, t in sd.items() if ".layers.1." in n})
    h = sd["model.norm.weight"].shape[0]
    for name, shape in (("eh_proj.weight", (h, 2 * h)), ("enorm.weight", (h,)), ("hnorm.weight", (h,)),
                        ("shared_head.norm.weight", (h,))):
        sd[f"model.layers.2.{name}"] = torch.ones(shape)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    view = open_checkpoint(src)
    assert view.facts.n_layers == 2 and 2 in view.facts.moe_layers
    out = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert not [n for n in names if n.startswith("blk.2.")] and _meta(out)["glm4moe.block_count"] == 2
    ids = _ids()
    assert np.abs(gguf_logits(out, ids) - hf_logits(src, ids)).max() < 1e-3
    st = calibrate(view, np.random.default_rng(1).integers(0, 512, (4, 24)), progress=False)
    assert sorted(st.router) == [1]
    st.write(tmp_path / "run" / "calib")
    run_prune(src, tmp_path / "run", tmp_path / "out", PruneOptions(keep=0.5), progress=False)
    assert not [n for n in open_checkpoint(tmp_path / "out").tensors if ".layers.2." in n]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- Kimi-K2

def test_kimi_k2_facts_and_runner(tmp_path: Path, capsys) -> None:
    """Kimi-K2's config says model_type kimi_k2, which transformers has no class for: moepack reads it as
    DeepSeek-V3 (one expert group, so routing is not group-limited) and runs DeepSeek-V3's transformers layers."""
    from moepack.model.runner import LayerRunner
    from moepack.stages.prune import PruneOptions, plan_shape

    from moepack.eval.reference import hf_config_kw

    d = build_tiny_model("kimi_k2", tmp_path / "m", tokenizer=True, vocab=512)
    view = open_checkpoint(d)
    f = view.facts
    assert (f.gguf_arch, f.scoring, f.router_bias, f.n_group, f.topk_group) == ("deepseek2", "sigmoid", True, 1, 1)
    runner = LayerRunner(view)
    assert type(runner._skeleton).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.as_tensor(_ids()[None])
    assert np.abs(runner.forward(ids).numpy()[0] - hf_logits(d, ids.numpy()[0])).max() < 1e-4
    assert plan_shape(view, PruneOptions(keep=0.75)).n_group == 1  # no group rounding for one group
    with pytest.raises(Exception, match="top-2"):
        plan_shape(view, PruneOptions(keep=0.125, top_k=1))  # 1 expert left: the top-2 group score needs 2
    assert main(["inspect", str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "kimi_k2" and report["routing"]["n_group"] == 1
    # eval's Hugging Face reference: DeepSeek-V3's transformers model (plain AutoModel knows no kimi_k2 without the
    # hub's remote code); the F32 GGUF matches it
    assert hf_config_kw(d)["config"].model_type == "deepseek_v3"
    f32 = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    assert main(["eval", str(f32), "--reference", str(d), "--text", str(DATA / "tinystories-valid.txt"), "--tokens",
                 "256", "--window", "64", "--no-speed", "--cache-dir", str(tmp_path / "cache"), "--json-out",
                 str(tmp_path / "eval.json")]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())["models"][0]
    assert abs(row["kld_mean"]) < 1e-6 and row["tokenizer_agrees"]


# ---------------------------------------------------------------------------------------------------- ERNIE

def test_ernie_tied_embeddings_and_mtp_tensors(tmp_path: Path) -> None:
    """ERNIE-4.5-21B-A3B ties its embeddings (llama.cpp reuses token_embd as output); the 300B's MTP tensors
    (model.mtp_*) are not part of the served model and are skipped, as the converter skips them."""
    from safetensors.torch import load_file, save_file

    d = _variant("ernie4_5_moe", tmp_path / "m", tie_word_embeddings=True)
    sd = load_file(d / "model.safetensors")
    h = sd["model.norm.weight"].shape[0]
    sd |= {"model.mtp_block.0.input_layernorm.weight": torch.ones(h), "model.mtp_emb_norm.0.weight": torch.ones(h),
           "model.mtp_linear_proj.0.weight": torch.ones(h, 2 * h)}
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    view = open_checkpoint(d)
    assert "lm_head.weight" not in view.tensors and not [n for n in view.tensors if "mtp" in n]
    out = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    ids = _ids()
    assert np.abs(gguf_logits(out, ids) - hf_logits(d, ids)).max() < 1e-3
    # ERNIE's SentencePiece-style vocabulary (byte fallback) tokenizes the multilingual sample as Hugging Face does
    from tokenizers import Tokenizer

    llm = _llama(out, vocab_only=True)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    llm.close()
    assert got == Tokenizer.from_file(str(d / "tokenizer.json")).encode(SAMPLE).ids


# ---------------------------------------------------------------------------------------------------- GLM-5

def test_glm5_indexer_metadata_and_types(tmp_path: Path) -> None:
    """GLM-5's DSA indexer: its head count, width, top-k and per-layer types in the metadata; its head weights
    (indexer.proj) stay F32 as the converter writes them while the other indexer matrices take the file's type."""
    d = build_tiny_model("glm_moe_dsa", tmp_path / "m", tokenizer=True, vocab=512)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", default_type="F16", progress=False).path
    meta = _meta(out)
    assert (meta["glm-dsa.attention.indexer.head_count"], meta["glm-dsa.attention.indexer.key_length"],
            meta["glm-dsa.attention.indexer.top_k"]) == (8, 128, 2048)
    assert meta["glm-dsa.attention.indexer.types"] == [True, True] and meta["tokenizer.ggml.pre"] == "glm4"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.indexer.proj.weight"] == "F32" and types["blk.1.indexer.attn_q_b.weight"] == "F16"
    assert types["blk.1.attn_k_b.weight"] == "F16"  # MLA's kv_b split as for DeepSeek-V3
    llm = _llama(out)
    assert llm.create_completion("Once upon", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] > 0
    llm.close()


def test_glm5_sparse_attention_matches_transformers(tmp_path: Path) -> None:
    """With the indexer's top-k (8) below the context (48 tokens) each query attends to the keys the indexer picks:
    llama.cpp's selection gives transformers' logits. (With 2 indexer heads, random weights give exact score ties,
    ReLU zeros, that the two top-k implementations break differently; 8 heads have none.)"""
    d = _variant("glm_moe_dsa", tmp_path / "m", index_topk=8)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    ids = _ids()
    assert np.abs(gguf_logits(out, ids) - hf_logits(d, ids)).max() < 1e-3

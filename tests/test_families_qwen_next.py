"""Qwen3-Next (hybrid gated DeltaNet + gated attention, MoE with a gated shared expert) end to end: the GGUF
layout llama.cpp's converter writes, the tokenizer, sensitivity's fake quantization, `compress --keep 0.75`
(a file llama.cpp loads and generates from, a pruned checkpoint transformers loads)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import DATA, ROOT, build_tiny_model
from family_checks import completion_tokens, compress_keep_075, meta, pruned_gguf_matches_transformers
from moepack.cli import main
from moepack.errors import MoepackError
from moepack.gguf.names import gguf_outputs
from moepack.gguf.writer import WriteError, write_gguf
from moepack.model.checkpoint import open_checkpoint

SAMPLE = ("The quick brown fox, 1234567 digits.\n\ndef f(x):\n    return x ** 2  # Python\n"
          "中文分词测试：你好，世界！ naïve café 🦊🚀   tabs\t\tand   spaces")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model("qwen3_next", tmp_path_factory.mktemp("qn") / "m", tokenizer=True, vocab=512)


def test_gguf_layout_as_the_converter_writes_it(model: Path, tmp_path: Path) -> None:
    """Tensor names, shapes, F32 tensors and values: in_proj_qkvz split per key head into attn_qkv + attn_gate,
    A_log as -exp, dt_bias as ssm_dt.bias, conv1d squeezed, zero-centred norms + 1 (not the gated ssm_norm)."""
    view = open_checkpoint(model)
    out = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    cfg = view.config
    assert {n for n in t if n.startswith("blk.0.")} == {
        "blk.0.attn_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.attn_qkv.weight",
        "blk.0.attn_gate.weight", "blk.0.ssm_ba.weight", "blk.0.ssm_conv1d.weight", "blk.0.ssm_dt.bias",
        "blk.0.ssm_a", "blk.0.ssm_norm.weight", "blk.0.ssm_out.weight", "blk.0.ffn_gate_inp.weight",
        "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight",
        "blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight",
        "blk.0.ffn_down_shexp.weight"}
    assert "blk.1.attn_q.weight" in t and "blk.1.attn_qkv.weight" not in t  # layer 1: gated full attention
    h, nk, nv = cfg["hidden_size"], cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk = cfg["linear_key_head_dim"]
    assert tuple(t["blk.0.attn_qkv.weight"].shape) == (h, 2 * nk * dk + nv * dk)  # GGUF order: (cols, rows)
    assert tuple(t["blk.0.ssm_conv1d.weight"].shape) == (cfg["linear_conv_kernel_dim"], 2 * nk * dk + nv * dk)
    assert tuple(t["blk.1.attn_q.weight"].shape) == (h, 2 * cfg["num_attention_heads"] * cfg["head_dim"])
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight"):
        assert t[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    a_log = view.load_numpy_f32("model.layers.0.linear_attn.A_log")
    assert np.allclose(np.array(t["blk.0.ssm_a"].data), -np.exp(a_log))
    assert np.allclose(np.array(t["blk.0.ssm_dt.bias"].data), view.load_numpy_f32("model.layers.0.linear_attn.dt_bias"))
    norm = view.load_numpy_f32("model.layers.1.self_attn.q_norm.weight")
    assert np.allclose(np.array(t["blk.1.attn_q_norm.weight"].data), norm + 1)
    gated = view.load_numpy_f32("model.layers.0.linear_attn.norm.weight")
    assert np.allclose(np.array(t["blk.0.ssm_norm.weight"].data), gated)
    # q of key head 1 starts the attn_qkv rows after key head 0's q: rows per head [q, k, v, z] in the checkpoint
    qkvz = view.load_numpy_f32("model.layers.0.linear_attn.in_proj_qkvz.weight")
    qkv = np.array(t["blk.0.attn_qkv.weight"].data).reshape(-1, h)
    per_head = qkvz.shape[0] // nk
    assert np.array_equal(qkv[dk:2 * dk], qkvz[per_head:per_head + dk])
    m = meta(out)
    assert (m["qwen3next.ssm.conv_kernel"], m["qwen3next.ssm.state_size"], m["qwen3next.ssm.group_count"],
            m["qwen3next.ssm.time_step_rank"], m["qwen3next.ssm.inner_size"]) == (4, dk, nk, nv, nv * dk)
    assert m["qwen3next.full_attention_interval"] == 2
    assert m["qwen3next.rope.dimension_count"] == cfg["head_dim"] // 4  # partial_rotary_factor 0.25
    assert m["qwen3next.expert_shared_feed_forward_length"] == cfg["shared_expert_intermediate_size"]


def test_layer_types_without_an_interval_are_refused(model: Path, tmp_path: Path) -> None:
    """llama.cpp rebuilds the layer types from full_attention_interval: a layout that follows none is refused."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "linear_attention"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WriteError, match="follow no interval"):
        write_gguf(open_checkpoint(d), tmp_path / "x.gguf", progress=False)


def test_vocab_tokenizes_like_hf(model: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from moepack.gguf.runtime import load_llama

    out = write_gguf(open_checkpoint(model), tmp_path / "m.gguf", progress=False).path
    want = Tokenizer.from_file(str(model / "tokenizer.json")).encode(SAMPLE).ids
    llm = load_llama(out, vocab_only=True)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    llm.close()
    assert got == want
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen2"


def test_fake_quant_inverts_the_qkvz_split(model: Path) -> None:
    """Sensitivity runs llama.cpp's weights in transformers: attn_qkv + attn_gate map back to in_proj_qkvz."""
    from moepack.gguf.writer import source_f32
    from moepack.stages.sensitivity.fakequant import to_checkpoint

    view = open_checkpoint(model)
    name = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    outs = [o for o in gguf_outputs(view) if name in o.sources]
    assert sorted(o.name for o in outs) == ["blk.0.attn_gate.weight", "blk.0.attn_qkv.weight"]
    assert {o.key for o in outs} == {"blk.0.ssm_in.weight"}  # one sensitivity group, one importance matrix
    back = to_checkpoint(view, name, outs, [source_f32(view, o) for o in outs])
    assert np.array_equal(back, view.load_numpy_f32(name))


def test_compress_runs_in_llama_cpp_and_the_pruned_checkpoint_in_transformers(tmp_path_factory) -> None:
    import transformers

    root = tmp_path_factory.mktemp("qnc")
    src = build_tiny_model("qwen3_next", root / "m", tokenizer=True, hidden=256, ffn=256, n_experts=8, vocab=512)
    out, pruned = compress_keep_075(src, root, 2 * sum(open_checkpoint(src).param_counts().values()) // 4)
    assert meta(out)["qwen3next.expert_count"] == 6 and completion_tokens(out) > 0
    m = transformers.AutoModelForCausalLM.from_pretrained(pruned)
    assert m.config.num_experts == 6 and m.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    assert pruned_gguf_matches_transformers(pruned, root) < 1e-3


def test_dense_layers_are_refused_for_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp's qwen3next has a router in every layer; a config with mlp_only_layers cannot be written."""
    import torch
    import transformers

    from conftest import tiny_config, write_tiny_tokenizer

    cfg = transformers.AutoConfig.for_model("qwen3_next", **tiny_config("qwen3_next", vocab=512), mlp_only_layers=[0])
    torch.manual_seed(0)
    d = tmp_path / "m"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    write_tiny_tokenizer(d, "bpe", 512)
    with pytest.raises(MoepackError, match="qwen3next"):  # no llama.cpp name for a dense FFN in this arch
        write_gguf(open_checkpoint(d), tmp_path / "x.gguf", progress=False)


def test_kv_cache_counts_attention_layers_and_the_recurrent_state(model: Path) -> None:
    """llama.cpp's hybrid memory: K/V for the full-attention layers only, plus the F32 recurrent state of the
    linear-attention layers (the tiny model: 1 of each; llama.cpp logs 0.12 MiB KV at 1024 cells, R + S 5632 B)."""
    from moepack.stages.footprint import kv_cache_bytes

    view = open_checkpoint(model)
    kv = 1 * 1024 * 2 * 16 * 2 * 2  # 1 attention layer × cells × kv heads × head_dim × f16 × (K, V)
    conv, state = (4 - 1) * (2 * 2 * 16 + 4 * 16), 16 * 4 * 16  # (K − 1)(2·n_k·dk + n_v·dv), dk·n_v·dv
    assert kv_cache_bytes(view, 1024) == kv + 4 * (conv + state) == 131_072 + 5_632


def test_imatrix_file_names_the_split_tensors(model: Path, tmp_path: Path) -> None:
    """The importance matrix exported for llama-quantize names attn_qkv and attn_gate (the tensors the GGUF holds),
    from in_proj_qkvz's inputs; calibration records every linear-attention projection."""
    from moepack.gguf.imatrix import ImatrixFile, read_imatrix, write_imatrix_gguf
    from moepack.stages.calibrate import calibrate

    view = open_checkpoint(model)
    st = calibrate(view, np.random.default_rng(0).integers(0, 512, (2, 16)), progress=False)
    path = write_imatrix_gguf(ImatrixFile.of_stats(st, view), tmp_path / "imatrix.gguf")
    entries = read_imatrix(path).entries
    for name in ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_ba.weight", "blk.0.ssm_out.weight"):
        assert name in entries and entries[name].counts[0] == 32, name
    assert np.array_equal(entries["blk.0.attn_qkv.weight"].sums, entries["blk.0.attn_gate.weight"].sums)


def test_qwen35_split_is_named_and_tokenizes_like_hf(model: Path, tmp_path: Path) -> None:
    """Qwen3.5's tokenizer.json split (marks \\p{M} inside words) → llama.cpp's "qwen35" pre-tokenizer, which
    splits decomposed accents and Devanagari vowel signs as Hugging Face does."""
    import shutil

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from moepack.gguf.runtime import load_llama
    from moepack.gguf.vocab import QWEN35_SPLIT

    d = tmp_path / "m"
    shutil.copytree(model, d)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated"),
                                                 byte_level])
    tok.decoder = decoders.ByteLevel()
    marked = "cafe\u0301 e\u0301te\u0301 re\u0301sume\u0301 नमस्ते दुनिया"  # decomposed accents, Devanagari signs
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000].splitlines() + [marked] * 200
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen35"
    sample = SAMPLE + " " + marked
    llm = load_llama(out, vocab_only=True)
    got = llm.tokenize(sample.encode(), add_bos=False, special=False)
    llm.close()
    assert got == tok.encode(sample).ids


def test_published_config_plans_80b_a3b(capsys) -> None:
    """Qwen3-Next-80B-A3B's config.json alone: 80B total, ~3B active without embeddings (the MTP head, which
    llama.cpp does not run, left out), and a KV cache for its 12 full-attention layers only."""
    from moepack.model.shapes import config_view
    from moepack.stages.footprint import kv_cache_bytes

    d = ROOT / "data" / "configs" / "qwen3-next-80b-a3b-thinking"
    assert main(["inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 79.5e9 < info["params_total"] < 80.5e9 and 3.0e9 < info["params_active_without_embedding"] < 3.9e9
    kv = 12 * 32768 * 2 * 256 * 2 * 2  # full-attention layers × ctx × kv heads × head_dim × f16 × (K, V)
    state = 36 * 4 * ((4 - 1) * (2 * 16 * 128 + 32 * 128) + 128 * 32 * 128)  # 36 DeltaNet layers, F32
    assert kv_cache_bytes(config_view(d), 32768) == kv + state


def test_multi_token_prediction_head_is_not_read(model: Path, tmp_path: Path) -> None:
    """Hub checkpoints store the MTP head under `mtp.` (outside model.layers); it is not part of the served model."""
    import shutil

    import torch
    from safetensors.torch import save_file

    d = tmp_path / "m"
    shutil.copytree(model, d)
    save_file({"mtp.fc.weight": torch.zeros(64, 128), "mtp.layers.0.input_layernorm.weight": torch.zeros(64)},
              str(d / "mtp.safetensors"))
    assert set(open_checkpoint(d).tensors) == set(open_checkpoint(model).tensors)

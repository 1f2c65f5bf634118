"""Qwen3.5-MoE (Qwen3-Next's hybrid with separate DeltaNet inputs, tiled value heads and M-RoPE) end to end: the
GGUF layout llama.cpp's converter writes, the hub's multimodal layout with fused experts, the tokenizer,
`compress --keep 0.75` (a file llama.cpp loads and generates from, a pruned checkpoint transformers loads)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import DATA, ROOT, build_tiny_model
from family_checks import completion_tokens, compress_keep_075, meta, pruned_gguf_matches_transformers
from moepack.cli import main
from moepack.gguf.writer import WriteError, write_gguf
from moepack.model.checkpoint import open_checkpoint

ARCH = "qwen3_5_moe_text"
SAMPLE = ("The quick brown fox, 1234567 digits.\n\ndef f(x):\n    return x ** 2  # Python\n"
          "中文分词测试：你好，世界！ naïve café 🦊🚀   tabs\t\tand   spaces cafe\u0301 नमस्ते दुनिया")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(ARCH, tmp_path_factory.mktemp("q35") / "m", tokenizer=True, vocab=512)


def _tiled(x: np.ndarray, n_k: int, r: int, d: int) -> np.ndarray:
    """Value heads grouped by key head (n_k, r, d, ...) → tiled (r, n_k, d, ...), along the first axis."""
    return x.reshape(n_k, r, d, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def test_gguf_layout_as_the_converter_writes_it(model: Path, tmp_path: Path) -> None:
    """Names, F32 tensors, values: separate DeltaNet inputs, value heads tiled (2 key heads, 4 value heads),
    A_log as -exp, zero-centred norms + 1, M-RoPE sections."""
    view = open_checkpoint(model)
    out = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    cfg = view.config
    assert {n for n in t if n.startswith("blk.0.")} == {
        "blk.0.attn_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.attn_qkv.weight",
        "blk.0.attn_gate.weight", "blk.0.ssm_alpha.weight", "blk.0.ssm_beta.weight", "blk.0.ssm_conv1d.weight",
        "blk.0.ssm_dt.bias", "blk.0.ssm_a", "blk.0.ssm_norm.weight", "blk.0.ssm_out.weight",
        "blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight",
        "blk.0.ffn_down_exps.weight", "blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_gate_shexp.weight",
        "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight"}
    assert "blk.1.attn_q.weight" in t and "blk.1.attn_qkv.weight" not in t  # layer 1: gated full attention
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight"):
        assert t[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    h, n_k, n_v, d = cfg["hidden_size"], cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], 16
    r, qk = n_v // n_k, 2 * n_k * d
    load = lambda k: view.load_numpy_f32(f"model.layers.0.linear_attn.{k}")  # noqa: E731
    qkv = np.array(t["blk.0.attn_qkv.weight"].data).reshape(-1, h)
    assert np.array_equal(qkv[:qk], load("in_proj_qkv.weight")[:qk])  # q and k rows as stored
    assert np.array_equal(qkv[qk:], _tiled(load("in_proj_qkv.weight")[qk:], n_k, r, d))
    assert not np.array_equal(qkv[qk:], load("in_proj_qkv.weight")[qk:])  # the reordering does something
    gate = np.array(t["blk.0.attn_gate.weight"].data).reshape(-1, h)
    assert np.array_equal(gate, _tiled(load("in_proj_z.weight"), n_k, r, d))
    assert np.array_equal(np.array(t["blk.0.ssm_alpha.weight"].data), _tiled(load("in_proj_a.weight"), n_k, r, 1))
    assert np.allclose(np.array(t["blk.0.ssm_a"].data), _tiled(-np.exp(load("A_log")), n_k, r, 1))
    assert np.array_equal(np.array(t["blk.0.ssm_dt.bias"].data), _tiled(load("dt_bias"), n_k, r, 1))
    conv = np.array(t["blk.0.ssm_conv1d.weight"].data)  # (channels, kernel)
    assert np.array_equal(conv[qk:], _tiled(load("conv1d.weight")[qk:, 0], n_k, r, d))
    ssm_out = np.array(t["blk.0.ssm_out.weight"].data)  # (H, n_v·dv): columns tiled
    assert np.array_equal(ssm_out, _tiled(load("out_proj.weight").T, n_k, r, d).T)
    norm = view.load_numpy_f32("model.layers.1.self_attn.q_norm.weight")
    assert np.allclose(np.array(t["blk.1.attn_q_norm.weight"].data), norm + 1)
    assert np.array_equal(np.array(t["blk.0.ssm_norm.weight"].data), load("norm.weight"))  # gated: no +1
    m = meta(out)
    assert m["general.architecture"] == "qwen35moe"
    assert list(m["qwen35moe.rope.dimension_sections"]) == [1, 1, 0, 0]
    assert m["qwen35moe.full_attention_interval"] == 2 and m["qwen35moe.rope.dimension_count"] == 4
    assert (m["qwen35moe.ssm.state_size"], m["qwen35moe.ssm.group_count"], m["qwen35moe.ssm.time_step_rank"],
            m["qwen35moe.ssm.inner_size"]) == (d, n_k, n_v, n_v * d)


def test_mrope_sections_wider_than_the_rotary_dims_are_refused(model: Path, tmp_path: Path) -> None:
    """The converter's default sections [11, 11, 10] need 32 rotary dimensions; ggml asserts at the first decode
    when a head rotates fewer: refused when writing, with the reason."""
    d = tmp_path / "m"
    shutil.copytree(model, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_parameters"]["mrope_section"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WriteError, match="mrope_section"):
        write_gguf(open_checkpoint(d), tmp_path / "x.gguf", progress=False)


def _hub_layout(src: Path, dst: Path) -> None:
    """`src` (what save_pretrained writes for Qwen3_5MoeForCausalLM) as the hub's Qwen3_5MoeForConditionalGeneration
    stores it: text weights under model.language_model., experts fused (E, 2I, H) / (E, H, I), a vision tensor and
    an MTP head beside them, the text config under text_config."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    per: dict[str, dict[int, torch.Tensor]] = {}
    for name, x in sd.items():
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:
            per.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = x
        else:
            out[name] = x
    for key in sorted(k for k in per if k.endswith(".gate_proj")):
        base = key[: -len(".gate_proj")]
        n = len(per[key])
        gate_up = [torch.cat([per[key][e], per[base + ".up_proj"][e]]) for e in range(n)]  # (2I, H) each
        out[f"{base}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, H)
        out[f"{base}.down_proj"] = torch.stack([per[base + ".down_proj"][e] for e in range(n)])
    out = {(n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n): x
           for n, x in out.items()}
    out["model.visual.patch_embed.proj.weight"] = torch.zeros(8, 3, 2, 2)
    out["mtp.fc.weight"] = torch.zeros(64, 128)
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    text = json.loads((src / "config.json").read_text())
    cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
           "text_config": text, "vision_config": {"depth": 1}, "tie_word_embeddings": False}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)


def test_hub_layout_reads_as_the_text_model(model: Path, tmp_path: Path) -> None:
    """The multimodal hub checkpoint with fused experts gives the text model's tensors and the same GGUF."""
    hub = tmp_path / "hub"
    _hub_layout(model, hub)
    view, text = open_checkpoint(hub), open_checkpoint(model)
    assert view.spec.model_type == ARCH and set(view.tensors) == set(text.tensors)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert np.array_equal(view.load_numpy_f32(name), text.load_numpy_f32(name))
    a = gguf.GGUFReader(write_gguf(view, tmp_path / "a.gguf", progress=False).path)
    b = {t.name: t for t in gguf.GGUFReader(write_gguf(text, tmp_path / "b.gguf", progress=False).path).tensors}
    assert len(a.tensors) == len(b)
    for t in a.tensors:
        assert np.array_equal(np.array(t.data), np.array(b[t.name].data)), t.name


def test_qwen35_split_tokenizes_like_hf(model: Path, tmp_path: Path) -> None:
    """Qwen3.5's tokenizer.json split (marks \\p{M} inside words) → llama.cpp's "qwen35" pre-tokenizer: the same
    ids as Hugging Face tokenizers on the multilingual sample."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from moepack.gguf.runtime import load_llama
    from moepack.gguf.vocab import QWEN35_SPLIT

    d = tmp_path / "m"
    shutil.copytree(model, d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000].splitlines() + [SAMPLE] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen35"
    llm = load_llama(out, vocab_only=True)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    llm.close()
    assert got == tok.encode(SAMPLE).ids


def test_compress_runs_in_llama_cpp_and_the_pruned_checkpoint_in_transformers(tmp_path_factory) -> None:
    import transformers

    root = tmp_path_factory.mktemp("q35c")
    src = build_tiny_model(ARCH, root / "m", tokenizer=True, hidden=256, ffn=256, n_experts=8, vocab=512)
    out, pruned = compress_keep_075(src, root, 2 * sum(open_checkpoint(src).param_counts().values()) // 4)
    assert meta(out)["qwen35moe.expert_count"] == 6 and completion_tokens(out) > 0
    m = transformers.AutoModelForCausalLM.from_pretrained(pruned)
    assert m.config.num_experts == 6 and m.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    assert pruned_gguf_matches_transformers(pruned, root) < 1e-3


def test_published_config_plans_35b_a3b(capsys) -> None:
    """Qwen3.5-35B-A3B's hub config.json alone (text_config of the multimodal release): the text model's ~35B
    total and ~3B active parameters, a KV cache for its 10 full-attention layers only."""
    from moepack.model.shapes import config_view
    from moepack.stages.footprint import kv_cache_bytes

    d = ROOT / "data" / "configs" / "qwen3.5-35b-a3b"
    assert main(["inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 33e9 < info["params_total"] < 36e9 and 2.0e9 < info["params_active_without_embedding"] < 3.5e9, info
    kv = 10 * 32768 * 2 * 256 * 2 * 2  # full-attention layers × ctx × kv heads × head_dim × f16 × (K, V)
    state = 30 * 4 * ((4 - 1) * (2 * 16 * 128 + 32 * 128) + 128 * 32 * 128)  # 30 DeltaNet layers, F32
    assert kv_cache_bytes(config_view(d), 32768) == kv + state


def test_imatrix_follows_the_tiled_value_heads(model: Path) -> None:
    """ssm_out's input columns are reordered in the GGUF: its importance rows (used when quantizing and exported
    for llama-quantize) are reordered with them; the row-reordered inputs keep theirs."""
    from moepack.gguf.imatrix import ImatrixFile
    from moepack.stages.calibrate import calibrate

    view = open_checkpoint(model)
    st = calibrate(view, np.random.default_rng(0).integers(0, 512, (2, 16)), progress=False)
    entries = ImatrixFile.of_stats(st, view).entries
    cols = st.imatrix["model.layers.0.linear_attn.out_proj.weight"].sums.reshape(-1)  # (n_v·dv,), grouped
    got = entries["blk.0.ssm_out.weight"].sums.reshape(-1)
    assert np.array_equal(got, _tiled(cols, 2, 2, 16)) and not np.array_equal(got, cols)
    for name in ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_alpha.weight"):
        assert entries[name].counts[0] == 32, name


def test_hub_layout_prunes_to_a_text_checkpoint(model: Path, tmp_path: Path) -> None:
    """Calibrating and pruning the hub layout writes the text model transformers loads: the kept experts'
    stacked weights and router rows, nothing of the vision tower."""
    import torch
    import transformers

    from moepack.stages.calibrate import calibrate
    from moepack.stages.prune import PruneOptions, run_prune

    hub = tmp_path / "hub"
    _hub_layout(model, hub)
    ids = np.random.default_rng(1).integers(0, 512, (2, 16))
    calibrate(open_checkpoint(hub), ids, progress=False).write(tmp_path / "run" / "calib")
    plan = run_prune(hub, tmp_path / "run", tmp_path / "out", PruneOptions(keep=0.5), progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == ARCH and cfg["num_experts"] == 4
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    orig = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for layer, d in plan.layers.items():
        p, o = pruned.model.layers[int(layer)].mlp, orig.model.layers[int(layer)].mlp
        assert torch.equal(p.experts.gate_up_proj, o.experts.gate_up_proj[d.kept])
        assert torch.equal(p.experts.down_proj, o.experts.down_proj[d.kept])
        assert torch.equal(p.gate.weight, o.gate.weight[d.kept])

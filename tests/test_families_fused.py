"""Families whose checkpoints fuse their experts into 3-D tensors (issue 27: gpt-oss, Llama 4), end to end on tiny
random models as transformers' save_pretrained writes them: the reader's per-expert split equals slices of the
stacked tensors (and stacks back bit for bit), calibration computes what transformers computes and records the router
as it routes, `compress --keep 0.75` writes a file llama.cpp loads and generates from, the pruned checkpoint holds the
stacked layout and loads in transformers, and the family's tokenizer tokenizes a multilingual sample as Hugging Face
does; Llama 4 also as released (multimodal) and with its llama3 RoPE scaling. The F32 logits check over
conftest.ARCHS is test_gguf_out's."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import build_tiny_model, small_compress_options
from family_checks import completion_tokens, compress_keep_075, gguf_token_ids, hf_token_ids
from moepack.gguf.writer import write_gguf
from moepack.model.checkpoint import open_checkpoint

FAMILIES = ("gpt_oss", "llama4_text")
PRE = {"gpt_oss": "gpt-4o", "llama4_text": "llama4"}  # tokenizer.ggml.pre as llama.cpp's converter writes it
# compress end to end: the family's checkpoint as released (Llama 4: multimodal) → (stacked expert tensor of the
# pruned checkpoint, the pruned checkpoint's model_type)
COMPRESS = {"gpt_oss": ("model.layers.0.mlp.experts.gate_up_proj", "gpt_oss"),
            "llama4": ("model.layers.1.feed_forward.experts.gate_up_proj", "llama4_text")}
SMALL = small_compress_options(calib_tokens=512, ladder="IQ3_S,Q4_K,Q6_K,Q8_0", fast=True)
SAMPLE = ("Hello World! It's 2026; they'll say \"naïve café\".\n\n"
          "def add(a, b):\n    return a + b  # 1234567 + 89\n\t\tindented\n"
          "中文分词测试，日本語のテキスト。한국어 🤖🎉 emoji  \n   trailing   spaces\n")
IDS = np.random.default_rng(2).integers(0, 256, (4, 24))  # (N, L)


def _tiny(arch: str, root: Path, **kw) -> Path:
    return build_tiny_model(arch, root / arch, tokenizer=True, vocab=512, **kw)


def test_gpt_oss_split_equals_slices_and_stacks_back(shared_tiny_model) -> None:
    from safetensors.torch import load_file

    from moepack.model.fused import stacked_view

    d = shared_tiny_model("gpt_oss")
    raw = load_file(d / "model.safetensors")
    view = open_checkpoint(d)
    x = "model.layers.1.mlp.experts"
    assert f"{x}.gate_up_proj" not in view.tensors
    gu, gub = raw[f"{x}.gate_up_proj"], raw[f"{x}.gate_up_proj_bias"]  # (E, H, 2I), (E, 2I)
    dn, dnb = raw[f"{x}.down_proj"], raw[f"{x}.down_proj_bias"]  # (E, I, H), (E, H)
    e, h, i2 = gu.shape
    for xid in range(e):
        p = f"{x}.{xid}"
        assert view.tensors[f"{p}.gate_proj.weight"].shape == (i2 // 2, h)
        assert torch.equal(view.load(f"{p}.gate_proj.weight"), gu[xid, :, 0::2].T)  # gate: even columns
        assert torch.equal(view.load(f"{p}.up_proj.weight"), gu[xid, :, 1::2].T)  # up: odd columns
        assert torch.equal(view.load(f"{p}.down_proj.weight"), dn[xid].T)  # (H, I)
        assert torch.equal(view.load(f"{p}.gate_proj.bias"), gub[xid, 0::2])
        assert torch.equal(view.load(f"{p}.up_proj.bias"), gub[xid, 1::2])
        assert torch.equal(view.load(f"{p}.down_proj.bias"), dnb[xid])
        assert view.tensors[f"{p}.gate_proj.weight"].stored.parts[0].nbytes == gu.numel() * 4 // e  # one expert
    back = stacked_view(view)
    assert set(back.tensors) == set(raw)
    for name, t in raw.items():
        assert back.tensors[name].shape == tuple(t.shape) and torch.equal(back.load(name), t), name


def test_gpt_oss_calibration_matches_transformers_and_its_router(shared_tiny_model) -> None:
    """The instrumented experts (biases, transposed weights, interleaved clamped SwiGLU) leave the logits as
    transformers computes them, and the recorded routing weights are the router's: softmax over the chosen k
    logits, router bias included."""
    import transformers

    from moepack.model.runner import LayerRunner
    from moepack.stages.calib_hooks import Accumulator, preparer

    d = shared_tiny_model("gpt_oss")
    view = open_checkpoint(d)
    ids = torch.as_tensor(IDS)
    acc = Accumulator()
    runner = LayerRunner(view)
    got = runner.logits(runner.run(runner.embed(ids), prepare=preparer(view, acc)))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        ref = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    k = view.facts.top_k
    for i, x in seen.items():
        r = model.model.layers[i].mlp.router
        logits = x @ r.weight.T + r.bias  # (T, E)
        top, idx = logits.topk(k, dim=-1)
        w = torch.softmax(top, dim=-1)  # (T, k)
        want_counts = torch.bincount(idx.reshape(-1), minlength=view.facts.n_experts).double()
        want_weights = torch.zeros(view.facts.n_experts, dtype=torch.float64).index_add_(
            0, idx.reshape(-1), w.reshape(-1).double())
        assert torch.equal(acc.router[i]["counts"], want_counts)
        assert torch.allclose(acc.router[i]["weight_sum"], want_weights, atol=1e-5)
    gate = acc.sums["model.layers.0.mlp.experts.gate_proj.weight"]
    assert gate.shape == (view.facts.n_experts, view.facts.hidden)
    assert torch.equal(acc.counts["model.layers.0.mlp.experts.down_proj.weight"], acc.router[0]["counts"])


@pytest.mark.parametrize("arch", FAMILIES)
def test_tokenizer_matches_hf(arch: str, tmp_path: Path) -> None:
    d = _tiny(arch, tmp_path)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == PRE[arch]
    assert gguf_token_ids(out, SAMPLE) == hf_token_ids(d, SAMPLE)


def test_gpt_oss_gguf_layout(shared_tiny_model, tmp_path: Path) -> None:
    """As the converter writes gpt-oss: gate/up/down stacked with their biases, sinks, router bias, the window."""
    d = build_tiny_model("gpt_oss", tmp_path / "m", tokenizer=True, vocab=512)
    view = open_checkpoint(d)
    out = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    r = gguf.GGUFReader(out)
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in r.tensors}  # numpy order
    e, h, f = view.facts.n_experts, view.facts.hidden, view.facts.expert_ffn
    nh = view.config["num_attention_heads"]
    assert shapes["blk.0.ffn_gate_exps.weight"] == (e, f, h) and shapes["blk.0.ffn_down_exps.weight"] == (e, h, f)
    assert shapes["blk.0.ffn_up_exps.bias"] == (e, f) and shapes["blk.0.ffn_down_exps.bias"] == (e, h)
    assert shapes["blk.0.attn_sinks.weight"] == (nh,) and shapes["blk.0.ffn_gate_inp.bias"] == (e,)
    assert "blk.0.post_attention_norm.weight" in shapes and "blk.0.attn_output.bias" in shapes
    assert r.fields["gpt-oss.attention.sliding_window"].contents() == view.config["sliding_window"]
    assert r.fields["gpt-oss.expert_feed_forward_length"].contents() == f


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(COMPRESS))
def test_compress_runs_in_llama_cpp_and_pruned_loads_in_transformers(arch: str, tmp_path: Path, capsys) -> None:
    import transformers
    from safetensors import safe_open

    from moepack.model.runner import LayerRunner

    d = (_tiny_llama4_multimodal(tmp_path / arch, hidden=256, ffn=256) if arch == "llama4"
         else _tiny(arch, tmp_path, hidden=256, ffn=256))
    view = open_checkpoint(d)
    target = 2 * sum(view.param_counts().values()) // 4  # a quarter of the bf16 size
    out, pruned = compress_keep_075(d, tmp_path, target, SMALL)
    assert "6 of 8 per MoE layer" in capsys.readouterr().out
    fields = gguf.GGUFReader(out).fields
    assert fields[f"{view.spec.gguf_arch}.expert_count"].contents() == 6
    assert completion_tokens(out) > 0
    cfg = json.loads((pruned / "config.json").read_text())
    stacked, model_type = COMPRESS[arch]
    assert cfg[view.spec.n_experts_key] == 6 and cfg["model_type"] == model_type
    with safe_open(str(pruned / "model.safetensors"), "pt") as f:  # the stacked layout transformers loads
        keys = set(f.keys())
        assert f.get_slice(stacked).get_shape() == [6, 256, 512]
        if arch == "gpt_oss":
            assert f.get_slice("model.layers.0.mlp.router.bias").get_shape() == [6]
    assert not any(".experts.0." in k for k in keys)
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    ids = torch.as_tensor(np.random.default_rng(1).integers(0, 512, (1, 16)))
    with torch.no_grad():
        ref = model(ids).logits
    got = LayerRunner(open_checkpoint(pruned)).forward(ids)
    assert torch.isfinite(ref).all() and (got - ref).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------- Llama 4

def _tiny_llama4_multimodal(out: Path, **kw) -> Path:
    """Llama 4 as released: Llama4ForConditionalGeneration (a one-layer vision tower beside the text model),
    config under text_config, text weights under language_model., with a Llama 4-style tokenizer."""
    import transformers

    from conftest import tiny_config, write_tiny_tokenizer

    text = transformers.AutoConfig.for_model("llama4_text", **tiny_config("llama4_text", vocab=512, **kw))
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text.to_dict(),
                                                                                  vision_config=vision))
    model.save_pretrained(out)
    write_tiny_tokenizer(out, "llama4", 512)
    return out


def test_llama4_split_and_multimodal_checkpoint(tmp_path: Path) -> None:
    """Per-expert tensors are the gate | up halves of the stacked gate_up_proj; the text model of the multimodal
    checkpoint is read from text_config and language_model.*, and its F32 GGUF gives transformers' logits."""
    from safetensors.torch import load_file

    from test_gguf_out import _gguf_logits, _ids

    d = _tiny_llama4_multimodal(tmp_path / "m")
    raw = load_file(d / "model.safetensors")
    view = open_checkpoint(d)
    assert view.spec.model_type == "llama4_text" and view.facts.moe_layers == (1, 3)
    assert not any(n.startswith(("language_model.", "vision_model.", "multi_modal")) for n in view.tensors)
    gu = raw["language_model.model.layers.1.feed_forward.experts.gate_up_proj"]  # (E, H, 2I)
    i = gu.shape[-1] // 2
    for xid in range(gu.shape[0]):
        p = f"model.layers.1.feed_forward.experts.{xid}"
        assert torch.equal(view.load(f"{p}.gate_proj.weight"), gu[xid, :, :i].T)
        assert torch.equal(view.load(f"{p}.up_proj.weight"), gu[xid, :, i:].T)
    out = write_gguf(view, tmp_path / "m.gguf", progress=False).path
    r = gguf.GGUFReader(out)
    names = {t.name for t in r.tensors}
    assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_gate_shexp.weight"} <= names
    assert "blk.0.ffn_gate_exps.weight" not in names
    assert r.fields["llama4.interleave_moe_layer_step"].contents() == 2
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama4"
    import transformers

    model = transformers.Llama4ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    ids = _ids(512)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(_gguf_logits(out, ids) - ref).max() < 1e-3


def test_llama4_calibration_records_the_sigmoid_router(shared_tiny_model) -> None:
    """The instrumented MoE block (input scaled by the score, shared expert beside) leaves transformers' logits;
    routing weights are the sigmoid of the chosen logits."""
    import transformers

    from moepack.model.runner import LayerRunner
    from moepack.stages.calib_hooks import Accumulator, preparer

    d = shared_tiny_model("llama4_text", top_k=1)
    view = open_checkpoint(d)
    ids = torch.as_tensor(IDS)
    acc = Accumulator()
    runner = LayerRunner(view)
    got = runner.logits(runner.run(runner.embed(ids), prepare=preparer(view, acc)))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    for i in view.facts.moe_layers:
        model.model.layers[i].feed_forward.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        ref = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    for i, x in seen.items():
        logits = model.model.layers[i].feed_forward.router(x)[1]  # (T, E)
        top, idx = logits.topk(1, dim=-1)
        want = torch.zeros(view.facts.n_experts, dtype=torch.float64).index_add_(
            0, idx.reshape(-1), torch.sigmoid(top).reshape(-1).double())
        assert torch.equal(acc.router[i]["counts"], torch.bincount(idx.reshape(-1), minlength=len(want)).double())
        assert torch.allclose(acc.router[i]["weight_sum"], want, atol=1e-5)


def test_llama4_llama3_rope_scaling_writes_rope_freqs(tmp_path: Path) -> None:
    """Llama 4's releases scale RoPE llama3-style: the GGUF carries the converter's rope_freqs tensor (one factor
    per frequency: 1, blended, `factor`) and its F32 logits are transformers'."""
    import transformers

    from conftest import tiny_config, write_tiny_tokenizer
    from test_gguf_out import _gguf_logits, _hf_logits, _ids

    rope = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}  # head_dim 16: all three regimes
    cfg = transformers.AutoConfig.for_model("llama4_text", **tiny_config("llama4_text", vocab=512),
                                            rope_parameters=rope)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", "llama4", 512)
    out = write_gguf(open_checkpoint(tmp_path / "m"), tmp_path / "m.gguf", progress=False).path
    freqs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    assert freqs.shape == (8,) and freqs[0] == 1.0 and 1.0 < freqs[1] < 16.0 and np.all(freqs[2:] == 16.0)
    ids = _ids(512)
    assert np.abs(_gguf_logits(out, ids) - _hf_logits(tmp_path / "m", ids)).max() < 1e-3

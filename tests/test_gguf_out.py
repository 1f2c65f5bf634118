"""The GGUF writer against llama.cpp itself: names, metadata, vocab, per-tensor types, sizes, determinism.

Logits: llama.cpp runs with an F32 KV cache (type_k = type_v = 0); its default F16 cache alone adds ~1e-2 on the
trained fixtures. Bounds: F32 GGUF ≤ 1e-3 max abs vs transformers in float32; BF16 GGUF (weights and matmul
inputs rounded to bf16 by llama.cpp): per token median of max |Δ| ≤ 2 % of the largest |logit|, mean |Δ| ≤ 0.2 %
of it, top-1 agreement ≥ 90 % (a bf16 rounding can flip a near-tie in top-k routing, so no bound on the max).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from conftest import ARCHS, build_tiny_model, fixture_dir
from moepack.cli import main
from moepack.gguf import kernels as ggml
from moepack.gguf.imatrix import ImatrixFile, write_imatrix_gguf
from moepack.gguf.keys import Keys
from moepack.gguf.names import gguf_group_name, gguf_outputs, gguf_tensor_name
from moepack.gguf.recipe import RECIPE_MAX_BYTES, read_recipe, types_by_class
from moepack.gguf.types import fallback_type, tensor_bytes
from moepack.gguf.writer import WriteError, overhead_bytes, resolve_types, write_gguf
from moepack.model.checkpoint import open_checkpoint
from moepack.schema import QuantPlan

GOLDEN = Path(__file__).parent / "golden"
N_TOK = 64


# ---------------------------------------------------------------------------------------------------- helpers

def _hf_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()  # (T, V)


def _llama(path: Path, **kw: Any):
    from moepack.gguf.runtime import load_llama

    return load_llama(path, n_ctx=128, n_threads=2, type_k=0, type_v=0, **kw)


def _gguf_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    llm = _llama(path, logits_all=True)
    llm.eval(ids.tolist())
    out = np.array(llm.scores[: len(ids)])  # (T, V)
    llm.close()
    return out


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, N_TOK)


def _reader_meta(path: Path) -> dict[str, Any]:
    r = gguf.GGUFReader(path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in r.fields.items() if k not in big}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models with tokenizers, built once: every architecture at width 64, deepseek_v3 at 256."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in cache:
            arch, _, size = key.partition(":")
            kw = dict(hidden=256, ffn=256) if size == "256" else {}
            d = build_tiny_model(arch, root / key.replace(":", "-"), tokenizer=True, vocab=512, **kw)
            if arch == "deepseek_v2":  # llama.cpp ranks groups V3-style; compare on V2's plain greedy routing
                cfg = json.loads((d / "config.json").read_text())
                cfg.update(topk_method="greedy", n_group=1, topk_group=1)
                (d / "config.json").write_text(json.dumps(cfg))
            cache[key] = d
        return cache[key]

    return get  # type: ignore[return-value]


def _mixed_types(view: Any) -> dict[str, str]:
    """Attention Q8_0 (kv_b Q4_K), experts Q2_K, down projections IQ3_S, shared experts Q4_K, the rest Q6_K."""
    types = {}
    for o in gguf_outputs(view):
        if not o.quantizable:
            continue
        g = gguf_group_name(view, o.sources[0])
        types[o.key] = ("Q4_K" if g == "attn_kv_b" else "Q8_0" if g.startswith("attn") else
                        "IQ3_S" if g == "ffn_down_exps" else "Q2_K" if g.endswith("_exps") else
                        "Q4_K" if g.endswith("_shexp") else "Q6_K")
    return types


# ---------------------------------------------------------------------------------------------------- names

def test_gguf_names(models) -> None:
    view = open_checkpoint(models("deepseek_v3"))
    refs = view.tensors
    assert {gguf_tensor_name(view, n) for n in refs if ".1.mlp.experts." in n and "down_proj" in n} == \
        {"blk.1.ffn_down_exps.weight"}
    assert gguf_tensor_name(view, "model.layers.1.self_attn.kv_b_proj.weight") == "blk.1.attn_kv_b.weight"
    assert gguf_tensor_name(view, "model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name(view, "model.layers.1.mlp.gate.e_score_correction_bias") == "blk.1.exp_probs_b.bias"
    assert gguf_group_name(view, "model.layers.1.mlp.experts.3.up_proj.weight") == "ffn_up_exps"
    outs = {o.name: o for o in gguf_outputs(view)}
    e, h = view.facts.n_experts, view.facts.hidden
    assert outs["blk.1.ffn_down_exps.weight"].shape == (e, h, view.facts.expert_ffn)
    cfg = view.config
    assert outs["blk.1.attn_k_b.weight"].shape == (cfg["num_attention_heads"], cfg["kv_lora_rank"],
                                                   cfg["qk_nope_head_dim"])
    assert outs["blk.1.attn_v_b.weight"].key == "blk.1.attn_kv_b.weight"
    assert "blk.1.attn_kv_b.weight" not in outs  # MLA layout: split, as the bundled llama.cpp expects


# ---------------------------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(models, arch: str, tmp_path: Path) -> None:
    d = models(arch)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    ids = _ids(512)
    diff = np.abs(_gguf_logits(out, ids) - _hf_logits(d, ids)).max()
    assert diff < 1e-3, f"{arch}: max |Δlogit| {diff}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_yarn_rope_scaling(arch: str, tmp_path: Path) -> None:
    """YaRN as the real configs carry it (DeepSeek-V3 with mscale/mscale_all_dim → rope.scaling.yarn_log_mul)."""
    import torch
    import transformers

    from conftest import tiny_config, write_tiny_tokenizer

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
            "beta_slow": 1.0, "rope_theta": 10000.0}
    if arch == "deepseek_v3":
        rope |= {"mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = transformers.AutoConfig.for_model(arch, **tiny_config(arch, vocab=512), rope_parameters=rope)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", "bpe", 512)
    out = write_gguf(open_checkpoint(tmp_path / "m"), tmp_path / "m.gguf", progress=False).path
    assert _reader_meta(out)[f"{open_checkpoint(tmp_path / 'm').spec.gguf_arch}.rope.scaling.type"] == "yarn"
    ids = _ids(512)
    assert np.abs(_gguf_logits(out, ids) - _hf_logits(tmp_path / "m", ids)).max() < 1e-3


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_vocab_tokenizes_like_hf(models, arch: str, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    d = models(arch)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    text = "First Citizen:\nBefore we proceed any further, hear me speak.  12345 naïve 日本語!"
    want = Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids
    llm = _llama(out, vocab_only=True)
    got = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.close()
    assert got == want
    meta = _reader_meta(out)
    assert meta["tokenizer.ggml.model"] == ("llama" if arch == "mixtral" else "gpt2")


def test_pre_tokenizer_names() -> None:
    from conftest import _QWEN2_SPLIT
    from moepack.gguf.vocab import pre_tokenizer_name

    def seq(*regexes: str, byte_regex: bool = False) -> dict[str, Any]:
        steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated"} for r in regexes]
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps + [
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": byte_regex}]}}

    ds3 = (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|\s+")
    assert pre_tokenizer_name(seq(_QWEN2_SPLIT)) == "qwen2"
    assert pre_tokenizer_name(seq(_QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|"))) == "llama-bpe"
    assert pre_tokenizer_name(seq(*ds3)) == "deepseek-v3"
    assert pre_tokenizer_name(seq(byte_regex=True)) == "gpt-2"
    assert pre_tokenizer_name(seq(r"\w+")) == "default"


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_fixture_f32_and_bf16_logits(name: str, tmp_path: Path) -> None:
    d = fixture_dir(name)
    view = open_checkpoint(d)
    ids = _ids(view.facts.vocab)
    ref = _hf_logits(d, ids)
    f32 = write_gguf(view, tmp_path / "f32.gguf", progress=False).path
    assert np.abs(_gguf_logits(f32, ids) - ref).max() < 1e-3
    bf16 = write_gguf(view, tmp_path / "bf16.gguf", default_type="BF16", progress=False).path
    got = _gguf_logits(bf16, ids)
    diff, scale = np.abs(got - ref), np.abs(ref).max()
    per_token = np.median(diff.max(axis=1))  # a near-tie in top-k routing may flip one token's experts
    assert per_token < 0.02 * scale and diff.mean() < 2e-3 * scale, (per_token, diff.mean(), scale)
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9


# ---------------------------------------------------------------------------------------------------- types

def test_a_files_size_is_known_without_the_importance_matrix_its_types_need(models, tmp_path: Path) -> None:
    """Sizing a plan whose types need an importance matrix (IQ2_XXS) reads no weights and needs none (compress sizes
    llama.cpp's IQ mixtures so, to measure the one of the target size); writing it without one is refused."""
    view = open_checkpoint(models("deepseek_v3:256"))
    plain = _mixed_types(view)
    needy = plain | {k: "IQ2_XXS" for k in plain if "ffn_down_exps" in k}
    sized = overhead_bytes(view, QuantPlan.by_hand(needy), default_type=None)
    assert abs(sized - overhead_bytes(view, QuantPlan.by_hand(plain), default_type=None)) < 256
    with pytest.raises(WriteError, match="importance matrix"):
        write_gguf(view, tmp_path / "x.gguf", QuantPlan.by_hand(needy), default_type=None, progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_mixed_types_load_generate_and_size(models, tmp_path: Path) -> None:
    d = models("deepseek_v3:256")
    view = open_checkpoint(d)
    types = _mixed_types(view)
    rep = write_gguf(view, tmp_path / "mixed.gguf", QuantPlan.by_hand(types), default_type=None, progress=False)
    k_b = "blk.1.attn_k_b.weight"  # rows of qk_nope = 16: Q4_K → Q5_0 → F16, as llama-quantize falls back
    assert rep.tensor_types[k_b] == "F16" and rep.fallbacks[k_b] == "Q4_K"
    reader = gguf.GGUFReader(rep.path)
    predicted = overhead_bytes(view, QuantPlan.by_hand(types), default_type=None)  # known before any weight is read
    # the recipe is counted at its longest (test_recipe_allowance: exact at that length)
    assert 0 <= predicted - reader.data_offset <= RECIPE_MAX_BYTES
    predicted = reader.data_offset
    for o in gguf_outputs(view):
        qtype = fallback_type(types[o.key], o.n_per_row) if o.quantizable else gguf.GGMLQuantizationType.F32
        assert {t.name: t.tensor_type for t in reader.tensors}[o.name] == qtype
        predicted += gguf.GGUFWriter.ggml_pad(tensor_bytes(o.shape, qtype), gguf.GGUF_DEFAULT_ALIGNMENT)
    assert rep.path.stat().st_size == predicted
    plan = json.loads(_reader_meta(rep.path)[Keys.QUANT_PLAN])
    assert plan["tensors"]["blk.1.ffn_down_exps.weight"] == "IQ3_S"
    assert plan["fallbacks"] == {f"blk.{i}.attn_k_b.weight": "Q4_K" for i in range(view.facts.n_layers)}
    llm = _llama(rep.path)
    text = llm("Hello", max_tokens=8, temperature=0)["choices"][0]["text"]
    llm.close()
    assert isinstance(text, str)


def test_same_input_same_bytes(models, tmp_path: Path) -> None:
    view = open_checkpoint(models("deepseek_v3:256"))
    rng = np.random.default_rng(1)
    im = {o.key: rng.random((o.shape[0] if o.transform == "stack" else 1, o.n_per_row)).astype(np.float32) + 0.1
          for o in gguf_outputs(view) if o.quantizable and o.transform != "k_b"}
    types = _mixed_types(view) | {k: "IQ2_XXS" for k in im if k.endswith("gate_exps.weight")}
    digests = []
    for i in range(2):
        rep = write_gguf(view, tmp_path / f"{i}.gguf", QuantPlan.by_hand(types), default_type=None, imatrix=im,
                         threads=2, progress=False)
        digests.append(hashlib.sha256(rep.path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_row_blocks_write_the_same_bytes(models, tmp_path: Path, monkeypatch) -> None:
    """Large plain tensors (token_embd, output) are converted and quantized in row blocks to bound memory; since
    every GGML type quantizes row by row, the file must not change."""
    import moepack.gguf.writer as go

    view = open_checkpoint(models("qwen3_moe"))
    types = {"token_embd.weight": "Q4_K", "output.weight": "Q8_0"}
    whole = write_gguf(view, tmp_path / "whole.gguf", QuantPlan.by_hand(types), default_type="Q6_K", threads=2,
                       progress=False)
    monkeypatch.setattr(go, "BLOCK_BYTES", 4 * 64 * 7)  # 7 rows of width 64 per block: a ragged last block
    calls: list[int] = []
    real = ggml.quantize
    monkeypatch.setattr(ggml, "quantize", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    blocks = write_gguf(view, tmp_path / "blocks.gguf", QuantPlan.by_hand(types), default_type="Q6_K", threads=2,
                        progress=False)
    assert 7 in calls  # the block path ran
    assert whole.path.read_bytes() == blocks.path.read_bytes()


def test_plan_and_imatrix_validated_before_writing(models, tmp_path: Path) -> None:
    view = open_checkpoint(models("deepseek_v3:256"))
    out = tmp_path / "x.gguf"
    with pytest.raises(WriteError, match="no type"):
        write_gguf(view, out, QuantPlan.by_hand({"blk.1.ffn_up_exps.weight": "Q4_K"}), default_type=None, progress=False)
    with pytest.raises(WriteError, match="does not have"):
        write_gguf(view, out, QuantPlan.by_hand({"blk.9.ffn_up_exps.weight": "Q4_K"}), progress=False)
    with pytest.raises(WriteError, match="importance matrix"):
        write_gguf(view, out, default_type="IQ2_XXS", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_quant_plan_reader(tmp_path: Path) -> None:
    """One reader for allocate's plans and hand-written ones: allocate's are written back byte for byte; a hand-written
    plan needs only "tensors" (a type name or an object with "type" per tensor) and keeps its other fields."""
    from moepack.errors import MoepackError
    from moepack.gguf.quantize import quantize_model
    from moepack.schema import SchemaError

    made = QuantPlan("greedy", 100, 90, 10, -0.5, {"g": "Q4_K"}, {"a.weight": "Q4_K"}, 64, 0.25, {"kld": 1.0})
    made.write(f := tmp_path / "quant_plan.json")
    back = QuantPlan.read(f)
    assert back == made and back.allocated and back.write(tmp_path / "again.json").read_bytes() == f.read_bytes()
    hand = QuantPlan.from_dict({"note": "mine", "tensors": {"a.weight": {"type": "q4_k"}, "b.weight": "IQ2_XXS"}})
    assert hand.tensors == {"a.weight": "q4_k", "b.weight": "IQ2_XXS"} and not hand.allocated
    assert hand.source == {"note": "mine"} and hand.to_dict()["note"] == "mine"
    for doc, match in (([], "JSON object"), ({"tensors": {}}, "non-empty"), ({"tensors": {"a": {"t": 1}}}, "'a'"),
                       ({"version": 2, "tensors": {"a": "Q4_K"}}, "version 2")):
        with pytest.raises(SchemaError, match=match):
            QuantPlan.from_dict(doc)
    (tmp_path / "bad.json").write_text(json.dumps({"tensors": {"a.weight": "Q9_X"}}))
    with pytest.raises(MoepackError, match="'a.weight': unknown or unsupported GGML type 'Q9_X'"):
        quantize_model(tmp_path, tmp_path / "x.gguf", plan=tmp_path / "bad.json")  # refused before the model is read


def test_ftype_file_takes_no_plan(models, tmp_path: Path) -> None:
    view = open_checkpoint(models("qwen3_moe"))
    with pytest.raises(WriteError, match="no quant plan"):
        write_gguf(view, tmp_path / "x.gguf", QuantPlan.by_hand({"output.weight": "Q8_0"}), ftype="Q4_K_M")
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_file(models, tmp_path: Path, monkeypatch) -> None:
    view = open_checkpoint(models("qwen3_moe"))
    calls = []

    def boom(*a: Any, **k: Any) -> None:
        calls.append(1)
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(ggml, "quantize", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        write_gguf(view, tmp_path / "x.gguf", default_type="Q8_0", progress=False)
    assert calls and list(tmp_path.iterdir()) == []


def test_resolve_types_row_fallbacks(models) -> None:
    view = open_checkpoint(models("qwen3_moe"))  # width 64: K-quants do not fit
    typed = {t.out.name: t for t in resolve_types(gguf_outputs(view), "Q4_K")}
    assert typed["blk.0.ffn_up_exps.weight"].qtype.name == "Q5_0"
    assert typed["blk.0.attn_norm.weight"].qtype.name == "F32"
    assert typed["blk.0.ffn_gate_inp.weight"].qtype.name == "F32"


# ---------------------------------------------------------------------------------------------------- recipe

def _planned_bytes(view: Any, types: dict[str, str]) -> int:
    """What a budget plans before writing: overhead_bytes plus every tensor's bytes padded to the alignment."""
    total = overhead_bytes(view, QuantPlan.by_hand(types), default_type=None)
    for t in resolve_types(gguf_outputs(view), None, types):
        total += gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)
    return total


def test_recipe_version_and_quantized_by(models, tmp_path: Path) -> None:
    import moepack
    from moepack.model.pruned import pruned_view
    from moepack.schema import PruneGroups, PruneLayer, PrunePlan

    view = open_checkpoint(models("deepseek_v3:256"))
    keep = [0, 2, 3, 5, 6, 7]
    plan = PrunePlan(model="m", model_fingerprint=view.fingerprint(), calib=None, calib_fingerprint="",
                     criterion="score", alpha=0.5, keep=0.75, seed=0, normalisation="by hand", n_experts=8,
                     n_kept=len(keep), top_k=2, top_k_new=2, top_k_policy="fixed",
                     groups=PruneGroups("none", None, None, len(keep), None, None), notes=[],
                     layers={str(L): PruneLayer(keep, [1, 4], [1.0] * 8) for L in view.facts.moe_layers})
    pruned = pruned_view(view, plan)
    types = _mixed_types(pruned)
    budget = {"from": "memory", "memory": 8 * 2**30, "ctx": 4096, "file_limit": 7 * 2**30}
    rep = write_gguf(pruned, tmp_path / "r.gguf", QuantPlan.by_hand(types), default_type=None, prune_plan=plan,
                     recipe={"budget": budget}, progress=False)
    reader = gguf.GGUFReader(rep.path)
    assert reader.fields["general.quantized_by"].contents() == "moepack"
    assert reader.fields[Keys.VERSION].contents() == moepack.__version__
    ours = {k for k in reader.fields if k.startswith("moepack.")}  # every moepack.* key is spelled in Keys
    assert ours == {v for k, v in vars(Keys).items() if k.isupper()}
    recipe = read_recipe(rep.path)
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    quantizable = {o.name for o in gguf_outputs(pruned) if o.quantizable}
    assert recipe["types"] == types_by_class({n: written[n] for n in quantizable})
    assert recipe["types"]["ffn_down_exps"] == {"IQ3_S": 1} and recipe["types"]["attn_k_b"] == {"F16": 2}
    assert recipe["experts"] == {"kept": 6, "of": 8, "layers": len(view.facts.moe_layers)}
    assert recipe["keep"] == 0.75 and recipe["top_k"] == reader.fields["deepseek2.expert_used_count"].contents()
    assert recipe["budget"] == budget
    _llama(rep.path).close()
    with pytest.raises(WriteError, match="derived"):  # the writer's own facts cannot be overridden
        write_gguf(pruned, tmp_path / "x.gguf", QuantPlan.by_hand(types), default_type=None, recipe={"keep": 1.0})
    assert not (tmp_path / "x.gguf").exists()


def test_recipe_allowance(models, tmp_path: Path) -> None:
    """The budget is planned before the recipe exists: a recipe at its longest fills the allowance exactly, a
    shorter one leaves the file smaller, a longer one is shortened (types counted over the file) or refused."""
    view = open_checkpoint(models("qwen3_moe"))
    types = {o.key: "Q8_0" for o in gguf_outputs(view) if o.quantizable}
    planned = _planned_bytes(view, types)
    short = write_gguf(view, tmp_path / "s.gguf", QuantPlan.by_hand(types), default_type=None, progress=False)
    base = len(gguf.GGUFReader(short.path).fields[Keys.RECIPE].contents())
    assert short.n_bytes <= planned
    pad = RECIPE_MAX_BYTES - base - len(',"note":""')  # the longest recipe there can be
    full = write_gguf(view, tmp_path / "f.gguf", QuantPlan.by_hand(types), default_type=None, progress=False,
                      recipe={"note": "x" * pad})
    assert len(gguf.GGUFReader(full.path).fields[Keys.RECIPE].contents()) == RECIPE_MAX_BYTES
    assert full.n_bytes == planned
    over = write_gguf(view, tmp_path / "o.gguf", QuantPlan.by_hand(types), default_type=None, progress=False,
                      recipe={"note": "x" * (pad + 1)})
    recipe = read_recipe(over.path)
    assert "types" not in recipe and recipe["types_total"] == {"Q8_0": len(types)} and over.n_bytes <= planned
    with pytest.raises(WriteError, match="allowance"):
        write_gguf(view, tmp_path / "x.gguf", QuantPlan.by_hand(types), default_type=None,
                   recipe={"note": "x" * RECIPE_MAX_BYTES})
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------------- golden

def _byte_chars() -> list[str]:
    """GPT-2's byte → unicode table (the ByteLevel alphabet), in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _golden_tokenizer(d: Path) -> int:
    from conftest import _QWEN2_SPLIT

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"]]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eot = len(vocab)
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}],
           "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                               "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {**vocab, "<|endoftext|>": eot}, "merges": merges}}
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                         "add_bos_token": False}))
    return eot + 1


def _golden_model(d: Path, arch: str) -> Path:
    """A hand-built checkpoint (config and tensor table written here, values from a fixed numpy seed), so the
    golden bytes depend on nothing but moepack and gguf."""
    from safetensors.numpy import save_file

    d.mkdir()
    vocab = _golden_tokenizer(d)
    H, E, F = 32, 4, 32
    cfg: dict[str, Any] = dict(vocab_size=vocab, hidden_size=H, num_attention_heads=2, max_position_embeddings=256,
                               rms_norm_eps=1e-6, rope_theta=10000.0, num_experts_per_tok=2, norm_topk_prob=True,
                               tie_word_embeddings=False, moe_intermediate_size=F, intermediate_size=2 * F)
    L = "model.layers.{}."
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, H), "lm_head.weight": (vocab, H),
                                          "model.norm.weight": (H,)}
    if arch == "qwen3_moe":
        cfg.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=1,
                   num_key_value_heads=1, head_dim=16, num_experts=E)
        a = L.format(0) + "self_attn."
        shapes |= {a + "q_proj.weight": (32, H), a + "k_proj.weight": (16, H), a + "v_proj.weight": (16, H),
                   a + "o_proj.weight": (H, 32), a + "q_norm.weight": (16,), a + "k_norm.weight": (16,)}
        moe_layers = [0]
    else:
        cfg.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=2,
                   num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=16, n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                   topk_group=1, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc")
        for i in range(2):
            a = L.format(i) + "self_attn."
            shapes |= {a + "q_a_proj.weight": (32, H), a + "q_a_layernorm.weight": (32,),
                       a + "q_b_proj.weight": (2 * 16, 32), a + "kv_a_proj_with_mqa.weight": (32 + 8, H),
                       a + "kv_a_layernorm.weight": (32,), a + "kv_b_proj.weight": (2 * (8 + 16), 32),
                       a + "o_proj.weight": (H, 2 * 16)}
        shapes |= {L.format(0) + f"mlp.{p}.weight": s for p, s in
                   (("gate_proj", (2 * F, H)), ("up_proj", (2 * F, H)), ("down_proj", (H, 2 * F)))}
        m = L.format(1) + "mlp."
        shapes |= {m + "gate.e_score_correction_bias": (E,), m + "shared_experts.gate_proj.weight": (F, H),
                   m + "shared_experts.up_proj.weight": (F, H), m + "shared_experts.down_proj.weight": (H, F)}
        moe_layers = [1]
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {L.format(i) + "input_layernorm.weight": (H,), L.format(i) + "post_attention_layernorm.weight": (H,)}
    for i in moe_layers:
        m = L.format(i) + "mlp."
        shapes[m + "gate.weight"] = (E, H)
        for e in range(E):
            shapes |= {m + f"experts.{e}.gate_proj.weight": (F, H), m + f"experts.{e}.up_proj.weight": (F, H),
                       m + f"experts.{e}.down_proj.weight": (H, F)}
    rng = np.random.default_rng(0)
    save_file({n: (rng.standard_normal(s) * 0.05 + (1.0 if n.endswith("norm.weight") else 0.0)).astype(np.float32)
               for n, s in sorted(shapes.items())}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return d


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_golden_header(arch: str, tmp_path: Path, monkeypatch) -> None:
    import moepack

    monkeypatch.setattr(moepack, "__version__", "0.0.0")  # moepack.version: the golden bytes outlive releases
    d = _golden_model(tmp_path / "tiny-golden", arch)
    # Q4_K on rows of 32 (and DeepSeek's attn_k_b rows of 8) exercises llama.cpp's fallbacks: Q5_0, F16
    out = write_gguf(open_checkpoint(d), tmp_path / "g.gguf", default_type="Q4_K", progress=False).path
    header = out.read_bytes()[: gguf.GGUFReader(out).data_offset]
    golden = GOLDEN / f"{arch}-q4_k.header.bin"
    if os.environ.get("MOEPACK_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_bytes(header)
    want = golden.read_bytes()
    at = next((i for i, (a, b) in enumerate(zip(header, want)) if a != b), min(len(header), len(want)))
    assert header == want, (f"{arch}: GGUF header differs from {golden.name} at byte {at} (sizes {len(header)} vs "
                            f"{len(want)}); if intended, rerun with MOEPACK_UPDATE_GOLDEN=1")
    llm = _llama(out)  # the hand-built model is a real one
    llm.close()


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_type_plan_ftype(models, tmp_path: Path, capsys) -> None:
    d = models("deepseek_v3:256")
    assert main(["quantize", str(d), "--type", "Q4_K", "-o", str(tmp_path / "t.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out
    plan = {"version": 1, "tensors": _mixed_types(open_checkpoint(d)) | {"blk.0.attn_norm.weight": "F32"}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["quantize", str(d), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "p.gguf")]) == 0
    meta = _reader_meta(tmp_path / "p.gguf")
    assert json.loads(meta[Keys.QUANT_PLAN])["source"] == {"version": 1}
    assert main(["quantize", str(d), "--ftype", "Q4_K_M", "-o", str(tmp_path / "f.gguf"), "--threads", "2"]) == 0
    assert _reader_meta(tmp_path / "f.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert read_recipe(tmp_path / "f.gguf")["ftype"] == "Q4_K_M"  # llama.cpp's quantizer keeps moepack.* keys
    assert read_recipe(tmp_path / "t.gguf")["types"]["ffn_up_exps"] == {"Q4_K": 1}
    _llama(tmp_path / "f.gguf").close()
    capsys.readouterr()
    assert main(["quantize", str(d), "--ftype", "IQ2_XXS", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "importance matrix" in capsys.readouterr().err
    # a bare GGML type is llama.cpp's name of no mixture: refused, naming both meanings
    assert main(["quantize", str(d), "--ftype", "Q4_K", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moepack quantize: error: --ftype Q4_K:") and "--type Q4_K" in err and "--ftype Q4_K_M" in err
    assert main(["quantize", str(d), "--type", "Q4_K", "--imatrix", str(tmp_path), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--calib-dir" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"tensors": {"blk.7.attn_q.weight": "Q4_K"}}))
    assert main(["quantize", str(d), "--plan", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "does not have" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_file_and_ftype_with_imatrix(models, tmp_path: Path) -> None:
    d = models("deepseek_v3:256")
    view = open_checkpoint(d)
    rng = np.random.default_rng(2)
    im = {o.key: rng.random((o.shape[0] if o.transform == "stack" else 1, o.n_per_row)).astype(np.float32) + 0.1
          for o in gguf_outputs(view) if o.quantizable and o.transform != "k_b"}
    write_imatrix_gguf(ImatrixFile.of_means(im), tmp_path / "imatrix.gguf")
    assert main(["quantize", str(d), "--type", "IQ2_XXS", "--imatrix", str(tmp_path / "imatrix.gguf"),
                 "-o", str(tmp_path / "iq2.gguf")]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "iq2.gguf").tensors}
    assert types["blk.1.ffn_up_exps.weight"] == "IQ2_XXS" and types["blk.1.attn_k_b.weight"] == "F16"
    assert main(["quantize", str(d), "--ftype", "IQ2_XXS", "--imatrix", str(tmp_path / "imatrix.gguf"),
                 "-o", str(tmp_path / "f.gguf")]) == 0
    _llama(tmp_path / "f.gguf").close()


def test_pruned_checkpoint(models, tmp_path: Path) -> None:
    from moepack.model.pruned import pruned_view
    from moepack.schema import PruneGroups, PruneLayer, PrunePlan
    from moepack.stages.prune import write_checkpoint

    d = models("qwen3_moe")
    view = open_checkpoint(d)
    keep = [0, 2, 3, 5, 6, 7]
    layer = PruneLayer(keep, [1, 4], [1.0] * 8)
    plan = PrunePlan(model=str(d), model_fingerprint=view.fingerprint(), calib=None, calib_fingerprint="",
                     criterion="score", alpha=0.5, keep=0.75, seed=0, normalisation="by hand", n_experts=8,
                     n_kept=len(keep), top_k=2, top_k_new=2, top_k_policy="fixed",
                     groups=PruneGroups("none", None, None, len(keep), None, None), notes=[],
                     layers={str(L): layer for L in view.facts.moe_layers})
    pruned = write_checkpoint(pruned_view(view, plan), tmp_path / "pruned", progress=False)
    plan.write(pruned / "prune_plan.json")
    rng = np.random.default_rng(3)
    im = {o.key: rng.random((8 if o.transform == "stack" else 1, o.n_per_row)).astype(np.float32) + 0.1
          for o in gguf_outputs(view) if o.quantizable}  # of the original model: 8 expert rows
    write_imatrix_gguf(ImatrixFile.of_means(im), tmp_path / "imatrix.gguf")
    out = tmp_path / "pruned.gguf"
    assert main(["quantize", str(pruned), "--type", "F32", "--imatrix", str(tmp_path / "imatrix.gguf"),
                 "-o", str(out)]) == 0
    meta = _reader_meta(out)
    assert meta["qwen3moe.expert_count"] == len(keep) and json.loads(meta[Keys.PRUNE_PLAN])["n_kept"] == 6
    ids = _ids(512)
    assert np.abs(_gguf_logits(out, ids) - _hf_logits(pruned, ids)).max() < 1e-3

"""Tiny random-weight models of every supported architecture, built from real configs inside the tests."""
from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DATA = ROOT / "data"
FIXTURES = ("tiny-qwen3-moe", "tiny-deepseek-v3")
ARCHS = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "mixtral", "olmoe", "minimax_m2", "dots1",
         "hunyuan_v1_moe", "qwen3_next", "glm4_moe", "kimi_k2", "gpt_oss", "llama4_text", "ernie4_5_moe", "glm_moe_dsa",
         "qwen3_5_moe_text")
# `compress` on a tiny model in seconds: a short ladder (the whole one costs test time); FAST_SEARCH: one criterion,
# the fast table, no refinement passes (the family tests, which check the file, not the search).
SMALL_LADDER = "IQ2_XXS,IQ2_S,IQ3_XXS,IQ3_S,Q4_K,Q5_K,Q6_K,Q8_0"
FAST_SEARCH = ("--criterion", "score", "--sensitivity", "fast", "--refine", "0")


def small_compress_options(*extra: str, calib_tokens: int = 1024, seq_len: int = 128, selection_tokens: int = 256,
                           ladder: str = SMALL_LADDER, fast: bool = False) -> list[str]:
    """The `moepack compress` flags of the tests' small runs: calibration, selection and report tokens from
    data/tinystories-valid.txt (text the fixtures never trained on), `ladder`, FAST_SEARCH when `fast`, then
    `extra`. One definition, so that every test's run stays small the same way."""
    flags = ["--calib-text", str(DATA / "tinystories-valid.txt"), "--calib-tokens", str(calib_tokens),
             "--seq-len", str(seq_len), "--sens-tokens", str(selection_tokens), "--ladder", ladder]
    return flags + list(FAST_SEARCH if fast else ()) + list(extra)


@pytest.fixture(autouse=True, scope="session")
def _moepack_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Kernel time tables the tests' compress runs measure (moepack.stages.speed) go to a temporary directory, not
    the user's cache."""
    import os

    os.environ.setdefault("MOEPACK_CACHE", str(tmp_path_factory.mktemp("moepack-cache")))


# A test that takes longer than this on a quiet machine (setup included: a module's shared compress run counts for
# its first test) carries @pytest.mark.slow; the run's summary names any that does not, so the marks follow the
# durations (on a loaded machine it names more: judge from a quiet run).
SLOW_S = 20.0
_seconds: dict[str, float] = {}
_unmarked: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when in ("setup", "call"):
        _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration
        if "slow" not in report.keywords:
            _unmarked.add(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    late = sorted(((s, n) for n, s in _seconds.items() if s > SLOW_S and n in _unmarked), reverse=True)
    if late:
        terminalreporter.write_sep("=", f"over {SLOW_S:.0f} s (setup + call) without @pytest.mark.slow")
        for s, n in late:
            terminalreporter.write_line(f"{s:7.1f}s {n}")


@cache
def bench_common() -> ModuleType:
    """bench/common.py, the benchmark scripts' library, loaded from its file (bench/ is a folder of scripts, not a
    package): what the tests and the benches share that is not moepack's own."""
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(arch: str, hidden: int = 64, ffn: int = 64, n_experts: int = 8, top_k: int = 2,
                n_layers: int = 2, vocab: int = 256) -> dict[str, Any]:
    """Config kwargs for a small model of `arch`; widths are parameters so K-quant tests can use 256."""
    heads = 4
    base: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers,
                                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=False, num_experts_per_tok=top_k, rms_norm_eps=1e-6)
    if arch == "qwen3_moe":
        return base | dict(num_experts=n_experts, moe_intermediate_size=ffn, intermediate_size=2 * ffn,
                           head_dim=hidden // heads, norm_topk_prob=True)
    if arch == "qwen2_moe":
        return base | dict(num_experts=n_experts, moe_intermediate_size=ffn, intermediate_size=2 * ffn,
                           shared_expert_intermediate_size=ffn, norm_topk_prob=False)
    if arch == "olmoe":
        # OLMoE is multi-head (llama.cpp's olmoe wants full-width k_norm, so no GQA)
        return base | dict(num_experts=n_experts, intermediate_size=ffn, norm_topk_prob=False,
                           num_key_value_heads=heads)
    if arch == "mixtral":
        return base | dict(num_local_experts=n_experts, intermediate_size=ffn)
    if arch == "llama4_text":
        # four layers: llama.cpp's pattern of 3 chunked-attention layers with RoPE, then a global one without;
        # MoE every 2nd layer (Maverick's interleave) beside a shared expert (the real models route top-1)
        return base | dict(num_hidden_layers=max(n_layers, 4), num_local_experts=n_experts, intermediate_size=ffn,
                           intermediate_size_mlp=2 * ffn, head_dim=hidden // heads, interleave_moe_layer_step=2,
                           rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt_oss":
        # as the hub config: attention biases and sinks, sliding / full layers (window under the tests' 64
        # tokens), YaRN; intermediate_size is the expert width
        rope = dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=64, rope_theta=150000.0)
        return base | dict(num_local_experts=n_experts, intermediate_size=ffn, head_dim=hidden // heads,
                           sliding_window=16, rope_parameters=rope, rms_norm_eps=1e-5)
    if arch == "qwen3_next":
        # one gated DeltaNet layer, then one gated full-attention layer; two key heads shared by four value heads
        lin = hidden // 4
        return base | dict(num_experts=n_experts, moe_intermediate_size=ffn, intermediate_size=2 * ffn,
                           shared_expert_intermediate_size=ffn, head_dim=hidden // heads, norm_topk_prob=True,
                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=lin,
                           linear_value_head_dim=lin, linear_conv_kernel_dim=4, full_attention_interval=2)
    if arch == "qwen3_5_moe_text":
        # Qwen3.5-MoE as Qwen3_5MoeForCausalLM saves it: one DeltaNet layer (two key heads, four value heads: the
        # converter's value-head reordering is exercised), then one gated full-attention layer
        lin = hidden // 4
        return base | dict(num_experts=n_experts, moe_intermediate_size=ffn, shared_expert_intermediate_size=ffn,
                           head_dim=hidden // heads, linear_num_key_heads=2, linear_num_value_heads=4,
                           linear_key_head_dim=lin, linear_value_head_dim=lin, linear_conv_kernel_dim=4,
                           full_attention_interval=2, rope_parameters=dict(  # M-RoPE sections within 4 rotary dims
                               rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                               mrope_section=[1, 1, 0], mrope_interleaved=True))
    if arch == "dots1":
        # as dots.llm1's config: multi-head attention (llama.cpp's dots1 has no GQA), a leading dense layer, two
        # shared experts, sigmoid router + correction bias although scoring_func says "noaux_tc", no sliding window
        return base | dict(num_key_value_heads=heads, n_routed_experts=n_experts, n_shared_experts=2,
                           moe_intermediate_size=ffn, intermediate_size=2 * ffn, first_k_dense_replace=1,
                           num_hidden_layers=max(n_layers, 2), norm_topk_prob=True, routed_scaling_factor=2.5,
                           scoring_func="noaux_tc", sliding_window=None)
    if arch == "hunyuan_v1_moe":
        # as Hunyuan-A13B's config: top-k as a per-layer list, experts and the shared MLP both intermediate_size wide
        return {k: v for k, v in base.items() if k != "num_experts_per_tok"} | dict(
            num_experts=n_experts, moe_topk=[top_k] * n_layers, intermediate_size=ffn, head_dim=hidden // heads)
    if arch == "minimax_m2":
        # as the hub config: every layer MoE, sigmoid router with correction bias, half of each head rotated
        return base | dict(num_local_experts=n_experts, intermediate_size=ffn, head_dim=hidden // heads,
                           rotary_dim=hidden // heads // 2, scoring_func="sigmoid", use_routing_bias=True,
                           bos_token_id=None, eos_token_id=None)
    if arch == "ernie4_5_moe":
        # ERNIE-4.5-300B-A47B-like (21B-A3B ties its embeddings): one dense layer first, a shared expert, softmax
        # router + correction bias
        return base | dict(moe_num_experts=n_experts, moe_intermediate_size=ffn, intermediate_size=2 * ffn,
                           moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
                           num_hidden_layers=max(n_layers, 2))
    if arch == "glm4_moe":
        # GLM-4.5-like: one dense layer first, a shared expert, sigmoid router + bias in one group, q/k/v biases,
        # per-head q/k norms (GLM-4.5 355B; Air has none), rotary on half of each head
        return base | dict(n_routed_experts=n_experts, n_shared_experts=1, moe_intermediate_size=ffn,
                           intermediate_size=2 * ffn, head_dim=hidden // heads, first_k_dense_replace=1, n_group=1,
                           topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, attention_bias=True,
                           use_qk_norm=True, partial_rotary_factor=0.5, num_hidden_layers=max(n_layers, 2))
    if arch in ("deepseek_v3", "deepseek_v2", "kimi_k2", "glm_moe_dsa"):
        mla = dict(num_key_value_heads=heads, q_lora_rank=hidden, kv_lora_rank=hidden, qk_nope_head_dim=16,
                   qk_rope_head_dim=16, v_head_dim=hidden // heads, n_routed_experts=n_experts, n_shared_experts=1,
                   moe_intermediate_size=ffn, intermediate_size=2 * ffn, first_k_dense_replace=1,
                   n_group=4 if n_experts % 4 == 0 else 1, topk_group=2 if n_experts % 4 == 0 else 1,
                   norm_topk_prob=True, routed_scaling_factor=2.5)
        if arch == "deepseek_v3":
            return base | mla | dict(num_hidden_layers=max(n_layers, 2))
        if arch == "glm_moe_dsa":  # GLM-5: DeepSeek-V3's layout in one group plus a DSA indexer (top-k > context)
            return base | mla | dict(num_hidden_layers=max(n_layers, 2), n_group=1, topk_group=1, index_n_heads=8,
                                     index_head_dim=128, index_topk=2048)
        if arch == "kimi_k2":  # DeepSeek-V3's layout with every expert in one group
            register_kimi_k2()
            return base | mla | dict(num_hidden_layers=max(n_layers, 2), n_group=1, topk_group=1,
                                     routed_scaling_factor=2.827)
        return base | mla | dict(num_hidden_layers=max(n_layers, 2), topk_method="group_limited_greedy",
                                 norm_topk_prob=False, routed_scaling_factor=1.0)
    raise ValueError(arch)


# Tokenizer family of each architecture's real checkpoints (for write_tiny_tokenizer).
TOKENIZER_KIND = {"gpt_oss": "gpt-4o", "llama4_text": "llama4", "mixtral": "spm", "olmoe": "gpt2", "minimax_m2": "o200k",
                  "glm4_moe": "glm", "ernie4_5_moe": "spm", "glm_moe_dsa": "glm"}
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# GPT-4o's (o200k) split, which MiniMax-M2's tokenizer.json uses; its special tokens (bos, eos, role start).
_O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_MINIMAX_SPECIAL = ("]~!b[", "[e~[", "]~b]")
_LLAMA4_SPECIAL = ("<|begin_of_text|>", "<|eot|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>")
_GPT_OSS_SPECIAL = ("<|startoftext|>", "<|return|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|end|>")


# GLM-4 / GLM-4.5's split (Llama 3's regex; llama.cpp's "glm4") and the special tokens of GLM-4.5's tokenizer.json.
_GLM_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GLM_SPECIAL = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>")


def register_kimi_k2() -> None:
    """Kimi-K2's hub checkpoints run DeepSeek-V3's modeling code as remote code under model_type `kimi_k2`, which
    transformers does not know: register that pairing so that the tests' reference loads load the tiny Kimi
    checkpoints as trust_remote_code would (moepack itself runs them through ArchSpec.extra["hf_model_type"])."""
    import transformers
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    if "kimi_k2" in transformers.CONFIG_MAPPING:
        return

    class KimiK2Config(transformers.DeepseekV3Config):
        model_type = "kimi_k2"

    class KimiK2ForCausalLM(transformers.DeepseekV3ForCausalLM):
        config_class = KimiK2Config

    transformers.AutoConfig.register("kimi_k2", KimiK2Config)
    transformers.AutoModelForCausalLM.register(KimiK2Config, KimiK2ForCausalLM)
    # one tensor per expert on disk, fused in memory: DeepSeek-V3's key conversion
    register_checkpoint_conversion_mapping("kimi_k2", get_checkpoint_conversion_mapping("deepseek_v3"))


def _tokenizer_text() -> list[str]:
    return (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000].splitlines()


def write_tiny_tokenizer(out: Path, kind: str, vocab: int) -> None:
    """A small trained tokenizer.json + tokenizer_config.json in `out`, shaped like real checkpoints' tokenizers.

    kind: "bpe" (byte-level BPE with Qwen2's split regex), "gpt2" (byte-level BPE, GPT-2 regex; OLMoE-like),
    "o200k" (byte-level BPE with GPT-4o's split regex and MiniMax-M2's special tokens), "gpt-4o" (the same split
    with gpt-oss's harmony special tokens), "llama4" (the same split with Llama 4's special tokens),
    "spm" (SentencePiece-style BPE with byte fallback and <0xXX> tokens; Mixtral-like). Deterministic.
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind in ("bpe", "gpt2", "o200k", "gpt-4o", "llama4"):
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "gpt2")
        split = _O200K_SPLIT if kind in ("o200k", "gpt-4o", "llama4") else _QWEN2_SPLIT
        tok.pre_tokenizer = (byte_level if kind == "gpt2" else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]))
        tok.decoder = decoders.ByteLevel()
        specials = list(_MINIMAX_SPECIAL) if kind == "o200k" else ["<|endoftext|>"]
        specials = list(_GPT_OSS_SPECIAL) if kind == "gpt-4o" else specials
        specials = list(_LLAMA4_SPECIAL) if kind == "llama4" else specials
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_tokenizer_text(), trainer)
        special = {"bos_token": specials[0], "eos_token": specials[1 % len(specials)], "add_bos_token": False}
    elif kind == "glm":  # GLM-4.5: byte-level BPE split by Llama 3's regex, GLM's special tokens
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_GLM_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(_GLM_SPECIAL), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_tokenizer_text(), trainer)
        special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
    elif kind == "spm":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                      show_progress=False)
        tok.train_from_iterator(_tokenizer_text(), trainer)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    else:
        raise ValueError(kind)
    blob = json.loads(tok.to_str())
    if kind == "spm":  # byte tokens live in the model vocab, as in Mistral's tokenizer.json, not as added tokens
        blob["added_tokens"] = [a for a in blob["added_tokens"] if a["content"] not in byte_tokens]
    (out / "tokenizer.json").write_text(json.dumps(blob, ensure_ascii=False, indent=1), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_tiny_model(arch: str, out: Path, seed: int = 0, tokenizer: bool = False, **kw: Any) -> Path:
    """Save a random-weight HF checkpoint of `arch` (hub layout: one tensor per expert) to `out`.

    `tokenizer=True` also writes a small trained tokenizer of the architecture's family (needs vocab >= 300)."""
    import json

    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(arch, **tiny_config(arch, **kw))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random router bias so that bias handling is exercised
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand_like(buf) * 0.1)
        if arch == "ernie4_5_moe":  # its correction bias is a parameter
            for name, p in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(torch.rand_like(p) * 0.1)
        if arch == "gpt_oss":  # expert biases start at zero: random, so that their handling is checked
            for name, p in model.named_parameters():
                if name.endswith("_proj_bias"):
                    p.copy_(torch.randn_like(p) * 0.1)
        if arch in ("qwen3_next", "qwen3_5_moe_text"):  # zero-centred RMSNorm weights (x·(1 + w)): random, so
            # the GGUF's +1 is checked
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") and ".linear_attn.norm." not in name:
                    p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    if arch in ("deepseek_v3", "kimi_k2"):  # as hub configs carry them; transformers 5 drops them on save
        p = out / "config.json"
        c = json.loads(p.read_text())
        c.update(scoring_func="sigmoid", topk_method="noaux_tc")
        if arch == "kimi_k2":  # Kimi-K2's config.json names DeepSeek-V3's class
            c.update(architectures=["DeepseekV3ForCausalLM"], num_nextn_predict_layers=0)
        p.write_text(json.dumps(c, indent=2))
    if tokenizer:
        write_tiny_tokenizer(out, TOKENIZER_KIND.get(arch, "bpe"), cfg.vocab_size)
    return out


@pytest.fixture
def tiny_model(tmp_path: Path):
    """`tiny_model(arch, **kw) -> Path` of a freshly saved random checkpoint."""

    def make(arch: str, **kw: Any) -> Path:
        return build_tiny_model(arch, tmp_path / f"{arch}-model", **kw)

    return make


def fixture_dir(name: str) -> Path:
    p = MODELS / name
    if not any(p.glob("*.safetensors")):  # committed with the repository: absent means a broken checkout
        pytest.fail(f"fixture {name} is missing from models/; restore it from git or rerun `make fixtures`")
    return p


@pytest.fixture(scope="session")
def shared_tiny_model(tmp_path_factory):
    """Like `tiny_model`, but each (arch, kwargs) is built once per session; tests must not modify the files."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(arch: str, **kw: Any) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_tiny_model(arch, tmp_path_factory.mktemp(f"{arch}-shared"), **kw)
        return cache[key]

    return make

"""Tiny random-weight models of every supported architecture, built from real configs inside the tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DATA = ROOT / "data"
FIXTURES = ("tiny-qwen3-moe", "tiny-deepseek-v3")
ARCHS = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "mixtral", "olmoe")


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
    if arch in ("deepseek_v3", "deepseek_v2"):
        mla = dict(num_key_value_heads=heads, q_lora_rank=hidden, kv_lora_rank=hidden, qk_nope_head_dim=16,
                   qk_rope_head_dim=16, v_head_dim=hidden // heads, n_routed_experts=n_experts, n_shared_experts=1,
                   moe_intermediate_size=ffn, intermediate_size=2 * ffn, first_k_dense_replace=1,
                   n_group=4 if n_experts % 4 == 0 else 1, topk_group=2 if n_experts % 4 == 0 else 1,
                   norm_topk_prob=True, routed_scaling_factor=2.5)
        if arch == "deepseek_v3":
            return base | mla | dict(num_hidden_layers=max(n_layers, 2))
        return base | mla | dict(num_hidden_layers=max(n_layers, 2), topk_method="group_limited_greedy",
                                 norm_topk_prob=False, routed_scaling_factor=1.0)
    raise ValueError(arch)


# Tokenizer family of each architecture's real checkpoints (for write_tiny_tokenizer).
TOKENIZER_KIND = {"mixtral": "spm", "olmoe": "gpt2"}
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizer_text() -> list[str]:
    return (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000].splitlines()


def write_tiny_tokenizer(out: Path, kind: str, vocab: int) -> None:
    """A small trained tokenizer.json + tokenizer_config.json in `out`, shaped like real checkpoints' tokenizers.

    kind: "bpe" (byte-level BPE with Qwen2's split regex), "gpt2" (byte-level BPE, GPT-2 regex; OLMoE-like),
    "spm" (SentencePiece-style BPE with byte fallback and <0xXX> tokens; Mixtral-like). Deterministic.
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind in ("bpe", "gpt2"):
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "gpt2")
        tok.pre_tokenizer = (byte_level if kind == "gpt2" else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level]))
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_tokenizer_text(), trainer)
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}
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
    model.save_pretrained(out)
    if arch == "deepseek_v3":  # as hub configs carry them; transformers 5 drops them on save
        p = out / "config.json"
        c = json.loads(p.read_text())
        c.update(scoring_func="sigmoid", topk_method="noaux_tc")
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

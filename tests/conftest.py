"""Tiny random-weight models of every supported architecture, built from real configs inside the tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DATA = ROOT.parent / "shared" / "data"
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
        return base | dict(num_experts=n_experts, intermediate_size=ffn, norm_topk_prob=False)
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


def build_tiny_model(arch: str, out: Path, seed: int = 0, **kw: Any) -> Path:
    """Save a random-weight HF checkpoint of `arch` (hub layout: one tensor per expert) to `out`."""
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
    return out


@pytest.fixture
def tiny_model(tmp_path: Path):
    """`tiny_model(arch, **kw) -> Path` of a freshly saved random checkpoint."""

    def make(arch: str, **kw: Any) -> Path:
        return build_tiny_model(arch, tmp_path / f"{arch}-model", **kw)

    return make


def fixture_dir(name: str) -> Path:
    p = MODELS / name
    if not (p / "model.safetensors").is_file():
        pytest.skip(f"fixture {name} not trained; run `make fixtures`")
    return p

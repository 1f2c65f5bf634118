"""Sizes, KV cache and compute buffer estimates, and the weight budget."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from moepack.errors import MoepackError
from moepack.model.checkpoint import open_checkpoint
from moepack.stages.budget import BudgetError, BudgetRequest, budget_for, format_size, parse_size
from moepack.stages.footprint import CTX_PAD, compute_buffer_bytes, gguf_overhead_bytes, kv_cache_bytes
from moepack.stages.sizes import size_flag


@pytest.mark.parametrize("text, n", [
    ("123456", 123456), (123456, 123456), ("0", 0), ("20MB", 20_000_000), ("20 mb", 20_000_000),
    ("1.5GiB", 1_610_612_736), ("8G", 8 * 2**30), ("8g", 8 * 2**30), ("2KiB", 2048), ("1kB", 1000),
    ("0.5kB", 500), ("1_000", 1000), ("7B", 7), ("1e3", 1000), ("1.5TB", 1_500_000_000_000), ("3M", 3 * 2**20),
    (".5MiB", 2**19), ("1.0000001kB", 1000),
])
def test_parse_size(text, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5MB", "1.5", "MB", "1..5GB", "1 2 MB", "nan", "inf GB"])
def test_parse_size_rejects_junk(text: str) -> None:
    with pytest.raises(BudgetError, match="size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(5_767_168) == "5.50 MiB (5,767,168 bytes)"
    assert size_flag(2**30 + 1) == "1.01GiB" and size_flag(5 * 2**20) == "5MiB"  # rounded up, to type


def _cfg(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_kv_cache_gqa_qwen3_moe(tiny_model) -> None:
    path = tiny_model("qwen3_moe")
    c = _cfg(path)
    # By hand from config.json: layers × ctx (padded to 256) × kv heads × (K + V head widths) × 2 bytes (f16).
    assert (c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"]) == (2, 2, 16)
    assert kv_cache_bytes(open_checkpoint(path), 1000) == 2 * 1024 * 2 * (16 + 16) * 2 == 262_144
    assert kv_cache_bytes(c, 1024) == 262_144 and kv_cache_bytes(c, 1025) == 2 * 1280 * 2 * 32 * 2
    assert kv_cache_bytes(c, 4096, "f32") == 2 * 4096 * 2 * 32 * 4
    assert kv_cache_bytes(c, 4096, "f16", "f32") == 2 * 4096 * 2 * 16 * (2 + 4)


def test_kv_cache_mla_deepseek_v3(tiny_model) -> None:
    path = tiny_model("deepseek_v3")
    c = _cfg(path)
    layers, latent, rope = c["num_hidden_layers"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    assert (layers, latent, rope) == (2, 64, 16)
    # MLA as the bundled llama.cpp caches it: one latent row (kv_lora_rank + qk_rope_head_dim) per token and
    # layer in K, no V tensor.
    assert kv_cache_bytes(open_checkpoint(path), 512) == layers * 512 * (latent + rope) * 2 == 163_840
    # Much less than the full per-head K and V of older llama.cpp: heads × (nope + rope + v_head).
    full = layers * 512 * c["num_attention_heads"] * (c["qk_nope_head_dim"] + rope + c["v_head_dim"]) * 2
    assert kv_cache_bytes(c, 512) < full
    with pytest.raises(BudgetError, match="80 values"):
        kv_cache_bytes(c, 512, "q8_0")  # the tiny latent row (64 + 16) does not fill Q8_0 blocks
    # DeepSeek-V3's own shape: 61 layers, latent 512 + rope 64 = 576 values per token and layer.
    v3 = c | {"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    assert kv_cache_bytes(v3, 4096) == 61 * 4096 * 576 * 2 == 287_834_112  # 274.5 MiB
    assert kv_cache_bytes(v3, 4096, "q8_0") == 61 * 4096 * 576 // 32 * 34


def test_kv_cache_type_checks() -> None:
    c = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "hidden_size": 64, "vocab_size": 256}
    with pytest.raises(BudgetError, match="q4_0"):
        kv_cache_bytes(c, 512, "q3_k")
    with pytest.raises(BudgetError, match="blocks of 32"):
        kv_cache_bytes(c, 512, "q8_0")  # 16-wide heads do not fill a Q8_0 block
    with pytest.raises(BudgetError, match="positive"):
        kv_cache_bytes(c, 0)
    assert kv_cache_bytes(c | {"head_dim": 64}, 512, "q8_0") == 2 * 512 * 2 * 2 * 68


# Logged by the llama.cpp bundled with llama-cpp-python 0.3.x ("CPU compute buffer size") for hand-built GGUFs
# of these shapes (qwen3moe: 2 layers, 8 experts top-2, expert width = hidden; deepseek2 MLA: 3 layers, first
# dense of 2 × hidden, kv_lora = hidden, rope 32, 1 shared expert): (config, ctx, ubatch, flash_attn, MiB).
_QWEN = dict(model_type="qwen3_moe", num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
             head_dim=16, hidden_size=256, vocab_size=4096, num_experts_per_tok=2, moe_intermediate_size=256)
_DS = dict(model_type="deepseek_v3", num_hidden_layers=3, num_attention_heads=16, hidden_size=256, vocab_size=4096,
           kv_lora_rank=256, qk_rope_head_dim=32, num_experts_per_tok=2, n_shared_experts=1,
           moe_intermediate_size=256, intermediate_size=512)
MEASURED = [(_QWEN, 4096, 512, False, 139.01), (_QWEN, 4096, 512, True, 9.01), (_QWEN, 1024, 128, False, 9.25),
            (_DS, 4096, 512, False, 158.06), (_DS, 4096, 512, True, 26.01), (_DS, 1024, 128, True, 5.75)]


@pytest.mark.parametrize("cfg, ctx, ub, fa, mib", MEASURED)
def test_compute_buffer_near_llama_cpp(cfg: dict, ctx: int, ub: int, fa: bool, mib: float) -> None:
    est = compute_buffer_bytes(cfg, ctx, ub, fa) / 2**20
    assert 0.9 * mib <= est <= 1.4 * mib


def test_compute_buffer_grows_with_context() -> None:
    small, big = compute_buffer_bytes(_QWEN, 2048), compute_buffer_bytes(_QWEN, 32768)
    assert big > 8 * small  # without flash attention the f32 KQ scores grow with n_ctx
    assert compute_buffer_bytes(_QWEN, 32768, flash_attn=True) < big / 10


def test_budget_from_memory(tiny_model) -> None:
    view = open_checkpoint(tiny_model("qwen3_moe"))
    b = budget_for(BudgetRequest(memory="64MiB", ctx=1000), view)
    assert b.memory == 64 * 2**20 and b.ctx == 1000 and b.source == "memory"
    assert b.kv_cache == kv_cache_bytes(view, 1000) and b.compute == compute_buffer_bytes(view, 1000)
    assert b.reserve == int(0.05 * 64 * 2**20) and b.overhead == gguf_overhead_bytes(view)
    assert b.weights == b.memory - b.kv_cache - b.compute - b.reserve - b.overhead > 0
    text = b.describe()
    assert "KV cache" in text and "weights" in text and f"{b.weights:,}" in text
    b0 = budget_for(BudgetRequest(memory=64 * 2**20, ctx=1000, reserve="0"), view, overhead=0)
    assert b0.weights == b.memory - b.kv_cache - b.compute
    with pytest.raises(BudgetError, match="lower --ctx-size"):
        budget_for(BudgetRequest(memory="4MiB", ctx=1000), view)


def test_budget_from_targets(tiny_model) -> None:
    view = open_checkpoint(tiny_model("deepseek_v3"))
    n = sum(t.numel for t in view.tensors.values())  # every tensor: norms, routers and biases too
    assert n == sum(view.param_counts().values())
    b = budget_for(BudgetRequest(target_bpw=3.5), view, overhead=1000)
    assert b.source == "target_bpw" and b.n_params == n and b.target == int(3.5 * n / 8)
    assert b.weights == b.target - 1000 and b.file_limit == b.target
    b = budget_for(BudgetRequest(target_size="1MB"), view)
    assert b.weights == 1_000_000 - gguf_overhead_bytes(view) and b.kv_cache == 0
    assert "GGUF file target" in b.describe()


@pytest.mark.parametrize("kw, message", [
    ({}, "exactly one"),
    ({"memory": "1GB"}, "needs --ctx-size"),
    ({"memory": "1GB", "ctx": 512, "target_size": "1MB"}, "exactly one"),
    ({"target_bpw": 0}, r"\(0, 32\]"),
    ({"target_size": "10kB"}, "metadata"),
])
def test_budget_errors(tiny_model, kw: dict, message: str) -> None:
    view = open_checkpoint(tiny_model("qwen3_moe"))
    with pytest.raises(BudgetError, match=message):
        budget_for(BudgetRequest(**kw), view)


def test_overhead_counts_the_tokenizer(tiny_model) -> None:
    path = tiny_model("qwen3_moe")
    view = open_checkpoint(path)
    without = gguf_overhead_bytes(view)
    tokens = {f"tok{i}": i for i in range(200)}
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": tokens, "merges": ["a b"] * 500}}))
    assert gguf_overhead_bytes(view) > 32 * 1024
    assert gguf_overhead_bytes(view) != without


def test_budget_cli_args(tiny_model) -> None:
    """The command line's budget flags (llama.cpp's names) become a BudgetRequest, and `budget_for` computes it."""
    from moepack.cli.options import add_budget, budget_request

    view = open_checkpoint(tiny_model("qwen3_moe"))
    p = argparse.ArgumentParser()
    add_budget(p)
    args = p.parse_args(["--memory", "64MiB", "-c", "2048", "--flash-attn", "--cache-type-k", "bf16",
                         "--cache-type-v", "f32"])
    request = budget_request(args)
    assert request == BudgetRequest(memory="64MiB", ctx=2048, type_k="bf16", type_v="f32", flash_attn=True)
    b = budget_for(request, view, overhead=0)
    assert b.kv_cache == kv_cache_bytes(view, 2048, "bf16", "f32")
    assert b.compute == compute_buffer_bytes(view, 2048, 512, True)
    assert budget_request(p.parse_args(["--target-bpw", "2.5", "--ctx-size", "512", "--ubatch-size", "256"])) == \
        BudgetRequest(target_bpw=2.5, ctx=512, n_ubatch=256)
    assert CTX_PAD == 256


def test_budget_cli_gpu_memory(tiny_model) -> None:
    """--gpu-memory with --memory and -c gives the two budgets of moepack.stages.placement; --memory alone is
    unchanged (no GPU part)."""
    from moepack.cli.options import add_budget, budget_request

    view = open_checkpoint(tiny_model("deepseek_v3"))
    p = argparse.ArgumentParser()
    add_budget(p)
    request = budget_request(p.parse_args(["--gpu-memory", "24MiB", "--memory", "64MiB", "-c", "1024"]))
    assert request == BudgetRequest(memory="64MiB", gpu_memory="24MiB", ctx=1024)
    b = budget_for(request, view, overhead=0)
    kv, compute = kv_cache_bytes(view, 1024), compute_buffer_bytes(view, 1024)
    assert b.gpu_weights == 24 * 2**20 - kv - compute - int(24 * 2**20 * 0.05) and b.gpu_memory == 24 * 2**20
    assert b.ram_weights == 64 * 2**20 - compute - int(64 * 2**20 * 0.05)  # no KV cache in RAM
    assert b.ram_weights == b.weights - b.gpu_weights and b.sides() == [("gpu", b.gpu_weights), ("ram", b.ram_weights)]
    assert b.file_limit == b.weights
    alone = budget_for(budget_request(p.parse_args(["--memory", "64MiB", "-c", "1024"])), view, overhead=0)
    assert alone == budget_for(BudgetRequest(memory="64MiB", ctx=1024), view, overhead=0)
    assert alone.gpu_weights is None
    assert alone.ram_weights is None and alone.sides() == [(None, alone.weights)]
    with pytest.raises(MoepackError, match="--gpu-memory needs --memory"):  # refused, never ignored
        budget_request(p.parse_args(["--gpu-memory", "24MiB", "-c", "1024"]))

"""What llama.cpp allocates besides the weights, from config.json: the KV cache, the compute buffers, and the GGUF
bytes that are not tensor data. `moepack.stages.budget` subtracts them from a device's memory.

KV cache and compute buffers follow the llama.cpp bundled with the installed llama-cpp-python (0.3.x; its
`llama_kv_cache` / `sched_reserve` logs were used to check the formulas, see `kv_cache_bytes` and
`compute_buffer_bytes`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moepack.model.arch import spec_for
from moepack.stages.sizes import BudgetError

if TYPE_CHECKING:  # no numpy/gguf at module level: the CLI's parser imports the budget modules
    import gguf

    from moepack.model.checkpoint import CheckpointView

__all__ = ["AttentionDims", "attention_dims", "ffn_width", "kv_cache_bytes", "compute_buffer_bytes",
           "tokenizer_bytes", "gguf_overhead_bytes", "CTX_PAD", "DEFAULT_UBATCH", "KV_CACHE_TYPES"]

CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256 (llama_context: "n_ctx = 1024" for 1000)
DEFAULT_UBATCH = 512  # llama-cpp-python's Llama(n_batch=512, n_ubatch=512) and llama.cpp's defaults
KV_CACHE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1")  # llama.cpp -ctk/-ctv


@dataclass(frozen=True)
class AttentionDims:
    """The widths llama.cpp runs a model at, from config.json; `kv_cache` is "gqa" or "mla" (ArchSpec.kv_cache)."""

    kv_cache: str
    n_layers: int
    n_head: int
    n_head_kv: int  # heads in the KV cache (1 for MLA: llama.cpp runs MLA as MQA over the latent)
    head_k: int  # K width per cached head
    head_v: int  # V width per cached head (MLA: the latent, read as a view of K; no V tensor is allocated)
    hidden: int
    vocab: int


def _config(view_or_config: CheckpointView | dict[str, Any]) -> dict[str, Any]:
    return view_or_config if isinstance(view_or_config, dict) else view_or_config.config


def _need(cfg: dict[str, Any], *keys: str, what: str = "the KV cache") -> int:
    from moepack.model.checkpoint import config_get

    v = config_get(cfg, *keys)
    if v is None:
        raise BudgetError(f"config.json has no {' / '.join(keys)}; cannot size {what}")
    return int(v)


def attention_dims(view_or_config: CheckpointView | dict[str, Any]) -> AttentionDims:
    from moepack.model.checkpoint import config_get

    cfg = _config(view_or_config)
    spec = spec_for(cfg.get("model_type"))
    n_head = _need(cfg, "num_attention_heads")
    hidden = _need(cfg, "hidden_size")
    if spec.kv_cache == "mla":
        latent = _need(cfg, "kv_lora_rank")
        n_head_kv, head_k, head_v = 1, latent + _need(cfg, "qk_rope_head_dim"), latent
    else:
        head = int(config_get(cfg, "head_dim", default=hidden // n_head))
        n_head_kv, head_k, head_v = int(config_get(cfg, "num_key_value_heads", default=n_head)), head, head
    n_layers = spec.extra["kv_layers"](cfg) if "kv_layers" in spec.extra else _need(cfg, "num_hidden_layers", "n_layer")
    return AttentionDims(spec.kv_cache, n_layers, n_head, n_head_kv, head_k, head_v, hidden, _need(cfg, "vocab_size"))


def ffn_width(view_or_config: CheckpointView | dict[str, Any]) -> int:
    """The widest per-token FFN activation of a layer: (top-k + shared) × expert width, or the dense width."""
    from moepack.model.checkpoint import config_get

    cfg = _config(view_or_config)
    spec = spec_for(cfg.get("model_type"))
    what = "the compute buffer"
    top_k, expert = _need(cfg, spec.top_k_key, what=what), _need(cfg, spec.expert_ffn_key, what=what)
    shared = int(config_get(cfg, spec.n_shared_key, default=spec.n_shared_default) if spec.n_shared_key
                 else spec.n_shared_default)
    dense = int(config_get(cfg, spec.extra.get("dense_ffn_key", "intermediate_size"), default=0))  # 0: only experts
    return max((top_k + shared) * expert, dense)


def _padded_ctx(ctx: int) -> int:
    if ctx <= 0:
        raise BudgetError(f"context length must be positive (got {ctx})")
    return -(-ctx // CTX_PAD) * CTX_PAD


def _kv_type(name: str) -> gguf.GGMLQuantizationType:
    import gguf

    key = str(name).strip().upper()
    if key not in KV_CACHE_TYPES:
        valid = ", ".join(t.lower() for t in KV_CACHE_TYPES)
        raise BudgetError(f"unknown KV cache type {name!r}; llama.cpp accepts {valid}")
    return gguf.GGMLQuantizationType[key]


def _row_bytes(qtype: gguf.GGMLQuantizationType, n: int) -> int:
    from moepack.gguf.types import BlockSizeError, block_size, row_bytes

    try:
        return row_bytes(qtype, n)
    except BlockSizeError:
        raise BudgetError(f"KV cache rows of {n} values do not fit {qtype.name} blocks of {block_size(qtype)}; "
                          "use f16") from None


def kv_cache_bytes(view_or_config: CheckpointView | dict[str, Any], ctx: int, type_k: str = "f16",
                   type_v: str | None = None) -> int:
    """Bytes of llama.cpp's KV cache for `ctx` tokens (one sequence), as `llama_kv_cache` allocates it.

    The context is first rounded up to a multiple of 256 (`CTX_PAD`), as llama.cpp does.

    GQA (Qwen, Mixtral, OLMoE)::

        n_layers × ctx × n_kv_heads × (head_dim · bytes(type_k) + head_dim · bytes(type_v))

    Hybrid (Qwen3-Next, Qwen3.5): full-attention layers only, plus the recurrent state (spec.extra recurrent_bytes).

    MLA (DeepSeek-V2/V3)::

        n_layers × ctx × (kv_lora_rank + qk_rope_head_dim) · bytes(type_k)        (no V cache)

    Why the MLA form: the bundled llama.cpp runs DeepSeek attention as MQA over the compressed latent when the GGUF
    carries key_length_mla/value_length_mla and split attn_k_b/attn_v_b (as the converter and moepack write it):
    head_count_kv is 1, key_length is kv_lora_rank + qk_rope_head_dim, and `llama_kv_cache` allocates no V
    (`has_v = !is_mla`). Checked: a deepseek2 GGUF with 3 layers, kv_lora 64, rope 16 reports "K (f16): 0.47 MiB,
    V (f16): 0.00 MiB" at n_ctx 1024 = 3 × 1024 × 80 × 2 bytes.
    """
    d = attention_dims(view_or_config)
    n = d.n_layers * _padded_ctx(ctx)
    k = n * d.n_head_kv * _row_bytes(_kv_type(type_k), d.head_k)
    if d.kv_cache == "mla":
        return k
    cfg = _config(view_or_config)  # hybrid models (Qwen3-Next): plus the linear-attention layers' recurrent state
    state = spec_for(cfg.get("model_type")).extra.get("recurrent_bytes", lambda c: 0)(cfg)
    return k + n * d.n_head_kv * _row_bytes(_kv_type(type_v or type_k), d.head_v) + state


def compute_buffer_bytes(view_or_config: CheckpointView | dict[str, Any], ctx: int,
                         n_ubatch: int = DEFAULT_UBATCH, flash_attn: bool = False) -> int:
    """An estimate of llama.cpp's compute buffer ("CPU compute buffer size") plus its output buffer.

    llama.cpp reserves one buffer for the worst-case graph of a micro-batch of u = min(n_ubatch, ctx) tokens over
    the whole (padded) context n_kv; ggml's allocator reuses memory, so the size is the peak of the tensors alive
    at once. The peak is either inside attention or at the output head::

        attention = u · n_kv · (2                      with flash attention: the f16 KQ mask
                                4 · (n_head + 1))     without: f32 KQ scores of every head + the f32 mask
                  + 4 · u · (4·hidden + 3·ffn + n_head · (head_k + head_v))     activations
        output    = 4 · u · (n_vocab + 4·hidden)                                 f32 logits of the micro-batch
        compute   = max(attention, output) + 4 · n_vocab                         + the logits output buffer

    with ffn = (top-k + shared experts) × expert width (or the dense FFN width if wider) and head_k/head_v the
    widths attention runs at (MLA: the latent, kv_lora + rope and kv_lora). Flash attention defaults to off
    because llama-cpp-python's `Llama` defaults to `flash_attn=False`; without it the KQ term dominates long
    contexts (n_head · n_kv · u · 4 bytes). Against the bundled llama.cpp on 7 small qwen3moe/deepseek2 shapes
    (hidden 64–256, 4–16 heads, vocab 256–4096) × 8 settings (ctx 1024/4096, ubatch 128/512, flash attention
    on/off) the estimate was within −7 % … +35 % of the logged size (it errs large for MLA with flash attention).
    It does not cover GPU offload (a second, host-side buffer) or several parallel sequences.
    """
    d = attention_dims(view_or_config)
    n_kv = _padded_ctx(ctx)
    u = max(1, min(n_ubatch, ctx))
    scores = u * n_kv * (2 if flash_attn else 4 * (d.n_head + 1))
    act = 4 * u * (4 * d.hidden + 3 * ffn_width(view_or_config) + d.n_head * (d.head_k + d.head_v))
    output = 4 * u * (d.vocab + 4 * d.hidden)
    return max(scores + act, output) + 4 * d.vocab


# ------------------------------------------------------------------------------------------------- GGUF overhead

_OVERHEAD_FIXED = 32 * 1024  # header, general.* and architecture keys, chat template, the prune plan
_PER_TENSOR = 192  # tensor-table entry (name, dims, type, offset) + ≤ 31 bytes alignment + its quant-plan line
_TOKEN_FALLBACK = 40  # bytes per vocabulary entry (string, type, score, merge) when there is no tokenizer.json


def tokenizer_bytes(root: Path, vocab: int) -> int:
    """Upper-leaning size of the GGUF vocabulary arrays: strings (8-byte length + UTF-8), types, scores, merges."""
    from moepack.gguf.vocab_tiktoken import vocab_bytes

    if not (root / "tokenizer.json").is_file() and (n := vocab_bytes(root, vocab)) is not None:  # Kimi-K2, Hunyuan
        return n
    path = root / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok.get("model", {})
        strings = list(model.get("vocab") or {}) + [a.get("content", "") for a in tok.get("added_tokens") or []]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    except (OSError, ValueError, AttributeError, TypeError):
        return vocab * _TOKEN_FALLBACK
    n = max(vocab, len(strings))
    token_bytes = sum(8 + len(s.encode("utf-8")) for s in strings) + (n - len(strings)) * 20 + 8 * n
    return token_bytes + sum(8 + len(m.encode("utf-8")) for m in merges)


def gguf_overhead_bytes(view: CheckpointView) -> int:
    """Estimated bytes of the GGUF file that are not tensor data, erring on the large side.

    = 32 KiB (header and metadata) + 192 bytes per GGUF tensor (per-expert checkpoint tensors count once per
    layer and projection, as they are stacked) + the vocabulary arrays estimated from tokenizer.json. For the two
    trained fixtures (F16 GGUFs from `gguf_out.write_gguf`) it gives 193 KB against 139 KB measured. The writer
    knows the exact number; pass it as `overhead=` to `budget_for` when available.
    """
    stacked = {(t.layer, t.kind) for t in view.tensors.values() if t.expert is not None}
    n_tensors = sum(1 for t in view.tensors.values() if t.expert is None) + len(stacked)
    return _OVERHEAD_FIXED + _PER_TENSOR * n_tensors + tokenizer_bytes(Path(view.root), view.facts.vocab)

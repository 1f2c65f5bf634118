"""How many bytes the quantized weights may take: from a device (memory, context length) or a size target.

Device budget (``--memory SIZE --ctx-size N [--reserve SIZE]``)::

    weights = memory − KV cache(ctx) − compute buffers(ctx) − reserve − GGUF overhead

Size targets (``--target-size SIZE`` or ``--target-bpw X``) set the GGUF *file* size directly::

    weights = target − GGUF overhead,     target = floor(X · N / 8) for --target-bpw

where N is the parameter count of **every tensor of the checkpoint the budget is computed for** (norms, routers
and biases included — the same count `moepack inspect` reports as "total" and divides by for its bits/weight).
`moepack compress` computes it on the original checkpoint, before pruning, so ``--target-bpw 2.5`` means "a file
of 2.5 bits per original parameter"; after pruning the bits per *kept* parameter are higher.

`weights` is the number `moepack allocate` spends: the sum of the GGUF tensor data bytes (grouped tensors at their
chosen types plus the fixed F32 tensors). The GGUF overhead (header, metadata, tokenizer, tensor table, alignment
padding) is estimated by `gguf_overhead_bytes` unless the caller knows it exactly.

GPU + RAM (``--gpu-memory SIZE`` with ``--memory`` and ``--ctx-size``): two budgets, one per placement
(`moepack.stages.placement`: the routed experts in system RAM, the rest, KV cache included, on the GPU).

KV cache and compute buffers follow the llama.cpp bundled with the installed llama-cpp-python (0.3.x; its
`llama_kv_cache` / `sched_reserve` logs were used to check the formulas, see `kv_cache_bytes` and
`compute_buffer_bytes`).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moepack.model.arch import spec_for
from moepack.errors import MoepackError

if TYPE_CHECKING:  # budget.py imports no numpy/gguf at module level, so that `moepack.stages.allocate` stays pure
    import gguf

    from moepack.model.checkpoint import CheckpointView

__all__ = ["BudgetError", "Budget", "AttentionDims", "parse_size", "format_size", "tokenizer_bytes",
           "attention_dims", "ffn_width", "kv_cache_bytes", "compute_buffer_bytes", "gguf_overhead_bytes",
           "weight_budget", "BudgetRequest", "budget_for", "CTX_PAD", "DEFAULT_UBATCH", "DEFAULT_RESERVE_FRACTION",
           "KV_CACHE_TYPES"]

log = logging.getLogger(__name__)

CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256 (llama_context: "n_ctx = 1024" for 1000)
DEFAULT_UBATCH = 512  # llama-cpp-python's Llama(n_batch=512, n_ubatch=512) and llama.cpp's defaults
DEFAULT_RESERVE_FRACTION = 0.05  # of --memory, for the OS and the runtime's own code and bookkeeping
KV_CACHE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1")  # llama.cpp -ctk/-ctv

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RX = re.compile(r"\s*(\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")


class BudgetError(MoepackError, ValueError):
    """A size, memory or context setting that cannot give a weight budget; the message says what to change."""


def parse_size(text: str | int) -> int:
    """'20MB' → 20_000_000, '1.5GiB' → 1_610_612_736, '123456' → 123456, '8G' → 8 GiB.

    Units (case-insensitive): none or B = bytes; kB MB GB TB = powers of 1000; KiB MiB GiB TiB = powers of 1024;
    a bare K M G T means the binary unit (as memory sizes are usually meant: an "8G" board has 8 GiB).
    Fractions of a byte are dropped (floor); a plain byte count must be whole.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BudgetError(f"size {text} is negative")
        return text
    m = _SIZE_RX.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(f"cannot read size {text!r}; write e.g. 20MB, 1.5GiB, 8G or 123456B "
                          "(units: B, kB/MB/GB/TB = 1000^n, KiB/MiB/GiB/TiB or K/M/G/T = 1024^n)")
    try:
        value = Decimal(m.group(1).replace("_", "")) * _UNITS[unit]
    except InvalidOperation:
        raise BudgetError(f"cannot read size {text!r}: {m.group(1)!r} is not a number") from None
    if _UNITS[unit] == 1 and value != value.to_integral_value():
        raise BudgetError(f"size {text!r} is not a whole number of bytes")
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def format_size(n: int | float) -> str:
    """'5.50 MiB (5,767,168 bytes)' — binary units for reading, exact bytes for checking."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(n):,} B" if unit == "B" else f"{x:.2f} {unit} ({int(n):,} bytes)"
        x /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------------ the shape

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
    knows the exact number; pass it as `overhead=` to `weight_budget` when available.
    """
    stacked = {(t.layer, t.kind) for t in view.tensors.values() if t.expert is not None}
    n_tensors = sum(1 for t in view.tensors.values() if t.expert is None) + len(stacked)
    return _OVERHEAD_FIXED + _PER_TENSOR * n_tensors + tokenizer_bytes(Path(view.root), view.facts.vocab)


# ---------------------------------------------------------------------------------------------------- the budget

@dataclass(frozen=True)
class Budget:
    """Where the weight budget came from. All sizes in bytes; `weights` is what allocation may spend."""

    memory: int | None  # device memory (device budgets only)
    kv_cache: int
    compute: int
    reserve: int
    weights: int  # bytes for GGUF tensor data
    overhead: int = 0  # GGUF bytes that are not tensor data
    source: str = "memory"  # "memory" | "target_size" | "target_bpw"
    ctx: int | None = None
    target: int | None = None  # GGUF file size target (size targets only)
    bpw: float | None = None
    n_params: int | None = None  # parameter count --target-bpw refers to
    gpu_memory: int | None = None  # GPU memory (GPU + RAM budgets only; then `memory` is the RAM)
    gpu_reserve: int = 0
    gpu_weights: int | None = None  # of `weights`, the bytes of GPU-resident tensors (moepack.stages.placement)

    @property
    def ram_weights(self) -> int | None:
        """Of `weights`, the bytes of the tensors in RAM (GPU + RAM budgets only; None otherwise)."""
        return None if self.gpu_weights is None else self.weights - self.gpu_weights

    def sides(self) -> list[tuple[str | None, int]]:
        """(placement side, tensor bytes it may hold): ("gpu", ·) and ("ram", ·) for a GPU + RAM budget, else one
        (None, weights) for the whole file."""
        if self.gpu_weights is None or self.ram_weights is None:
            return [(None, self.weights)]
        return [("gpu", self.gpu_weights), ("ram", self.ram_weights)]

    @property
    def file_limit(self) -> int:
        """The largest GGUF file this budget allows (tensor data + overhead)."""
        return self.weights + self.overhead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.gpu_weights is not None:
            from moepack.stages.placement import describe_placed

            return describe_placed(self)
        if self.source == "memory":
            lines = [f"device memory     {format_size(self.memory or 0)}",
                     f"− KV cache        {format_size(self.kv_cache)}  (ctx {self.ctx})",
                     f"− compute buffers {format_size(self.compute)}  (estimate)",
                     f"− reserve         {format_size(self.reserve)}",
                     f"− GGUF metadata   {format_size(self.overhead)}  (estimate)"]
        else:
            how = (f"{self.bpw:g} bits × {self.n_params:,} parameters" if self.source == "target_bpw"
                   else "--target-size")
            lines = [f"GGUF file target  {format_size(self.target or 0)}  ({how})",
                     f"− GGUF metadata   {format_size(self.overhead)}  (estimate)"]
        return "\n".join(lines + [f"= weights         {format_size(self.weights)}"])


def _check_modes(memory: Any, ctx: Any, target_size: Any, target_bpw: Any) -> str:
    modes = [name for name, v in (("--memory", memory), ("--target-size", target_size),
                                  ("--target-bpw", target_bpw)) if v is not None]
    if len(modes) != 1:
        raise BudgetError("give exactly one of --memory SIZE --ctx-size N, --target-size SIZE or --target-bpw X"
                          + (f" (got {', '.join(modes)})" if modes else ""))
    if modes[0] == "--memory" and ctx is None:
        raise BudgetError("--memory needs --ctx-size N: the context length sizes the KV cache")
    if modes[0] != "--memory" and ctx is not None:
        log.info("--ctx-size is ignored with %s (the KV cache is only subtracted from --memory)", modes[0])
    return modes[0]


def _device_budget(view: CheckpointView, memory: int, ctx: int, reserve: int | None, overhead: int,
                   type_k: str, type_v: str | None, n_ubatch: int, flash_attn: bool) -> Budget:
    kv = kv_cache_bytes(view, ctx, type_k, type_v)
    compute = compute_buffer_bytes(view, ctx, n_ubatch, flash_attn)
    reserve = int(memory * DEFAULT_RESERVE_FRACTION) if reserve is None else reserve
    b = Budget(memory, kv, compute, reserve, memory - kv - compute - reserve - overhead, overhead, "memory", ctx)
    if b.weights <= 0:
        raise BudgetError(f"nothing is left for weights:\n{b.describe()}\nlower --ctx-size, --reserve or the KV cache "
                          "type (--cache-type-k q8_0), enable --flash-attn, or give more --memory")
    return b


def weight_budget(view: CheckpointView, *, memory: int | str | None = None, ctx: int | None = None,
                  reserve: int | str | None = None, target_size: int | str | None = None,
                  target_bpw: float | None = None, overhead: int | None = None, type_k: str = "f16",
                  type_v: str | None = None, n_ubatch: int = DEFAULT_UBATCH, flash_attn: bool = False) -> Budget:
    """The weight budget from exactly one of (memory + ctx), target_size or target_bpw; see the module docstring.

    `reserve` defaults to 5 % of memory. `overhead` (non-tensor GGUF bytes) defaults to `gguf_overhead_bytes`.
    Raises `BudgetError` at once when the settings leave no room for weights.
    """
    mode = _check_modes(memory, ctx, target_size, target_bpw)
    overhead = gguf_overhead_bytes(view) if overhead is None else int(overhead)
    if mode == "--memory":
        return _device_budget(view, parse_size(memory), int(ctx), None if reserve is None else parse_size(reserve),
                              overhead, type_k, type_v, n_ubatch, flash_attn)
    if mode == "--target-size":
        target, bpw, n = parse_size(target_size), None, None
    else:
        bpw = float(target_bpw)
        if not (math.isfinite(bpw) and 0 < bpw <= 32):
            raise BudgetError(f"--target-bpw must be in (0, 32] bits per weight (got {target_bpw})")
        n = sum(t.numel for t in view.tensors.values())
        target = math.floor(bpw * n / 8)
    b = Budget(None, 0, 0, 0, target - overhead, overhead, mode[2:].replace("-", "_"), None, target, bpw, n)
    if b.weights <= 0:
        raise BudgetError(f"the target {format_size(target)} does not even hold the GGUF metadata "
                          f"({format_size(overhead)}); give a larger target")
    return b


@dataclass(frozen=True)
class BudgetRequest:
    """What the user asked for: exactly one of (memory + ctx), target_size or target_bpw, plus the runtime settings
    that size the KV cache and compute buffers; `budget_for` turns it into a `Budget` for one checkpoint."""

    memory: int | str | None = None  # device memory: bytes or a size such as "16GiB"
    ctx: int | None = None  # context length the device must hold
    reserve: int | str | None = None  # memory kept free (default DEFAULT_RESERVE_FRACTION of memory)
    target_size: int | str | None = None  # GGUF file size
    target_bpw: float | None = None  # GGUF file size as bits per parameter of the checkpoint
    type_k: str = "f16"  # KV cache K type at run time
    type_v: str | None = None  # KV cache V type (None: type_k)
    n_ubatch: int = DEFAULT_UBATCH
    flash_attn: bool = False
    gpu_memory: int | str | None = None  # GPU memory: then `memory` is system RAM (moepack.stages.placement)


def budget_for(request: BudgetRequest, view: CheckpointView, overhead: int | None = None) -> Budget:
    """`weight_budget` of `view` for `request`, or with `gpu_memory` the two budgets of `placed_budget`;
    `overhead` as there."""
    if request.gpu_memory is not None:
        from moepack.stages.placement import placed_budget

        return placed_budget(view, request, overhead)
    return weight_budget(view, memory=request.memory, ctx=request.ctx, reserve=request.reserve,
                         target_size=request.target_size, target_bpw=request.target_bpw, overhead=overhead,
                         type_k=request.type_k, type_v=request.type_v, n_ubatch=request.n_ubatch,
                         flash_attn=request.flash_attn)

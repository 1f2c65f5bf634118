"""Predicted decode and prompt speed of a quantization plan: the matrix products one token costs in llama.cpp, timed
per GGML type on this machine (moepack.gguf.matmul) or read from a table measured on the target device.

The model (what it counts, and what it leaves out):
- Decode, one token: every weight matrix once (a matrix-vector product), k' of the E experts of each MoE layer;
  the embedding is a row lookup (free) unless the output head shares it.
- Prompt, per token of a `ubatch` (llama.cpp's default 512): dense matrices multiply the whole ubatch; the experts
  of a layer multiply it in one `mul_mat_id`, each the tokens routed to it (routing spread evenly). The last layer's
  feed-forward and the output head run for the ubatch's last token only: llama.cpp keeps only the rows whose logits
  are asked for before them (`inp_out_ids`), and a prompt asks for its last token's.
- Time = Σ (seconds per call + rows × seconds per row) of (type, row width, batch) from the kernel table; routed
  experts are timed as llama.cpp runs them, with `mul_mat_id` at the model's (E, k').
- Attention over the KV cache (`Attention`: KQ, soft_max, KQV over the F16 cache, llama.cpp without flash attention)
  at SPEED_CONTEXT cached tokens: a 512-token prompt from an empty cache, and decoding right after it.
- Each layer's element-wise and routing ops (`LayerOps`: norms, a RoPE-sized pass, the cache stores, the router's
  soft_max and top-k, SwiGLU, weighting and summing the experts' outputs, residual adds), timed as one graph.
- Not counted: llama.cpp's work per decoded token outside the graph (building its inputs, copying the logits
  out); docs/performance.md measures how far the prediction is from llama.cpp's own tokens per second.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moepack.errors import MoepackError
from moepack.model.arch import Role
from moepack.schema.speed import KernelTimes
from moepack.stages.footprint import DEFAULT_UBATCH

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView

__all__ = ["MatMul", "Attention", "LayerOps", "SPEED_CONTEXT", "KernelClock", "SpeedError", "Speed", "matmuls",
           "gguf_matmuls", "predict", "decode_tps",
           "plan_speed", "default_table_path", "runtime_name", "measure_for"]

log = logging.getLogger(__name__)

SPEED_CONTEXT = DEFAULT_UBATCH  # tokens in the KV cache where speed is predicted: after a one-ubatch prompt


class SpeedError(MoepackError, ValueError):
    """A speed the plan cannot reach, or a kernel time table that cannot serve this model."""


@dataclass(frozen=True)
class MatMul:
    """One weight matrix a token multiplies by: `rows` rows of width `n` per use, `uses` uses per decoded token
    (k' for an expert tensor of `experts` experts, else 1)."""

    name: str
    qtype: str
    n: int
    rows: int
    uses: int = 1
    experts: int = 0  # > 0: routed experts, each with `rows` rows
    last: bool = False  # the last layer's feed-forward or the output head: a prompt runs it for its last token only

    def decode_seconds(self, clock: KernelClock, qtype: str | None = None) -> float:
        """Seconds this matrix costs one decoded token (at `qtype` instead of its own type when given)."""
        return self._seconds(clock, qtype or self.qtype, 1)

    def prompt_seconds(self, clock: KernelClock, ubatch: int) -> float:
        """Seconds per token of a prompt processed `ubatch` tokens at a time."""
        return self._seconds(clock, self.qtype, 1 if self.last else ubatch) / ubatch

    def _seconds(self, clock: KernelClock, qtype: str, tokens: int) -> float:
        """Seconds of one product for `tokens` tokens."""
        if self.experts:  # one mul_mat_id: each expert multiplies the tokens routed to it
            call, row = clock.expert_cost(qtype, self.n, self.experts, self.uses, tokens)
            return call + self.rows * self.uses * tokens * row
        call, row = clock.cost(qtype, self.n, tokens)
        return call + self.rows * row


@dataclass(frozen=True)
class Attention:
    """One layer's attention over `context` cached tokens: `n_head` query heads over `n_head_kv` cached heads of
    widths (head_k, head_v) (MLA: one latent head)."""

    name: str
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    context: int = SPEED_CONTEXT

    def decode_seconds(self, clock: KernelClock, qtype: str | None = None) -> float:
        return self._seconds(clock, 1)

    def prompt_seconds(self, clock: KernelClock, ubatch: int) -> float:
        return self._seconds(clock, ubatch) / ubatch

    def _seconds(self, clock: KernelClock, tokens: int) -> float:
        call, per_cached = clock.attention_cost(self.n_head, self.n_head_kv, self.head_k, self.head_v, tokens)
        return call + self.context * per_cached


@dataclass(frozen=True)
class LayerOps:
    """One layer's element-wise and routing ops (moepack.gguf.matmul.layer_ops_seconds): hidden width, heads, the
    routed experts and k' (0: a dense layer) and the feed-forward width."""

    name: str
    hidden: int
    n_head: int
    n_head_kv: int
    head: int
    experts: int
    used: int
    ffn: int

    def decode_seconds(self, clock: KernelClock, qtype: str | None = None) -> float:
        return clock.layer_ops(self, 1)

    def prompt_seconds(self, clock: KernelClock, ubatch: int) -> float:
        return clock.layer_ops(self, ubatch) / ubatch

    @property
    def key(self) -> str:
        return f"OPS@{self.n_head}x{self.n_head_kv}x{self.head}x{self.experts}x{self.used}x{self.ffn}"


Work = MatMul | Attention | LayerOps


def _attention(layers: int, n_head: int, n_head_kv: int, head_k: int, head_v: int) -> list[Attention]:
    return [Attention(f"blk.{i}.attn_kq", n_head, n_head_kv, head_k, head_v) for i in range(layers)]


def _layer_ops(moe: list[int], dense: list[int], d: tuple[int, int, int, int], experts: int, used: int, expert_ffn: int,
               dense_ffn: int) -> list[LayerOps]:
    """LayerOps of each MoE and dense layer; `d` = (hidden, n_head, n_head_kv, head width)."""
    return [LayerOps(f"blk.{i}.layer_ops", *d, experts, used, expert_ffn) for i in moe] + [
        LayerOps(f"blk.{i}.layer_ops", *d, 0, 1, max(1, dense_ffn)) for i in dense]


def _last_only(name: str, last_block: int) -> bool:
    """Whether llama.cpp computes GGUF tensor `name`'s product for the output tokens only (see the docstring)."""
    return name.startswith("output.") or name.startswith(f"blk.{last_block}.ffn_")


def _last_block(names: list[str]) -> int:
    return max((int(n.split(".")[1]) for n in names if n.startswith("blk.")), default=-1)


def matmuls(view: CheckpointView, types: dict[str, str]) -> list[Work]:
    """The weight products of one token through `view` with the GGUF tensor → type map `types` (tensors it does not
    name are written at F32), at the type llama.cpp writes (row-width fallbacks applied), and its attention."""
    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.types import fallback_type
    from moepack.stages.footprint import attention_dims

    outs = gguf_outputs(view)
    tied = not any(o.role is Role.OUTPUT and len(o.shape) >= 2 for o in outs)
    last = _last_block([o.name for o in outs])
    work = []
    for o in outs:
        if len(o.shape) < 2 or (o.role is Role.EMBEDDING and not tied):
            continue
        qtype = fallback_type(types.get(o.name, "F32"), o.shape[-1]).name
        tail = o.role is Role.EMBEDDING or _last_only(o.name, last)  # a tied embedding is the output head
        if o.role is Role.ROUTED_EXPERTS:  # (E, rows, n)
            work.append(MatMul(o.name, qtype, o.shape[-1], o.shape[-2], view.facts.top_k, o.shape[0], tail))
        else:  # (rows, n), or (heads, rows, n) for MLA's k_b / v_b
            work.append(MatMul(o.name, qtype, o.shape[-1], math.prod(o.shape[:-1]), last=tail))
    d, f = attention_dims(view), view.facts
    dense = view.config.get("intermediate_size") or 0  # a dense layer's width (a list per layer in some configs)
    ops = _layer_ops(list(f.moe_layers), list(f.dense_layers), (d.hidden, d.n_head, d.n_head_kv, d.head_k),
                     f.n_experts, f.top_k, f.expert_ffn, int(max(dense) if isinstance(dense, list) else dense))
    return work + _attention(d.n_layers, d.n_head, d.n_head_kv, d.head_k, d.head_v) + ops


def _field(reader: Any, key: str, default: int | None = None) -> int:
    """An integer metadata value of a GGUF file (the largest, for a per-layer array)."""
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise SpeedError(f"the GGUF file has no {key}")
        return default
    return int(max(f.parts[i][0] for i in f.data))


def gguf_matmuls(path: str | Path) -> list[Work]:
    """The weight products of one token through the GGUF file at `path`, from its tensor table and its
    `*.expert_used_count` (any file llama.cpp runs: moepack's, llama.cpp's own), and its attention (head counts and
    widths from the metadata, one per layer with a K projection)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    top_k = _field(reader, f"{arch}.expert_used_count", 0)
    names = {t.name for t in reader.tensors}
    last = _last_block(list(names))
    work = []
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]  # ggml order: (n, rows[, experts or heads])
        if len(ne) < 2 or (t.name.startswith("token_embd") and "output.weight" in names):
            continue
        tail = t.name.startswith("token_embd") or _last_only(t.name, last)
        if "_exps" in t.name and len(ne) == 3:
            work.append(MatMul(t.name, t.tensor_type.name, ne[0], ne[1], top_k, ne[2], tail))
        else:
            work.append(MatMul(t.name, t.tensor_type.name, ne[0], ne[1] * (ne[2] if len(ne) == 3 else 1), last=tail))
    n_head = _field(reader, f"{arch}.attention.head_count")
    head_k = _field(reader, f"{arch}.attention.key_length", _field(reader, f"{arch}.embedding_length") // n_head)
    layers = len({n.split(".")[1] for n in names if n.split(".")[-2] in ("attn_k", "attn_kv_a_mqa", "attn_qkv")})
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    hidden = _field(reader, f"{arch}.embedding_length")
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("blk.")}
    moe = sorted({int(n.split(".")[1]) for n in names if ".ffn_gate_inp." in n})
    ops = _layer_ops(moe, sorted(blocks - set(moe)), (hidden, n_head, n_head_kv, head_k),
                     _field(reader, f"{arch}.expert_count", 0), top_k,
                     _field(reader, f"{arch}.expert_feed_forward_length", 0),
                     _field(reader, f"{arch}.feed_forward_length", 0))
    return work + _attention(layers, n_head, n_head_kv, head_k,
                             _field(reader, f"{arch}.attention.value_length", head_k)) + ops


def runtime_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama-cpp-python {version('llama_cpp_python')}"
    except PackageNotFoundError:
        return "llama-cpp-python (not installed)"


def default_table_path(threads: int) -> Path:
    """Where this machine's measured table is cached: $MOEPACK_CACHE or ~/.cache/moepack, by device and threads."""
    import hashlib

    from moepack.gguf.matmul import METHOD, cpu_name
    from moepack.schema.speed import SPEED_FORMAT

    root = Path(os.environ.get("MOEPACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "moepack")
    key = f"{cpu_name()}|{os.cpu_count()}|{runtime_name()}|{SPEED_FORMAT}|{METHOD}"  # a new method measures again
    return root / "speed" / f"{hashlib.sha256(key.encode()).hexdigest()[:12]}-t{threads}.json"


class KernelClock:
    """Seconds per call and per weight row, from a kernel time table: measured here on demand (and cached at `path`),
    or read from a table a user brought from the target device (`measure=False`: missing widths and batches are
    interpolated)."""

    def __init__(self, times: KernelTimes, path: Path | None = None, measure: bool = True) -> None:
        self.times, self.path, self.measure = times, path, measure
        self.dirty = False
        self._unknown: set[str] = set()  # attention shapes a brought table lacks (warned once)

    @classmethod
    def here(cls, threads: int, path: Path | None = None, fresh: bool = False) -> KernelClock:
        """This machine's clock, starting from its cached table where there is one (`fresh`: from an empty one,
        which replaces the cache when saved)."""
        from moepack.gguf.matmul import cpu_name

        path = path or default_table_path(threads)
        times = KernelTimes(cpu_name(), threads, runtime_name())
        if path.is_file() and not fresh:
            try:
                times = KernelTimes.read(path)
            except MoepackError as e:
                log.warning("%s; measuring the kernels again", e)
        return cls(times, path)

    @classmethod
    def from_file(cls, path: Path) -> KernelClock:
        """A table measured elsewhere (`--speed-table`): nothing is measured here."""
        return cls(KernelTimes.read(path), None, measure=False)

    def _cell(self, key: str, n: int, batch: int, measure: Callable[[], tuple[float, float]]
              ) -> tuple[float, float] | None:
        """(call, row) of a table cell: from the table, else measured here (and kept), else None (a brought table)."""
        s = self.times.get(key, n, batch)
        if s is None and self.measure:
            s = measure()
            self.times.put(key, n, batch, *s)
            self.dirty = True
        return s

    def cost(self, qtype: str, n: int, batch: int) -> tuple[float, float]:
        """(seconds per call, seconds per row) of a plain product of `qtype`, width `n`, against `batch` columns."""
        from moepack.gguf import matmul

        s = self._cell(qtype, n, batch, lambda: matmul.row_cost(qtype, n, batch, self.times.threads))
        return s if s is not None else _interpolate(self.times, qtype, n, batch)

    def expert_cost(self, qtype: str, n: int, experts: int, used: int, tokens: int) -> tuple[float, float]:
        """(seconds per call, seconds per row × expert use × token) of `mul_mat_id` over `experts` experts of which
        each of `tokens` tokens uses `used` (keyed "TYPE@ExK" in the table); a brought table without that key: the
        plain product at an expert's share of the tokens, once per expert used."""
        from moepack.gguf import matmul

        s = self._cell(f"{qtype}@{experts}x{used}", n, tokens,
                       lambda: matmul.expert_row_cost(qtype, n, experts, used, tokens, self.times.threads))
        if s is not None:
            return s
        share = max(1, round(tokens * used / experts))
        call, row = self.cost(qtype, n, share)
        return call * min(experts, used * tokens), row / share

    def attention_cost(self, n_head: int, n_head_kv: int, head_k: int, head_v: int,
                       tokens: int) -> tuple[float, float]:
        """(seconds per call, seconds per cached token) of one layer's attention for `tokens` query tokens (keyed
        "ATTN@{n_head}x{n_head_kv}x{head_v}" at width head_k)."""
        from moepack.gguf import matmul

        key = f"ATTN@{n_head}x{n_head_kv}x{head_v}"
        s = self._cell(key, head_k, tokens, lambda: matmul.attention_cost(n_head, n_head_kv, head_k, head_v, tokens,
                                                                         self.times.threads))
        if s is not None:
            return s
        if key not in self.times.seconds_per_row:  # a table measured for another model, or before attention was
            self._missing(key, f"attention of {n_head} heads over {n_head_kv} cached heads of {head_k}/{head_v}")
            return 0.0, 0.0
        return _interpolate(self.times, key, head_k, tokens)

    def layer_ops(self, ops: LayerOps, tokens: int) -> float:
        """Seconds of one layer's element-wise and routing ops for `tokens` tokens (keyed "OPS@..." at the hidden
        width, as seconds per row; a brought table without them counts none, with a warning)."""
        from moepack.gguf import matmul

        s = self._cell(ops.key, ops.hidden, tokens, lambda: (0.0, matmul.layer_ops_seconds(
            ops.hidden, ops.n_head, ops.n_head_kv, ops.head, ops.experts, ops.used, ops.ffn, tokens,
            self.times.threads)))
        if s is not None:
            return s[1]
        if ops.key not in self.times.seconds_per_row:
            self._missing(ops.key, "element-wise and routing ops of this model's layers")
            return 0.0
        return _interpolate(self.times, ops.key, ops.hidden, tokens)[1]

    def _missing(self, key: str, what: str) -> None:
        """Warn once that a brought table lacks `key`."""
        if key not in self._unknown:
            self._unknown.add(key)
            log.warning("the kernel time table of %s has no times for the %s (%s): tokens/s leave them out "
                        "(measure the table for this model with `moepack speed MODEL -o FILE` on that device)",
                        self.times.device, what, key)

    def save(self) -> None:
        if self.dirty and self.path is not None:
            self.times.write(self.path)
            self.dirty = False

    def describe(self) -> str:
        where = "measured on this machine" if self.measure else "read from a table of another device"
        return f"{self.times.device}, {self.times.threads} threads, {self.times.runtime} ({where})"


def _interpolate(times: KernelTimes, qtype: str, n: int, batch: int) -> tuple[float, float]:
    """A brought table's (call, row) time at a width or batch it lacks: the nearest width scaled by n (a row's work,
    and converting an input column, grow with the width), linear between the nearest batches (the end one beyond)."""
    widths = times.seconds_per_row.get(qtype)
    if not widths:
        have = ", ".join(sorted(times.seconds_per_row)) or "none"
        raise SpeedError(f"the kernel time table of {times.device} has no {qtype} (it has: {have}); measure it "
                         f"again with `moepack speed MODEL -o FILE` on that device for this model")
    near = min(widths, key=lambda w: abs(w - n))
    batches = sorted(widths[near])
    lo = max((b for b in batches if b <= batch), default=batches[0])
    hi = min((b for b in batches if b >= batch), default=batches[-1])
    f = 0.0 if hi == lo else (batch - lo) / (hi - lo)
    (call_lo, row_lo), (call_hi, row_hi) = (times.get(qtype, near, b) or (0.0, 0.0) for b in (lo, hi))
    return (call_lo + (call_hi - call_lo) * f) * n / near, (row_lo + (row_hi - row_lo) * f) * n / near


@dataclass(frozen=True)
class Speed:
    """Predicted tokens per second of one plan, and the decode seconds each tensor class takes."""

    decode_tps: float
    prompt_tps: float
    decode_seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"decode_tps": round(self.decode_tps, 2), "prompt_tps": round(self.prompt_tps, 2),
                "decode_ms_by_class": {k: round(v * 1e3, 4) for k, v in sorted(self.decode_seconds.items())}}


def predict(work: list[Work], clock: KernelClock, ubatch: int = DEFAULT_UBATCH) -> Speed:
    """Decode and prompt tokens per second of `work` (see the module docstring for what is counted)."""
    from moepack.gguf.recipe import tensor_class

    by_class: dict[str, float] = {}
    prompt = 0.0
    for m in work:
        cls = tensor_class(m.name)
        by_class[cls] = by_class.get(cls, 0.0) + m.decode_seconds(clock)
        prompt += m.prompt_seconds(clock, ubatch)
    clock.save()
    decode = sum(by_class.values())
    return Speed(1.0 / decode if decode else float("inf"), 1.0 / prompt if prompt else float("inf"), by_class)


def decode_tps(work: list[Work], clock: KernelClock) -> float:
    """Predicted decode tokens per second of `work` alone (no prompt cells are timed for it)."""
    seconds = sum(m.decode_seconds(clock) for m in work)
    clock.save()
    return 1.0 / seconds if seconds else float("inf")


def plan_speed(view: CheckpointView, types: dict[str, str], clock: KernelClock,
               ubatch: int = DEFAULT_UBATCH) -> Speed:
    """Predicted speed of `view` written with `types` (GGUF name → type)."""
    return predict(matmuls(view, {k: str(getattr(v, "name", v)) for k, v in types.items()}), clock, ubatch)


BATCHES = tuple(2**i for i in range(10))  # 1 .. 512: decode, every expert share of a ubatch, a whole ubatch


def measure_for(view: CheckpointView, types: tuple[str, ...], clock: KernelClock,
                batches: tuple[int, ...] = BATCHES, progress: bool = False) -> KernelTimes:
    """Measure every (type, row width of `view`, batch) `clock` does not hold yet: the table a user brings to
    `compress --speed-table` from this device. Each type is timed at its row-width fallback where the rows do not
    fit its blocks, as llama.cpp writes it."""
    from tqdm import tqdm

    from moepack.gguf.types import fallback_type

    every = matmuls(view, {})
    work = [m for m in every if isinstance(m, MatMul)]
    attention = {(a.n_head, a.n_head_kv, a.head_k, a.head_v) for a in every if isinstance(a, Attention)}
    ops = {o for o in every if isinstance(o, LayerOps)}
    widths = sorted({m.n for m in work})
    cells = sorted({(fallback_type(t, n).name, n, b) for t in types for n in widths for b in batches})
    moe = sorted({(fallback_type(t, m.n).name, m.n, m.experts, m.uses) for t in types for m in work if m.experts})
    jobs = [lambda c=c: clock.cost(*c) for c in cells]
    jobs += [lambda c=c, k=k: clock.expert_cost(*c, k) for c in moe for k in (1, DEFAULT_UBATCH)]
    jobs += [lambda a=a, k=k: clock.attention_cost(*a, k) for a in sorted(attention) for k in (1, DEFAULT_UBATCH)]
    jobs += [lambda o=o, k=k: clock.layer_ops(o, k) for o in {o.key: o for o in ops}.values()
             for k in (1, DEFAULT_UBATCH)]
    for job in tqdm(jobs, desc="timing llama.cpp's matrix products", unit="cell", disable=not progress):
        job()
    clock.save()
    return clock.times

"""Predicted decode and prompt speed of a quantization plan: the matrix products one token costs in llama.cpp, timed
per GGML type on this machine (moepack.gguf.matmul) or read from a table measured on the target device.

The model (what it counts, and what it leaves out):
- Decode, one token: every weight matrix once (a matrix-vector product), k' of the E experts of each MoE layer;
  the embedding is a row lookup (free) unless the output head shares it.
- Prompt, per token of a `ubatch` (llama.cpp's default 512): dense matrices multiply the whole ubatch; the experts
  of a layer multiply it in one `mul_mat_id`, each the tokens routed to it (routing spread evenly).
- Time = Σ rows × seconds per row of (type, row width, batch) from the kernel table; routed experts are timed as
  llama.cpp runs them, with `mul_mat_id` at the model's (E, k'), per row, expert use and token. Attention over the
  context, norms, routing and the graph's own overhead are not counted: on real widths the weights' products dominate a
  step (docs/performance.md measures how far the prediction is from llama.cpp's own tokens per second).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moepack.errors import MoepackError
from moepack.model.arch import Role
from moepack.schema.speed import KernelTimes
from moepack.stages.footprint import DEFAULT_UBATCH

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView
    from moepack.schema import SensitivityTable

__all__ = ["MatMul", "KernelClock", "SpeedError", "Speed", "matmuls", "gguf_matmuls", "predict", "decode_tps",
           "plan_speed", "default_table_path", "runtime_name", "group_seconds", "speed_choice", "measure_for"]

log = logging.getLogger(__name__)


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

    def decode_seconds(self, clock: KernelClock, qtype: str | None = None) -> float:
        """Seconds this matrix costs one decoded token (at `qtype` instead of its own type when given)."""
        t = qtype or self.qtype
        if self.experts:  # one mul_mat_id over the k' experts a token is routed to
            return self.rows * self.uses * clock.expert_seconds(t, self.n, self.experts, self.uses, 1)
        return self.rows * clock.seconds(t, self.n, 1)

    def prompt_seconds(self, clock: KernelClock, ubatch: int) -> float:
        """Seconds per token of a prompt processed `ubatch` tokens at a time."""
        if self.experts:  # one mul_mat_id over the ubatch: each expert multiplies the tokens routed to it
            return self.rows * self.uses * clock.expert_seconds(self.qtype, self.n, self.experts, self.uses, ubatch)
        return self.rows * clock.seconds(self.qtype, self.n, ubatch) / ubatch


def matmuls(view: CheckpointView, types: dict[str, str]) -> list[MatMul]:
    """The weight products of one token through `view` with the GGUF tensor → type map `types` (tensors it does not
    name are written at F32), at the type llama.cpp writes (row-width fallbacks applied)."""
    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.types import fallback_type

    outs = gguf_outputs(view)
    tied = not any(o.role is Role.OUTPUT and len(o.shape) >= 2 for o in outs)
    work = []
    for o in outs:
        if len(o.shape) < 2 or (o.role is Role.EMBEDDING and not tied):
            continue
        qtype = fallback_type(types.get(o.name, "F32"), o.shape[-1]).name
        if o.role is Role.ROUTED_EXPERTS:  # (E, rows, n)
            work.append(MatMul(o.name, qtype, o.shape[-1], o.shape[-2], view.facts.top_k, o.shape[0]))
        else:  # (rows, n), or (heads, rows, n) for MLA's k_b / v_b
            work.append(MatMul(o.name, qtype, o.shape[-1], math.prod(o.shape[:-1])))
    return work


def gguf_matmuls(path: str | Path) -> list[MatMul]:
    """The weight products of one token through the GGUF file at `path`, from its tensor table and its
    `*.expert_used_count` (any file llama.cpp runs: moepack's, llama.cpp's own)."""
    import gguf

    reader = gguf.GGUFReader(path)
    used = [f for name, f in reader.fields.items() if name.endswith(".expert_used_count")]
    top_k = int(used[0].parts[-1][0]) if used else 0
    names = {t.name for t in reader.tensors}
    work = []
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]  # ggml order: (n, rows[, experts or heads])
        if len(ne) < 2 or (t.name.startswith("token_embd") and "output.weight" in names):
            continue
        if "_exps" in t.name and len(ne) == 3:
            work.append(MatMul(t.name, t.tensor_type.name, ne[0], ne[1], top_k, ne[2]))
        else:
            work.append(MatMul(t.name, t.tensor_type.name, ne[0], ne[1] * (ne[2] if len(ne) == 3 else 1)))
    return work


def runtime_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama-cpp-python {version('llama_cpp_python')}"
    except PackageNotFoundError:
        return "llama-cpp-python (not installed)"


def default_table_path(threads: int) -> Path:
    """Where this machine's measured table is cached: $MOEPACK_CACHE or ~/.cache/moepack, by device and threads."""
    import hashlib

    from moepack.gguf.matmul import cpu_name

    root = Path(os.environ.get("MOEPACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "moepack")
    key = hashlib.sha256(f"{cpu_name()}|{os.cpu_count()}|{runtime_name()}".encode()).hexdigest()[:12]
    return root / "speed" / f"{key}-t{threads}.json"


class KernelClock:
    """Seconds per weight row, from a kernel time table: measured here on demand (and cached at `path`), or read from
    a table a user brought from the target device (`measure=False`: missing widths and batches are interpolated)."""

    def __init__(self, times: KernelTimes, path: Path | None = None, measure: bool = True) -> None:
        self.times, self.path, self.measure = times, path, measure
        self.dirty = False

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

    def seconds(self, qtype: str, n: int, batch: int) -> float:
        s = self.times.get(qtype, n, batch)
        if s is not None:
            return s
        if self.measure:
            from moepack.gguf.matmul import seconds_per_row

            s = seconds_per_row(qtype, n, batch, self.times.threads)
            self.times.put(qtype, n, batch, s)
            self.dirty = True
            return s
        return _interpolate(self.times, qtype, n, batch)

    def expert_seconds(self, qtype: str, n: int, experts: int, used: int, tokens: int) -> float:
        """Seconds per (row × expert use × token) of `mul_mat_id` over `experts` experts of which each of `tokens`
        tokens uses `used` (keyed "TYPE@ExK" in the table); a brought table without that key: the plain product at
        an expert's share of the tokens."""
        key = f"{qtype}@{experts}x{used}"
        s = self.times.get(key, n, tokens)
        if s is not None:
            return s
        if self.measure:
            from moepack.gguf.matmul import seconds_per_expert_row

            s = seconds_per_expert_row(qtype, n, experts, used, tokens, self.times.threads)
            self.times.put(key, n, tokens, s)
            self.dirty = True
            return s
        share = max(1, round(tokens * used / experts))
        return self.seconds(qtype, n, share) / share

    def save(self) -> None:
        if self.dirty and self.path is not None:
            self.times.write(self.path)
            self.dirty = False

    def describe(self) -> str:
        where = "measured on this machine" if self.measure else "read from a table of another device"
        return f"{self.times.device}, {self.times.threads} threads, {self.times.runtime} ({where})"


def _interpolate(times: KernelTimes, qtype: str, n: int, batch: int) -> float:
    """A brought table's time at a width or batch it lacks: the nearest width scaled by n (a row's work grows with
    its width), linear between the nearest batches (the end one beyond them)."""
    widths = times.seconds_per_row.get(qtype)
    if not widths:
        have = ", ".join(sorted(times.seconds_per_row)) or "none"
        raise SpeedError(f"the kernel time table of {times.device} has no {qtype} (it has: {have}); measure it "
                         f"again with `moepack speed MODEL -o FILE` on that device for this model")
    near = min(widths, key=lambda w: abs(w - n))
    by_batch = sorted(widths[near].items())
    lo = max(((b, s) for b, s in by_batch if b <= batch), default=by_batch[0])
    hi = min(((b, s) for b, s in by_batch if b >= batch), default=by_batch[-1])
    s = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (batch - lo[0]) / (hi[0] - lo[0])
    return s * n / near


@dataclass(frozen=True)
class Speed:
    """Predicted tokens per second of one plan, and the decode seconds each tensor class takes."""

    decode_tps: float
    prompt_tps: float
    decode_seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"decode_tps": round(self.decode_tps, 2), "prompt_tps": round(self.prompt_tps, 2),
                "decode_ms_by_class": {k: round(v * 1e3, 4) for k, v in sorted(self.decode_seconds.items())}}


def predict(work: list[MatMul], clock: KernelClock, ubatch: int = DEFAULT_UBATCH) -> Speed:
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


def decode_tps(work: list[MatMul], clock: KernelClock) -> float:
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

    work = matmuls(view, {})
    widths = sorted({m.n for m in work})
    cells = sorted({(fallback_type(t, n).name, n, b) for t in types for n in widths for b in batches})
    moe = sorted({(fallback_type(t, m.n).name, m.n, m.experts, m.uses) for t in types for m in work if m.experts})
    jobs = [lambda c=c: clock.seconds(*c) for c in cells]
    jobs += [lambda c=c, k=k: clock.expert_seconds(*c, k) for c in moe for k in (1, DEFAULT_UBATCH)]
    for job in tqdm(jobs, desc="timing llama.cpp's matrix products", unit="cell", disable=not progress):
        job()
    clock.save()
    return clock.times


# ------------------------------------------------------------------------------------------ --min-decode-tps

def group_seconds(table: SensitivityTable, work: list[MatMul], clock: KernelClock) -> tuple[list[list[float]], float]:
    """Decode seconds per token of each group at each of its options, and of the tensors outside every group (as
    `work` has them)."""
    from moepack.gguf.types import fallback_type

    by_name = {m.name: m for m in work}
    grouped = {t for g in table.groups for t in g.tensors}

    seconds = [[sum(by_name[t].decode_seconds(clock, fallback_type(o.type, by_name[t].n).name)
                    for t in g.tensors if t in by_name) for o in g.options] for g in table.groups]
    fixed = sum(m.decode_seconds(clock) for m in work if m.name not in grouped)
    return seconds, fixed


def speed_choice(table: SensitivityTable, budget_bytes: int, seconds: list[list[float]], fixed_s: float,
                 limit_s: float, solver: str = "greedy") -> tuple[list[int], float]:
    """The allocation within `budget_bytes` whose predicted decode seconds per token are at most `limit_s`, with the
    least predicted ΔKLD the allocator finds: the budget allocated on ΔKLD + λ · seconds (Lagrangian relaxation of
    the time limit), λ the smallest that meets it (a bisection on log λ). Returns the choice and its seconds: above
    `limit_s` when even the largest λ cannot meet it (then the fastest plan found)."""
    from moepack.stages.allocate import allocate, choice_of

    def solve(lam: float) -> tuple[list[int], float]:
        penalized = dataclasses.replace(table, groups=tuple(
            dataclasses.replace(g, options=tuple(dataclasses.replace(o, dkld=o.dkld + lam * t)
                                                 for o, t in zip(g.options, ts)))
            for g, ts in zip(table.groups, seconds)))
        choice = choice_of(penalized, allocate(penalized, budget_bytes, solver))
        assert choice is not None
        return choice, fixed_s + sum(ts[c] for ts, c in zip(seconds, choice))

    best = solve(0.0)
    if best[1] <= limit_s:
        return best
    lo, hi = -12.0, 12.0  # log10 λ: ΔKLD in nats against seconds per token
    fast = solve(10.0 ** hi)
    if fast[1] > limit_s:
        return fast
    for _ in range(30):
        mid = (lo + hi) / 2
        found = solve(10.0 ** mid)
        if found[1] <= limit_s:
            hi, fast = mid, found
        else:
            lo = mid
        if hi - lo < 0.05:
            break
    return fast

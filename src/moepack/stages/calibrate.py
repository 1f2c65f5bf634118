"""Calibration: run text through the model layer by layer; record routing statistics and the importance matrix.

Per MoE layer and routed expert: routed token slots (→ frequency f_e), the sum of the routing weights that multiply
the expert's output (→ mean score s_e), and the sum of weight × ‖expert output‖₂ (→ REAP saliency). Per weight
matrix (per expert for expert matrices): the sum of squared input activations per input column and the token
count, i.e. llama.cpp's importance matrix. Saved as `calib/stats.safetensors` + `calib/manifest.json`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.backends import Backend, LocalBackend, as_tensor, layer_f32_bytes, open_view, torch_threads
from moepack.errors import MoepackError
from moepack.model.runner import LayerRunner, layer_sources, moe_layers

__all__ = [
    "RouterStats",
    "ImatrixEntry",
    "CalibStats",
    "CalibError",
    "calibrate",
    "calib_shard",
    "merge_shards",
    "shard_bounds",
    "run_calibrate",
    "calib_dir",
    "expert_key",
]

log = logging.getLogger(__name__)

FORMAT = "moepack.calib/1"
RARE_SHARE = 0.01  # an expert with under 1% of the uniform share of token slots is reported as rarely routed


class CalibError(MoepackError, ValueError):
    pass


def expert_key(name: str) -> str:
    """Checkpoint name of one expert's matrix → the name of the stacked entry: `.experts.7.` → `.experts.`."""
    return re.sub(r"\.experts\.\d+\.", ".experts.", name, count=1)


@dataclass
class RouterStats:
    """One MoE layer's routing statistics over `tokens` tokens with `top_k` routed slots each."""

    counts: np.ndarray  # (E,) routed token slots per expert
    weight_sum: np.ndarray  # (E,) sum of the weights multiplying the expert's output (after norm and scaling)
    saliency_sum: np.ndarray  # (E,) sum of weight × ‖expert output‖₂
    tokens: int
    top_k: int

    @property
    def freq(self) -> np.ndarray:
        """f_e: share of routed token slots (sums to 1 over the experts)."""
        return self.counts / max(1, self.tokens * self.top_k)

    @property
    def score(self) -> np.ndarray:
        """s_e: mean routing weight when selected; 0 for a never-routed expert."""
        return self.weight_sum / np.maximum(self.counts, 1)

    @property
    def saliency(self) -> np.ndarray:
        """REAP saliency: mean over routed tokens of weight × ‖expert output‖₂; 0 for a never-routed expert."""
        return self.saliency_sum / np.maximum(self.counts, 1)


@dataclass
class ImatrixEntry:
    """Sum of squared inputs per input column, per matrix: M = experts (stacked) or 1."""

    sums: np.ndarray  # (M, n)
    counts: np.ndarray  # (M,) tokens seen by each matrix

    def mean(self) -> np.ndarray:
        """Mean squared input (M, n); a matrix that saw no token gets ones, as llama-quantize does."""
        c = self.counts[:, None]  # (M, 1)
        return np.where(c > 0, self.sums / np.maximum(c, 1), 1.0).astype(np.float32)


@dataclass
class CalibStats:
    manifest: dict[str, Any]
    router: dict[int, RouterStats]
    imatrix: dict[str, ImatrixEntry]  # checkpoint tensor name; expert matrices under `expert_key(name)`
    heldout: np.ndarray | None = None  # (n, L) token ids kept out of the statistics (for KLD checks)

    def imatrix_for(self, name: str) -> np.ndarray:
        """Mean squared input per column (n,) for one checkpoint matrix (an expert's name gives its own row)."""
        m = re.search(r"\.experts\.(\d+)\.", name)
        key = expert_key(name) if m else name
        if key not in self.imatrix:
            raise KeyError(f"no importance matrix for {name}")
        return self.imatrix[key].mean()[int(m.group(1)) if m else 0]

    def save(self, out: Path) -> None:
        from safetensors.numpy import save_file

        out.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for layer, r in self.router.items():
            arrays[f"router.{layer}.counts"] = r.counts.astype(np.float64)
            arrays[f"router.{layer}.weight_sum"] = r.weight_sum.astype(np.float64)
            arrays[f"router.{layer}.saliency_sum"] = r.saliency_sum.astype(np.float64)
        for key, e in self.imatrix.items():
            arrays[f"imatrix.{key}.in_sum2"] = np.ascontiguousarray(e.sums, dtype=np.float32)
            arrays[f"imatrix.{key}.counts"] = e.counts.astype(np.float64)
        if self.heldout is not None:
            arrays["heldout_ids"] = np.ascontiguousarray(self.heldout, dtype=np.int64)
        tmp = out / "stats.safetensors.tmp"
        save_file(arrays, str(tmp))
        os.replace(tmp, out / "stats.safetensors")
        tmp = out / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2))
        os.replace(tmp, out / "manifest.json")  # written last: its presence marks a complete artifact

    @classmethod
    def load(cls, path: str | Path) -> CalibStats:
        from safetensors.numpy import load_file

        d = calib_dir(path)
        manifest = json.loads((d / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise CalibError(f"{d}: not a moepack calibration ({manifest.get('format')!r}); rerun moepack calibrate")
        arrays = load_file(str(d / "stats.safetensors"))
        router: dict[int, RouterStats] = {}
        for layer in manifest["moe_layers"]:
            router[int(layer)] = RouterStats(
                arrays[f"router.{layer}.counts"], arrays[f"router.{layer}.weight_sum"],
                arrays[f"router.{layer}.saliency_sum"], int(manifest["tokens"]), int(manifest["top_k"]))
        imatrix: dict[str, ImatrixEntry] = {}
        for k, v in arrays.items():
            if k.startswith("imatrix.") and k.endswith(".in_sum2"):
                key = k[len("imatrix."):-len(".in_sum2")]
                imatrix[key] = ImatrixEntry(v.astype(np.float64), arrays[f"imatrix.{key}.counts"])
        return cls(manifest, router, imatrix, arrays.get("heldout_ids"))


def calib_dir(path: str | Path) -> Path:
    """A run directory or its `calib/` subdirectory → the directory holding manifest.json."""
    p = Path(path)
    for d in (p / "calib", p):
        if (d / "manifest.json").is_file() and (d / "stats.safetensors").is_file():
            return d
    raise CalibError(f"{p}: no calibration statistics (calib/manifest.json); run `moepack calibrate ... -o {p}`")


# ---- collection ------------------------------------------------------------------------------------------------
@dataclass
class _Acc:
    """float64 accumulators for one run."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # imatrix key → (M, n)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # imatrix key → (M,)
    router: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add(self, key: str, x: torch.Tensor, row: int = 0, n_rows: int = 1) -> None:
        x = x.reshape(-1, x.shape[-1])  # (T, n)
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_rows, x.shape[-1], dtype=torch.float64)
            self.counts[key] = torch.zeros(n_rows, dtype=torch.float64)
        self.sums[key][row] += x.float().pow(2).sum(0).double()
        self.counts[key][row] += x.shape[0]

    def add_heads(self, key: str, x: torch.Tensor, head0: int = 0, n_heads: int | None = None) -> None:
        """Per-head inputs x (T, h, d) of heads head0..head0+h-1 (of n_heads): one row per head."""
        n_heads = n_heads or x.shape[1]
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_heads, x.shape[2], dtype=torch.float64)
            self.counts[key] = torch.zeros(n_heads, dtype=torch.float64)
        self.sums[key][head0:head0 + x.shape[1]] += x.float().pow(2).sum(0).double()
        self.counts[key][head0:head0 + x.shape[1]] += x.shape[0]


def _check_experts_layout(experts: torch.nn.Module) -> None:
    flags = (getattr(experts, "has_bias", False), getattr(experts, "is_transposed", False),
             getattr(experts, "is_concatenated", True), getattr(experts, "has_gate", True))
    if flags != (False, False, True, True):
        raise CalibError(f"{type(experts).__name__}: unsupported expert layout (bias/transposed/interleaved)")


def _instrument_experts(experts: torch.nn.Module, layer: int, acc: _Acc, names: dict[str, str]) -> None:
    """Replace the experts' forward with the eager per-expert loop that also records statistics.

    Computes what transformers' eager experts forward computes, in the same order; `names` maps "gate", "up",
    "down" to the imatrix keys.
    """
    _check_experts_layout(experts)
    n_exp = int(experts.num_experts)
    r = acc.router.setdefault(layer, {k: torch.zeros(n_exp, dtype=torch.float64)
                                      for k in ("counts", "weight_sum", "saliency_sum")})

    module = weakref.ref(experts)  # no module → forward → module cycle: the layer is freed as soon as it is dropped

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        experts = module()
        out = torch.zeros_like(hidden_states)  # (T, H)
        flat = top_k_index.reshape(-1)  # (T*k,)
        r["counts"] += torch.bincount(flat, minlength=n_exp).double()
        r["weight_sum"].index_add_(0, flat, top_k_weights.reshape(-1).double())
        for e in torch.unique(flat).tolist():
            tok, pos = torch.where(top_k_index == e)  # routed tokens and their top-k slot
            x = hidden_states[tok]  # (n_e, H)
            acc.add(names["gate"], x, e, n_exp)
            acc.add(names["up"], x, e, n_exp)
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, I) each
            a = experts.act_fn(gate) * up  # (n_e, I)
            acc.add(names["down"], a, e, n_exp)
            y = torch.nn.functional.linear(a, experts.down_proj[e])  # (n_e, H)
            w = top_k_weights[tok, pos]  # (n_e,)
            r["saliency_sum"][e] += (w.double() * y.double().norm(dim=-1)).sum()
            out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
        return out

    experts.forward = forward


def _preparer(view: CheckpointView, acc: _Acc):
    """`prepare(i, layer)` for LayerRunner.run: hooks every linear map and instruments the experts."""

    def prepare(i: int, layer: torch.nn.Module) -> None:
        sources = layer_sources(view, i)
        for path, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and f"{path}.weight" in sources:
                key = sources[f"{path}.weight"].names[0]
                mod.register_forward_pre_hook(lambda m, args, key=key: acc.add(key, args[0]))
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and "mlp.experts.gate_up_proj" in sources:
            n = view.facts.n_experts
            gu = sources["mlp.experts.gate_up_proj"].names
            names = {"gate": expert_key(gu[0]), "up": expert_key(gu[n]),
                     "down": expert_key(sources["mlp.experts.down_proj"].names[0])}
            _instrument_experts(experts, i, acc, names)
        if _mla_split(view):
            _hook_mla_k_b(view, i, layer, acc)
            _hook_mla_v_b(view, i, layer, acc)

    return prepare


def _mla_split(view: CheckpointView) -> bool:
    """Whether llama.cpp runs this model with kv_b_proj split into attn_k_b and attn_v_b (DeepSeek MLA)."""
    return view.spec.gguf_arch == "deepseek2" and "kv_lora_rank" in view.config


def _hook_mla_v_b(view: CheckpointView, i: int, layer: torch.nn.Module, acc: _Acc, chunk: int = 16) -> None:
    """Input of llama.cpp's attn_v_b: per head, the attention-weighted sum of the normed latent kv (kv_lora wide).
    Needs the attention probabilities, so DeepSeek layers are calibrated with eager attention."""
    attn = layer.self_attn
    key = f"model.layers.{i}.self_attn.v_b_proj.weight"
    latent: dict[str, torch.Tensor] = {}

    def keep_latent(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        latent["c"] = out.reshape(out.shape[0], 1, -1, out.shape[-1])  # (B, 1, L, kv_lora)

    def collect(mod: torch.nn.Module, args: Any, out: Any) -> None:
        w, c = out[1], latent.pop("c")  # (B, H, L, L), (B, 1, L, kv_lora)
        if w is None:
            raise CalibError("DeepSeek calibration needs attention probabilities (eager attention)")
        n_head = w.shape[1]
        for h0 in range(0, n_head, chunk):
            z = torch.matmul(w[:, h0:h0 + chunk].to(c.dtype), c)  # (B, h, L, kv_lora)
            acc.add_heads(key, z.transpose(1, 2).reshape(-1, z.shape[1], z.shape[-1]), h0, n_head)  # (B*L, h, kv)

    attn.kv_a_layernorm.register_forward_hook(keep_latent)
    attn.register_forward_hook(collect)


def _hook_mla_k_b(view: CheckpointView, i: int, layer: torch.nn.Module, acc: _Acc) -> None:
    """llama.cpp splits DeepSeek's kv_b_proj into attn_k_b (applied to q_nope per head) and attn_v_b; record
    q_nope, the input of attn_k_b, under `...self_attn.k_b_proj.weight` (rows: heads)."""
    cfg = view.config
    n_head, nope = int(cfg["num_attention_heads"]), int(cfg["qk_nope_head_dim"])
    q = getattr(layer.self_attn, "q_b_proj", None) or getattr(layer.self_attn, "q_proj", None)
    if q is None:
        return
    key = f"model.layers.{i}.self_attn.k_b_proj.weight"

    def hook(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        acc.add_heads(key, out.reshape(-1, n_head, out.shape[-1] // n_head)[..., :nope])  # (T, n_head, nope)

    q.register_forward_hook(hook)


def _never_and_rare(router: dict[int, RouterStats]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    never: dict[str, list[int]] = {}
    rare: dict[str, list[int]] = {}
    for layer, r in router.items():
        uniform = 1.0 / len(r.counts)
        z = [int(e) for e in np.flatnonzero(r.counts == 0)]
        lo = [int(e) for e in np.flatnonzero((r.counts > 0) & (r.freq < RARE_SHARE * uniform))]
        if z:
            never[str(layer)] = z
        if lo:
            rare[str(layer)] = lo
    return never, rare


def calib_shard(ids: np.ndarray, view: Any, batch_size: int, threads: int,
                progress: bool = False) -> dict[str, np.ndarray]:
    """One calibration task: the raw float64 sums of token sequences `ids` (n, L) through the model, as
    {"router.L.counts|weight_sum|saliency_sum": (E,), "imatrix.KEY.sums": (M, n), "imatrix.KEY.counts": (M,)}.
    `view` is a checkpoint view or a `ViewRef` (re-opened from storage); runs on `threads` torch threads."""
    view = open_view(view)
    with torch_threads(threads):
        runner = LayerRunner(view, attn_implementation="eager" if _mla_split(view) else "sdpa")
        acc = _Acc()
        with torch.inference_mode():
            h = runner.embed(as_tensor(ids))  # (n, L, H)
            runner.run(h, prepare=_preparer(view, acc), batch_size=batch_size, inplace=True,
                       progress="calibrate" if progress else False)
            if "lm_head.weight" in view.tensors:
                for b0 in range(0, h.shape[0], batch_size):
                    acc.add("lm_head.weight", runner.final_norm(h[b0:b0 + batch_size]))
        runner.release()
    out = {f"router.{layer}.{k}": v.numpy() for layer, d in acc.router.items() for k, v in d.items()}
    out.update({f"imatrix.{k}.sums": v.numpy() for k, v in acc.sums.items()})
    out.update({f"imatrix.{k}.counts": v.numpy() for k, v in acc.counts.items()})
    return out


def merge_shards(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum the shards' arrays in shard order (a key missing from a shard counts as zeros)."""
    out: dict[str, np.ndarray] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = v.copy() if k not in out else out[k] + v
    return out


def shard_bounds(n: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Up to `shards` contiguous blocks of the n sequences made of whole forward batches (their counts differ by
    at most one): every batch is then the batch a one-shard run forms, so its float32 partial sums are the same
    and shards change only the order of the float64 additions."""
    n_batch = -(-n // batch_size)
    shards = max(1, min(shards, n_batch))
    q, r = divmod(n_batch, shards)
    starts = [min(n, (i * q + min(i, r)) * batch_size) for i in range(shards + 1)]
    return list(zip(starts[:-1], starts[1:]))


def _shard_bytes(view: CheckpointView, n_seq: int, seq_len: int, batch_size: int) -> int:
    """Estimated peak memory of one calibration task (+25%): a decoder layer in f32 (+10%: the tensor being read),
    the shard's hidden states, a batch's activations (eager MLA attention probabilities), the embedding as stored,
    the float64 sums."""
    cfg, hidden = view.config, view.facts.hidden
    heads, wide = int(cfg.get("num_attention_heads", 1)), max(hidden, view.facts.expert_ffn) * 8
    act = 4 * batch_size * seq_len * max(wide, 3 * heads * seq_len)
    embed = view.tensors["model.embed_tokens.weight"].nbytes if "model.embed_tokens.weight" in view.tensors else 0
    sums = 16 * sum(t.shape[-1] for t in view.tensors.values() if len(t.shape) == 2)
    return int(1.25 * (1.1 * layer_f32_bytes(view) + 4 * n_seq * seq_len * hidden + act + embed + sums))


def calibrate(view: CheckpointView, ids: np.ndarray, *, batch_size: int = 8, progress: bool = True,
              heldout: np.ndarray | None = None, manifest: dict[str, Any] | None = None,
              backend: Backend | None = None, shards: int | None = None,
              threads: int | None = None) -> CalibStats:
    """Statistics of token sequences `ids` (N, L) through `view`, one decoder layer in memory at a time.

    The sequences are split into `shards` contiguous blocks of whole batches (default 1 in-process, one per task
    slot on Ray; batches shrink when there are fewer batches than shards), each run as one `calib_shard` task on
    `backend` (default in-process) with `threads` torch threads (default: torch's current count; on Ray the cores
    of the smallest node). The shards' sums are added in shard order, so for the same shards and threads the
    result is bitwise the same on every backend, and other shard counts change only the float64 rounding."""
    if not moe_layers(view):
        raise CalibError(f"{view.root}: no MoE layers; nothing to calibrate")
    if shards is not None and shards < 1:
        raise CalibError(f"shards must be at least 1 (got {shards})")
    t0 = time.time()
    backend = backend or LocalBackend()
    threads = threads or backend.default_threads(torch.get_num_threads())
    want = min(shards or backend.slots(threads), len(ids))
    if want > -(-len(ids) // batch_size):  # a shard holds whole batches: smaller batches for more shards
        batch_size = max(1, len(ids) // want)
        log.info("batches of %d sequences, so that %d shards hold whole batches", batch_size, want)
    bounds = shard_bounds(len(ids), want, batch_size)
    one = backend.local and len(bounds) == 1
    parts = backend.map(calib_shard, [np.ascontiguousarray(ids[a:b]) for a, b in bounds], backend.view_arg(view),
                        batch_size, threads, one and progress, desc="calibrate", num_cpus=threads,
                        memory=_shard_bytes(view, bounds[0][1] - bounds[0][0], ids.shape[1], batch_size),
                        progress=progress)
    sums = merge_shards(parts)
    n_tok = int(ids.size)
    top_k = view.facts.top_k
    router = {layer: RouterStats(sums[f"router.{layer}.counts"], sums[f"router.{layer}.weight_sum"],
                                 sums[f"router.{layer}.saliency_sum"], n_tok, top_k)
              for layer in sorted({int(k.split(".")[1]) for k in sums if k.startswith("router.")})}
    keys = sorted(k[len("imatrix."):-len(".sums")] for k in sums if k.startswith("imatrix.") and k.endswith(".sums"))
    imatrix = {k: ImatrixEntry(sums[f"imatrix.{k}.sums"], sums[f"imatrix.{k}.counts"]) for k in keys}
    never, rare = _never_and_rare(router)
    for layer, ex in never.items():
        log.warning("layer %s: expert(s) %s never routed on the calibration text; their importance matrix falls "
                    "back to ones (as llama-quantize does) and their score/saliency is 0", layer, ex)
    man = dict(manifest or {})
    man.update(format=FORMAT, fingerprint=view.fingerprint(), arch=view.facts.arch, tokens=n_tok,
               seq_len=int(ids.shape[1]), n_sequences=int(ids.shape[0]), top_k=top_k,
               n_experts=view.facts.n_experts, moe_layers=list(moe_layers(view)), never_routed=never,
               rarely_routed=rare, heldout_tokens=int(heldout.size) if heldout is not None else 0,
               shards=len(bounds), batch_size=batch_size, threads=threads, backend=backend.name,
               seconds=round(time.time() - t0, 2))
    return CalibStats(man, router, imatrix, heldout)


def _split_tokens(ids: np.ndarray, tokens: int, heldout: int, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    from moepack.model.textdata import chunk_tokens

    if len(ids) < tokens + heldout:
        have = len(ids)
        heldout = min(heldout, have // 8)
        tokens = have - heldout
        log.warning("text gives %d tokens, fewer than requested; using %d for statistics, %d held out",
                    have, tokens, heldout)
    calib = chunk_tokens(ids[:tokens], seq_len)  # (N, L)
    held = None
    if heldout >= seq_len:
        held = chunk_tokens(ids[tokens:tokens + heldout], seq_len)  # (n, L)
    return calib, held


def run_calibrate(model_dir: str | Path, text: str | Path, out_dir: str | Path, *, tokens: int = 50_000,
                  seq_len: int = 512, heldout_tokens: int = 4096, batch_size: int = 8,
                  imatrix_out: str | Path | None = None, progress: bool = True, backend: Backend | None = None,
                  shards: int | None = None, threads: int | None = None) -> CalibStats:
    """The calibrate stage: statistics into OUT_DIR/calib/ (skipped when there with the same inputs; `shards`
    counts as an input only when given: the default takes statistics made with any number of shards)."""
    from moepack.model.textdata import text_sha256, tokenize_file

    if tokens < seq_len:
        raise CalibError(f"--calib-tokens {tokens} is less than one sequence of --seq-len {seq_len}")
    if shards is not None and shards < 1:
        raise CalibError(f"--shards must be at least 1 (got {shards})")
    view = open_checkpoint(model_dir)
    if not moe_layers(view):
        raise CalibError(f"{model_dir}: no MoE layers; nothing to calibrate")
    inputs = dict(model=str(Path(model_dir).resolve()), text=str(Path(text).resolve()),
                  text_sha256=text_sha256(text), tokens_requested=tokens, seq_len_requested=seq_len,
                  heldout_requested=heldout_tokens)
    if shards is not None:
        inputs["shards"] = shards
    out = Path(out_dir) / "calib"
    stats = _reuse(out, view, inputs)
    if stats is None:
        ids = tokenize_file(model_dir, text, tokens + heldout_tokens)
        calib, held = _split_tokens(ids, tokens, heldout_tokens, seq_len)
        if shards is not None and shards > len(calib):
            raise CalibError(f"--shards {shards} exceeds the {len(calib)} calibration sequences; use at most "
                             f"{len(calib)} shards, or more --calib-tokens or a shorter --seq-len")
        log.info("calibrating %s on %d tokens (%d x %d)", view.root, calib.size, *calib.shape)
        stats = calibrate(view, calib, batch_size=batch_size, progress=progress, heldout=held, manifest=inputs,
                          backend=backend, shards=shards, threads=threads)
        stats.save(out)
        log.info("calibration statistics in %s (%.1f s)", out, stats.manifest["seconds"])
    if imatrix_out:
        from moepack.gguf.imatrix import write_imatrix_gguf

        write_imatrix_gguf(stats, view, imatrix_out)
    return stats


def _reuse(out: Path, view: CheckpointView, inputs: dict[str, Any]) -> CalibStats | None:
    if not (out / "manifest.json").is_file():
        return None
    try:
        stats = CalibStats.load(out)
    except (MoepackError, OSError, KeyError, json.JSONDecodeError):
        return None
    same = stats.manifest.get("fingerprint") == view.fingerprint() and all(
        stats.manifest.get(k) == v for k, v in inputs.items() if k != "model")
    if same:
        log.info("reusing calibration statistics in %s (same model, text and settings)", out)
        return stats
    return None

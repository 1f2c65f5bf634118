"""Calibration: run text through the model layer by layer; record routing statistics and the importance matrix.

Per MoE layer and routed expert: routed token slots (→ frequency f_e), the sum of the routing weights that multiply
the expert's output (→ mean score s_e), and the sum of weight × ‖expert output‖₂ (→ REAP saliency). Per weight
matrix (per expert for expert matrices): the sum of squared input activations per input column and the token
count, i.e. llama.cpp's importance matrix. Per MoE layer also the Gram matrix of all experts' outputs on a fixed
sample of about 256 of its tokens (the output similarity expert merging assigns by). Saved as
`calib/stats.safetensors` + `calib/manifest.json`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moepack.backends import Backend, LocalBackend, as_tensor, layer_f32_bytes, open_view, torch_threads
from moepack.errors import MoepackError
from moepack.model.arch import expert_id, expert_key
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.model.runner import LayerRunner, moe_layers
from moepack.model.textdata import CalibSource, as_sources, text_sha256, tokenize_source
from moepack.rundir import RunDir
from moepack.schema import CALIB_FORMAT, CalibInputs, CalibManifest, CalibStats, ImatrixEntry, RouterStats
from moepack.stages.calib_hooks import Accumulator, mla_split, preparer, sample_stride

__all__ = [
    "CalibError",
    "calibrate",
    "calib_shard",
    "merge_shards",
    "shard_bounds",
    "run_calibrate",
    "imatrix_for",
    "usable_sources",
]

log = logging.getLogger(__name__)

RARE_SHARE = 0.01  # an expert with under 1% of the uniform share of token slots is reported as rarely routed


class CalibError(MoepackError, ValueError):
    pass


def imatrix_for(stats: CalibStats, name: str) -> np.ndarray:
    """Mean squared input per column (n,) for one checkpoint matrix (an expert's name gives its own row)."""
    e = expert_id(name)
    key = expert_key(name) if e is not None else name
    if key not in stats.imatrix:
        raise KeyError(f"no importance matrix for {name}")
    return stats.imatrix[key].mean()[e if e is not None else 0]


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
        runner = LayerRunner(view, attn_implementation="eager" if mla_split(view) else "sdpa")
        acc = Accumulator(sim_stride=sample_stride(int(ids.size)))  # + the output Gram of every expert
        with torch.inference_mode():
            h = runner.embed(as_tensor(ids))  # (n, L, H)
            runner.run(h, prepare=preparer(view, acc), batch_size=batch_size, inplace=True,
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
              selection: np.ndarray | None = None, inputs: CalibInputs | None = None,
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
                                 sums[f"router.{layer}.saliency_sum"], n_tok, top_k,
                                 sums.get(f"router.{layer}.out_gram"))
              for layer in sorted({int(k.split(".")[1]) for k in sums if k.startswith("router.")})}
    keys = sorted(k[len("imatrix."):-len(".sums")] for k in sums if k.startswith("imatrix.") and k.endswith(".sums"))
    imatrix = {k: ImatrixEntry(sums[f"imatrix.{k}.sums"], sums[f"imatrix.{k}.counts"]) for k in keys}
    never, rare = _never_and_rare(router)
    for layer, ex in never.items():
        log.warning("layer %s: expert(s) %s never routed on the calibration text; their importance matrix falls "
                    "back to ones (as llama-quantize does) and their score/saliency is 0", layer, ex)
    man = CalibManifest(fingerprint=view.fingerprint(), arch=view.facts.arch, tokens=n_tok,
                        seq_len=int(ids.shape[1]), n_sequences=int(ids.shape[0]), top_k=top_k,
                        n_experts=view.facts.n_experts, moe_layers=list(moe_layers(view)), never_routed=never,
                        rarely_routed=rare, selection_tokens=int(selection.size) if selection is not None else 0,
                        shards=len(bounds), batch_size=batch_size, threads=threads, backend=backend.name,
                        seconds=round(time.time() - t0, 2), inputs=inputs)
    return CalibStats(man, router, imatrix, selection)


def _split_tokens(ids: np.ndarray, tokens: int, selection: int, seq_len: int,
                  report: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Statistics tokens, then held-out tokens, then report tokens (each (n, L), None when under one sequence)."""
    from moepack.model.textdata import chunk_tokens

    if len(ids) < tokens + selection + report:
        have = len(ids)
        selection, report = min(selection, have // 8), min(report, have // 8)
        tokens = have - selection - report
        log.warning("text gives %d tokens, fewer than requested; using %d for statistics, %d held out, %d for the "
                    "report", have, tokens, selection, report)
    calib = chunk_tokens(ids[:tokens], seq_len)  # (N, L)
    held = chunk_tokens(ids[tokens:tokens + selection], seq_len) if selection >= seq_len else None  # (n, L)
    rep = chunk_tokens(ids[tokens + selection:tokens + selection + report], seq_len) if report >= seq_len else None
    return calib, held, rep


def run_calibrate(model: str | Path | CheckpointView, text: str | Path | Sequence[CalibSource] | None,
                  out_dir: str | Path, *, tokens: int = 50_000, seq_len: int = 512, selection_tokens: int = 4096,
                  batch_size: int = 8, imatrix_out: str | Path | None = None, progress: bool = True,
                  backend: Backend | None = None, shards: int | None = None, threads: int | None = None,
                  report_tokens: int = 0) -> CalibStats:
    """The calibrate stage of `model` (a checkpoint directory, or its view already opened) on `text` (one file, named
    sources of text or conversations, or None: the bundled set; moepack.model.textdata.as_sources): statistics into
    OUT_DIR/calib/, a stage of OUT_DIR as a run directory (moepack.rundir: skipped when there with the same inputs;
    `shards` counts as an input only when given: the default takes statistics made with any number of shards).
    `report_tokens` more are held out after the held-out tokens (CalibStats.report), for a KLD no choice saw. With
    several sources every one gives its share of each part, and the held-out sequences keep their domain."""
    if tokens < seq_len:
        raise CalibError(f"--calib-tokens {tokens} is less than one sequence of --seq-len {seq_len}")
    if shards is not None and shards < 1:
        raise CalibError(f"--shards must be at least 1 (got {shards})")
    view = model if isinstance(model, CheckpointView) else open_checkpoint(model)
    if not moe_layers(view):
        raise CalibError(f"{view.root}: no MoE layers; nothing to calibrate")
    sources = usable_sources(view.root, as_sources(text))
    inputs = _inputs(view, sources, tokens, seq_len, selection_tokens, shards, report_tokens)
    run = RunDir(Path(out_dir))
    out = run.layout.calib
    made: list[CalibStats] = []

    def work() -> None:
        made.append(_calibrate_text(view, sources, inputs, batch_size, progress, backend, threads))
        made[0].write(out)
        log.info("calibration statistics in %s (%.1f s)", out, made[0].manifest.seconds)

    # The model by fingerprint, not path; the shard count only when given (`accept`).
    key = {"model": view.fingerprint(), "format": CALIB_FORMAT,
           "inputs": {k: v for k, v in inputs.to_dict().items() if k not in ("model", "shards")}}
    if not run.stage("calibrate", key, out, work, accept=lambda: _made_with_shards(out, shards)):
        log.info("reusing calibration statistics in %s (same model, text and settings)", out)
    stats = made[0] if made else CalibStats.read(out)
    if imatrix_out:
        from moepack.gguf.imatrix import ImatrixFile, write_imatrix_gguf

        write_imatrix_gguf(ImatrixFile.of_stats(stats, view), imatrix_out)
    return stats


def usable_sources(model_dir: str | Path, sources: list[CalibSource]) -> list[CalibSource]:
    """`sources` less the bundled conversation part when the model has no chat template (conversations a user gave
    need one: moepack.model.chat raises a clear error)."""
    if not any(s.chat and s.bundled for s in sources):
        return sources
    from moepack.model.chat import has_chat_template

    keep = [s for s in sources if not (s.chat and s.bundled) or has_chat_template(model_dir)]
    if len(keep) < len(sources):
        log.info("calibration: %s has no chat template; the bundled conversations are left out", model_dir)
    return keep


def _inputs(view: CheckpointView, sources: list[CalibSource], tokens: int, seq_len: int, selection: int,
            shards: int | None, report: int) -> CalibInputs:
    """The calibration request: one plain text as before domains existed (its path and sha256), several sources
    by their records (a name each) with `text` naming them all and `text_sha256` hashing their hashes."""
    import hashlib

    model = str(Path(view.root).resolve())
    if len(sources) == 1 and not sources[0].chat:
        path = sources[0].path
        return CalibInputs(model, str(path.resolve()), text_sha256(path), tokens, seq_len, selection, shards, report)
    records = [s.record() for s in sources]
    text = "; ".join(f"{r['name']}={r['path']}" for r in records)
    sha = hashlib.sha256("".join(str(r["sha256"]) for r in records).encode()).hexdigest()
    return CalibInputs(model, text, sha, tokens, seq_len, selection, shards, report, records)


def _per_domain(n: int, domains: int, seq_len: int) -> int:
    """Tokens of a held-out part each of `domains` gives: whole sequences, at least one when any is asked for."""
    return 0 if n < seq_len else -(-n // (domains * seq_len)) * seq_len


def _interleave(parts: list[np.ndarray | None]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The domains' sequences (n_d, L) taken in turn, so that any prefix holds every domain, and each one's domain
    index (n,); (None, None) when no domain has one."""
    have = [(i, p) for i, p in enumerate(parts) if p is not None and len(p)]
    if not have:
        return None, None
    order = sorted((j, i) for i, p in have for j in range(len(p)))  # (position in its domain, domain)
    rows = np.stack([parts[i][j] for j, i in order])  # (n, L)
    return rows, np.asarray([i for _, i in order], dtype=np.int64)


Held = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _domain_tokens(view: CheckpointView, sources: list[CalibSource], inputs: CalibInputs) -> Held:
    """(statistics (N, L), selection (n, L), its domains (n,), report (m, L), its domains (m,)) of several sources:
    each gives an equal share of the statistics tokens and whole sequences of the held-out parts."""
    n, length = len(sources), inputs.seq_len_requested
    tokens = max(length, inputs.tokens_requested // n)
    sel, rep = _per_domain(inputs.selection_requested, n, length), _per_domain(inputs.report_requested, n, length)
    parts = []
    for src in sources:
        ids = tokenize_source(view.root, src, tokens + sel + rep)
        if len(ids) < length:
            raise CalibError(f"calibration domain {src.name!r} ({src.path}) gives {len(ids)} tokens, fewer than one "
                             f"sequence of {length}; give it more text or leave it out")
        parts.append(_split_tokens(ids, tokens, sel, length, rep))
    calib, _ = _interleave([p[0] for p in parts])
    return (calib, *_interleave([p[1] for p in parts]), *_interleave([p[2] for p in parts]))


def _calibrate_text(view: CheckpointView, sources: list[CalibSource], inputs: CalibInputs, batch_size: int,
                    progress: bool, backend: Backend | None, threads: int | None) -> CalibStats:
    """Statistics of the requested tokens of `sources` through `view`, with the selection and report tokens after
    them held out (per domain, each sequence labelled, when there are several)."""
    tokens, selection, report_n = inputs.tokens_requested, inputs.selection_requested, inputs.report_requested
    held_domain = report_domain = None
    if inputs.domains is None:
        ids = tokenize_source(view.root, sources[0], tokens + selection + report_n)
        calib, held, report = _split_tokens(ids, tokens, selection, inputs.seq_len_requested, report_n)
    else:
        calib, held, held_domain, report, report_domain = _domain_tokens(view, sources, inputs)
    if inputs.shards is not None and inputs.shards > len(calib):
        raise CalibError(f"--shards {inputs.shards} exceeds the {len(calib)} calibration sequences; use at most "
                         f"{len(calib)} shards, or more --calib-tokens or a shorter --seq-len")
    log.info("calibrating %s on %d tokens (%d x %d)%s", view.root, calib.size, *calib.shape,
             f" from {len(sources)} domains: {', '.join(s.name for s in sources)}" if inputs.domains else "")
    stats = calibrate(view, calib, batch_size=batch_size, progress=progress, selection=held, inputs=inputs,
                      backend=backend, shards=inputs.shards, threads=threads)
    stats.report, stats.selection_domain, stats.report_domain = report, held_domain, report_domain
    return stats


def _made_with_shards(out: Path, shards: int | None) -> bool:
    """Whether the statistics in `out` answer a request for `shards` (None: any count)."""
    if shards is None:
        return True
    try:
        return CalibManifest.read(out).shards == shards
    except (MoepackError, OSError, KeyError):
        return False

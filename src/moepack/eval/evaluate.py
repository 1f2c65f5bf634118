"""Quality, speed and memory of GGUF files (`moepack eval MODEL.gguf [...] --reference MODEL_DIR|REF.gguf --text FILE`),
measured through llama-cpp-python (the runtime users deploy with), against a reference model.

What is measured, and how:

- Text: the reference's tokenizer (tokenizer.json of a checkpoint directory, or the reference GGUF's own) turns the
  text into ids once, paragraph by paragraph; every model is fed those same ids. Each model's own tokenizer is
  checked against them on a sample (`tokenizer_agrees`).
- Windows: the first `tokens` ids are cut into non-overlapping windows of `ctx` tokens. As llama-perplexity does,
  the first half of each window is context only: the logits at positions ctx/2 .. ctx-2 predict tokens
  ctx/2+1 .. ctx-1, so each window scores ctx/2 - 1 tokens. No BOS token is inserted. By default `tokens` is
  enough for 16,384 scored tokens (`reference.tokens_for`); a shorter text scores the windows it holds and
  `settings.short_text` says how many of those asked for.
- `ppl`: exp(mean negative log-likelihood of the scored tokens).
- `kld_*`: KL(reference ‖ model) of the next-token distributions, in nats, per scored token: mean, median, p99,
  p99.9, max, and the 95 % confidence interval of the mean (`kld_ci95_low/high`) from the spread of the window
  means (with two windows or more).
- Against the reference, as llama-perplexity's KL-divergence run (`metrics.pair_summary`): `top1`, the share of
  scored positions where the model's most likely token is the reference's ("same top"); `dp_rms` and `dp_mean`, the
  RMS and mean of Δp = p_model(target) − p_ref(target); `ppl_ratio` = model PPL / reference PPL =
  exp(mean(nll_model − nll_ref)), with `ln_ppl_ratio`. Each has a 95 % interval (`*_ci95_low/high`) from the
  window means, as the KLD has: tokens of one window are correlated, so a token-level standard error is too narrow.
- Multiple choice (`moepack.eval.mc`): PIQA, HellaSwag, a TinyStories cloze set; log-likelihood of each ending.
- Speed and memory: each model alone in a fresh Python subprocess, loaded with `n_ctx = ctx` (no logits_all):
  a warm-up, then `speed.SPEED_RUNS` runs of a timed prompt eval of `prompt_tokens` text tokens and `gen_tokens`
  timed greedy decode steps; `prompt_tps`, `decode_tps` are the medians of those runs (each run's in
  `speed_runs`), since one run swings several-fold with other load on the machine. `peak_rss_bytes` is the
  process's VmHWM after that, `base_rss_bytes` its RSS before loading (interpreter and libraries). The Markdown
  shows them in a table of their own, apart from the quality numbers, which do not depend on the machine.
- `bpw`: 8 × file size / the reference's parameter count (the ORIGINAL model's, so pruning lowers it);
  `bpw_tensors` the same from tensor data alone.

Threads: logits are bit-identical for any thread count. `EvalConfig`'s default is 1 because ggml's worker threads
spin at barriers: on a machine whose cores are shared with other jobs, 2 threads ran 10-40x slower than 1. The
command line's `--threads` defaults to moepack's common 2, to measure speed as the smallest supported device would
see it, on an otherwise idle machine.

Reference log-probabilities are computed once and cached under `cache_dir` (default ~/.cache/moepack/eval), keyed by
the reference's fingerprint, the text's hash, ctx and tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moepack import __version__
from moepack.atomic import atomic_write_text
from moepack.eval import mc
from moepack.eval.reference import (ROW_CHUNK, EvalConfig, EvalError, LlamaScorer, Reference, Scorer, Tokenize,
                                    gguf_counts, prepare_reference)
from moepack.eval.speed import SPEED_RUNS, measure_speed
from moepack.model import metrics
from moepack.model.chat import read_conversations
from moepack.model.textdata import read_text, text_sha256

__all__ = ["SCORING", "evaluate", "evaluate_model", "kld_with_ci", "with_ci", "window_metrics", "to_markdown",
           "write_report"]

log = logging.getLogger(__name__)

SCORING = ("non-overlapping windows of ctx tokens; the second half of each window is scored as llama-perplexity does "
           "(ctx/2 - 1 tokens per window); no BOS inserted; KLD = KL(reference || model) in nats; "
           "dp = p_model(target) - p_ref(target); ppl_ratio = exp(mean(nll_model - nll_ref)); every 95 % CI from "
           "the spread of the window means (1.96 x their standard deviation / sqrt(windows)), the RMS dp's as the "
           "square root of mean(dp^2)'s, the PPL ratio's as exp of its log's")
_SAMPLE_CHARS = 4000  # text used to check that a model's tokenizer agrees with the reference's


def window_metrics(scorer: Scorer, ref: Reference, cfg: EvalConfig, desc: str = "") -> dict[str, float]:
    """PPL, KLD statistics, same-top share, Δp and PPL ratio of `scorer` over the reference's windows."""
    if scorer.n_vocab != ref.logp.shape[1]:
        raise EvalError(f"{desc}: vocabulary of {scorer.n_vocab} tokens, the reference has {ref.logp.shape[1]}")
    s = cfg.ctx - cfg.first - 1
    nll = np.empty(len(ref.nll))
    kld = np.empty(len(ref.nll))
    top1 = np.empty(len(ref.nll), dtype=bool)
    for w, win in enumerate(tqdm(ref.windows, desc=desc or "eval", unit="win", leave=False, disable=None)):
        logits = scorer.window_logits(win)[cfg.first: cfg.ctx - 1]  # (S, V)
        targets = win[cfg.first + 1:]  # (S,)
        top1[w * s: (w + 1) * s] = metrics.top1(logits) == ref.top1[w * s: (w + 1) * s]
        for r in range(0, s, ROW_CHUNK):
            # Rounded to the reference's storage type so that a model scored against itself gives exactly 0.
            lp = metrics.log_probs(logits[r: r + ROW_CHUNK]).astype(ref.logp.dtype).astype(np.float64)  # (c, V)
            row = w * s + r
            rlp = np.asarray(ref.logp[row: row + len(lp)], dtype=np.float64)  # (c, V)
            kld[row: row + len(lp)] = metrics.token_kld(rlp, lp)
            nll[row: row + len(lp)] = metrics.nll(lp, targets[r: r + len(lp)])
    blocks = len(ref.windows)
    return {"ppl": metrics.ppl(nll), **metrics.kld_summary(kld, blocks),
            **metrics.pair_summary(ref.nll, nll, top1, blocks)}


def _mc_results(scorer: Scorer, tokenize: Tokenize, tasks: dict[str, list[mc.McItem]], name: str) -> dict:
    return {t: mc.score_items(t, scorer, tokenize, items, desc=f"{t} {name}").to_dict() for t, items in tasks.items()}


def _reference_mc(ref: Reference, tasks: dict[str, list[mc.McItem]], cfg: EvalConfig) -> dict:
    """The reference's multiple-choice accuracy, cached next to its log-probs."""
    out: dict[str, Any] = {}
    todo = {}
    for t, items in tasks.items():
        h = hashlib.sha256(json.dumps([(i.context, i.endings, i.gold) for i in items]).encode()).hexdigest()[:12]
        p = ref.cache / f"mc-{t}-{len(items)}-{h}.json"
        if p.is_file():
            out[t] = json.loads(p.read_text())
        else:
            todo[t] = (items, p)
    if todo:
        scorer = ref.scorer(cfg)
        for t, (items, p) in todo.items():
            out[t] = _mc_results(scorer, ref.tokenize, {t: items}, "reference")[t]
            atomic_write_text(p, json.dumps(out[t]))  # a unique temporary: evals may share the cache
    return {t: out[t] for t in tasks}


def _tokenizer_agrees(scorer: LlamaScorer, ref: Reference, sample: str) -> bool | None:
    try:
        return scorer.tokenize(sample) == ref.tokenize(sample)
    except Exception as e:  # a GGUF without a vocabulary cannot tokenize; it can still be scored on ids
        log.debug("%s: no tokenizer check (%s)", scorer.path, e)
        return None


def evaluate_model(path: Path, ref: Reference, tasks: dict[str, list[mc.McItem]], cfg: EvalConfig,
                   sample: str = "") -> dict[str, Any]:
    """One report entry: size, bpw, window metrics, multiple choice, speed and memory of one GGUF."""
    path = Path(path)
    t0 = time.perf_counter()
    size = path.stat().st_size
    _, tensor_bytes = gguf_counts(path)
    entry: dict[str, Any] = {"file": str(path), "size_bytes": size, "tensor_bytes": tensor_bytes,
                             "bpw": 8 * size / ref.params, "bpw_tensors": 8 * tensor_bytes / ref.params}
    from moepack.gguf.runtime import run_isolated

    # In a throwaway process first: an abort inside llama.cpp becomes an error here, not the end of this process.
    run_isolated("moepack.gguf.runtime:smoke_test", {"path": str(path), "n_ctx": cfg.ctx, "threads": cfg.threads,
                                                      "repack": cfg.repack}, what=f"loading {path.name}")
    scorer = LlamaScorer(path, cfg.ctx, cfg.threads, cfg.repack)
    try:
        entry["tokenizer_agrees"] = _tokenizer_agrees(scorer, ref, sample) if sample else None
        if entry["tokenizer_agrees"] is False:
            log.warning("%s: its tokenizer splits the text differently from the reference's; scored on the "
                        "reference's token ids", path)
        entry.update(window_metrics(scorer, ref, cfg, desc=path.name))
        entry["mc"] = _mc_results(scorer, ref.tokenize, tasks, path.name)
    finally:
        scorer.close()
    entry["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg.speed:
        entry.update(measure_speed(path, ref.windows.reshape(-1), cfg))
    log.info("%s: ppl %.4f (ratio %.4f), kld %.5f, same top %.4f, rms dp %.4f (%.1f s)", path.name, entry["ppl"],
             entry["ppl_ratio"], entry["kld_mean"], entry["top1"], entry["dp_rms"], entry["eval_seconds"])
    return entry


def _check_inputs(models: Sequence[Path], text: Path) -> None:
    if not models:
        raise EvalError("no model given; pass one or more .gguf files")
    for m in models:
        p = Path(m)
        if not p.is_file():
            raise EvalError(f"model not found: {p}")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EvalError(f"{p} is not a GGUF file; write one with `moepack quantize`")
    if not Path(text).is_file():
        raise EvalError(f"text file not found: {text}")


def _short_text(ref: Reference, cfg: EvalConfig) -> str | None:
    """What a text shorter than `cfg.tokens` scored instead (None when it held them all): not an error."""
    asked = cfg.tokens // cfg.ctx
    if len(ref.windows) >= asked:
        return None
    msg = (f"the text holds {len(ref.windows)} windows of {cfg.ctx} tokens, fewer than the {asked} asked for: "
           f"{len(ref.nll)} tokens scored instead of {asked * (cfg.ctx - cfg.first - 1)}")
    log.warning("%s", msg)
    return msg


def _sample(text: Path, cfg: EvalConfig) -> str:
    """Text for the tokenizer check; of conversations, their contents: llama.cpp tokenizes a template's special
    tokens as text here (special=False) where the reference's tokenizer does not, which is no disagreement."""
    if cfg.chat:
        return "\n\n".join(m["content"] for c in read_conversations(text) for m in c)[:_SAMPLE_CHARS]
    return read_text(text)[:_SAMPLE_CHARS]


def evaluate(models: Sequence[Path], reference: Path, text: Path, cfg: EvalConfig) -> dict[str, Any]:
    """The whole report: settings, the reference's own numbers, one entry per model."""
    cfg.validate()
    _check_inputs(models, text)
    tasks = {t: mc.load_task(t, cfg.resolved_data_dir(), cfg.mc_items, cfg.cloze_text) for t in cfg.mc}
    ref = prepare_reference(reference, text, cfg)
    sample = _sample(text, cfg)
    ref_entry = {"path": str(reference), "kind": ref.kind, "params": ref.params, "size_bytes": ref.size_bytes,
                 "bpw": 8 * ref.size_bytes / ref.params, "ppl": ref.ppl, "mc": _reference_mc(ref, tasks, cfg)}
    ref.release()
    settings = {"text": str(text), "text_sha256": text_sha256(text), "chat": cfg.chat, "ctx": cfg.ctx,
                "tokens": cfg.tokens, "windows": len(ref.windows), "scored_tokens": len(ref.nll),
                "short_text": _short_text(ref, cfg), "scoring": SCORING,
                "mc": {t: {"n": len(items), "metric": mc.HEADLINE[t]} for t, items in tasks.items()},
                "threads": cfg.threads, "prompt_tokens": cfg.prompt_tokens, "gen_tokens": cfg.gen_tokens,
                "speed_runs": SPEED_RUNS if cfg.speed else 0,
                "reference_cache": str(ref.cache)}
    entries = [evaluate_model(Path(m), ref, tasks, cfg, sample) for m in models]
    return {"moepack_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
            "reference": ref_entry, "models": entries}


def _fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if v is None else format(v * scale, spec)


def with_ci(m: dict[str, Any], key: str, spec: str, scale: float = 1.0, ci: str = "") -> str:
    """m[key] and the half-width of its 95 % confidence interval (`{ci or key}_ci95_low/high`), e.g. `0.0123 ± 0.0005`;
    the value alone when there is no interval (one window)."""
    lo, hi = m.get(f"{ci or key}_ci95_low"), m.get(f"{ci or key}_ci95_high")
    if lo is None or hi is None or m.get(key) is None:
        return _fmt(m.get(key), spec, scale)
    return f"{format(m[key] * scale, spec)} ± {format((hi - lo) / 2 * scale, spec)}"


def kld_with_ci(m: dict[str, Any]) -> str:
    """Mean KLD and the half-width of its 95 % confidence interval, e.g. `0.01234 ± 0.00051`."""
    return with_ci(m, "kld_mean", ".5f", ci="kld")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _speed_table(report: dict[str, Any]) -> list[str]:
    """Speed and memory, apart from the quality numbers: they depend on the machine and its load."""
    timed = [m for m in report["models"] if m.get("decode_tps") is not None]
    if not timed:
        return []
    s = report["settings"]
    rows = [[f"`{Path(m['file']).name}`", _fmt(m.get("load_seconds"), ".2f"), _fmt(m.get("prompt_tps"), ".1f"),
             _fmt(m.get("decode_tps"), ".1f"), _fmt(m.get("peak_rss_bytes"), ".1f", 2 ** -20)] for m in timed]
    runs = s.get("speed_runs") or 1
    return ["", *_table(["model", "load s", "prompt tok/s", "decode tok/s", "peak RSS MiB"], rows), "",
            f"Speed: median of {runs} run(s) of {s['prompt_tokens']} prompt tokens and {s['gen_tokens']} decode "
            f"steps, each model alone in a fresh process, {s['threads']} thread(s); it varies with the machine "
            "and its other load."]


def to_markdown(report: dict[str, Any]) -> str:
    """The quality table (the reference row, then one row per model) and, when measured, the speed table."""
    tasks = list(report["settings"]["mc"])
    head = (["model", "size MiB", "bpw", "PPL", "PPL ratio", "KLD mean", "KLD median", "KLD p99", "KLD p99.9",
             "RMS Δp %", "same top %"] + [f"{t} ({report['settings']['mc'][t]['metric']}) %" for t in tasks])
    ref = report["reference"]
    rows = [[f"reference `{Path(ref['path']).name}`", _fmt(ref["size_bytes"], ".1f", 2 ** -20), _fmt(ref["bpw"], ".2f"),
             _fmt(ref["ppl"], ".3f")] + ["—"] * 7 + [_fmt(ref["mc"][t]["score"], ".1f", 100) for t in tasks]]
    for m in report["models"]:
        rows.append([f"`{Path(m['file']).name}`", _fmt(m["size_bytes"], ".1f", 2 ** -20), _fmt(m["bpw"], ".2f"),
                     _fmt(m["ppl"], ".3f"), with_ci(m, "ppl_ratio", ".4f"), kld_with_ci(m),
                     _fmt(m["kld_median"], ".5f"), _fmt(m["kld_p99"], ".4f"), _fmt(m.get("kld_p999"), ".4f"),
                     with_ci(m, "dp_rms", ".2f", 100), with_ci(m, "top1", ".2f", 100)]
                    + [_fmt(m["mc"][t]["score"], ".1f", 100) for t in tasks])
    s = report["settings"]
    source = f"`{Path(s['text']).name}`" + (" (conversations, the reference's chat template)" if s.get("chat") else "")
    note = (f"\n{s['scored_tokens']} tokens scored in {s['windows']} windows of {s['ctx']} from {source}; ± is the "
            "half-width of the 95 % confidence interval from the spread of the window means; PPL ratio = model PPL / "
            f"reference PPL; bpw over the reference's {ref['params']:,} parameters.")
    if s.get("short_text"):
        note += f" Short text: {s['short_text']}."
    lines = _table(head, rows) + [note] + _speed_table(report)
    if report.get("command"):
        lines += ["", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    """Write the JSON and/or Markdown report, each atomically."""
    for path, body in ((json_path, lambda: json.dumps(report, indent=1)), (md_path, lambda: to_markdown(report))):
        if path:
            atomic_write_text(path, body())

"""Speed and memory of one GGUF: load time, prompt and decode tokens per second and peak RSS, measured alone in a
fresh process (`measure_speed` runs `speed_probe` through moepack.gguf.runtime.run_isolated).

Tokens per second are the median of `SPEED_RUNS` runs after a warm-up: one run of the same file on the same machine
has read both 362 and 1551 decode tok/s when other jobs shared the cores; every run's figure is kept beside it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moepack.eval.reference import EvalConfig

__all__ = ["SPEED_RUNS", "speed_probe", "measure_speed"]

log = logging.getLogger(__name__)

SPEED_RUNS = 5  # timed prompt + decode runs per model; the median is reported


def _rss(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS:, VmHWM:); ru_maxrss where /proc is absent."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed_run(llm: Any, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prompt seconds, decode seconds) of one prompt eval from an empty context and `gen` greedy decode steps."""
    import llama_cpp

    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t
    nv = llm.n_vocab()
    t = time.perf_counter()
    for _ in range(gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(nv,))  # (V,)
        llm.eval([int(logits.argmax())])
    return prompt_s, time.perf_counter() - t


def speed_probe(path: str, ctx: int, threads: int, prompt: list[int], gen: int, repack: bool = False,
                runs: int = SPEED_RUNS) -> dict[str, Any]:
    """Load time, median prompt and greedy-decode tokens/s over `runs` runs, and memory, of one GGUF; run alone in a
    fresh process."""
    from moepack.gguf.runtime import load_llama

    base = _rss("VmRSS:")
    t = time.perf_counter()
    llm = load_llama(path, n_ctx=ctx, n_batch=len(prompt), n_threads=threads, n_threads_batch=threads,
                     repack=repack)
    load_s = time.perf_counter() - t
    llm.eval(prompt[:8])  # warm-up
    times = [_timed_run(llm, prompt, gen) for _ in range(runs)]
    prompt_tps = [len(prompt) / p for p, _ in times]
    decode_tps = [gen / d for _, d in times]
    return {"load_seconds": load_s, "prompt_tps": float(np.median(prompt_tps)),
            "decode_tps": float(np.median(decode_tps)), "peak_rss_bytes": _rss("VmHWM:"), "base_rss_bytes": base,
            "speed_each_run": {"prompt_tps": prompt_tps, "decode_tps": decode_tps}}


def _rounded(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return round(v, 3) if isinstance(v, float) else v


def measure_speed(path: Path, prompt: Sequence[int], cfg: EvalConfig) -> dict[str, Any]:
    """Load time, median prompt and decode tokens/s (and each run's) and peak RSS of one GGUF, alone in a fresh
    subprocess."""
    from moepack.gguf.runtime import run_isolated

    gen = min(cfg.gen_tokens, cfg.ctx // 2)
    prompt = [int(t) for t in prompt[: min(cfg.prompt_tokens, cfg.ctx - gen)]]
    res = run_isolated("moepack.eval.speed:speed_probe", {"path": str(path), "ctx": cfg.ctx, "threads": cfg.threads,
                                                        "prompt": prompt, "gen": gen, "repack": cfg.repack},
                       what=f"speed test of {Path(path).name}")
    return {k: _rounded(v) for k, v in res.items()}

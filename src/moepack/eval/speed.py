"""Speed and memory of one GGUF: load time, prompt and decode tokens per second and peak RSS, measured alone in a
fresh process (`measure_speed` runs `speed_probe` through moepack.gguf.runtime.run_isolated).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moepack.eval.reference import EvalConfig

__all__ = ["speed_probe", "measure_speed"]

log = logging.getLogger(__name__)


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


def speed_probe(path: str, ctx: int, threads: int, prompt: list[int], gen: int,
                extra_bufts: bool = False) -> dict[str, float]:
    """Load, prompt and greedy-decode timings and memory of one GGUF; run alone in a fresh process."""
    import llama_cpp

    from moepack.gguf.runtime import load_llama

    base = _rss("VmRSS:")
    t = time.perf_counter()
    llm = load_llama(path, n_ctx=ctx, n_batch=len(prompt), n_threads=threads, n_threads_batch=threads,
                     extra_bufts=extra_bufts)
    load_s = time.perf_counter() - t
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t
    nv = llm.n_vocab()
    t = time.perf_counter()
    for _ in range(gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(nv,))  # (V,)
        llm.eval([int(logits.argmax())])
    decode_s = time.perf_counter() - t
    return {"load_seconds": load_s, "prompt_tps": len(prompt) / prompt_s, "decode_tps": gen / decode_s,
            "peak_rss_bytes": _rss("VmHWM:"), "base_rss_bytes": base}


def measure_speed(path: Path, prompt: Sequence[int], cfg: EvalConfig) -> dict[str, float]:
    """Load time, prompt and decode tokens/s and peak RSS of one GGUF, alone in a fresh subprocess."""
    from moepack.gguf.runtime import run_isolated

    gen = min(cfg.gen_tokens, cfg.ctx // 2)
    prompt = [int(t) for t in prompt[: min(cfg.prompt_tokens, cfg.ctx - gen)]]
    res = run_isolated("moepack.eval.speed:speed_probe", {"path": str(path), "ctx": cfg.ctx, "threads": cfg.threads,
                                                        "prompt": prompt, "gen": gen, "extra_bufts": cfg.extra_bufts},
                       what=f"speed test of {Path(path).name}")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}

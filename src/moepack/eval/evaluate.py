"""Quality, speed and memory of GGUF files (`moepack eval MODEL.gguf [...] --reference MODEL_DIR|REF.gguf --text FILE`),
measured through llama-cpp-python (the runtime users deploy with), against a reference model.

What is measured, and how:

- Text: the reference's tokenizer (tokenizer.json of a checkpoint directory, or the reference GGUF's own) turns the
  text into ids once, paragraph by paragraph; every model is fed those same ids. Each model's own tokenizer is
  checked against them on a sample (`tokenizer_agrees`).
- Windows: the first `tokens` ids are cut into non-overlapping windows of `ctx` tokens. As llama-perplexity does,
  the first half of each window is context only: the logits at positions ctx/2 .. ctx-2 predict tokens
  ctx/2+1 .. ctx-1, so each window scores ctx/2 - 1 tokens. No BOS token is inserted.
- `ppl`: exp(mean negative log-likelihood of the scored tokens).
- `kld_*`: KL(reference ‖ model) of the next-token distributions, in nats, per scored token: mean, median, p99, max.
  `top1`: share of scored positions where the model's most likely token is the reference's.
- Multiple choice (`moepack.eval.mc`): PIQA, HellaSwag, a TinyStories cloze set; log-likelihood of each ending.
- Speed and memory: each model alone in a fresh Python subprocess, loaded with `n_ctx = ctx` (no logits_all):
  a warm-up, then a timed prompt eval of `prompt_tokens` text tokens (`prompt_tps`), then `gen_tokens` timed greedy
  decode steps (`decode_tps`); `peak_rss_bytes` is the process's VmHWM after that, `base_rss_bytes` its RSS before
  loading (interpreter and libraries).
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
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from moepack import __version__

from moepack.eval import mc
from moepack.errors import MoepackError
from moepack.model.textdata import chunk_tokens, read_text, text_sha256

__all__ = [
    "EvalConfig", "EvalError", "Reference", "LlamaScorer", "HFScorer", "SCORING",
    "evaluate", "prepare_reference", "evaluate_model", "window_metrics", "log_softmax", "measure_speed", "to_markdown", "write_report",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SCORING = ("non-overlapping windows of ctx tokens; the second half of each window is scored as llama-perplexity does "
           "(ctx/2 - 1 tokens per window); no BOS inserted; KLD = KL(reference || model) in nats")
_ROW_CHUNK = 64  # rows of (rows, vocab) float64 log-softmax at a time
_SAMPLE_CHARS = 4000  # text used to check that a model's tokenizer agrees with the reference's
Tokenize = Callable[[str], list[int]]


class EvalError(MoepackError, ValueError):
    pass


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 512
    tokens: int = 8192  # text tokens read; windows = tokens // ctx
    mc: tuple[str, ...] = ()
    mc_items: int | None = 500  # per task; None = all
    threads: int = 1  # results do not depend on it; see the module doc for why 1 is the default
    speed: bool = True
    prompt_tokens: int = 128
    gen_tokens: int = 64
    cache_dir: Path | None = None
    data_dir: Path | None = None  # holds mc/ (default: the package's own)
    cloze_text: Path | None = None  # the text the cloze task is built from
    extra_bufts: bool = False  # llama.cpp's CPU extra buffer types (repacking); see moepack.gguf.runtime

    def validate(self) -> None:
        if self.ctx < 8:
            raise EvalError(f"--window {self.ctx} is too small; use at least 8 (512 is usual)")
        if self.tokens < self.ctx:
            raise EvalError(f"--tokens {self.tokens} is less than one window of --window {self.ctx}")
        if "cloze" in self.mc and self.cloze_text is None:
            raise EvalError("--mc cloze needs --cloze-text FILE (held-out text of the model's domain)")
        bad = [t for t in self.mc if t not in mc.TASKS]
        if bad:
            raise EvalError(f"unknown --mc task(s) {bad}; choose from {', '.join(mc.TASKS)}")
        if self.mc_items is not None and self.mc_items < 1:
            raise EvalError("--mc-items must be at least 1 (0 on the command line means all)")
        if self.threads < 1 or self.gen_tokens < 1 or self.prompt_tokens < 1:
            raise EvalError("--threads, --gen-tokens and --prompt-tokens must be positive")

    @property
    def first(self) -> int:
        """Index of the first position whose logits are scored in a window."""
        return self.ctx // 2

    def resolved_data_dir(self) -> Path:
        return self.data_dir or mc.MC_DATA

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        if os.environ.get("MOEPACK_CACHE"):
            return Path(os.environ["MOEPACK_CACHE"]) / "eval"
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "moepack" / "eval"


class Scorer(Protocol):
    n_vocab: int

    def window_logits(self, ids: np.ndarray) -> np.ndarray: ...  # (L,) -> (L, V) float32

    def ending_logprobs(self, context: list[int], endings: list[list[int]]) -> list[float]: ...


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: (R, V) -> (R, V)."""
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _ending_sum(logp_rows: np.ndarray, ending: Sequence[int]) -> float:
    """Summed log-prob of `ending` from the logits rows that predict it: (len(ending), V)."""
    lp = log_softmax(logp_rows)
    return float(lp[np.arange(len(ending)), np.asarray(ending)].sum())


class LlamaScorer:
    """A GGUF file in llama-cpp-python with logits for every position."""

    def __init__(self, path: Path, n_ctx: int, threads: int, extra_bufts: bool = False) -> None:
        from moepack.gguf.runtime import load_llama

        self.path = Path(path)
        self.n_ctx = n_ctx
        self.llm = load_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True,
                              n_threads=threads, n_threads_batch=threads, extra_bufts=extra_bufts)
        self.n_vocab = int(self.llm.n_vocab())

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return self.llm.scores[: len(ids)]  # (L, V), a view valid until the next eval

    def ending_logprobs(self, context: list[int], endings: list[list[int]]) -> list[float]:
        room = self.n_ctx - max(len(e) for e in endings)
        if room < 1 or not context:
            raise EvalError(f"{self.path.name}: an ending does not fit in --window {self.n_ctx} or the context is empty")
        ctx = context[-room:]
        self.llm.reset()
        self.llm.eval(ctx)
        out = []
        for e in endings:
            self.llm.n_tokens = len(ctx)  # drop the previous ending; eval() clears the KV cache past n_tokens
            self.llm.eval(e)
            out.append(_ending_sum(self.llm.scores[len(ctx) - 1: len(ctx) + len(e) - 1], e))
        return out

    def close(self) -> None:
        self.llm.close()


class HFScorer:
    """A Hugging Face checkpoint in transformers, float32."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        import transformers

        self.torch = torch
        self.threads = threads
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.n_vocab = int(self.model.config.vocab_size)

    def _logits(self, batch: list[list[int]]) -> np.ndarray:
        torch = self.torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # as for llama.cpp: extra threads spin on a shared machine
        try:
            with torch.inference_mode():
                ids = torch.tensor(batch, dtype=torch.long)  # (B, L)
                return self.model(input_ids=ids).logits.float().numpy()  # (B, L, V)
        finally:
            torch.set_num_threads(before)

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        return self._logits([[int(i) for i in ids]])[0]  # (L, V)

    def ending_logprobs(self, context: list[int], endings: list[list[int]]) -> list[float]:
        seqs = [context + e for e in endings]
        width = max(len(s) for s in seqs)
        # Right padding: causal attention and per-token routing keep the padding invisible to real positions.
        logits = self._logits([s + [0] * (width - len(s)) for s in seqs])  # (B, L, V)
        n = len(context)
        return [_ending_sum(logits[b, n - 1: n + len(e) - 1], e) for b, e in enumerate(endings)]

    def close(self) -> None:
        del self.model


def _hf_tokenizer(model_dir: Path) -> Tokenize:
    from moepack.model.textdata import load_tokenizer

    tok = load_tokenizer(model_dir)
    return lambda s: tok.encode(s, add_special_tokens=False).ids


def _gguf_tokenizer(path: Path) -> Tokenize:
    from moepack.gguf.runtime import load_llama

    llm = load_llama(path, vocab_only=True)
    return lambda s: list(llm.tokenize(s.encode("utf-8"), add_bos=False, special=False))


def _tokenize_text(tokenize: Tokenize, text: str, max_tokens: int) -> np.ndarray:
    """Paragraph by paragraph, as `moepack.model.textdata.tokenize_file` does, stopping once `max_tokens` are read."""
    ids: list[int] = []
    for para in text.split("\n\n"):
        if para.strip():
            ids.extend(tokenize(para + "\n\n"))
            if len(ids) >= max_tokens:
                break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


@dataclass
class Reference:
    """The reference model's view of the evaluation text, cached on disk."""

    path: Path
    kind: str  # "hf" (checkpoint directory) or "gguf"
    params: int  # parameter count of the original model
    size_bytes: int
    windows: np.ndarray  # (N, ctx) int64 token ids
    logp: np.ndarray  # (N * S, V) log-probs at the scored positions, memory-mapped
    top1: np.ndarray  # (N * S,) the reference's argmax at those positions
    nll: np.ndarray  # (N * S,) float64
    cache: Path
    _tokenize: Tokenize | None = field(default=None, repr=False)
    _scorer: Any = field(default=None, repr=False)

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = _hf_tokenizer(self.path) if self.kind == "hf" else _gguf_tokenizer(self.path)
        return self._tokenize(text)

    def scorer(self, cfg: EvalConfig) -> Scorer:
        """The reference model, loaded once and kept until `release()`."""
        if self._scorer is None:
            self._scorer = (HFScorer(self.path, cfg.threads) if self.kind == "hf"
                            else LlamaScorer(self.path, cfg.ctx, cfg.threads, cfg.extra_bufts))
        return self._scorer

    def release(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None


def _gguf_counts(path: Path) -> tuple[int, int]:
    """(elements, tensor data bytes) of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_elements) for t in r.tensors), sum(int(t.n_bytes) for t in r.tensors)


def _reference_identity(path: Path, kind: str) -> tuple[list[str], int, int]:
    """(fingerprint parts, parameter count, bytes on disk) of the reference."""
    if kind == "gguf":
        st = path.stat()
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(1 << 20)).hexdigest()
        return [str(st.st_size), str(st.st_mtime_ns), head], _gguf_counts(path)[0], st.st_size
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(path)
    files = sorted({t.file for t in view.tensors.values()})
    parts = [view.fingerprint()] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    tok = path / "tokenizer.json"
    if tok.is_file():
        parts.append(hashlib.sha256(tok.read_bytes()).hexdigest())
    return parts, sum(view.param_counts().values()), sum(f.stat().st_size for f in files)


def _build_reference(ref: Reference, text: Path, cfg: EvalConfig, tmp: Path) -> None:
    """Tokenize, run the reference over every window and store log-probs at the scored positions in `tmp`."""
    ids = _tokenize_text(ref.tokenize, read_text(text), cfg.tokens)
    windows = chunk_tokens(ids, cfg.ctx, cfg.tokens // cfg.ctx)  # (N, ctx)
    scorer = ref.scorer(cfg)
    s = cfg.ctx - cfg.first - 1
    n_vocab = scorer.n_vocab
    dtype = np.float32 if len(windows) * s * n_vocab * 4 <= 1 << 30 else np.float16
    logp = np.lib.format.open_memmap(tmp / "logp.npy", mode="w+", dtype=dtype, shape=(len(windows) * s, n_vocab))
    nll = np.empty(len(windows) * s)
    top1 = np.empty(len(windows) * s, dtype=np.int32)
    bar = tqdm(windows, desc=f"reference {ref.path.name}", unit="win", leave=False, disable=None)
    for w, win in enumerate(bar):
        logits = scorer.window_logits(win)[cfg.first: cfg.ctx - 1]  # (S, V)
        targets = win[cfg.first + 1:]  # (S,)
        top1[w * s: (w + 1) * s] = logits.argmax(-1)
        for r in range(0, s, _ROW_CHUNK):
            lp = log_softmax(logits[r: r + _ROW_CHUNK]).astype(dtype)  # (c, V)
            row = w * s + r
            logp[row: row + len(lp)] = lp
            nll[row: row + len(lp)] = -lp[np.arange(len(lp)), targets[r: r + len(lp)]]
    logp.flush()
    del logp
    np.save(tmp / "windows.npy", windows)
    np.save(tmp / "nll.npy", nll)
    np.save(tmp / "top1.npy", top1)


def prepare_reference(reference: Path, text: Path, cfg: EvalConfig) -> Reference:
    """The cached reference for (reference, text, ctx, tokens), computed now if absent.

    When computed now, the reference model stays loaded for its multiple-choice scoring: call `release()` after.
    """
    reference = Path(reference)
    if not reference.exists():
        raise EvalError(f"reference not found: {reference}; pass a checkpoint directory or a GGUF file")
    kind = "gguf" if reference.is_file() else "hf"
    parts, params, size = _reference_identity(reference, kind)
    key_src = json.dumps([CACHE_VERSION, kind, parts, text_sha256(text), cfg.ctx, cfg.tokens])
    d = cfg.resolved_cache_dir() / f"ref-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    empty = np.empty(0)
    ref = Reference(reference, kind, params, size, empty, empty, empty, empty, d)
    if not (d / "meta.json").is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.perf_counter()
        _build_reference(ref, text, cfg, tmp)
        meta = {"reference": str(reference), "kind": kind, "text": str(text), "ctx": cfg.ctx, "tokens": cfg.tokens,
                "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        try:
            os.replace(tmp, d)
        except OSError:  # another process finished the same reference first
            if not (d / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("reference log-probs for %s cached in %s (%.1f s)", reference, d, meta["seconds"])
    ref.windows = np.load(d / "windows.npy")
    ref.logp = np.load(d / "logp.npy", mmap_mode="r")
    ref.nll = np.load(d / "nll.npy")
    ref.top1 = np.load(d / "top1.npy")
    return ref


def window_metrics(scorer: Scorer, ref: Reference, cfg: EvalConfig, desc: str = "") -> dict[str, float]:
    """PPL, KLD statistics and top-1 agreement of `scorer` over the reference's windows."""
    if scorer.n_vocab != ref.logp.shape[1]:
        raise EvalError(f"{desc}: vocabulary of {scorer.n_vocab} tokens, the reference has {ref.logp.shape[1]}")
    s = cfg.ctx - cfg.first - 1
    nll = np.empty(len(ref.nll))
    kld = np.empty(len(ref.nll))
    top1 = np.empty(len(ref.nll), dtype=bool)
    for w, win in enumerate(tqdm(ref.windows, desc=desc or "eval", unit="win", leave=False, disable=None)):
        logits = scorer.window_logits(win)[cfg.first: cfg.ctx - 1]  # (S, V)
        targets = win[cfg.first + 1:]  # (S,)
        top1[w * s: (w + 1) * s] = logits.argmax(-1) == ref.top1[w * s: (w + 1) * s]
        for r in range(0, s, _ROW_CHUNK):
            # Rounded to the reference's storage type so that a model scored against itself gives exactly 0.
            lp = log_softmax(logits[r: r + _ROW_CHUNK]).astype(ref.logp.dtype).astype(np.float64)  # (c, V)
            row = w * s + r
            rlp = np.asarray(ref.logp[row: row + len(lp)], dtype=np.float64)  # (c, V)
            kld[row: row + len(lp)] = (np.exp(rlp) * (rlp - lp)).sum(-1)
            nll[row: row + len(lp)] = -lp[np.arange(len(lp)), targets[r: r + len(lp)]]
    return {"ppl": float(np.exp(nll.mean())), "kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
            "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()), "top1": float(top1.mean())}


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
    res = run_isolated("moepack.eval.evaluate:speed_probe", {"path": str(path), "ctx": cfg.ctx, "threads": cfg.threads,
                                                        "prompt": prompt, "gen": gen, "extra_bufts": cfg.extra_bufts},
                       what=f"speed test of {Path(path).name}")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


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
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(out[t]))
            os.replace(tmp, p)
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
    _, tensor_bytes = _gguf_counts(path)
    entry: dict[str, Any] = {"file": str(path), "size_bytes": size, "tensor_bytes": tensor_bytes,
                             "bpw": 8 * size / ref.params, "bpw_tensors": 8 * tensor_bytes / ref.params}
    from moepack.gguf.runtime import run_isolated

    # In a throwaway process first: an abort inside llama.cpp becomes an error here, not the end of this process.
    run_isolated("moepack.gguf.runtime:smoke_test", {"path": str(path), "n_ctx": cfg.ctx, "threads": cfg.threads,
                                                      "extra_bufts": cfg.extra_bufts}, what=f"loading {path.name}")
    scorer = LlamaScorer(path, cfg.ctx, cfg.threads, cfg.extra_bufts)
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
    log.info("%s: ppl %.4f, kld %.5f, top1 %.4f (%.1f s)", path.name, entry["ppl"], entry["kld_mean"],
             entry["top1"], entry["eval_seconds"])
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


def evaluate(models: Sequence[Path], reference: Path, text: Path, cfg: EvalConfig) -> dict[str, Any]:
    """The whole report: settings, the reference's own numbers, one entry per model."""
    cfg.validate()
    _check_inputs(models, text)
    tasks = {t: mc.load_task(t, cfg.resolved_data_dir(), cfg.mc_items, cfg.cloze_text) for t in cfg.mc}
    ref = prepare_reference(reference, text, cfg)
    sample = read_text(text)[:_SAMPLE_CHARS]
    ref_entry = {"path": str(reference), "kind": ref.kind, "params": ref.params, "size_bytes": ref.size_bytes,
                 "bpw": 8 * ref.size_bytes / ref.params, "ppl": ref.ppl, "mc": _reference_mc(ref, tasks, cfg)}
    ref.release()
    settings = {"text": str(text), "text_sha256": text_sha256(text), "ctx": cfg.ctx, "tokens": cfg.tokens,
                "windows": len(ref.windows), "scored_tokens": len(ref.nll), "scoring": SCORING,
                "mc": {t: {"n": len(items), "metric": mc.HEADLINE[t]} for t, items in tasks.items()},
                "threads": cfg.threads, "prompt_tokens": cfg.prompt_tokens, "gen_tokens": cfg.gen_tokens,
                "reference_cache": str(ref.cache)}
    entries = [evaluate_model(Path(m), ref, tasks, cfg, sample) for m in models]
    return {"moepack_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
            "reference": ref_entry, "models": entries}


def _fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if v is None else format(v * scale, spec)


def to_markdown(report: dict[str, Any]) -> str:
    """One table: the reference row, then one row per model."""
    tasks = list(report["settings"]["mc"])
    head = (["model", "size MiB", "bpw", "PPL", "KLD mean", "KLD median", "KLD p99", "top-1 %"]
            + [f"{t} ({report['settings']['mc'][t]['metric']}) %" for t in tasks]
            + ["prompt tok/s", "decode tok/s", "peak RSS MiB"])
    ref = report["reference"]
    rows = [[f"reference `{Path(ref['path']).name}`", _fmt(ref["size_bytes"], ".1f", 2 ** -20), _fmt(ref["bpw"], ".2f"),
             _fmt(ref["ppl"], ".3f"), "—", "—", "—", "—"]
            + [_fmt(ref["mc"][t]["score"], ".1f", 100) for t in tasks] + ["—"] * 3]
    for m in report["models"]:
        rows.append([f"`{Path(m['file']).name}`", _fmt(m["size_bytes"], ".1f", 2 ** -20), _fmt(m["bpw"], ".2f"),
                     _fmt(m["ppl"], ".3f"), _fmt(m["kld_mean"], ".5f"), _fmt(m["kld_median"], ".5f"),
                     _fmt(m["kld_p99"], ".4f"), _fmt(m["top1"], ".2f", 100)]
                    + [_fmt(m["mc"][t]["score"], ".1f", 100) for t in tasks]
                    + [_fmt(m.get("prompt_tps"), ".1f"), _fmt(m.get("decode_tps"), ".1f"),
                       _fmt(m.get("peak_rss_bytes"), ".1f", 2 ** -20)])
    s = report["settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\n{s['scored_tokens']} tokens scored in {s['windows']} windows of {s['ctx']} from "
            f"`{Path(s['text']).name}`; {s['threads']} thread(s); bpw over the reference's {ref['params']:,} "
            "parameters.")
    if report.get("command"):
        note += f"\n\n`{report['command']}`"
    return "\n".join(lines) + "\n" + note + "\n"


def write_report(report: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    """Write the JSON and/or Markdown report, each to a temporary name renamed into place."""
    for path, body in ((json_path, lambda: json.dumps(report, indent=1)), (md_path, lambda: to_markdown(report))):
        if path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(body())
            os.replace(tmp, path)

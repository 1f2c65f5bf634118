"""The reference side of `moepack eval`: the scorers (a GGUF in llama-cpp-python, a checkpoint in transformers), the
evaluation text as the reference's token ids cut into windows, and the reference's log-probabilities at the scored
positions, cached on disk (keyed by the reference's fingerprint, the text's hash, ctx and tokens).
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

from moepack.atomic import publish_dir
from moepack.errors import MoepackError
from moepack.eval import mc
from moepack.model import metrics
from moepack.model.chat import chat_template, tokenize_chat
from moepack.model.textdata import chunk_tokens, read_text, text_sha256

__all__ = ["EvalConfig", "EvalError", "Scorer", "LlamaScorer", "HFScorer", "Reference", "prepare_reference",
           "gguf_counts", "Tokenize", "ROW_CHUNK", "CACHE_VERSION", "SCORED_TOKENS", "tokens_for", "hf_config_kw"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ROW_CHUNK = 64  # rows of (rows, vocab) float64 log-softmax at a time
Tokenize = Callable[[str], list[int]]
SCORED_TOKENS = 16384  # scored by default: llama-perplexity's KLD runs are of this order, and CIs narrow as 1/sqrt


def tokens_for(ctx: int, scored: int = SCORED_TOKENS) -> int:
    """Text tokens whose windows of `ctx` score at least `scored` tokens (ctx - ctx/2 - 1 per window)."""
    return ctx * -(-scored // (ctx - ctx // 2 - 1))


class EvalError(MoepackError, ValueError):
    pass


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 512
    tokens: int = 0  # text tokens read, windows = tokens // ctx; 0: tokens_for(ctx), set when the config is made
    mc: tuple[str, ...] = ()
    mc_items: int | None = 500  # per task; None = all
    threads: int = 1  # results do not depend on it; see the module doc for why 1 is the default
    speed: bool = True
    prompt_tokens: int = 128
    gen_tokens: int = 64
    cache_dir: Path | None = None
    data_dir: Path | None = None  # holds mc/ (default: the package's own)
    cloze_text: Path | None = None  # the text the cloze task is built from
    repack: bool = False  # llama.cpp's CPU extra buffer types (repacking); see moepack.gguf.runtime
    chat: bool = False  # the text is JSONL conversations, rendered with the reference checkpoint's chat template

    def __post_init__(self) -> None:
        if self.tokens == 0 and self.ctx >= 8:  # a smaller ctx is refused by validate()
            object.__setattr__(self, "tokens", tokens_for(self.ctx))

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


def _ending_sum(logp_rows: np.ndarray, ending: Sequence[int]) -> float:
    """Summed log-prob of `ending` from the logits rows that predict it: (len(ending), V)."""
    lp = metrics.log_probs(logp_rows)  # (len(ending), V) float64
    return float(-metrics.nll(lp, np.asarray(ending)).sum())


class LlamaScorer:
    """A GGUF file in llama-cpp-python with logits for every position."""

    def __init__(self, path: Path, n_ctx: int, threads: int, repack: bool = False) -> None:
        from moepack.gguf.runtime import load_llama

        self.path = Path(path)
        self.n_ctx = n_ctx
        self.llm = load_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True,
                              n_threads=threads, n_threads_batch=threads, repack=repack)
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


def hf_config_kw(model_dir: Path) -> dict[str, Any]:
    """Kimi-K2's config.json says model_type kimi_k2, which transformers has no class for (the hub ships remote
    code): load it with the config its ArchSpec names (DeepSeek-V3's). Other checkpoints as transformers reads them."""
    from moepack.model.arch import spec_for, supported
    from moepack.model.checkpoint import open_checkpoint, read_config
    from moepack.model.runner import hf_config

    model_type = read_config(Path(model_dir)).get("model_type")
    if model_type not in supported() or "hf_model_type" not in spec_for(model_type).extra:
        return {}
    return {"config": hf_config(open_checkpoint(model_dir))}


class HFScorer:
    """A Hugging Face checkpoint in transformers, float32."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        import transformers

        self.torch = torch
        self.threads = threads
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                                       **hf_config_kw(model_dir)).eval()
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
        return metrics.ppl(self.nll)

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = _hf_tokenizer(self.path) if self.kind == "hf" else _gguf_tokenizer(self.path)
        return self._tokenize(text)

    def scorer(self, cfg: EvalConfig) -> Scorer:
        """The reference model, loaded once and kept until `release()`."""
        if self._scorer is None:
            self._scorer = (HFScorer(self.path, cfg.threads) if self.kind == "hf"
                            else LlamaScorer(self.path, cfg.ctx, cfg.threads, cfg.repack))
        return self._scorer

    def release(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None


def gguf_counts(path: Path) -> tuple[int, int]:
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
        return [str(st.st_size), str(st.st_mtime_ns), head], gguf_counts(path)[0], st.st_size
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(path)
    files = sorted({t.file for t in view.tensors.values()})
    parts = [view.fingerprint()] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    for tok in (path / "tokenizer.json", path / "tiktoken.model", path / "hy.tiktoken"):
        if tok.is_file():
            parts.append(hashlib.sha256(tok.read_bytes()).hexdigest())
    return parts, sum(view.param_counts().values()), sum(f.stat().st_size for f in files)


def _build_reference(ref: Reference, text: Path, cfg: EvalConfig, tmp: Path) -> None:
    """Tokenize, run the reference over every window and store log-probs at the scored positions in `tmp`."""
    ids = (tokenize_chat(ref.path, text, cfg.tokens) if cfg.chat
           else _tokenize_text(ref.tokenize, read_text(text), cfg.tokens))
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
        top1[w * s: (w + 1) * s] = metrics.top1(logits)
        for r in range(0, s, ROW_CHUNK):
            lp = metrics.log_probs(logits[r: r + ROW_CHUNK]).astype(dtype)  # (c, V)
            row = w * s + r
            logp[row: row + len(lp)] = lp
            nll[row: row + len(lp)] = metrics.nll(lp, targets[r: r + len(lp)])
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
    if cfg.chat and kind == "gguf":
        raise EvalError("--eval-chat renders the conversations with the reference checkpoint's chat template: pass "
                        "--reference as the checkpoint directory, not a GGUF file")
    parts, params, size = _reference_identity(reference, kind)
    key = [CACHE_VERSION, kind, parts, text_sha256(text), cfg.ctx, cfg.tokens]
    if cfg.chat:  # the template is part of the scored text
        key.append(hashlib.sha256(chat_template(reference).encode()).hexdigest())
    key_src = json.dumps(key)
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
        meta = {"reference": str(reference), "kind": kind, "text": str(text), "chat": cfg.chat, "ctx": cfg.ctx,
                "tokens": cfg.tokens, "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        publish_dir(tmp, d, "meta.json")  # False: another process finished the same reference first
        log.info("reference log-probs for %s cached in %s (%.1f s)", reference, d, meta["seconds"])
    ref.windows = np.load(d / "windows.npy")
    ref.logp = np.load(d / "logp.npy", mmap_mode="r")
    ref.nll = np.load(d / "nll.npy")
    ref.top1 = np.load(d / "top1.npy")
    return ref

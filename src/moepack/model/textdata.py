"""Text → token ids → fixed-length sequences, shared by calibration, training and evaluation."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from moepack.errors import MoepackError

import numpy as np

__all__ = ["DEFAULT_CALIB_TEXT", "read_text", "text_sha256", "tokenize_file", "chunk_tokens", "load_tokenizer",
           "TextDataError"]

log = logging.getLogger(__name__)


# Package data: paragraphs of five domains in turn (built by scripts/build_data.py; sources in data/SOURCES.md).
DEFAULT_CALIB_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"


class TextDataError(MoepackError, ValueError):
    pass


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise TextDataError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TextDataError(f"text file is empty: {p}")
    return text


def text_sha256(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise TextDataError(f"text file not found: {p}")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def load_tokenizer(model_dir: str | Path):  # -> tokenizers.Tokenizer (or TiktokenText: same encode)
    from tokenizers import Tokenizer

    from moepack.model.tiktoken_vocab import TiktokenText, has_tiktoken_vocab

    if has_tiktoken_vocab(Path(model_dir)):  # Kimi-K2, Hunyuan-A13B: a tiktoken rank file, no tokenizer.json
        return TiktokenText(model_dir)
    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise TextDataError(f"{model_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(p))


def tokenize_file(model_dir: str | Path, text_path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of a text file with the model's own tokenizer; stops early once `max_tokens` are reached."""
    tok = load_tokenizer(model_dir)
    text = read_text(text_path)
    ids: list[int] = []
    # Paragraph-sized pieces keep the tokenizer fast and let us stop early on large files.
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        ids.extend(tok.encode(para + "\n\n", add_special_tokens=False).ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    arr = np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int64)
    return arr


def chunk_tokens(ids: np.ndarray, seq_len: int, n_seqs: int | None = None) -> np.ndarray:
    """Non-overlapping sequences of `seq_len` tokens: (N, seq_len). The ragged tail is dropped."""
    n = len(ids) // seq_len
    if n_seqs is not None:
        n = min(n, n_seqs)
    if n == 0:
        raise TextDataError(f"text gives {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)  # (N, L)

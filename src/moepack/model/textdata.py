"""Text → token ids → fixed-length sequences, shared by calibration, training and evaluation."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moepack.model.tokenizer import TextDataError, load_tokenizer  # re-exported: their home is below chat's

import numpy as np

__all__ = ["DEFAULT_CALIB_TEXT", "BUNDLED_CALIB_DIR", "BUNDLED_DOMAINS", "CalibSource", "bundled_sources",
           "as_sources", "parse_source", "sources_of", "read_text", "text_sha256", "tokenize_file", "tokenize_source",
           "chunk_tokens", "load_tokenizer", "TextDataError"]

log = logging.getLogger(__name__)


# Package data: one file per domain (built by scripts/build_data.py; sources in data/SOURCES.md). Each domain keeps
# its name through calibration, so that every choice is measured per domain (moepack.pipeline.robust).
BUNDLED_CALIB_DIR = Path(__file__).resolve().parents[1] / "data" / "calibration"
BUNDLED_DOMAINS = ("stories", "encyclopedic", "dialogue", "code", "web")
BUNDLED_CHAT = "chat"  # conversations (chat.jsonl), rendered with the model's chat template where it has one
DEFAULT_CALIB_TEXT = BUNDLED_CALIB_DIR  # what logs and the card name as the default calibration text


@dataclass(frozen=True)
class CalibSource:
    """One domain of calibration text: plain text, or JSONL conversations (`chat`) rendered with the model's own
    chat template. Its selection tokens keep the `name`: choices are judged on every domain, not only the mean."""

    name: str
    path: Path
    chat: bool = False
    bundled: bool = False  # part of moepack's default set: a model without a chat template skips its chat part

    def record(self) -> dict[str, str | bool]:
        """How the calibration manifest names it (the text's sha256 makes a changed file calibrate again)."""
        return {"name": self.name, "path": str(self.path.resolve()), "sha256": text_sha256(self.path),
                "chat": self.chat}


def bundled_sources() -> list[CalibSource]:
    """moepack's default calibration set: the five text domains, then the conversation part."""
    out = [CalibSource(d, BUNDLED_CALIB_DIR / f"{d}.txt", bundled=True) for d in BUNDLED_DOMAINS]
    chat = BUNDLED_CALIB_DIR / f"{BUNDLED_CHAT}.jsonl"
    return out + ([CalibSource(BUNDLED_CHAT, chat, chat=True, bundled=True)] if chat.is_file() else [])


def parse_source(spec: str | Path, chat: bool = False) -> CalibSource:
    """`[NAME=]FILE` of --calib-text / --calib-chat → a source named NAME (default: the file's stem)."""
    text = str(spec)
    name, sep, path = text.partition("=")
    if not sep or not name or "/" in name or Path(text).is_file():
        name, path = Path(text).stem, text
    p = Path(path)
    if not p.is_file():
        flag = "--calib-chat" if chat else "--calib-text"
        raise TextDataError(f"{flag} {text}: file not found: {p}")
    return CalibSource(name, p, chat=chat)


def sources_of(texts: Sequence[str], chats: Sequence[str]) -> Path | list[CalibSource] | None:
    """The calibration sources of --calib-text / --calib-chat ([NAME=]FILE each; `bundled` for the bundled text
    domains): None when neither is given (the bundled set), one path for a single unnamed text (a one-domain run,
    as before domains existed), else the named sources."""
    if not texts and not chats:
        return None
    if len(texts) == 1 and not chats and "=" not in texts[0] and texts[0] != "bundled":
        return Path(texts[0])  # read (or found missing) where it is tokenized, after the other flags are checked
    out: list[CalibSource] = []
    for t in texts:
        out += [s for s in bundled_sources() if not s.chat] if t == "bundled" else [parse_source(t)]
    return out + [parse_source(c, chat=True) for c in chats]


def as_sources(text: str | Path | Sequence[CalibSource] | None) -> list[CalibSource]:
    """Calibration text as sources: None → the bundled set; one path → one domain named after the file; several
    sources as given (each name once)."""
    if text is None:
        return bundled_sources()
    if isinstance(text, (str, Path)):
        return [CalibSource(Path(text).stem, Path(text))]
    out = list(text)
    names = [s.name for s in out]
    if not out:
        raise TextDataError("no calibration text given")
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise TextDataError(f"calibration domain name(s) {', '.join(dup)} given twice: name each text differently "
                            "(--calib-text NAME=FILE)")
    return out


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


def tokenize_source(model_dir: str | Path, source: CalibSource, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of one calibration source: plain text as `tokenize_file`, conversations rendered with the model's
    chat template (moepack.model.chat)."""
    if not source.chat:
        return tokenize_file(model_dir, source.path, max_tokens)
    from moepack.model.chat import tokenize_chat

    return tokenize_chat(model_dir, source.path, max_tokens)


def chunk_tokens(ids: np.ndarray, seq_len: int, n_seqs: int | None = None) -> np.ndarray:
    """Non-overlapping sequences of `seq_len` tokens: (N, seq_len). The ragged tail is dropped."""
    n = len(ids) // seq_len
    if n_seqs is not None:
        n = min(n, n_seqs)
    if n == 0:
        raise TextDataError(f"text gives {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)  # (N, L)

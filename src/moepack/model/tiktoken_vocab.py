"""tiktoken vocabularies (a rank file beside config.json, no tokenizer.json): Kimi-K2's `tiktoken.model` and
Hunyuan-A13B's `hy.tiktoken`. Which family uses which file, split and special tokens (as data), the rank file
reader, and text → ids for calibration and evaluation. gguf.vocab_tiktoken writes such a vocabulary into a GGUF.

The rank file is read directly (one "base64-token rank" pair per line): the `tiktoken` package is optional.
"""
from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from moepack.errors import MoepackError

__all__ = ["HUNYUAN_SPLIT", "KIMI_SPLIT", "TIKTOKEN_FILES", "TiktokenError", "TiktokenFamily", "TiktokenText",
           "bpe_split", "family_of", "has_tiktoken_vocab", "model_json", "read_ranks"]


class TiktokenError(MoepackError, ValueError):
    """A tiktoken vocabulary moepack cannot read; the message says what is wrong."""


TIKTOKEN_FILES = ("tiktoken.model", "hy.tiktoken")  # Kimi's, Hunyuan's

# tokenization_kimi.py's split: Han runs; letter runs without Han (o200k-style); 1-3 digits; punctuation; spaces.
# `&&` is class intersection (tiktoken's Rust regex; the `regex` module with V1).
KIMI_SPLIT = "|".join([
    r"[\p{Han}]+",
    (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
     r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"),
    (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
     r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"),
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# tokenization_hy.py's split (Qwen2's: single digits)
HUNYUAN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
HUNYUAN_SPECIAL = ("<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>",
                    *(f"<|extra_{i}|>" for i in range(205)))


@dataclass(frozen=True)
class TiktokenFamily:
    file: str  # the rank file
    pre: str  # llama.cpp's pre-tokenizer (it implements the split itself)
    split: str  # the tokenizer code's split regex (pat_str), for tokenizing text in Python
    n_reserved: int = 0  # special ids after the ranks (Kimi's num_reserved_special_tokens), named
    # `<|reserved_token_{id}|>` unless tokenizer_config.json names them
    specials: tuple[str, ...] = ()  # or the special tokens after the ranks, as the tokenizer code names them
    bos: str | None = None  # the BOS token the converter forces (Hunyuan: <|bos|>, not config.json's id)
    by_line: bool = False  # ranks are line numbers (tokenization_hy.py ignores the file's rank column)
    nfc: bool = False  # the tokenizer NFC-normalises text first (Hugging Face side only; llama.cpp does not)


KIMI = TiktokenFamily("tiktoken.model", "kimi-k2", KIMI_SPLIT, n_reserved=256)
HUNYUAN = TiktokenFamily("hy.tiktoken", "hunyuan", HUNYUAN_SPLIT, specials=HUNYUAN_SPECIAL, bos="<|bos|>",
                   by_line=True, nfc=True)
FAMILIES: dict[str, TiktokenFamily] = {"kimi_k2": KIMI, "hunyuan_v1_moe": HUNYUAN, "hunyuan": HUNYUAN}


def has_tiktoken_vocab(model_dir: Path) -> bool:
    return (any((model_dir / f).is_file() for f in TIKTOKEN_FILES)
            and not (model_dir / "tokenizer.json").is_file())


def read_ranks(path: Path, by_line: bool = False) -> dict[bytes, int]:
    """A tiktoken rank file: `base64(token) rank` per line (`by_line`: rank = order of first appearance)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            token, r = base64.b64decode(tok, validate=True), int(rank)
            if by_line:
                ranks.setdefault(token, len(ranks))
            else:
                ranks[token] = r
        except (ValueError, binascii.Error):
            raise TiktokenError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TiktokenError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """`token` merged from single bytes by lowest rank first, using only ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def model_json(model_dir: Path, name: str) -> dict[str, Any]:
    path = model_dir / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def family_of(model_dir: Path) -> TiktokenFamily:
    model_type = model_json(model_dir, "config.json").get("model_type")
    if model_type not in FAMILIES:
        raise TiktokenError(f"{model_dir}: tiktoken vocabularies are supported for {', '.join(sorted(FAMILIES))} "
                         f"(this model_type is {model_type!r}); a tokenizer.json is needed otherwise")
    fam = FAMILIES[model_type]
    if not (model_dir / fam.file).is_file():
        raise TiktokenError(f"{model_dir}: no tokenizer.json and no {fam.file} ({model_type}'s tiktoken vocabulary)")
    return fam


class _Encoding:  # the `.ids` of tokenizers' Encoding, which callers of load_tokenizer read
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class TiktokenText:
    """Text → ids with a tiktoken vocabulary (special tokens not parsed, as `encode_ordinary`): the `tiktoken`
    package when installed, else the split regex and rank BPE here (same ids, slower). Quacks like the
    `tokenizers.Tokenizer.encode` that moepack's calibration and eval call."""

    def __init__(self, model_dir: str | Path) -> None:
        root = Path(model_dir)
        fam = family_of(root)
        self.nfc = fam.nfc
        self.ranks = read_ranks(root / fam.file, fam.by_line)
        try:
            import tiktoken
        except ImportError:
            import regex

            self._tiktoken = None
            self._split = regex.compile(fam.split, flags=regex.V1)
            self._piece = lru_cache(maxsize=1 << 16)(self._bpe)
        else:
            self._tiktoken = tiktoken.Encoding(name=root.name, pat_str=fam.split, mergeable_ranks=self.ranks,
                                               special_tokens={})

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        if piece in self.ranks:
            return (self.ranks[piece],)
        return tuple(self.ranks[p] for p in bpe_split(self.ranks, piece, len(self.ranks)))

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self._tiktoken is not None:
            return _Encoding(self._tiktoken.encode_ordinary(text))
        return _Encoding([i for m in self._split.finditer(text) for i in self._piece(m.group().encode("utf-8"))])

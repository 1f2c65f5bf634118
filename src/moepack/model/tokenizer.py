"""The model's own tokenizer, and the error of text that cannot be read or tokenized: below both
moepack.model.textdata (plain text) and moepack.model.chat (conversations), which use them and each other."""
from __future__ import annotations

from pathlib import Path

from moepack.errors import MoepackError

__all__ = ["TextDataError", "load_tokenizer"]


class TextDataError(MoepackError, ValueError):
    pass


def load_tokenizer(model_dir: str | Path):  # -> tokenizers.Tokenizer (or TiktokenText: same encode)
    from tokenizers import Tokenizer

    from moepack.model.tiktoken_vocab import TiktokenText, has_tiktoken_vocab

    if has_tiktoken_vocab(Path(model_dir)):  # Kimi-K2, Hunyuan-A13B: a tiktoken rank file, no tokenizer.json
        return TiktokenText(model_dir)
    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise TextDataError(f"{model_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(p))

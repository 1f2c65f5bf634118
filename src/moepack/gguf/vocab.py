"""tokenizer.json (+ tokenizer_config.json) → GGUF vocabulary, as llama.cpp's converter writes it.

Two families cover the supported models:
- byte-level BPE ("gpt2" tokenizer model: Qwen, DeepSeek, OLMoE): tokens, token types, merges and the name of the
  pre-tokenizer regex llama.cpp should use ("qwen2", "deepseek-v3", "llama-bpe", "gpt-2", ...);
- SentencePiece-style BPE with byte fallback ("llama" tokenizer model: Mixtral, Mistral): tokens, scores (merge
  rank), token types with the 256 `<0xXX>` byte tokens.
Special tokens (bos/eos/pad/unk, add_bos/add_eos, chat template) come from gguf's own `SpecialVocab`.
A tiktoken rank file without tokenizer.json (Kimi-K2, Hunyuan-A13B) is handled by `vocab_tiktoken`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from moepack.errors import MoepackError
from moepack.gguf.vocab_tiktoken import add_tiktoken_vocab
from moepack.model.tiktoken_vocab import TiktokenError, has_tiktoken_vocab

__all__ = ["VocabError", "VocabInfo", "add_vocab", "pre_tokenizer_name", "QWEN35_SPLIT"]

log = logging.getLogger(__name__)


class VocabError(MoepackError, ValueError):
    """A tokenizer moepack cannot turn into a GGUF vocabulary."""


@dataclass(frozen=True)
class VocabInfo:
    model: str  # "gpt2" | "llama"
    pre: str | None  # pre-tokenizer name for gpt2 vocabularies
    n_tokens: int
    n_merges: int


# Pre-tokenizer split regexes of tokenizer.json → llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp knows
# these names; the regexes are those of the tokenizers the names stand for).
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5's split: Qwen2's with combining marks (\p{M}) kept inside words (llama.cpp's "qwen35").
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_REGEXES: dict[tuple[str, ...], str] = {
    (_QWEN2,): "qwen2",
    (QWEN35_SPLIT,): "qwen35",
    (_LLAMA3,): "llama-bpe",
}


def _deepseek_pre(regexes: tuple[str, ...]) -> str | None:
    """DeepSeek's multi-regex pre-tokenizers, recognised by their distinctive first splits."""
    if len(regexes) >= 3 and regexes[0] == r"\p{N}{1,3}" and "一-龥" in regexes[1]:
        return "deepseek-v3"  # DeepSeek-V3 / R1
    if len(regexes) >= 3 and regexes[0] == "[\r\n]":
        return "deepseek-llm"  # DeepSeek-LLM / V2
    return None


# GLM-4 / GLM-4.5 split with Llama 3's regex; llama.cpp tells them apart by vocabulary (the converter's checksum)
# and runs "glm4" without a BOS token. Their vocabulary's mark is the [gMASK] prefix token; the converter's
# _set_vocab_glm also names these special tokens.
_GLM_MARK = "[gMASK]"
_GLM_SPECIAL = {"bos": _GLM_MARK, "eot": "<|user|>", "unk": "<|endoftext|>", "eom": "<|observation|>"}


def _added(tok: dict[str, Any]) -> dict[str, int]:
    return {a["content"]: int(a["id"]) for a in tok.get("added_tokens") or []}


def _glm_pre(tok: dict[str, Any], regexes: tuple[str, ...]) -> str | None:
    return "glm4" if regexes == (_LLAMA3,) and _GLM_MARK in _added(tok) else None


# o200k (GPT-4o's tokenizer.json split, also MiniMax-M2's): llama.cpp runs "gpt-4o" and "minimax-m2" with the same
# regexes; the converter tells them apart by vocabulary (its checksum). MiniMax's mark is its end-of-turn token,
# which llama.cpp itself recognises by text.
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_MINIMAX_MARK = "[e~["
_LLAMA4_MARK = "<|header_start|>"  # Llama 4's chat header token (the converter names its vocabulary "llama4")


def _o200k_pre(tok: dict[str, Any], regexes: tuple[str, ...]) -> str | None:
    if regexes != (_O200K,):
        return None
    added = _added(tok)
    return "minimax-m2" if _MINIMAX_MARK in added else "llama4" if _LLAMA4_MARK in added else "gpt-4o"


def _split_regexes(pre: dict[str, Any] | None) -> tuple[tuple[str, ...], bool]:
    """(Split regexes in order, whether a ByteLevel step applies GPT-2's own regex)."""
    if not pre:
        return (), False
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes: list[str] = []
    gpt2_regex = False
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            regexes.append(step["pattern"]["Regex"])
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            gpt2_regex = True
    return tuple(regexes), gpt2_regex


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, from its split regexes."""
    regexes, gpt2_regex = _split_regexes(tokenizer.get("pre_tokenizer"))
    if (name := _glm_pre(tokenizer, regexes)) is not None:
        return name
    if (name := _o200k_pre(tokenizer, regexes)) is not None:
        return name
    if regexes in _PRE_BY_REGEXES:
        return _PRE_BY_REGEXES[regexes]
    if (name := _deepseek_pre(regexes)) is not None:
        return name
    if not regexes and gpt2_regex:
        return "gpt-2"
    log.warning("unrecognised pre-tokenizer %s; writing llama.cpp's 'default' (tokenization may differ)",
                regexes or tokenizer.get("pre_tokenizer"))
    return "default"


def _load(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise VocabError(f"{model_dir}: no tokenizer.json; copy the model's tokenizer files next to its weights")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VocabError(f"{path}: invalid JSON ({e})") from None


def _token_table(tok: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int], set[int]]:
    """(tokens by id padded to n_vocab, their types, ids of added tokens). Added tokens override the base vocab."""
    vocab: dict[str, int] = tok["model"]["vocab"]
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in by_id}
    added: set[int] = set()
    for a in tok.get("added_tokens") or []:
        i = int(a["id"])
        by_id[i] = a["content"]
        added.add(i)
        types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise VocabError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}")
    tokens, toktypes = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            toktypes.append(int(types[i]))
        else:  # as the converter pads: unused ids of the embedding matrix
            tokens.append(f"[PAD{i}]")
            toktypes.append(int(gguf.TokenType.UNUSED))
    return tokens, toktypes, added


def _merges(tok: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in tok["model"].get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _is_byte_level(tok: dict[str, Any]) -> bool:
    model = tok.get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback", False)


def _is_spm_bpe(tok: dict[str, Any]) -> bool:
    model = tok.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback", False))


def _add_space_prefix(tok: dict[str, Any]) -> bool:
    """SentencePiece-style tokenizers prepend "▁" either in the normalizer or in a Metaspace pre-tokenizer."""
    blob = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")])
    if '"Prepend"' in blob:
        return True
    m = re.search(r'"prepend_scheme": "(\w+)"', blob)
    if m:
        return m.group(1) != "never"
    return '"add_prefix_space": true' in blob


def _spm_scores(tokens: list[str], toktypes: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece BPE scores: a merged piece scores -rank of the merge making it, so llama.cpp's SPM tokenizer
    (greedy highest-score bigram merging) applies merges in the tokenizer's order."""
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    scores = []
    for i, (t, ty) in enumerate(zip(tokens, toktypes)):
        if ty != gguf.TokenType.NORMAL:
            scores.append(0.0)
        else:
            scores.append(-float(rank.get(t, len(merges) + i)))
    return scores


def add_vocab(writer: gguf.GGUFWriter, model_dir: str | Path, n_vocab: int) -> VocabInfo:
    """Write the GGUF tokenizer keys of `model_dir`'s tokenizer into `writer` (padded to `n_vocab` tokens)."""
    root = Path(model_dir)
    if has_tiktoken_vocab(root):  # Kimi-K2, Hunyuan-A13B: a tiktoken rank file, no tokenizer.json
        try:
            pre, n_tokens, n_merges = add_tiktoken_vocab(writer, root, n_vocab)
        except TiktokenError as e:  # one error type for every vocabulary problem
            raise VocabError(str(e)) from None
        return VocabInfo("gpt2", pre, n_tokens, n_merges)
    tok = _load(root)
    tokens, toktypes, _ = _token_table(tok, n_vocab)
    merges = _merges(tok)
    if _is_byte_level(tok):
        model, pre = "gpt2", pre_tokenizer_name(tok)
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        special = gguf.SpecialVocab(root, load_merges=True, n_vocab=n_vocab)
        if pre == "glm4":
            added = _added(tok)
            for kind, content in _GLM_SPECIAL.items():
                if content in added:
                    special._set_special_token(kind, added[content])
        special.add_to_gguf(writer, quiet=True)
    elif _is_spm_bpe(tok):
        model, pre = "llama", None
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                toktypes[i] = int(gguf.TokenType.BYTE)
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, toktypes, merges))
        writer.add_token_types(toktypes)
        writer.add_add_space_prefix(_add_space_prefix(tok))
        gguf.SpecialVocab(root, load_merges=False, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    else:
        kind = tok.get("model", {}).get("type")
        raise VocabError(f"{root}/tokenizer.json: {kind} tokenizers are not supported (byte-level BPE and "
                         "SentencePiece-style BPE with byte fallback are)")
    return VocabInfo(model, pre, len(tokens), len(merges) if model == "gpt2" else 0)

"""tiktoken vocabularies (a rank file, no tokenizer.json) → GGUF, as llama.cpp's converter writes them for Kimi-K2
(`tiktoken.model`) and Hunyuan-A13B (`hy.tiktoken`): a byte-level BPE ("gpt2") vocabulary whose tokens are the rank
file's byte strings in GPT-2's byte-to-unicode spelling, ordered by rank; merges recovered from the ranks (each
multi-byte token split by rank-ordered BPE limited to lower ranks; a split into two parts is its merge, and merges
keep rank order, so llama.cpp's merge priority is tiktoken's rank priority); the special ids after the ranks, named
as the family's tokenizer code names them; the pre-tokenizer named by model family (llama.cpp implements each
family's split itself).

Which file, split and special tokens each family uses, and the rank file reader: moepack.model.tiktoken_vocab.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from moepack.model.tiktoken_vocab import (TIKTOKEN_FILES, TiktokenError, TiktokenFamily, bpe_split, family_of,
                                          model_json, read_ranks)

__all__ = ["add_tiktoken_vocab", "bpe_merges", "byte_to_unicode", "special_tokens", "vocab_bytes"]


def vocab_bytes(model_dir: Path, n_vocab: int) -> int | None:
    """Upper-leaning size of the GGUF vocabulary arrays of a tiktoken vocabulary (each byte spells as ≤ 2 UTF-8
    bytes; one merge per token; specials/padding ≤ 40 bytes each); None when there is no rank file."""
    path = next((model_dir / f for f in TIKTOKEN_FILES if (model_dir / f).is_file()), None)
    if path is None:
        return None
    lengths = [len(line.split()[0]) * 3 // 4 for line in path.read_text(encoding="ascii").splitlines() if line]
    per_token = sum(8 + 2 * n + 4 + 8 + 2 * n + 1 for n in lengths)  # string, type, merge
    return per_token + max(n_vocab - len(lengths), 0) * 40


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the spelling of byte-level BPE tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge making each multi-byte token, in rank order (tokens not reachable by one merge have none)."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1 and len(parts := bpe_split(ranks, token, rank)) == 2:
            out.append((parts[0], parts[1]))
    return out


def special_tokens(model_dir: Path, n_base: int, fam: TiktokenFamily) -> dict[int, str]:
    """The special ids from n_base on: the family's fixed names, or reserved ids named by tokenizer_config.json's
    added_tokens_decoder (else `<|reserved_token_{id}|>`)."""
    if fam.specials:  # Hunyuan's start at 127957 = its rank count
        return dict(enumerate(fam.specials, start=n_base))
    named = {int(i): a["content"] for i, a in (model_json(model_dir, "tokenizer_config.json")
                                               .get("added_tokens_decoder") or {}).items()}
    return {i: named.get(i, f"<|reserved_token_{i}|>") for i in range(n_base, n_base + fam.n_reserved)}


def add_tiktoken_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> tuple[str, int, int]:
    """Write the tokenizer keys of `model_dir`'s tiktoken vocabulary; returns (pre-tokenizer, tokens, merges)."""
    fam = family_of(model_dir)
    ranks = read_ranks(model_dir / fam.file, fam.by_line)
    special = special_tokens(model_dir, len(ranks), fam)
    if len(ranks) + len(special) > n_vocab:
        raise TiktokenError(f"{model_dir}: {len(ranks)} ranks + {len(special)} special tokens exceed the model's "
                         f"vocab_size {n_vocab}")
    enc = byte_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    by_id = {r: spell(t) for t, r in ranks.items()}
    tokens, toktypes = [], []
    for i in range(n_vocab):
        if i in special:
            tokens.append(special[i])
            toktypes.append(int(gguf.TokenType.CONTROL))
        elif i in by_id:
            tokens.append(by_id[i])
            toktypes.append(int(gguf.TokenType.NORMAL))
        else:  # as the converter pads: unused ids of the embedding matrix
            tokens.append(f"[PAD{i}]")
            toktypes.append(int(gguf.TokenType.UNUSED))
    merges = [f"{spell(a)} {spell(b)}" for a, b in bpe_merges(ranks)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fam.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    writer.add_token_merges(merges)
    # bos/eos from config.json (no tokenizer.json to look names up in), add_bos and chat template from
    # tokenizer_config.json, as the converter's SpecialVocab reads them
    sv = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    if fam.bos is not None:  # overrides config.json's id
        sv.special_token_ids["bos"] = {t: i for i, t in special.items()}[fam.bos]
    sv.add_to_gguf(writer, quiet=True)
    return fam.pre, len(tokens), len(merges)



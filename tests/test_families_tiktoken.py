"""tiktoken vocabularies (issue 28: Kimi-K2's checkpoint as it is; Hunyuan-A13B's too): a model dir with a
tiktoken rank file (`tiktoken.model`, `hy.tiktoken`) and no tokenizer.json becomes llama.cpp's byte-level BPE
vocabulary (tokens by rank, merges recovered from the ranks, special ids, the `kimi-k2` / `hunyuan` pre-tokenizer).
Checked by tokenizing a multilingual sample both ways: tiktoken's rank BPE in Python (the `tiktoken` package when
installed, else the reference encoder below) and llama.cpp from the written GGUF.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import gguf
import pytest

from conftest import DATA, build_tiny_model
from moepack.cli import main
from moepack.gguf.vocab import VocabError
from moepack.gguf.vocab_tiktoken import byte_to_unicode
from moepack.model.tiktoken_vocab import HUNYUAN_SPLIT, KIMI_SPLIT, TiktokenError, read_ranks
from moepack.gguf.writer import write_gguf
from moepack.model.checkpoint import open_checkpoint
from moepack.model.textdata import load_tokenizer
from moepack.stages.footprint import tokenizer_bytes

# Kimi-K2's named special ids, as offsets from the first reserved id (its tokenizer_config.json's)
KIMI_SPECIAL = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 9: "[EOT]",
                10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
CHAT_TEMPLATE = "{% for m in messages %}<|im_user|>{{ m['content'] }}<|im_end|>{% endfor %}"
SAMPLE = ("Hello, World! It's 2026.\n\ndef f(x):\n    return x ** 2  # square\n\t\t中文分词测试，你好世界。"
          " 1234567 3.14159 🙂🚀  trailing   spaces\n\nWE'LL see ÀÉÎõü naïve\n\n\n")
_EXTRA = "中文分词测试，你好世界。我想在苹果工作。数字 1234567 2026 3.14159 与表情 🙂🚀🙂🚀 def f(x):\n    return x\n"


def _train_ranks(vocab: int) -> dict[bytes, int]:
    """A small byte-level BPE trained on Shakespeare (+ a little Chinese, code, emoji), as tiktoken ranks: the 256
    bytes, then each merge's token in merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text, _EXTRA * 200], trainer)
    dec = {c: b for b, c in byte_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for m in json.loads(tok.to_str())["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ranks.setdefault(bytes(dec[c] for c in a + b), len(ranks))
    return ranks


def _write_kimi_tokenizer(d: Path, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (d / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    added = {str(n + k): {"content": c, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False} for k, c in KIMI_SPECIAL.items()}
    config = {"tokenizer_class": "TikTokenTokenizer", "bos_token": "[BOS]", "eos_token": "[EOS]",
              "unk_token": "[UNK]", "pad_token": "[PAD]", "added_tokens_decoder": added, "add_bos_token": False,
              "chat_template": CHAT_TEMPLATE,
              "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (d / "tokenizer.json").unlink(missing_ok=True)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(bos_token_id=n, eos_token_id=n + 1, pad_token_id=n + 255)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _rank_bpe(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """tiktoken's byte-pair merge: repeatedly merge the adjacent pair whose concatenation has the lowest rank."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while True:
        cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                 if parts[i] + parts[i + 1] in ranks]
        if not cands:
            return [ranks[p] for p in parts]
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _tiktoken_ids(ranks: dict[bytes, int], text: str, split: str = KIMI_SPLIT) -> list[int]:
    try:
        import tiktoken
    except ImportError:
        import regex

        pat = regex.compile(split, flags=regex.V1)
        return [i for m in pat.finditer(text) for i in _rank_bpe(ranks, m.group().encode())]
    enc = tiktoken.Encoding(name="tiny", pat_str=split, mergeable_ranks=ranks, special_tokens={})
    return enc.encode_ordinary(text)


def _meta(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


def test_kimi_k2_tiktoken_vocab_matches_llama_cpp(tmp_path: Path) -> None:
    """Kimi-K2's hub tokenizer (tiktoken.model + tokenizer_config.json, no tokenizer.json) → the GGUF vocabulary
    llama.cpp's converter writes; llama.cpp then tokenizes text as tiktoken does."""
    from moepack.gguf.runtime import load_llama

    ranks = _train_ranks(700)
    n = len(ranks)
    vocab = n + 256 + 4  # the embedding matrix is larger than ranks + reserved ids: the rest is padding
    d = build_tiny_model("kimi_k2", tmp_path / "m", vocab=vocab)
    _write_kimi_tokenizer(d, ranks)
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    meta = _meta(out)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "kimi-k2"
    assert len(tokens) == vocab and tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ"
    assert tokens[n] == "[BOS]" and tokens[n + 3] == "<|im_user|>" and tokens[n + 5] == f"<|reserved_token_{n + 5}|>"
    assert tokens[-1] == f"[PAD{vocab - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[n] == types[n + 255] == gguf.TokenType.CONTROL and types[n - 1] == gguf.TokenType.NORMAL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (n, n + 1)
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE and meta["tokenizer.ggml.add_bos_token"] is False
    merges = meta["tokenizer.ggml.merges"]
    assert n - 256 - 10 <= len(merges) <= n - 256  # (almost) every multi-byte token has its merge
    assert merges[0].replace(" ", "") == tokens[256]  # rank order: the first merge makes the first merged token
    # the budget's estimate of these arrays errs on the large side, by less than 2x
    written = sum(8 + len(t.encode()) for t in tokens + merges) + 4 * len(types)
    assert written <= tokenizer_bytes(d, vocab) < 2 * written

    want = _tiktoken_ids(ranks, SAMPLE)
    assert len(want) < len(SAMPLE.encode())  # the trained merges apply
    llm = load_llama(out, vocab_only=True, verbose=False)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    chat = llm.tokenize(b"<|im_user|>Hi[EOS]", add_bos=False, special=True)
    assert llm.detokenize(got) == SAMPLE.encode()
    llm.close()
    assert got == want
    assert chat[0] == n + 3 and chat[-1] == n + 1
    # moepack's own text → ids (calibration, eval's reference) read the same vocabulary
    assert load_tokenizer(d).encode(SAMPLE, add_special_tokens=False).ids == want
    assert main(["eval", str(out), "--reference", str(d), "--text", str(DATA / "tinystories-valid.txt"), "--tokens",
                 "128", "--window", "64", "--no-speed", "--cache-dir", str(tmp_path / "cache"), "--json-out",
                 str(tmp_path / "eval.json")]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())["models"][0]
    assert row["tokenizer_agrees"] and abs(row["kld_mean"]) < 1e-6


def test_tiktoken_vocab_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "tiktoken.model").write_text("QQ== 0\nQg== x\n")
    with pytest.raises(TiktokenError, match=r"tiktoken.model:2: expected"):
        read_ranks(tmp_path / "tiktoken.model")
    (tmp_path / "tiktoken.model").write_text("QQ== 0\nQg== 2\n")
    with pytest.raises(TiktokenError, match="without gaps"):
        read_ranks(tmp_path / "tiktoken.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from moepack.gguf.vocab import add_vocab

    with pytest.raises(VocabError, match="kimi_k2"):
        add_vocab(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path, 300)


def test_hunyuan_tiktoken_vocab_matches_llama_cpp(tmp_path: Path) -> None:
    """Hunyuan-A13B's hy.tiktoken (ranks by line; its tokenizer code's fixed special tokens after them, <|bos|>
    forced as BOS as the converter does) → llama.cpp's `hunyuan` vocabulary, tokenizing as tiktoken does."""
    from moepack.gguf.runtime import load_llama

    ranks = _train_ranks(600)
    n = len(ranks)
    d = build_tiny_model("hunyuan_v1_moe", tmp_path / "m", vocab=n + 210)
    (d / "tokenizer.json").unlink(missing_ok=True)
    order = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in order]
    (d / "hy.tiktoken").write_text("\n".join(lines + lines[:3]) + "\n")  # repeated lines are skipped
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=n + 3)  # hub configs' bos id is not <|bos|>'s: the converter forces it
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    out = write_gguf(open_checkpoint(d), tmp_path / "m.gguf", progress=False).path
    meta = _meta(out)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.pre"] == "hunyuan" and len(tokens) == n + 210
    assert tokens[n:n + 6] == ["<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|extra_0|>"]
    assert tokens[-1] == "<|extra_204|>" and types[-1] == gguf.TokenType.CONTROL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (n + 2, n + 3)
    want = _tiktoken_ids(ranks, SAMPLE, HUNYUAN_SPLIT)
    assert want != _tiktoken_ids(ranks, SAMPLE)  # the sample tells the two splits apart
    llm = load_llama(out, vocab_only=True, verbose=False)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    chat = llm.tokenize(b"<|bos|>Hi<|eos|>", add_bos=False, special=True)
    llm.close()
    assert got == want and chat[0] == n + 2 and chat[-1] == n + 3
    assert load_tokenizer(d).encode(SAMPLE).ids == want


def test_kimi_k2_tiktoken_compress(tmp_path: Path) -> None:
    """`compress` on Kimi-K2's hub layout (no tokenizer.json): calibration tokenizes with the tiktoken vocabulary,
    the pruned checkpoint keeps tiktoken.model, and the written file tokenizes as tiktoken does."""
    from family_checks import compress_keep_075
    from moepack.gguf.runtime import load_llama

    ranks = _train_ranks(700)
    src = build_tiny_model("kimi_k2", tmp_path / "m", vocab=len(ranks) + 256)
    _write_kimi_tokenizer(src, ranks)
    out, pruned = compress_keep_075(src, tmp_path, sum(open_checkpoint(src).param_counts().values()))  # bf16 / 2
    assert (pruned / "tiktoken.model").read_bytes() == (src / "tiktoken.model").read_bytes()
    assert not (pruned / "tokenizer.json").exists()
    llm = load_llama(out, vocab_only=True, verbose=False)
    got = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    llm.close()
    assert got == _tiktoken_ids(ranks, SAMPLE)

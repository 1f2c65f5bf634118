"""The end-to-end checks every model family passes (issue 27): compress at keep 0.75 writes a file llama.cpp loads
and generates from, and the pruned checkpoint loads in transformers and gives the logits its F32 GGUF gives."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from conftest import small_compress_options
from moepack.cli import main

__all__ = ["SMALL_COMPRESS", "compress_keep_075", "completion_tokens", "hf_logits", "gguf_logits", "meta",
           "pruned_gguf_matches_transformers", "gguf_token_ids", "hf_token_ids"]

# compress options that keep a family's end-to-end test to seconds of CPU (few tokens, a short ladder, fast mode).
SMALL_COMPRESS = tuple(small_compress_options(calib_tokens=256, seq_len=32, selection_tokens=64, ladder="IQ2_XXS,Q4_K,Q8_0",
                                              fast=True))


def compress_keep_075(src: Path, root: Path, target: int, flags: tuple[str, ...] = SMALL_COMPRESS) -> tuple[Path, Path]:
    """`compress --keep 0.75 --save-pruned` of `src` under `target` bytes → (the GGUF, the pruned checkpoint)."""
    out, pruned = root / "x.gguf", root / "pruned"
    assert main(["compress", str(src), "--target-size", f"{target}B", "--keep", "0.75", "-o", str(out),
                 "--save-pruned", str(pruned), *flags]) == 0
    assert out.stat().st_size <= target
    assert json.loads((pruned / "config.json").read_text())  # the chosen candidate's checkpoint was written
    return out, pruned


def completion_tokens(path: Path, prompt: str = "Once upon a time") -> int:
    """Tokens llama.cpp generates from the file (greedy, at most 8)."""
    from moepack.gguf.runtime import load_llama

    llm = load_llama(path, n_ctx=128, n_threads=2)
    done = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    llm.close()
    return int(done["usage"]["completion_tokens"])


def hf_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' own logits (T, V) of a checkpoint for token ids (T,), in float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()  # (T, V)


def gguf_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's logits (T, V) of a GGUF for token ids (T,), with an F32 KV cache."""
    from moepack.gguf.runtime import load_llama

    llm = load_llama(path, n_ctx=128, n_threads=2, type_k=0, type_v=0, logits_all=True)
    llm.eval(ids.tolist())
    out = np.array(llm.scores[: len(ids)])  # (T, V)
    llm.close()
    return out


def meta(path: Path) -> dict[str, Any]:
    """A GGUF's metadata fields, without the vocabulary arrays."""
    import gguf

    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k not in big}


def pruned_gguf_matches_transformers(pruned: Path, root: Path, vocab: int = 512, n: int = 32) -> float:
    """Max |Δlogit| between transformers on the pruned checkpoint and llama.cpp on its F32 GGUF."""
    from moepack.gguf.writer import write_gguf
    from moepack.model.checkpoint import open_checkpoint

    ids = np.random.default_rng(0).integers(1, vocab, n)
    f32 = write_gguf(open_checkpoint(pruned), root / "pruned-f32.gguf", progress=False).path
    return float(np.abs(gguf_logits(f32, ids) - hf_logits(pruned, ids)).max())


def gguf_token_ids(path: Path, text: str) -> list[int]:
    """llama.cpp's token ids of `text` from a GGUF's vocabulary (no BOS, special tokens not parsed)."""
    from moepack.gguf.runtime import load_llama

    llm = load_llama(path, vocab_only=True)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.close()
    return list(ids)


def hf_token_ids(model_dir: Path, text: str) -> list[int]:
    """Hugging Face tokenizers' ids of `text` from the checkpoint's tokenizer.json (no special tokens added)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids

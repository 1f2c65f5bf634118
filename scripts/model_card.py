"""Write a fixture's README.md model card from its config, tensors and training.json (`write_card(model_dir)`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from moepack.model.checkpoint import open_checkpoint
from moepack.gguf.estimate import describe

CARD = """---
license: cdla-sharing-1.0
library_name: transformers
tags: [moe, fixture, moepack]
---
# {name}

A small **trained** Mixture-of-Experts model ({hf_class}) that moepack's tests and benchmarks measure on. Trained
from scratch on `data/tinystories-train.txt` (TinyStories excerpt) by `scripts/train_fixtures.py`
(`make fixtures`), stored as a Hugging Face checkpoint in bf16 with one tensor per expert, as hub checkpoints are.

## Architecture

| | |
|---|---|
| architecture | `{arch}` (llama.cpp: `{gguf_arch}`) |
| layers | {layers} ({n_moe} MoE, dense: {dense}) |
| hidden size | {hidden} |
| routed experts per MoE layer | {experts} × intermediate {expert_ffn} |
| top-k | {top_k} |
| shared experts | {shared} |
| routing | {routing} |
| vocabulary | {vocab} (byte-level BPE, qwen2 pre-tokenizer regex, trained on the same text) |
| parameters | {total:,} total, {active:,} active per token |
| size on disk | {disk_mb:.1f} MB ({files}) |

{extra}

## Training

| | |
|---|---|
| tokens trained | {tokens:,} ({steps} steps × batch {batch} × {seq} tokens; the text has {avail:,} tokens) |
| optimiser | AdamW, lr {lr}, warm-up 50 steps, cosine to 10%, weight decay 0.1, grad clip 1.0 |
| load balancing | Switch-style balance loss (coefficient 0.01){bias_note} |
| training time | {secs:.0f} s on {threads} CPU threads |

## Quality

Perplexity on `data/tinystories-valid.txt` ({valid_tokens:,} tokens, non-overlapping windows of {seq}),
evaluated with the bf16 weights as stored:

| model | perplexity |
|---|---|
| this model | **{ppl:.2f}** |
| unigram model (add-one smoothed token frequencies of the training text) | {uni:.1f} |
| target: at most one third of unigram | {target:.1f} — {met} |

Tests assert the perplexity on a slice of the validation text stays below **{bound:.0f}**.

## Expert usage on the validation text (share of routed token slots)

| MoE layer | min share | max share | uniform |
|---|---|---|---|
{usage}
"""


def _disk_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6


def _weight_files(model_dir: Path) -> str:
    files = sorted(f.name for f in model_dir.glob("*.safetensors"))
    return files[0] if len(files) == 1 else f"{len(files)} shards of at most 40 MB"


def write_card(model_dir: Path) -> None:
    view = open_checkpoint(model_dir)
    d = describe(view)
    t = json.loads((model_dir / "training.json").read_text())
    r = d["routing"]
    routing = r["scoring"] + (" + e_score_correction_bias (noaux_tc)" if r["bias"] else "")
    if r["n_group"]:
        routing += f", group-limited: n_group {r['n_group']}, topk_group {r['topk_group']}"
    routing += f", routed_scaling_factor {r['routed_scaling_factor']:g}, norm_topk_prob {r['norm_topk_prob']}"
    cfg = view.config
    extra = ""
    if "q_lora_rank" in cfg:
        extra = (f"MLA attention: q_lora_rank {cfg['q_lora_rank']}, kv_lora_rank {cfg['kv_lora_rank']}, "
                 f"qk_nope_head_dim {cfg['qk_nope_head_dim']}, qk_rope_head_dim {cfg['qk_rope_head_dim']}, "
                 f"v_head_dim {cfg['v_head_dim']}, {cfg['num_attention_heads']} heads.")
    else:
        extra = (f"Attention: {cfg['num_attention_heads']} heads, {cfg.get('num_key_value_heads')} KV heads, "
                 f"head dim {cfg.get('head_dim')}.")
    usage = "\n".join(f"| {layer} | {a:.3f} | {b:.3f} | {1 / d['routed_experts']:.3f} |"
                      for layer, (a, b) in zip(d["moe_layers"], t["expert_usage"]))
    target = t["unigram_ppl"] / 3
    card = CARD.format(
        name=model_dir.name, hf_class=d["hf_class"], arch=d["architecture"], gguf_arch=d["gguf_arch"],
        layers=d["layers"], n_moe=len(d["moe_layers"]), dense=d["dense_layers"] or "none", hidden=d["hidden"],
        experts=d["routed_experts"], expert_ffn=d["expert_ffn"], top_k=d["top_k"], shared=d["shared_experts"],
        routing=routing, vocab=d["vocab"], total=d["params_total"], active=d["params_active"],
        disk_mb=_disk_mb(model_dir), files=_weight_files(model_dir), extra=extra, tokens=t["tokens_trained"],
        steps=t["steps"], batch=t["batch"], seq=t["seq_len"], avail=t["train_tokens_available"], lr=t["lr"],
        bias_note=("; plus DeepSeek-V3's bias update of e_score_correction_bias (±0.001 per step toward even load)"
                   if r["bias"] else ""),
        secs=t["train_seconds"], threads=t["threads"], valid_tokens=t["valid_tokens"], ppl=t["valid_ppl"],
        uni=t["unigram_ppl"], target=target, met="met" if t["valid_ppl"] <= target else "NOT met",
        bound=card_bound(t["valid_ppl"]), usage=usage,
    )
    (model_dir / "README.md").write_text(card)


MULTI_CARD = """---
license: other
library_name: transformers
tags: [moe, fixture, moepack]
---
# {name}

A small **trained** Mixture-of-Experts model ({hf_class}, DeepSeek-V3 layout) with fine-grained experts, for
measuring expert pruning where experts specialise. Trained from scratch on the train parts of moepack's five-domain
corpus (`data/SOURCES.md`: stories, encyclopedic prose, dialogue, Python code, web text; each training window drawn
from a domain chosen uniformly) by `scripts/train_fixtures.py --models {name}`, with DeepSeek-V3's
auxiliary-loss-free balancing only (no balance loss), stored in bf16 with one tensor per expert. Licences: those of
the corpus sources (CDLA-Sharing-1.0, CC BY-SA 3.0, public domain, PSF-2.0, ODC-BY).

## Architecture

| | |
|---|---|
| layers | {layers} ({n_moe} MoE, dense: {dense}) |
| hidden size | {hidden} |
| routed experts per MoE layer | {experts} × intermediate {expert_ffn}, top-{top_k}, {shared} shared expert |
| routing | {routing} |
| vocabulary | {vocab} (byte-level BPE, qwen2 pre-tokenizer regex, trained on the corpus's train parts) |
| parameters | {total:,} total, {active:,} active per token |
| size on disk | {disk_mb:.1f} MB ({files}) |

## Training

{tokens:,} tokens ({steps} steps × batch {batch} × {seq}; the train parts hold {avail:,} tokens), AdamW lr {lr},
warm-up 50 steps, cosine to 10 %, weight decay 0.1, grad clip 1.0; bias update of e_score_correction_bias
(±0.001 per step toward even load); {secs:.0f} s on {threads} CPU threads.

## Held-out perplexity per domain

Non-overlapping windows of {seq} tokens of each domain's evaluation part (never trained or calibrated on), bf16
weights as stored. Expert usage: the smallest and largest share of routed token slots an expert gets, per MoE layer
(uniform: {uniform:.4f}).

| domain | tokens | perplexity | unigram perplexity | expert share min / max per MoE layer |
|---|---|---|---|---|
{rows}
"""


def write_multi_card(model_dir: Path) -> None:
    view = open_checkpoint(model_dir)
    d = describe(view)
    t = json.loads((model_dir / "training.json").read_text())
    r = d["routing"]
    routing = (f"{r['scoring']} + e_score_correction_bias, group-limited: n_group {r['n_group']}, topk_group "
               f"{r['topk_group']}, routed_scaling_factor {r['routed_scaling_factor']:g}")
    rows = "\n".join(
        f"| {dom} | {h['tokens']:,} | {h['ppl']:.2f} | {h['unigram_ppl']:.1f} | "
        + ", ".join(f"{a:.4f} / {b:.4f}" for a, b in h["expert_usage"]) + " |"
        for dom, h in t["held_out"].items())
    card = MULTI_CARD.format(
        name=model_dir.name, hf_class=d["hf_class"], layers=d["layers"], n_moe=len(d["moe_layers"]),
        dense=d["dense_layers"] or "none", hidden=d["hidden"], experts=d["routed_experts"],
        expert_ffn=d["expert_ffn"], top_k=d["top_k"], shared=d["shared_experts"], routing=routing,
        vocab=d["vocab"], total=d["params_total"], active=d["params_active"],
        disk_mb=_disk_mb(model_dir), files=_weight_files(model_dir), tokens=t["tokens_trained"],
        steps=t["steps"], batch=t["batch"], seq=t["seq_len"], avail=t["train_tokens_available"], lr=t["lr"],
        secs=t["train_seconds"], threads=t["threads"], uniform=1 / d["routed_experts"], rows=rows)
    (model_dir / "README.md").write_text(card)


def card_bound(ppl: float) -> float:
    """The perplexity bound tests hold the fixture to: 25% headroom over the measured value for slice noise."""
    return round(ppl * 1.25 + 1)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path = Path(arg)
        multi = "held_out" in json.loads((path / "training.json").read_text())
        (write_multi_card if multi else write_card)(path)

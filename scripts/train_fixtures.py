"""Train the bundled fixture MoE models: `make fixtures` (or `python scripts/train_fixtures.py [--models NAME ...]`).

tiny-qwen3-moe and tiny-deepseek-v3 are trained on TinyStories; tiny-deepseek-v3-multi (64 fine-grained experts) on
the train parts of the five-domain corpus (scripts/build_data.py), with DeepSeek-V3's auxiliary-loss-free balancing
only, so that its experts can specialise by domain.

Writes real Hugging Face checkpoints (config.json, bf16 model.safetensors with one tensor per expert as hub
checkpoints store them, tokenizer.json, tokenizer_config.json, README.md model card) under models/.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TRAIN = DATA / "tinystories-train.txt"
VALID = DATA / "tinystories-valid.txt"
VOCAB = 4096
SEQ = 256
EOS = "<|endoftext|>"
# llama.cpp's "qwen2" pre-tokenizer regex, so the GGUF can name a pre-tokenizer llama.cpp knows.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

COMMON = dict(
    vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, num_experts_per_tok=4,
    bos_token_id=0, eos_token_id=0, pad_token_id=None,
)
CONFIGS = {
    "tiny-qwen3-moe": dict(
        COMMON, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_key_value_heads=2, head_dim=64,
        num_experts=16, moe_intermediate_size=256, intermediate_size=512, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True,
    ),
    "tiny-deepseek-v3": dict(
        COMMON, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=4,
        q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=256, intermediate_size=512,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True,
    ),
    "tiny-deepseek-v3-multi": dict(
        COMMON, vocab_size=8192, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
        num_key_value_heads=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=64, n_shared_experts=1, moe_intermediate_size=128, intermediate_size=512,
        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        rope_interleave=True,
    ),
}
# What each fixture trains on, and the weight of the Switch-style balance loss (0: DeepSeek-V3's bias balancing only).
TRAINING = {"tiny-qwen3-moe": ("stories", 0.01), "tiny-deepseek-v3": ("stories", 0.01),
            "tiny-deepseek-v3-multi": ("multi", 0.0)}


def train_tokenizer(out: Path, vocab: int, texts: list[str] | None = None) -> None:
    """Byte-level BPE with Qwen2's split regex, trained on TinyStories (the first fixtures) or on `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if texts is None:
        tok.train([str(TRAIN)], trainer)
    else:
        tok.train_from_iterator((p for t in texts for p in t.split("\n\n") if p.strip()), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": 1024, "add_bos_token": False, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")


def encode(out: Path, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for story in text.split("\n\n"):
        if story.strip():
            ids.extend(tok.encode(story.strip()).ids + [eos])
    return np.asarray(ids, dtype=np.int64)


class RouterTap:
    """Forward hooks on every MoE router: keep the logits (for the balance loss) and the chosen experts."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        for r in self.routers:
            r.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        logits, _weights, idx = output
        self.logits.append(logits)  # (T, E)
        self.indices.append(idx)  # (T, k)

    def clear(self) -> None:
        self.logits.clear()
        self.indices.clear()

    def balance_loss(self, sigmoid: bool, k: int) -> torch.Tensor:
        """Switch-style load-balancing loss E·Σ f_e·P_e, averaged over MoE layers."""
        losses = []
        for logits, idx in zip(self.logits, self.indices):
            n_exp = logits.shape[-1]
            if sigmoid:
                s = logits.float().sigmoid()
                probs = s / s.sum(-1, keepdim=True)
            else:
                probs = logits.float().softmax(-1)
            frac = torch.bincount(idx.flatten(), minlength=n_exp).float() / idx.numel()  # (E,)
            losses.append(n_exp * (frac * probs.mean(0)).sum())
        return torch.stack(losses).mean()


def build(name: str):
    import transformers

    cfg_dict = dict(CONFIGS[name])
    model_type = cfg_dict.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model


@torch.no_grad()
def evaluate(model, ids: np.ndarray, tap: RouterTap | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Perplexity over non-overlapping SEQ windows and per-layer (min, max) expert usage share."""
    model.eval()
    n = len(ids) // SEQ
    x = torch.from_numpy(ids[: n * SEQ].reshape(n, SEQ))  # (N, L)
    nll, count = 0.0, 0
    counts: list[torch.Tensor] = []
    for b in range(0, n, 16):
        if tap:
            tap.clear()
        batch = x[b : b + 16]
        logits = model(input_ids=batch).logits.float()  # (B, L, V)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
        if tap:
            if not counts:
                counts = [torch.zeros(lg.shape[-1]) for lg in tap.logits]
            for i, idx in enumerate(tap.indices):
                counts[i] += torch.bincount(idx.flatten(), minlength=counts[i].numel()).float()
    model.train()
    usage = [((c / c.sum()).min().item(), (c / c.sum()).max().item()) for c in counts]
    return math.exp(nll / count), usage


def unigram_ppl(train: np.ndarray, valid: np.ndarray, vocab: int) -> float:
    counts = Counter(train.tolist())
    total = len(train)
    lp = [math.log((counts.get(t, 0) + 1) / (total + vocab)) for t in valid.tolist()]
    return math.exp(-sum(lp) / len(lp))


def save_checkpoint(model, name: str, out: Path) -> None:
    """bf16 safetensors in the hub layout: one tensor per expert, router bias kept in fp32."""
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):  # (E, 2I, H) -> per expert (I, H)
                tensors[f"{base}{e}.gate_proj.weight"] = t[e, :inter].clone()
                tensors[f"{base}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(t.shape[0]):  # (E, H, I) -> per expert (H, I)
                tensors[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            tensors[key] = t.clone()
    for key, t in tensors.items():
        tensors[key] = t.float().contiguous() if key.endswith("e_score_correction_bias") else t.to(torch.bfloat16).contiguous()
    save_shards(dict(sorted(tensors.items())), out)
    cfg = json.loads(model.config.to_json_string())
    cfg.update({k: v for k, v in CONFIGS[name].items() if k in ("scoring_func", "topk_method", "architectures")})
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


SHARD_BYTES = 40 * 10**6  # as the hub's max_shard_size: every committed file stays well under git hosts' 50 MB warning


def save_shards(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int = SHARD_BYTES) -> None:
    """Write `tensors` as one model.safetensors, or as hub-style shards with an index when larger than `max_bytes`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_bytes)
    for old in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    for fname, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in sorted(names)}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_data(name: str, out: Path) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """(training token arrays, one per domain; held-out token arrays by domain) with a tokenizer trained here."""
    vocab = CONFIGS[name]["vocab_size"]
    if TRAINING[name][0] == "stories":
        train_tokenizer(out, vocab)
        return [encode(out, TRAIN.read_text(encoding="utf-8"))], {"stories": encode(out, VALID.read_text(encoding="utf-8"))}
    from build_data import corpus  # scripts/build_data.py: the five-domain corpus

    train_text, eval_text = corpus("train"), corpus("eval")
    train_tokenizer(out, vocab, list(train_text.values()))
    return [encode(out, t) for t in train_text.values()], {d: encode(out, t) for d, t in eval_text.items()}


def sample_batch(rng: np.random.Generator, parts: list[np.ndarray], batch: int) -> torch.Tensor:
    """`batch` windows of SEQ tokens, each from a domain drawn uniformly (so small domains are not drowned)."""
    if len(parts) == 1:  # one domain: the draw the first fixtures were trained with
        starts = rng.integers(0, len(parts[0]) - SEQ - 1, size=batch)
        return torch.from_numpy(np.stack([parts[0][s : s + SEQ] for s in starts]))  # (B, L)
    rows = []
    for d in rng.integers(0, len(parts), size=batch):
        s = int(rng.integers(0, len(parts[d]) - SEQ - 1))
        rows.append(parts[d][s : s + SEQ])
    return torch.from_numpy(np.stack(rows))  # (B, L)


def train(name: str, steps: int, batch: int, lr: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    out = ROOT / "models" / name
    out.mkdir(parents=True, exist_ok=True)
    parts, valid = load_data(name, out)
    model = build(name)
    sigmoid = CONFIGS[name].get("scoring_func") == "sigmoid"
    aux_weight = TRAINING[name][1]
    tap = RouterTap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    t0 = time.time()
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = sample_batch(rng, parts, batch)  # (B, L)
        tap.clear()
        out_ = model(input_ids=x, labels=x)
        aux = tap.balance_loss(sigmoid, model.config.num_experts_per_tok)
        loss = out_.loss + aux_weight * aux if aux_weight else out_.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sigmoid:  # DeepSeek-V3's auxiliary-loss-free balancing: nudge the correction bias toward even load
            with torch.no_grad():
                for router, idx in zip(tap.routers, tap.indices):
                    load = torch.bincount(idx.flatten(), minlength=router.e_score_correction_bias.numel()).float()
                    router.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
        if step % 25 == 0 or step == steps - 1:
            print(f"{name} step {step}/{steps} loss {out_.loss.item():.3f} aux {aux.item():.3f} "
                  f"{(step + 1) * batch * SEQ / (time.time() - t0):.0f} tok/s", flush=True)
    train_time = time.time() - t0
    model = model.to(torch.bfloat16).float()  # evaluate what is saved: bf16 weights
    held_out = {d: evaluate(model, ids, tap) for d, ids in valid.items()}
    save_checkpoint(model, name, out)
    all_train = np.concatenate(parts)
    stats = {
        "name": name, "steps": steps, "batch": batch, "seq_len": SEQ, "lr": lr, "balance_loss_weight": aux_weight,
        "tokens_trained": steps * batch * SEQ, "train_tokens_available": int(len(all_train)),
        "train_seconds": round(train_time, 1), "threads": threads,
        "params_total": sum(p.numel() for p in model.parameters()),
    }
    if list(valid) == ["stories"]:  # the first fixtures' card layout
        (ppl, usage), ids = held_out["stories"], valid["stories"]
        stats |= {"valid_ppl": round(ppl, 3), "unigram_ppl": round(unigram_ppl(all_train, ids, model.config.vocab_size), 3),
                  "valid_tokens": int(len(ids)), "expert_usage": [[round(a, 4), round(b, 4)] for a, b in usage]}
    else:
        stats["held_out"] = {d: {"ppl": round(ppl, 3), "tokens": int(len(valid[d])),
                                 "unigram_ppl": round(unigram_ppl(all_train, valid[d], model.config.vocab_size), 3),
                                 "expert_usage": [[round(a, 4), round(b, 4)] for a, b in usage]}
                             for d, (ppl, usage) in held_out.items()}
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats), flush=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    for name in a.models:
        train(name, a.steps, a.batch, a.lr, a.threads)
        from model_card import write_card, write_multi_card  # scripts/model_card.py: cards from training.json

        (write_card if TRAINING[name][0] == "stories" else write_multi_card)(ROOT / "models" / name)


if __name__ == "__main__":
    main()

"""Per-core rates behind docs/distributed.md's cost model, and the model's DeepSeek-V3 numbers from them.

    .venv/bin/python bench/distributed_cost.py [--tokens 4096] [--cores 64] [--out bench/results/distributed_cost.json]

Measured here, on one thread each: ggml quantization (with an importance matrix) and dequantization per ladder type
on a 7168-wide matrix; float32 GEMM at DeepSeek-V3's shapes (an expert's 128 routed tokens × 7168 × 2048, attention's
tokens × 7168 × 1536); whether torch's results change with the thread count; and one sensitivity run on a random
model of the fixtures' shape (DeepSeek-V3 layout: hidden 256, 4 layers, 16 experts × 256, top-4, vocab 4096), which
gives the measured seconds per probe at that size. Then the cost of probing DeepSeek-V3 (671B) on N machines of
`--cores` cores, from those rates; every assumption is printed with its number.

`--v3-layer` measures instead one DeepSeek-V3-shaped MoE layer (bench/scale.py's synthetic checkpoint, 2 routed
experts + the shared one, top-2) on `--threads` threads: building it from bf16, calibrating it and pushing tokens
through it; and prints the cost model of a whole DeepSeek-V3 `compress` (calibrate + sensitivity + write) on one
machine of `--cores` cores, in fast mode (one probe per group) and full mode (one per group and upgrade type).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, v3_layer_checkpoint
from moepack.gguf import kernels as ggml
from moepack.gguf.types import LADDER
from moepack.stages.sensitivity.fast import PROXY_SAMPLE


# DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3): the numbers the model below uses.
DSV3 = dict(hidden=7168, layers=61, dense_layers=3, experts=256, shared=1, top_k=8, expert_ffn=2048, dense_ffn=18432,
            vocab=129280, heads=128, q_lora=1536, kv_lora=512, nope=128, rope=64, v_head=128)


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def quant_rates(rows: int = 64, n: int = 7168) -> dict[str, dict[str, float]]:
    """Weights per second, one thread: quantize (with an importance matrix) and dequantize, per ladder type."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n), dtype=np.float32) * 0.02  # (rows, n)
    im = rng.random(n, dtype=np.float32) + 0.5  # (n,)
    out = {}
    for t in LADDER:
        raw = ggml.quantize(x, t, im, threads=1)
        q = _best(lambda: ggml.quantize(x, t, im, threads=1), 2)
        big = np.tile(raw.reshape(rows, -1), (8, 1))  # (8·rows, row bytes): dequantize 8× as many rows
        d = _best(lambda: ggml.dequantize(big, t, (8 * rows, n), threads=1))
        out[t] = {"quantize_wps": x.size / q, "dequantize_wps": 8 * x.size / d}
    return out


def gemm_rates(tokens: int) -> dict[str, float]:
    """float32 FLOP/s on one thread at DeepSeek-V3's shapes; and the memcpy rate (bytes/s) of building layers."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    per_expert = max(1, tokens * DSV3["top_k"] // DSV3["experts"])  # routed tokens per expert
    xe, we = torch.randn(per_expert, 7168, generator=g), torch.randn(2048, 7168, generator=g)
    rows = min(tokens, 1024)
    xa, wa = torch.randn(rows, 7168, generator=g), torch.randn(1536, 7168, generator=g)
    te = _best(lambda: torch.nn.functional.linear(xe, we))
    ta = _best(lambda: torch.nn.functional.linear(xa, wa))
    src = torch.randn(64 << 20, generator=g)  # 256 MiB
    dst = torch.empty_like(src)
    tc = _best(lambda: dst.copy_(src))
    return {"expert_flops": 2 * per_expert * 7168 * 2048 / te, "attn_flops": 2 * rows * 7168 * 1536 / ta,
            "copy_bytes_per_s": 2 * src.numel() * 4 / tc, "tokens_per_expert": per_expert}


def thread_effect() -> dict[str, bool]:
    """Which torch results change between 1 and 2 threads (so a task fixes its thread count)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16384, 512, generator=g), torch.randn(2048, 512, generator=g)
    ops = {"x.sum()": lambda: x.sum(), "x.pow(2).sum(0)": lambda: x.pow(2).sum(0),
           "linear(x, w)": lambda: torch.nn.functional.linear(x, w), "logsumexp(-1)": lambda: torch.logsumexp(x, -1)}
    same = {}
    for name, fn in ops.items():
        torch.set_num_threads(1)
        a = fn()
        torch.set_num_threads(2)
        same[name] = bool(torch.equal(a, fn()))
    torch.set_num_threads(1)
    return same


def random_deepseek_v3(out: Path, hidden: int = 256, ffn: int = 256, n_experts: int = 16, top_k: int = 4,
                       n_layers: int = 4, vocab: int = 4096) -> Path:
    """A random-weight DeepSeek-V3 checkpoint of the fixtures' shape (the tests' tiny model of the family, wider):
    MLA, a leading dense layer, one shared expert, sigmoid router with a random correction bias."""
    import transformers

    cfg = transformers.DeepseekV3Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=top_k, rms_norm_eps=1e-6,
        q_lora_rank=hidden, kv_lora_rank=hidden, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=hidden // 4,
        n_routed_experts=n_experts, n_shared_experts=1, moe_intermediate_size=ffn, intermediate_size=2 * ffn,
        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # as trained checkpoints have: a router bias that matters
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand_like(buf) * 0.1)
    model.save_pretrained(out)
    c = json.loads((out / "config.json").read_text())  # as hub configs carry them; transformers drops them on save
    (out / "config.json").write_text(json.dumps(c | {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}, indent=2))
    return out


def fixture_probe(tokens: int, threads: int) -> dict[str, float]:
    """One sensitivity run (default ladder) on a random model of the fixtures' shape: seconds per probe."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.calibrate import calibrate
    from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity

    with tempfile.TemporaryDirectory() as d:
        path = random_deepseek_v3(Path(d) / "m")
        view = open_checkpoint(path)
        rng = np.random.default_rng(0)
        stats = calibrate(view, rng.integers(0, 4096, (4, 256)), progress=False, threads=threads)
        ids = rng.integers(0, 4096, (max(1, tokens // 256), 256))
        t = measure_sensitivity(view, ids, SensitivityConfig(threads=threads, progress=False), imatrix=stats).to_dict()
    tm = t["timing"]
    return {"tokens": int(ids.size), "groups": len(t["groups"]), "probes": tm["probes"],
            "quantize_s": tm["quantize_s"], "probes_s": tm["probes_s"], "s_per_probe": tm["probes_s"] / tm["probes"],
            "weights": int(sum(o.numel for o in view.tensors.values()))}


def dsv3_model(rates: dict, gemm: dict, tokens: int, cores: int) -> dict[str, float]:
    """Core-seconds of probing DeepSeek-V3 with the default ladder, from the measured per-core rates."""
    c = DSV3
    h, e_ffn = c["hidden"], c["expert_ffn"]
    attn = (h * c["q_lora"] + c["q_lora"] * c["heads"] * (c["nope"] + c["rope"]) + h * (c["kv_lora"] + c["rope"])
            + c["kv_lora"] * c["heads"] * (c["nope"] + c["v_head"]) + c["heads"] * c["v_head"] * h)
    expert = 3 * h * e_ffn
    moe_layer = attn + (c["experts"] + c["shared"]) * expert
    dense_layer = attn + 3 * h * c["dense_ffn"]
    head = c["vocab"] * h
    active = attn + (c["top_k"] + c["shared"]) * expert  # per token, MoE layer (dense layers: about the same)
    # groups: attention 5 per layer (q_a, q_b, kv_a_mqa, kv_b = k_b + v_b, output); FFN 3 per dense layer, 6 per MoE
    # layer (gate/up/down of the routed and of the shared experts); token_embd and output
    layers = [(i, dense_layer if i < c["dense_layers"] else moe_layer) for i in range(c["layers"])]
    groups = [(i, 5 + (3 if i < c["dense_layers"] else 6)) for i in range(c["layers"])]
    n_groups = sum(n for _, n in groups) + 2
    upgrades = len(LADDER) - 1  # at most; row widths of 128 (attn_k_b) fall back and are probed fewer times
    depth = [(c["layers"] - i) for i, n in groups for _ in range(n)] + [c["layers"], 0]  # layers run per probe
    mean_depth = sum(depth) / len(depth)
    mean_layer = sum(w for _, w in layers) / len(layers)
    base, ups = LADDER[0], LADDER[1:]
    build_s = mean_depth * mean_layer * (1 / rates[base]["dequantize_wps"] + 8 / gemm["copy_bytes_per_s"])
    fwd_s = tokens * (mean_depth * 2 * active / gemm["expert_flops"] + 2 * head / gemm["attn_flops"])
    probe_s = build_s + fwd_s
    total_w = sum(w for _, w in layers) + 2 * head
    quant_base_s = total_w / rates[base]["quantize_wps"]
    quant_up_s = total_w * sum(1 / rates[t]["quantize_wps"] for t in ups)
    probes = n_groups * upgrades
    core_s = probes * probe_s + quant_base_s + quant_up_s
    return {"params": total_w, "groups": n_groups, "probes": probes, "mean_depth": mean_depth,
            "layer_weights": mean_layer, "active_per_token_layer": active, "build_core_s": build_s,
            "forward_core_s": fwd_s, "probe_core_s": probe_s, "quantize_base_core_s": quant_base_s,
            "quantize_upgrades_core_s": quant_up_s, "total_core_s": core_s, "cores": cores,
            "hours_on": {n: core_s / (n * cores) / 3600 for n in (1, 4, 16, 64)}}


WRITE_TYPE = "IQ2_XXS"  # the write term's kernel: a 2.5 bpw plan is mostly 2-bit types


def v3_layer_times(threads: int, tokens: int = 512) -> dict[str, float]:
    """Seconds on one V3-shaped MoE layer (`threads` threads): build it from bf16 (read, convert, fuse experts),
    forward `tokens` tokens through it, and the calibrate stage on the same tokens (build + forward + statistics)."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.model.runner import LayerRunner
    from moepack.stages.calibrate import calibrate

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=ROOT / "out") as d:
        view = open_checkpoint(v3_layer_checkpoint(Path(d)))
        runner = LayerRunner(view)
        ids = np.random.default_rng(0).integers(0, 4096, (tokens // 128, 128))  # (N, 128)
        h = runner.embed(torch.as_tensor(ids))  # (N, 128, H)
        build = _best(lambda: runner.layer(0), 2)
        run = _best(lambda: runner.run(h, 0, 1), 2)  # build + forward
        t0 = time.perf_counter()
        calibrate(view, ids, progress=False, threads=threads)
        calib = time.perf_counter() - t0
        layer_bytes = sum(t.nbytes for t in view.tensors.values() if t.layer == 0)
        cfg = view.config
    h_, e_ffn = cfg["hidden_size"], cfg["moe_intermediate_size"]
    attn = (h_ * 1536 + 1536 * 128 * 192 + h_ * 576 + 512 * 128 * 256 + 128 * 128 * h_)
    active = attn + (cfg["num_experts_per_tok"] + cfg["n_shared_experts"]) * 3 * h_ * e_ffn
    return {"threads": threads, "tokens": tokens, "layer_bytes": layer_bytes, "active": active, "build_s": build,
            "forward_s": run - build, "calibrate_s": calib}


def compress_model(layer: dict, rates: dict, gemm: dict, calib_tokens: int, probe_tokens: int,
                   cores: int) -> dict[str, dict[str, float]]:
    """Core-hours of DeepSeek-V3's compress in fast and full mode, from the measured V3-layer seconds (× threads =
    core-seconds) and the per-core kernel rates. Per-token forward cost scales with the active weights of a layer."""
    m = dsv3_model(rates, gemm, probe_tokens, cores)
    c, thr = DSV3, layer["threads"]
    per_tok_w = layer["forward_s"] * thr / (layer["tokens"] * layer["active"])  # core-s per token and active weight
    cal_tok_w = (layer["calibrate_s"] - layer["build_s"]) * thr / (layer["tokens"] * layer["active"])
    build_b = layer["build_s"] * thr / layer["layer_bytes"]  # core-s per bf16 byte built
    v3_bytes = 2 * m["params"] - 2 * c["vocab"] * c["hidden"]  # bf16 bytes calibrate builds (no lm_head)
    head_s = 2 * c["vocab"] * c["hidden"] / gemm["attn_flops"]  # per token
    calib = calib_tokens * c["layers"] * m["active_per_token_layer"] * cal_tok_w + v3_bytes * build_b  # no head
    base, top = LADDER[0], LADDER[-1]
    # Full mode quantizes every weight at every ladder type (each is probed). Fast mode quantizes whole only the
    # base and the probed (highest) type; every other type is quantized, for its error alone, on PROXY_SAMPLE of
    # each tensor's rows (QuantStore.sample_errors), the base again on the same rows.
    whole = {t: 1.0 for t in LADDER}
    sampled = {t: (1.0 if t in (base, top) else PROXY_SAMPLE) for t in LADDER}
    sampled[base] += PROXY_SAMPLE  # the base's error on the sampled rows, paired with each type's
    quant = {mode: m["params"] * sum(f / rates[t]["quantize_wps"] for t, f in share.items())
             for mode, share in (("fast", sampled), ("full", whole))}
    errors = m["params"] * sum(f / rates[t]["dequantize_wps"] for t, f in sampled.items())  # fast mode's Δerr
    build_q = m["mean_depth"] * m["layer_weights"] * (1 / rates[base]["dequantize_wps"]
                                                      + 8 / gemm["copy_bytes_per_s"])
    fwd = probe_tokens * (m["mean_depth"] * m["active_per_token_layer"] * per_tok_w + head_s)
    probe = build_q + fwd
    write = m["params"] / rates[WRITE_TYPE]["quantize_wps"]  # every weight once (a ~2.5 bpw plan)
    out = {}
    for mode, probes in (("fast", m["groups"]), ("full", m["probes"])):
        terms = {"calibrate": calib, "quantize ladder": quant[mode], "per-type error": errors if mode == "fast" else 0.0,
                 "probes": probes * probe, "write": write}
        out[mode] = {k: v / 3600 for k, v in terms.items()} | {
            "probes_n": probes, "probe_core_s": probe, "total_core_h": sum(terms.values()) / 3600,
            "wall_h": sum(terms.values()) / cores / 3600}
    out["rates"] = {"per_tok_w": per_tok_w, "cal_tok_w": cal_tok_w, "build_b": build_b, "head_s": head_s,
                    "probe_build_s": build_q, "probe_fwd_s": fwd}
    return out


def print_compress(layer: dict, cm: dict, cores: int, calib_tokens: int, probe_tokens: int) -> None:
    gb = layer["layer_bytes"] / 1e9
    print(f"V3-shaped MoE layer ({gb:.2f} GB bf16, {layer['active'] / 1e6:.0f}M active weights per token), "
          f"{layer['threads']} threads, {layer['tokens']} tokens: build {layer['build_s']:.1f} s, forward "
          f"{layer['forward_s']:.1f} s, calibrate {layer['calibrate_s']:.1f} s")
    r = cm["rates"]
    print(f"per core: forward {r['per_tok_w'] * 1e12:.1f} ps per token and active weight (calibrate "
          f"{r['cal_tok_w'] * 1e12:.1f}), build from bf16 {1 / r['build_b'] / 1e9:.2f} GB/s; a probe "
          f"({probe_tokens} tokens) builds {r['probe_build_s']:.0f} + runs {r['probe_fwd_s']:.0f} core-s")
    print(f"\nDeepSeek-V3 compress ({calib_tokens} calibration tokens, {probe_tokens} probe tokens), core-hours; "
          f"wall hours on one {cores}-core machine:\n")
    print(f"(write: every weight at {WRITE_TYPE}'s rate)\n")
    print("| term | fast | full |\n|---|---:|---:|")
    for k in ("calibrate", "quantize ladder", "per-type error", "probes", "write"):
        print(f"| {k} | {cm['fast'][k]:.0f} | {cm['full'][k]:.0f} |")
    print(f"| probes (count) | {cm['fast']['probes_n']} | {cm['full']['probes_n']} |")
    print(f"| **total core-h** | {cm['fast']['total_core_h']:.0f} | {cm['full']['total_core_h']:.0f} |")
    print(f"| **wall h, {cores} cores** | {cm['fast']['wall_h']:.1f} | {cm['full']['wall_h']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="probe tokens (moepack's default --sens-tokens)")
    ap.add_argument("--cores", type=int, default=64, help="cores per machine in the DeepSeek-V3 model")
    ap.add_argument("--fixture-tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed_cost.json")
    ap.add_argument("--v3-layer", action="store_true", help="measure a V3-shaped layer; model a whole compress")
    ap.add_argument("--threads", type=int, default=2, help="threads for the V3-layer measurements")
    ap.add_argument("--calib-tokens", type=int, default=50_000, help="calibration tokens (compress's default)")
    ap.add_argument("--reuse", action="store_true", help="V3 model from the rates and layer times saved last time")
    args = ap.parse_args()
    if args.v3_layer:
        v3_compress(args)
        return
    res = {"command": " ".join(["bench/distributed_cost.py", *sys.argv[1:]]), "torch_threads_same": thread_effect(),
           "rates": quant_rates(), "gemm": gemm_rates(args.tokens),
           "fixture": fixture_probe(args.fixture_tokens, threads=1)}
    res["dsv3"] = dsv3_model(res["rates"], res["gemm"], args.tokens, args.cores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"$ .venv/bin/python {res['command']}\n")
    print("| type | quantize (M weights/s/core) | dequantize (M weights/s/core) |\n|---|---:|---:|")
    for t, r in res["rates"].items():
        print(f"| {t} | {r['quantize_wps'] / 1e6:.2f} | {r['dequantize_wps'] / 1e6:.0f} |")
    g = res["gemm"]
    print(f"\nfloat32 GEMM, 1 thread: expert ({g['tokens_per_expert']} × 7168 × 2048) {g['expert_flops'] / 1e9:.1f} "
          f"GFLOP/s, attention {g['attn_flops'] / 1e9:.1f} GFLOP/s; memcpy {g['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    print("same result on 1 and 2 threads:", res["torch_threads_same"])
    f = res["fixture"]
    print(f"fixture shape ({f['weights'] / 1e6:.1f}M weights, {f['groups']} groups, {f['probes']} probes, "
          f"{f['tokens']} tokens, 1 thread): quantize {f['quantize_s']:.1f} s, probes {f['probes_s']:.1f} s = "
          f"{f['s_per_probe']:.3f} s per probe")
    m = res["dsv3"]
    print(f"\nDeepSeek-V3: {m['params'] / 1e9:.0f}B weights, {m['groups']} groups, {m['probes']} probes, mean depth "
          f"{m['mean_depth']:.1f} layers of {m['layer_weights'] / 1e9:.1f}B weights")
    print(f"  per probe: build {m['build_core_s']:.0f} + forward {m['forward_core_s']:.0f} = "
          f"{m['probe_core_s']:.0f} core-s; quantize base {m['quantize_base_core_s'] / 3600:.0f} core-h, upgrades "
          f"{m['quantize_upgrades_core_s'] / 3600:.0f} core-h; total {m['total_core_s'] / 3600:.0f} core-h")
    print("  wall hours on N machines of", m["cores"], "cores:",
          ", ".join(f"N={n}: {v:.1f}" for n, v in m["hours_on"].items()))


def v3_compress(args: argparse.Namespace) -> None:
    command = " ".join(["bench/distributed_cost.py", *sys.argv[1:]])
    print(f"$ .venv/bin/python {command}\n", flush=True)
    out = args.out.with_name("compress_cost.json")
    if args.reuse:
        saved = json.loads(out.read_text())
        rates, gemm, layer = saved["rates"], saved["gemm"], saved["layer"]
    else:
        rates, gemm, layer = quant_rates(), gemm_rates(args.tokens), v3_layer_times(args.threads)
    cm = compress_model(layer, rates, gemm, args.calib_tokens, args.tokens, args.cores)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "rates": rates, "gemm": gemm, "layer": layer, "model": cm},
                              indent=1) + "\n")
    print("| type | quantize (M weights/s/core) | dequantize (M weights/s/core) |\n|---|---:|---:|")
    for t, r in rates.items():
        print(f"| {t} | {r['quantize_wps'] / 1e6:.2f} | {r['dequantize_wps'] / 1e6:.0f} |")
    print(f"float32 GEMM, 1 thread: attention-sized {gemm['attn_flops'] / 1e9:.1f} GFLOP/s; memcpy "
          f"{gemm['copy_bytes_per_s'] / 1e9:.1f} GB/s\n")
    print_compress(layer, cm, args.cores, args.calib_tokens, args.tokens)


if __name__ == "__main__":
    main()

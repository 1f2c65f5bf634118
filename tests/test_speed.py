"""The speed model: llama.cpp's matrix products timed per type (moepack.gguf.matmul), the kernel time table and its
file, what one token multiplies (moepack.stages.speed), `moepack speed`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moepack.cli import main
from moepack.schema.base import SchemaError
from moepack.schema.speed import KernelTimes
from moepack.stages.speed import Attention, KernelClock, LayerOps, MatMul, SpeedError, matmuls, plan_speed, predict

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_row_cost_grows_with_the_work() -> None:
    """A row of four times the width, or a batch of 64 columns instead of 1, takes longer; the times are positive,
    and a K-quant's product of a 512-token batch has a fixed part per call (its input converted to Q8_K once for all
    rows: about a third of a 512-row product on a 2-core EPYC)."""
    from moepack.gguf.matmul import row_cost

    one = row_cost("Q8_0", 256, 1, threads=1, repeats=3)
    wide = row_cost("Q8_0", 1024, 1, threads=1, repeats=3)
    batch = row_cost("Q8_0", 256, 64, threads=1, repeats=3)
    call, row = row_cost("Q4_K", 2048, 512, threads=1, repeats=3)
    assert 0 < one[1] < wide[1] and one[1] < batch[1] and min(one + wide + batch) >= 0
    assert call > 50 * row > 0


def test_attention_cost_grows_with_the_cache_and_the_query_tokens() -> None:
    """A layer's attention (KQ, soft_max, KQV over an F16 cache): positive time per cached token, more for 64 query
    tokens than for one, more for more heads."""
    from moepack.gguf.matmul import attention_cost

    one = attention_cost(4, 2, 64, 64, 1, threads=1, n_kv=(64, 256), repeats=3)
    many = attention_cost(4, 2, 64, 64, 64, threads=1, n_kv=(64, 256), repeats=3)
    heads = attention_cost(16, 2, 64, 64, 64, threads=1, n_kv=(64, 256), repeats=3)
    assert 0 < one[1] < many[1] < heads[1]


def test_fit_splits_a_products_time_into_call_and_rows() -> None:
    from moepack.gguf.matmul import fit_call_row

    assert fit_call_row((512, 2048), [1e-3 + 512e-6, 1e-3 + 2048e-6]) == pytest.approx((1e-3, 1e-6))
    assert fit_call_row((512, 2048), [1.1e-3, 1.0e-3]) == (0.0, pytest.approx(1.0e-3 / 2048))  # noise: no negative row


def test_experts_are_timed_as_llama_cpp_runs_them(tmp_path: Path) -> None:
    """Routed experts: ggml's mul_mat_id at the model's (E, k'), cached under "TYPE@ExK" per batch width. (How a
    prompt's token compares with a decoded one is a timing: bench/speed.py measures it, not a test on a machine
    that may be busy.)"""
    clock = KernelClock(KernelTimes("here", 1, "test"), tmp_path / "t.json")
    one = clock.expert_cost("Q8_0", 256, 8, 2, 1)
    many = clock.expert_cost("Q8_0", 256, 8, 2, 64)
    assert one[1] > 0 and many[1] > 0 and clock.times.get("Q8_0@8x2", 256, 1) == one
    clock.save()
    assert KernelTimes.read(tmp_path / "t.json").get("Q8_0@8x2", 256, 64) == many


def test_matmuls_counts_what_one_token_multiplies() -> None:
    """tiny-qwen3-moe: per MoE layer k of E experts' gate/up/down, the router, q/k/v/o; the output head; no
    embedding lookup; types as the plan says, F32 where it says nothing."""
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(MODELS / "tiny-qwen3-moe")
    work = {m.name: m for m in matmuls(view, {"blk.0.ffn_down_exps.weight": "Q4_K"})}
    f = view.facts
    down = work["blk.0.ffn_down_exps.weight"]
    assert (down.qtype, down.uses, down.experts) == ("Q4_K", f.top_k, f.n_experts)
    assert "token_embd.weight" not in work and work["output.weight"].qtype == "F32"
    assert work["blk.0.ffn_gate_inp.weight"].rows == f.n_experts
    assert {n.split(".")[2] for n in work if n.startswith("blk.0.")} >= {"attn_q", "attn_k", "attn_v", "attn_output"}
    last = f.n_layers - 1  # its feed-forward and the head run for a prompt's last token only
    assert {n for n, m in work.items() if getattr(m, "last", False)} == {"output.weight"} | {
        n for n in work if n.startswith(f"blk.{last}.ffn_")}
    # each layer's attention over the KV cache: the config's heads and head widths
    attn = [m for m in work.values() if isinstance(m, Attention)]
    cfg = view.config
    assert len(attn) == f.n_layers and {(a.n_head, a.n_head_kv, a.head_k) for a in attn} == {
        (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])}
    ops = [m for m in work.values() if isinstance(m, LayerOps)]  # and its element-wise and routing ops
    assert sorted(o.name for o in ops) == [f"blk.{i}.layer_ops" for i in range(f.n_layers)]
    assert {(o.experts, o.used, o.ffn) for o in ops} == {(f.n_experts, f.top_k, f.expert_ffn)}


def _table(times: dict[str, float], call: float = 0.0) -> KernelTimes:
    """A table where every (type, width) takes `times[type]` per row at batch 1 and 8x per row at batch 512, and
    `call` per call at batch 512 (none at batch 1)."""
    t = KernelTimes("test device", 2, "test")
    for qtype, s in times.items():
        for n in (64, 128, 256):
            t.put(qtype, n, 1, 0.0, s * n / 256)
            t.put(qtype, n, 512, call * n / 256, 8 * s * n / 256)
    return t


def test_predict_sums_calls_and_rows_times_seconds_per_row() -> None:
    """Decode: rows × uses × seconds per row; prompt: each call's fixed part, each expert multiplies its share of
    the ubatch (a brought table without the experts' key: the plain product at that share, once per expert)."""
    clock = KernelClock(_table({"Q4_K": 1e-6, "F32": 4e-6}, call=2e-4), measure=False)
    work = [MatMul("blk.0.attn_q.weight", "Q4_K", 256, 100), MatMul("blk.0.ffn_up_exps.weight", "Q4_K", 256, 10, 2, 8)]
    sp = predict(work, clock, ubatch=512)
    decode = 100 * 1e-6 + 10 * 2 * 1e-6
    assert sp.decode_tps == pytest.approx(1 / decode)
    assert sp.decode_seconds == pytest.approx({"attn_q": 100e-6, "ffn_up_exps": 20e-6})
    # experts: batch 128 of 512 → 1e-6 + (8e-6 - 1e-6) * 127 / 511 per row, 8 experts × 10 rows, over 512 tokens
    expert_row = 1e-6 + 7e-6 * 127 / 511
    expert_call = 2e-4 * 127 / 511 * 8
    prompt = (2e-4 + 100 * 8e-6) / 512 + (expert_call + 8 * 10 * expert_row) / 512
    assert sp.prompt_tps == pytest.approx(1 / prompt)


def test_the_last_layers_feed_forward_and_the_head_run_once_per_prompt() -> None:
    """llama.cpp keeps only the output token's row before the last layer's feed-forward and the output head: a
    prompt pays them once per ubatch, at the decode cost; decode pays them as any other product."""
    clock = KernelClock(_table({"Q4_K": 1e-6}, call=2e-4), measure=False)
    first, last = (MatMul(f"blk.{i}.ffn_up_exps.weight", "Q4_K", 256, 10, 2, 8, last=i == 1) for i in (0, 1))
    assert last.decode_seconds(clock) == first.decode_seconds(clock)
    assert last.prompt_seconds(clock, 512) == pytest.approx(last.decode_seconds(clock) / 512)
    assert last.prompt_seconds(clock, 512) < first.prompt_seconds(clock, 512) / 10


def test_a_brought_table_interpolates_widths_and_names_missing_types() -> None:
    clock = KernelClock(_table({"Q4_K": 1e-6}, call=2e-4), measure=False)
    assert clock.cost("Q4_K", 512, 1) == pytest.approx((0, 2e-6))  # the nearest width (256), scaled by the width
    assert clock.cost("Q4_K", 256, 256) == pytest.approx((2e-4 * 255 / 511, 1e-6 + 7e-6 * 255 / 511))
    with pytest.raises(SpeedError, match="no IQ2_XXS .*has: Q4_K.*moepack speed"):
        clock.cost("IQ2_XXS", 256, 1)


def test_a_brought_table_without_this_models_attention_warns_and_counts_products(caplog) -> None:
    clock = KernelClock(_table({"Q4_K": 1e-6}), measure=False)
    work = [MatMul("blk.0.attn_q.weight", "Q4_K", 256, 100), Attention("blk.0.attn_kq", 4, 2, 64, 64)]
    assert predict(work, clock).decode_tps == pytest.approx(1 / 100e-6)
    assert "no times for the attention of 4 heads" in caplog.text and "moepack speed MODEL" in caplog.text
    clock.times.put("ATTN@4x2x64", 64, 1, 1e-5, 1e-7)  # measured there: call + 512 cached tokens x per token
    assert Attention("blk.0.attn_kq", 4, 2, 64, 64).decode_seconds(clock) == pytest.approx(1e-5 + 512e-7)


def test_slower_types_predict_fewer_tokens(tmp_path: Path) -> None:
    """The same model with every tensor at a type whose rows take twice as long decodes at about half the speed."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(MODELS / "tiny-qwen3-moe")
    clock = KernelClock(_table({"Q4_K": 1e-6, "Q2_K": 2e-6, "F32": 1e-7}), measure=False)
    names = [o.name for o in gguf_outputs(view) if o.quantizable]
    fast = plan_speed(view, {n: "Q4_K" for n in names}, clock)
    slow = plan_speed(view, {n: "Q2_K" for n in names}, clock)
    assert 1.7 < fast.decode_tps / slow.decode_tps < 2.0 and fast.prompt_tps > slow.prompt_tps


def test_table_file_round_trips_and_bad_files_say_what_to_do(tmp_path: Path) -> None:
    t = _table({"Q4_K": 1e-6})
    back = KernelTimes.read(t.write(tmp_path / "t.json"))
    assert back.to_dict() == t.to_dict() and back.get("Q4_K", 256, 512) == pytest.approx((0, 8e-6))
    old = {k: v for k, v in t.to_dict().items() if k != "seconds_per_call"} | {"format": "moepack.speed/1"}
    (tmp_path / "v1.json").write_text(json.dumps(old))  # a table of the first format: no fixed part per call
    assert KernelTimes.read(tmp_path / "v1.json").get("Q4_K", 256, 512) == pytest.approx((0, 8e-6))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SchemaError, match="moepack speed"):
        KernelTimes.read(tmp_path / "bad.json")
    d = t.to_dict()
    d["seconds_per_row"]["Q4_K"]["256"]["1"] = -1
    (tmp_path / "neg.json").write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="not a positive time"):
        KernelTimes.read(tmp_path / "neg.json")


def test_speed_command_writes_a_table_compress_reads(tmp_path: Path, capsys, monkeypatch) -> None:
    """`moepack speed MODEL -o FILE` times the types asked at the model's widths and batches 1..512; compress
    rejects a table that is not one before it starts."""
    monkeypatch.setenv("MOEPACK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "device.json"
    assert main(["speed", str(MODELS / "tiny-qwen3-moe"), "--types", "Q4_K,Q8_0", "-t", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    t = KernelTimes.read(out)
    # every width and batch 1..512; the routed experts' mul_mat_id at the model's 16 experts, 4 per token
    # and each layer's attention (4 heads over 2 cached heads of 64) and other ops for 1 and 512 query tokens
    ops = "OPS@4x2x64x16x4x256"
    assert set(t.seconds_per_row) == {"Q4_K", "Q8_0", "Q4_K@16x4", "Q8_0@16x4", "ATTN@4x2x64", ops}
    assert set(t.seconds_per_row[ops][256]) == {1, 512} and "layer ops" in printed
    assert "decode GB/s" in printed and "per cached token" in printed and set(t.seconds_per_row["ATTN@4x2x64"][64]) == {
        1, 512}
    assert all(set(bs) == {2**i for i in range(10)} for k, ns in t.seconds_per_row.items() if "@" not in k
               for bs in ns.values())
    assert all(set(bs) == {1, 512} for k, ns in t.seconds_per_row.items() if "@" in k for bs in ns.values())
    (cached,) = (tmp_path / "cache" / "speed").glob("*-t1.json")  # this machine's cache, for compress
    assert KernelTimes.read(cached).to_dict() == t.to_dict()
    assert main(["speed", str(MODELS / "tiny-qwen3-moe"), "--types", "Q8_0", "-t", "1", "--fresh"]) == 0
    measured_anew = {k.split("@")[0] for k in KernelTimes.read(cached).seconds_per_row}
    assert measured_anew == {"Q8_0", "ATTN", "OPS"}
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compress", str(MODELS / "tiny-qwen3-moe"), "--target-bpw", "3", "-o", str(tmp_path / "x.gguf"),
                 "--speed-table", str(tmp_path / "bad.json")]) != 0
    assert "moepack speed" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


def test_a_gguf_files_own_tensors_give_the_same_work_as_its_plan(tmp_path: Path) -> None:
    """gguf_matmuls of a written file equals matmuls of the view and plan it was written from."""
    from moepack.gguf.quantize import quantize_model
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.speed import gguf_matmuls

    model = MODELS / "tiny-qwen3-moe"
    out = tmp_path / "q8.gguf"
    quantize_model(model, out, qtype="Q8_0", progress=False)
    from_file = sorted(gguf_matmuls(out), key=lambda m: m.name)
    view = open_checkpoint(model)
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert from_file == sorted(matmuls(view, types), key=lambda m: m.name)


def _device_table(path: Path) -> Path:
    """A brought kernel time table on which every IQ type takes 10x as long per row as the other types."""
    from moepack.gguf.types import QUANT_TYPES

    t = KernelTimes("a device whose IQ kernels are slow", 2, "test")
    for qtype in [q.name for q in QUANT_TYPES] + ["F32", "F16", "BF16"]:
        s = 1e-7 if qtype.startswith("IQ") else 1e-8
        for n in (256, 1024):
            t.put(qtype, n, 1, 0.0, s * n / 256)
            t.put(qtype, n, 512, 0.0, 64 * s * n / 256)
    return t.write(path)


@pytest.mark.slow
def test_min_decode_tps_moves_the_plan_to_faster_types(tmp_path: Path, capsys) -> None:
    """compress --min-decode-tps: the plan is moved to faster types until its predicted decode speed reaches the
    limit, within the budget (recorded per candidate); a limit no plan can reach fails before anything is written.
    By default (--speed-floor 0.95) a plan slower than 0.95x the same-size llama.cpp mixture is moved likewise."""
    from conftest import small_compress_options

    model, table, run = MODELS / "tiny-qwen3-moe", _device_table(tmp_path / "device.json"), tmp_path / "run"
    common = ["--target-bpw", "3", "--keep", "1", "--speed-table", str(table), "--run-dir",
              str(run), *small_compress_options(fast=True)]
    assert main(["compress", str(model), "-o", str(tmp_path / "free.gguf"), *common, "--speed-floor", "0"]) == 0
    free = json.loads((run / "summary.json").read_text())["speed"]
    assert "a device whose IQ kernels are slow" in free["kernels"] and "floor" not in free
    want = 1.3 * free["decode_tps"]
    assert main(["compress", str(model), "-o", str(tmp_path / "fast.gguf"), *common, "--min-decode-tps",
                 str(want)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["speed"]["decode_tps"] >= want
    (cand,) = summary["candidates"]
    assert cand["speed_limited"]["before"] < want <= cand["speed_limited"]["after"]
    # the floor: a share of the same-size llama.cpp mixture's predicted decode, here set to 1.2x the free plan's
    factor = 1.2 * free["decode_tps"] / free["mixture"]["decode_tps"]
    assert main(["compress", str(model), "-o", str(tmp_path / "floor.gguf"), *common, "--speed-floor",
                 f"{factor:.6f}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    floor = summary["speed"]["floor"]
    assert floor["decode_tps"] == pytest.approx(factor * floor["mixture_decode_tps"], rel=1e-3)
    assert free["decode_tps"] < floor["decode_tps"] <= summary["speed"]["decode_tps"] and floor["met"]
    (cand,) = summary["candidates"]
    assert cand["speed_limited"]["limit"] == "speed_floor" and floor["moved"]["kld_after"] == cand["kld"]
    assert "speed floor" in capsys.readouterr().out
    assert main(["compress", str(model), "-o", str(tmp_path / "never.gguf"), *common, "--min-decode-tps",
                 str(1000 * want)]) != 0
    assert "--min-decode-tps" in capsys.readouterr().err and not (tmp_path / "never.gguf").exists()


def test_speed_floor_is_a_share_of_the_same_size_mixtures_decode(tmp_path: Path) -> None:
    """The floor: --speed-floor × the predicted decode of the same-size llama.cpp mixture of the unpruned model, on
    the clock compress predicts with; none when 0, on a GPU + RAM device, or without a mixture; the CLI's default is
    the pipeline's."""
    from types import SimpleNamespace

    from moepack.cli.compress import SPEED_FLOOR
    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.options import CompressOptions
    from moepack.pipeline.search import CandidateSearch
    from moepack.stages.mixtures import mixture_types
    from moepack.stages.speed import decode_tps

    assert SPEED_FLOOR == CompressOptions().speed_floor == 0.95

    def search(mixture: str | None, gpu: int | None = None, floor: float = 0.95) -> CandidateSearch:
        s = object.__new__(CandidateSearch)
        s.ref, s.opts, s.budget = view, CompressOptions(speed_floor=floor), SimpleNamespace(gpu_weights=gpu)
        s.__dict__["reference_mixture"] = mixture  # the cached property, as the budget would choose it
        s._clock = clock
        return s

    view = open_checkpoint(MODELS / "tiny-qwen3-moe")
    clock = KernelClock.from_file(_device_table(tmp_path / "device.json"))
    want = decode_tps(matmuls(view, {k: v.name for k, v in mixture_types(view, "Q2_K").items()}), clock)
    floor = search("Q2_K").speed_floor
    assert floor == {"mixture": "Q2_K", "mixture_decode_tps": pytest.approx(want, rel=1e-3), "factor": 0.95,
                     "decode_tps": pytest.approx(0.95 * want, rel=1e-3)}
    assert search("Q2_K", floor=0).speed_floor is None and search(None).speed_floor is None
    assert search("Q2_K", gpu=2**30).speed_floor is None


def test_tie_break_takes_the_fastest_of_the_retentions_tied_with_the_best() -> None:
    """best(): among retentions not measurably worse than the lowest (paired CI) and nowhere worse, the fastest
    predicted decode; one measurably worse, or worse on a domain, is not taken however fast; --no-speed-tiebreak:
    the lowest."""
    from types import SimpleNamespace

    from moepack.pipeline.options import CompressOptions
    from moepack.pipeline.search import CandidateSearch

    def cand(keep: float, kld: float) -> SimpleNamespace:
        return SimpleNamespace(keep=keep, kld=kld, view=None, plan=SimpleNamespace(tensors={}), prune_plan=None)

    a, b, c, d = cand(1.0, 0.010), cand(0.875, 0.0104), cand(0.75, 0.0109), cand(0.625, 0.0102)
    search = object.__new__(CandidateSearch)
    search.opts, search.tie_break = CompressOptions(), None
    measurably_worse = {0.75}
    search.meter = SimpleNamespace(tied=lambda a, best: a[0] not in measurably_worse)
    for x in (a, b, c, d):
        x.view = x.keep  # what the stub's tied() sees first
    speeds = {1.0: 100.0, 0.875: 120.0, 0.75: 200.0, 0.625: 300.0}
    search.decode_tps = lambda cand: speeds[cand.keep]
    fitting = [a, b, c, d]
    chosen = search._fastest_tie(fitting, 0, [a, b, c])  # d is worse on a domain; c measurably worse than a
    assert chosen is b and search.tie_break["chosen"] == 0.875 and search.tie_break["tied"] == [1.0, 0.875]
    search.opts = CompressOptions(speed_tiebreak=False)
    assert search._fastest_tie(fitting, 0, [a, b, c]) is a
    search.opts = CompressOptions()
    speeds[0.875] = 105.0  # tied, but 5 % faster predicted: within the prediction's error, the lowest stays
    assert search._fastest_tie(fitting, 0, [a, b, c]) is a and search.tie_break["chosen"] == 1.0


def test_tied_means_the_paired_difference_is_not_significant() -> None:
    """KLDMeter.tied: a plan a constant 1 % above the best on every window is measurably worse (paired), though
    far inside the best's own CI; one that is noisily above and below it is tied."""
    import numpy as np

    from moepack.pipeline.measure import KLDMeter

    rng = np.random.default_rng(0)
    best = rng.gamma(2.0, 0.01, size=(16, 64))  # (N, L) per-token KLDs
    shifted, noisy = best * 1.01, best + rng.normal(0, 0.01, size=best.shape)
    meter = object.__new__(KLDMeter)
    tokens = {"best": best, "shifted": shifted, "noisy": noisy}
    meter._measured = lambda view, tensors, plan, ids: (float(tokens[view].mean()), tokens[view])
    assert not meter.tied(("shifted", {}, None), ("best", {}, None))
    assert meter.tied(("noisy", {}, None), ("best", {}, None))


def test_median_table_takes_each_cells_median_over_the_tables_that_all_hold_it() -> None:
    """KernelTimes.median: per (key, width, batch), the median call and row time apart; a cell one table lacks is
    left out (bench/speed.py predicts from the median of tables measured between its rounds)."""
    tables = [KernelTimes("here", 2, "test") for _ in range(3)]
    for t, (call, row) in zip(tables, [(1e-6, 3e-8), (5e-6, 1e-8), (2e-6, 2e-8)]):
        t.put("Q4_K", 2048, 1, call, row)
    tables[0].put("Q2_K", 768, 512, 1e-4, 1e-6)  # only in one table
    med = KernelTimes.median(tables)
    assert med.get("Q4_K", 2048, 1) == pytest.approx((2e-6, 2e-8))
    assert med.get("Q2_K", 768, 512) is None and (med.device, med.threads) == ("here", 2)


def test_decode_attention_reads_the_cache_from_memory_and_big_prompt_blocks_fit() -> None:
    """Decode attention is timed over enough KV caches to exceed twice the last-level cache (llama.cpp reads them
    from memory); a prompt block whose scores exceed the memory cap is timed alone (DeepSeek-V3's 128 heads)."""
    from moepack.gguf import matmul

    kv = 2 * 128 * 512 * 4 * 2  # K and V of 4 heads × 128 over 512 tokens, F16
    copies = matmul.attention_copies(kv, 1, kv)
    assert copies * kv >= 2 * matmul.cache_bytes() and copies >= matmul.ATTENTION_COPIES
    assert matmul.attention_copies(kv, 512, 2**20) == matmul.ATTENTION_COPIES
    assert matmul.attention_copies(kv, 512, 2**31) == 1

"""Sensitivity: allocate's schema, determinism, cached probes = full forwards, ggml-exact fake quantization."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from conftest import ARCHS as ALL_ARCHS
from conftest import build_tiny_model
from moepack.cli import main
from moepack.gguf import kernels as ggml
from moepack.gguf.names import gguf_outputs
from moepack.model import metrics
from moepack.model.checkpoint import open_checkpoint
from moepack.model.runner import LayerRunner
from moepack.schema import SensitivityTable
from moepack.stages.allocate import allocate
from moepack.stages.calibrate import calibrate
from moepack.stages.sensitivity.fakequant import FakeQuantWeights, QuantStore, gguf_f32, to_checkpoint
from moepack.stages.sensitivity.groups import SensitivityError, plan_groups
from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity, plan_kld, prepare_imatrix
from moepack.stages.sensitivity.probes import (Prober, ReferenceLogProbs, head_batch, quantize_groups,
                                               reference_logprobs, typed_base)
from moepack.stages.sensitivity.table import spearman

ARCHS = ("deepseek_v3", "qwen3_moe")
LADDER = ["IQ2_XXS", "IQ3_S", "Q8_0"]
VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Any:
    """(model dir, view, ids (2, 32), calibration stats saved in run/calib) per architecture, built once."""
    cache: dict[str, Any] = {}

    def get(arch: str) -> tuple[Path, Any, np.ndarray, Any, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            model = build_tiny_model(arch, root / "model", tokenizer=True, vocab=VOCAB, hidden=256, ffn=256,
                                     n_experts=8)
            view = open_checkpoint(model)
            rng = np.random.default_rng(0)
            stats = calibrate(view, rng.integers(0, VOCAB, (4, 32)), progress=False)
            stats.write(root / "run" / "calib")
            cache[arch] = (model, view, rng.integers(0, VOCAB, (2, 32)), stats, root / "run")
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def tables(tiny) -> Any:
    cache: dict[str, dict[str, Any]] = {}

    def get(arch: str) -> dict[str, Any]:
        if arch not in cache:
            _, view, ids, stats, _ = tiny(arch)
            cache[arch] = _measure(view, ids, imatrix=stats, ladder=LADDER)
        return cache[arch]

    return get


def _measure(view: Any, ids: Any, imatrix: Any = None, **cfg: Any) -> dict[str, Any]:
    """The table as its JSON dict (what sensitivity.json holds)."""
    cfg["ladder"] = tuple(cfg.get("ladder", LADDER))
    return measure_sensitivity(view, ids, SensitivityConfig(progress=False, **cfg), imatrix=imatrix).to_dict()


def _strip(table: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in table.items() if k != "timing"}, sort_keys=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_table_feeds_allocate_and_covers_every_tensor(arch, tiny, tables) -> None:
    _, view, _, _, _ = tiny(arch)
    t = tables(arch)
    table = SensitivityTable.from_dict(json.loads(json.dumps(t)))
    outs = gguf_outputs(view)
    grouped = [n for g in table.groups for n in g.tensors]
    assert sorted(grouped) == sorted(o.name for o in outs if o.quantizable)
    assert sorted(t["fixed"]) == sorted(o.name for o in outs if not o.quantizable)
    assert {"token_embd", "output", "blk.1.ffn_down_exps"} <= {g.name for g in table.groups}
    for g in table.groups:
        assert g.options[0].type == "IQ2_XXS" and g.options[0].dkld == 0.0
        assert [o.bytes for o in g.options] == sorted(o.bytes for o in g.options)
    for solver in ("greedy", "exact"):
        budget = (table.min_bytes + table.max_bytes) // 2
        plan = allocate(table, budget, solver)
        assert plan.predicted_bytes <= budget and len(set(plan.tensors.values())) >= 2
    assert t["base"]["kld"] > 0 and t["timing"]["probes"] == sum(len(g.options) - 1 for g in table.groups)
    assert -1.0 <= t["proxy"]["spearman"] <= 1.0


def test_deepseek_mla_group_and_fallbacks(tables) -> None:
    """attn_kv_b is one group of llama.cpp's attn_k_b (rows of qk_nope = 16: IQ and K types fall back) and
    attn_v_b; fallbacks that give the same bytes as a smaller option are not probed twice."""
    g = next(g for g in tables("deepseek_v3")["groups"] if g["name"] == "blk.1.attn_kv_b")
    assert g["tensors"] == ["blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"]
    assert g["options"][0]["written"] == {"blk.1.attn_k_b.weight": "F16", "blk.1.attn_v_b.weight": "IQ2_XXS"}


@pytest.mark.parametrize("arch", ARCHS)
def test_measured_twice_identical(arch, tiny, tables) -> None:
    _, view, ids, stats, _ = tiny(arch)
    again = _measure(view, ids, imatrix=stats, ladder=LADDER)
    assert _strip(again) == _strip(tables(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_top_type_beats_the_base(arch, tables) -> None:
    """Raising a group to its top type (Q8_0; the tiny DeepSeek's attn_k_b rows of 16 cannot take it) lowers the
    KLD vs the all-IQ2_XXS model: always for the head and the embedding, for most groups, and in sum (a single
    small group may move the KLD either way by a hair)."""
    groups = tables(arch)["groups"]
    top = {g["name"]: g["options"][-1]["dkld"] for g in groups}
    assert top["output"] < 0 and top["token_embd"] < 0
    assert sum(top.values()) < 0
    assert np.mean([d <= 1e-4 for d in top.values()]) >= 0.75, top


@pytest.mark.parametrize("arch", ARCHS)
def test_fake_quant_equals_the_writers_file(arch, tiny, tmp_path) -> None:
    """`moepack quantize --type IQ3_S`: each GGUF tensor's bytes equal ours, and the weights the forward uses equal
    ggml's dequantization of the file's bytes, mapped back to checkpoint tensors."""
    model, view, _, stats, run_dir = tiny(arch)
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(model), "--type", "IQ3_S", "--calib-dir", str(run_dir), "-o", str(out)]) == 0
    im, w = prepare_imatrix(view, stats)
    groups, _ = plan_groups(view, "IQ3_S", ["IQ3_S"], im)
    store = QuantStore(view, im, proxy_weights=w, threads=2)
    quantize_groups(store, groups, False)
    weights = FakeQuantWeights(view, store, typed_base(groups))
    reader = {t.name: t for t in gguf.GGUFReader(out).tensors}
    from_file: dict[str, np.ndarray] = {}
    for g in groups:
        for o, t in zip(g.outs, g.options[0].typed):
            r = reader[o.name]
            assert r.tensor_type == t.qtype
            raw = np.asarray(r.data).view(np.uint8).reshape(-1)
            assert np.array_equal(raw, store.raw(o.name, t.qtype)), o.name
            from_file[o.name] = ggml.dequantize(raw, r.tensor_type, o.shape)
    for name, outs in weights.outs.items():
        expect = to_checkpoint(view, name, outs, [from_file[o.name] for o in outs])
        assert torch.equal(weights(name), torch.from_numpy(expect)), name


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_gguf_layout_round_trip(arch, shared_tiny_model) -> None:
    """to_checkpoint inverts the writer's stacking / MLA split / rotary permutation (Mixtral) exactly."""
    view = open_checkpoint(shared_tiny_model(arch))
    by_src: dict[str, list[Any]] = {}
    for o in gguf_outputs(view):
        if o.quantizable:
            for s in o.sources:
                by_src.setdefault(s, []).append(o)
    for name, outs in by_src.items():
        back = to_checkpoint(view, name, outs, [gguf_f32(view, o) for o in outs])
        assert np.array_equal(back, view.load_numpy_f32(name)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_probe_equals_full_forward(arch, tiny) -> None:
    """A probe started from cached hidden states with kept base layers gives the KLD of a from-scratch forward."""
    _, view, ids, stats, _ = tiny(arch)
    im, w = prepare_imatrix(view, stats)
    groups, _ = plan_groups(view, None, ["IQ2_XXS", "Q4_K"], im)
    store = QuantStore(view, im, proxy_weights=w, threads=2)
    quantize_groups(store, groups, False)
    ids_t = torch.as_tensor(ids)
    ref, _ = reference_logprobs(view, ids_t, None, None, 8)
    weights = FakeQuantWeights(view, store, typed_base(groups))
    prober = Prober(view, weights, ids_t, ref, 8, 1 << 30)
    for name in ("token_embd", "blk.1.ffn_up_exps", "blk.0.attn_output", "output"):
        g = next(g for g in groups if g.name == name)
        got = prober.probe(g, g.options[1])
        weights.override = {o.name: t.qtype for o, t in zip(g.outs, g.options[1].typed)}
        fresh = LayerRunner(view, loader=weights)
        h = fresh.run(fresh.embed(ids_t))
        want = ref.kld(fresh, h, head_batch(ids_t, view.facts.vocab))
        weights.override = {}
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), name
    assert prober.probe(groups[0], groups[0].options[0]) == pytest.approx(prober.base_kld, rel=1e-6)


def test_plan_kld(tiny, tables) -> None:
    """The measured KLD of the all-base plan is the table's base KLD; an allocated plan measures below it."""
    _, view, ids, stats, _ = tiny("qwen3_moe")
    t = tables("qwen3_moe")
    base = {n: g["options"][0]["type"] for g in t["groups"] for n in g["tensors"]}
    assert plan_kld(view, ids, base, imatrix=stats) == pytest.approx(t["base"]["kld"], rel=1e-6)
    table = SensitivityTable.from_dict(t)
    plan = allocate(table, (table.min_bytes + table.max_bytes) // 2)
    assert plan_kld(view, ids, plan.tensors, imatrix=stats) < t["base"]["kld"]


def test_kld_formula_matches_token_kld() -> None:
    """The probes' KLD agrees with metrics.token_kld and with float64 to 1e-5 at a real vocabulary size."""
    g = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(3, 64, 4096, generator=g) * 4
    logits = ref_logits + torch.randn(3, 64, 4096, generator=g) * 0.3

    class Head:
        def logits(self, h: torch.Tensor) -> torch.Tensor:
            return h

    ref = ReferenceLogProbs([ref_logits[:2], ref_logits[2:]])
    want = float(metrics.token_kld(metrics.log_probs(ref_logits), metrics.log_probs(logits)).mean())
    lp_ref, lp = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    exact = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    got = ref.kld(Head(), logits, 2)  # type: ignore[arg-type]
    assert got == pytest.approx(want, rel=1e-5) and got == pytest.approx(exact, rel=1e-5)


def test_probe_kld_is_bitwise_the_formula_it_replaced() -> None:
    """The probe KLDs feed the allocation: the one metrics implementation gives bit for bit what the probes summed
    before it (per head batch Σ p (log p − log q) over the vocabulary in float32, the batch's tokens in float64,
    the batches in Python floats in order)."""
    g = torch.Generator().manual_seed(1)
    ref_logits = torch.randn(5, 16, 1024, generator=g) * 3
    logits = ref_logits + torch.randn(5, 16, 1024, generator=g) * 0.5

    class Head:
        def logits(self, h: torch.Tensor) -> torch.Tensor:
            return h

    batches = [ref_logits[:2], ref_logits[2:4], ref_logits[4:]]
    total = 0.0
    for z, b0 in zip(batches, range(0, 5, 2)):
        lp = torch.log_softmax(z.float(), dim=-1)
        lq = torch.log_softmax(logits[b0:b0 + 2], -1)
        total += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
    old = total / (5 * 16)
    assert ReferenceLogProbs(batches).kld(Head(), logits, 2) == old  # type: ignore[arg-type]


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None


def test_proxy_mode_and_roles(tiny) -> None:
    _, view, ids, stats, _ = tiny("qwen3_moe")
    t = _measure(view, ids, imatrix=stats, ladder=["IQ2_XXS", "IQ3_S", "Q4_K", "Q8_0"], mode="proxy",
                 reference="routed_experts=Q4_K,attn_q=IQ3_S")
    assert t["base"]["measure"] == "proxy" and "kld" not in t["base"] and "proxy" not in t
    by = {g["name"]: g for g in t["groups"]}
    # The base first, then every other type in order of bytes: downgrades below the base, upgrades above it.
    assert [o["type"] for o in by["blk.0.ffn_gate_exps"]["options"]] == ["Q4_K", "IQ2_XXS", "IQ3_S", "Q8_0"]
    assert [o["type"] for o in by["blk.0.attn_q"]["options"]] == ["IQ3_S", "IQ2_XXS", "Q4_K", "Q8_0"]
    assert [o["type"] for o in by["blk.0.attn_k"]["options"]][0] == "IQ2_XXS"
    for g in t["groups"]:
        d = [o["dkld"] for o in g["options"]]
        assert d == [o["proxy"] for o in g["options"]] and d[-1] < 0
        base = g["options"][0]["bytes"]
        assert all(o["dkld"] > 0 for o in g["options"] if o["bytes"] < base), g["name"]  # a downgrade hurts
    SensitivityTable.from_dict(t)
    with pytest.raises(SensitivityError, match="no group of"):
        _measure(view, ids, imatrix=stats, reference="shared_experts=Q4_K", mode="proxy")


def test_fast_mode_predicts_downgrades_and_auto_counts_them(tiny) -> None:
    """From a mid-ladder base, fast mode predicts the types below it as positive ΔKLDs (α_g > 0 learnt from the
    top upgrade's probe), and auto's full-table estimate counts every option, downgrades included."""
    _, view, ids, stats, _ = tiny("qwen3_moe")
    ladder = ["IQ2_XXS", "IQ3_S", "Q4_K", "Q8_0"]
    t = _measure(view, ids, imatrix=stats, ladder=ladder, reference="Q4_K", sensitivity="auto", auto_limit_s=0.0)
    assert t["base"]["sensitivity"] == "fast"
    down = [o for g in t["groups"] for o in g["options"] if o["bytes"] < g["options"][0]["bytes"]]
    assert len(down) >= 2 * len(t["groups"]) and all(o["dkld"] >= 0 for o in down)
    assert np.mean([o["dkld"] > 0 for o in down]) >= 0.75
    options, probes = sum(len(g["options"]) - 1 for g in t["groups"]), t["timing"]["probes"]
    assert probes == len(t["groups"]) and options >= 3 * probes
    assert t["timing"]["full_estimate_s"] == pytest.approx((options - probes) * t["timing"]["s_per_probe"],
                                                           rel=0.01, abs=0.2)
    SensitivityTable.from_dict(t)


def test_disk_cache_quantizes_once(tiny, tmp_path, monkeypatch) -> None:
    from moepack.gguf import writer as gguf_out

    _, view, ids, stats, _ = tiny("qwen3_moe")
    kw: dict[str, Any] = dict(imatrix=stats, ladder=["IQ2_XXS", "Q4_K"])
    in_memory = _measure(view, ids, **kw)
    first = _measure(view, ids, cache_dir=tmp_path, **kw)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 * sum(len(g["tensors"]) for g in first["groups"])

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("quantized again")

    monkeypatch.setattr(gguf_out, "tensor_data", refuse)
    second = _measure(view, ids, cache_dir=tmp_path, **kw)
    assert _strip(first) == _strip(second) == _strip(in_memory)


def test_pruned_view_uses_the_original_imatrix(tiny) -> None:
    from moepack.model.pruned import pruned_view
    from moepack.stages.prune import PruneOptions, make_plan

    _, view, ids, stats, _ = tiny("qwen3_moe")
    plan = make_plan(view, stats, PruneOptions(keep=0.5))
    pv = pruned_view(view, plan)
    im, _ = prepare_imatrix(pv, stats)
    full, _ = prepare_imatrix(view, stats)
    kept = plan.kept(1)
    assert np.array_equal(im["blk.1.ffn_down_exps.weight"], full["blk.1.ffn_down_exps.weight"][kept])
    t = measure_sensitivity(pv, ids, SensitivityConfig(ladder=("IQ2_XXS", "Q8_0"), progress=False),
                            reference_view=view, imatrix=stats).to_dict()
    assert t["base"]["reference"] == str(view.root) and t["base"]["kld"] > 0


def test_cli_writes_the_table(tiny, tmp_path, capsys) -> None:
    model, _, _, _, run_dir = tiny("qwen3_moe")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "s.json"
    rc = main(["sensitivity", str(model), "--calib-dir", str(run_dir), "--calib-text", str(text), "--sens-tokens", "64",
               "--seq-len", "32", "--ladder", "IQ2_XXS,Q8_0", "-o", str(out)])
    assert rc == 0 and "KLD of the all-base model" in capsys.readouterr().out
    t = json.loads(out.read_text())
    assert t["base"]["tokens"] == 64 and t["overhead_bytes"] > 0
    assert not list(tmp_path.glob(".s.json*"))  # written atomically, nothing left behind
    plan_out = tmp_path / "plan.json"
    target = SensitivityTable.from_dict(t).min_bytes + t["overhead_bytes"] + 50_000
    assert main(["allocate", "--sensitivity", str(out), "--target-size", f"{target}B", "-o", str(plan_out)]) == 0


# ---------------------------------------------------------------------------------------------------- fast mode

def _opts(t: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(g["name"], o["type"]): o for g in t["groups"] for o in g["options"][1:]}


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_mode_probes_once_per_group_and_predicts_the_rest(arch, tiny, tables, monkeypatch) -> None:
    """Fast mode: the full table's groups, types and bytes; one probe per group with an upgrade (counted at
    Prober.probe_many), at its highest upgrade, whose ΔKLD is the full table's measurement bitwise; every other type is
    α · Δerr with α >= 0 from that probe, and carries no measured KLD."""
    _, view, ids, stats, _ = tiny(arch)
    full = tables(arch)
    calls: list[tuple[str, str]] = []
    many = Prober.probe_many
    monkeypatch.setattr(Prober, "probe_many",
                        lambda self, ps, *a: calls.extend((g.name, o.type) for g, o in ps) or many(self, ps, *a))
    fast = _measure(view, ids, imatrix=stats, sensitivity="fast", proxy_sample=1.0)  # every row: exact proxies
    assert fast["base"]["sensitivity"] == "fast" and full["base"]["sensitivity"] == "full"
    assert fast["timing"]["s_per_probe"] > 0  # its probes' own seconds: what compress estimates a full table from
    assert [(g["name"], [(o["type"], o["bytes"]) for o in g["options"]]) for g in fast["groups"]] == \
        [(g["name"], [(o["type"], o["bytes"]) for o in g["options"]]) for g in full["groups"]]
    with_upgrades = [g for g in fast["groups"] if len(g["options"]) > 1]
    assert sorted(calls) == sorted((g["name"], g["options"][-1]["type"]) for g in with_upgrades)
    assert fast["timing"]["probes"] == len(with_upgrades) < full["timing"]["probes"]
    assert fast["base"]["kld"] == full["base"]["kld"]
    f, m = _opts(fast), _opts(full)
    for g in with_upgrades:
        top = (g["name"], g["options"][-1]["type"])
        assert f[top]["dkld"] == m[top]["dkld"] and f[top]["kld"] == m[top]["kld"]
        alpha = max(0.0, f[top]["dkld"] / f[top]["proxy"]) if f[top]["proxy"] < 0 else 0.0
        for o in g["options"][1:-1]:
            k = (g["name"], o["type"])
            assert "kld" not in o and o["proxy"] == m[k]["proxy"]
            assert o["dkld"] == pytest.approx(alpha * o["proxy"], rel=1e-12, abs=1e-15) and o["dkld"] <= 0
    table = SensitivityTable.from_dict(fast)
    plan = allocate(table, (table.min_bytes + table.max_bytes) // 2)
    assert len(set(plan.tensors.values())) >= 2


def test_row_sample_is_seeded_per_tensor_and_spans_every_slice(tiny) -> None:
    """row_sample: the same rows in every process (seeded by the name), a draw per expert of a stacked tensor, and
    None where a tensor is measured whole (fraction 1, 1-D, or fewer than MIN_SAMPLE_ROWS rows)."""
    from moepack.stages.sensitivity.fakequant import MIN_SAMPLE_ROWS, row_sample

    _, view, _, _, _ = tiny("qwen3_moe")
    outs = {o.name: o for o in gguf_outputs(view)}
    exps = next(o for n, o in outs.items() if n.endswith("ffn_up_exps.weight"))
    idx = row_sample(exps, 1 / 8)
    assert idx is not None and idx.shape == (exps.shape[0], exps.shape[-2] // 8)
    assert np.array_equal(idx, row_sample(exps, 1 / 8))
    assert all(len(set(r)) == idx.shape[1] and list(r) == sorted(r) for r in idx)
    assert len({tuple(r) for r in idx}) > 1  # each expert its own rows
    assert row_sample(exps, 1.0) is None and row_sample(outs["output_norm.weight"], 1 / 8) is None
    assert row_sample(exps, (MIN_SAMPLE_ROWS - 1) / exps.shape[-2]) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_mode_samples_the_errors_of_types_not_probed(arch, tiny, tables) -> None:
    """With a row sample, fast mode's base and probed (top) types keep their whole-tensor proxies and measured KLD
    bitwise; the types between are estimated from the sample, close to the whole-tensor proxy (paired with the base's
    error on the same rows) and still α · Δerr."""
    _, view, ids, stats, _ = tiny(arch)
    whole = _measure(view, ids, imatrix=stats, sensitivity="fast", proxy_sample=1.0)
    sampled = _measure(view, ids, imatrix=stats, sensitivity="fast", proxy_sample=1 / 8)
    assert sampled["base"]["proxy_sample"] == 1 / 8 and sampled["timing"]["sampled_errors"] > 0
    assert whole["timing"]["sampled_errors"] == 0
    w, s = _opts(whole), _opts(sampled)
    rel = []
    for g in sampled["groups"]:
        if len(g["options"]) < 2:
            continue
        top = (g["name"], g["options"][-1]["type"])
        assert s[top]["proxy"] == w[top]["proxy"] and s[top]["dkld"] == w[top]["dkld"]
        for o in g["options"][1:-1]:
            k = (g["name"], o["type"])
            rel.append(abs(s[k]["proxy"] / w[k]["proxy"] - 1))
            alpha = max(0.0, s[top]["dkld"] / s[top]["proxy"]) if s[top]["proxy"] < 0 else 0.0
            assert s[k]["dkld"] == pytest.approx(alpha * s[k]["proxy"], rel=1e-12, abs=1e-15)
    assert rel and max(rel) < 0.5 and float(np.median(rel)) < 0.15
    with pytest.raises(SensitivityError, match="proxy_sample"):
        _measure(view, ids, imatrix=stats, sensitivity="fast", proxy_sample=0.0)


def test_auto_keeps_fast_above_the_limit_and_completes_below(tiny, tables) -> None:
    """auto times the fast probes: a full-table estimate above the limit keeps the fast table (the estimate in
    "timing"); below it the remaining probes run and the table equals full mode's."""
    _, view, ids, stats, _ = tiny("qwen3_moe")
    fast = _measure(view, ids, imatrix=stats, sensitivity="fast")
    kept = _measure(view, ids, imatrix=stats, sensitivity="auto", auto_limit_s=0.0)
    assert _strip(kept) == _strip(fast)
    assert kept["timing"]["full_estimate_s"] >= 0 and kept["timing"]["limit_s"] == 0.0
    done = _measure(view, ids, imatrix=stats, sensitivity="auto", auto_limit_s=1e9)
    assert _strip(done) == _strip(tables("qwen3_moe"))
    with pytest.raises(SensitivityError, match="choose one of auto, fast, full"):
        _measure(view, ids, imatrix=stats, sensitivity="quick")


def test_sensitivity_option_parses_and_keys_the_cached_table(tiny, tables, tmp_path, monkeypatch) -> None:
    """--sensitivity on sensitivity and compress (default auto, bad values refused); compress reuses a cached table
    only for the same mode."""
    from types import SimpleNamespace

    from moepack.cli import build_parser
    from moepack.pipeline.candidates import Candidate
    from moepack.pipeline.options import CompressOptions
    from moepack.pipeline.steps import sensitivity_stage
    from moepack.rundir import RunDir
    from moepack.stages.sensitivity import measure

    p = build_parser()
    sens = ["sensitivity", "m", "--calib-dir", "r", "--calib-text", "t", "-o", "s.json"]
    comp = ["compress", "m", "-o", "x.gguf", "--target-bpw", "2.5"]
    for argv in (sens, comp):
        assert p.parse_args(argv).sensitivity == "auto"
        assert p.parse_args(argv + ["--sensitivity", "fast"]).sensitivity == "fast"
        with pytest.raises(SystemExit):
            p.parse_args(argv + ["--sensitivity", "quick"])
    _, view, _, _, _ = tiny("qwen3_moe")
    ran: list[str] = []

    def fake(view: Any, ids: Any, cfg: Any, **kw: Any) -> Any:
        ran.append(cfg.sensitivity)
        return SensitivityTable.from_dict(tables("qwen3_moe"))

    monkeypatch.setattr(measure, "measure_sensitivity", fake)
    stats = SimpleNamespace(manifest=SimpleNamespace(text_sha256="x", tokens=64, shards=1), selection=np.zeros((1, 8)),
                            domain_scales=None, selection_weights=lambda n=None: None, selection_domain=None,
                            domain_names=[])
    run = RunDir(tmp_path / "run")
    for mode in ("full", "full", "fast", "fast", "full"):
        sensitivity_stage(run, view, stats, Candidate(1.0, view, None), "IQ2_XXS",
                          CompressOptions(ladder=tuple(LADDER), sensitivity=mode, progress=False), None)
    assert ran == ["full", "fast", "full"]


def test_probe_tokens_run_the_table_on_the_first_selection_sequences(tiny, tables, tmp_path, monkeypatch,
                                                                     capsys) -> None:
    """--probe-tokens: the table's probes see the first ceil(N / L) selection sequences; a table probed on fewer
    tokens is cached apart from the one on all of them; 0 is refused before any work."""
    from types import SimpleNamespace

    from moepack.cli import main
    from moepack.pipeline.candidates import Candidate
    from moepack.pipeline.options import CompressError, CompressOptions
    from moepack.pipeline.steps import probe_ids, sensitivity_stage
    from moepack.rundir import RunDir
    from moepack.stages.sensitivity import measure

    held = np.arange(32).reshape(4, 8)  # (N, L)
    assert probe_ids(held, None) is held
    assert [probe_ids(held, n).shape[0] for n in (1, 8, 9, 100)] == [1, 1, 2, 4]
    assert (probe_ids(held, 9) == held[:2]).all()
    with pytest.raises(CompressError, match="at least 1"):
        probe_ids(held, 0)
    model, view, _, _, _ = tiny("qwen3_moe")
    seen: list[int] = []

    def fake(view: Any, ids: Any, cfg: Any, **kw: Any) -> Any:
        seen.append(int(np.asarray(ids).size))
        return SensitivityTable.from_dict(tables("qwen3_moe"))

    monkeypatch.setattr(measure, "measure_sensitivity", fake)
    stats = SimpleNamespace(manifest=SimpleNamespace(text_sha256="x", tokens=64, shards=1), selection=held,
                            domain_scales=None, selection_weights=lambda n=None: None, selection_domain=None,
                            domain_names=[])
    run = RunDir(tmp_path / "run")
    for probe in (None, 8, 8, 32, None):  # 32 tokens = every sequence: the same table as None
        sensitivity_stage(run, view, stats, Candidate(1.0, view, None), "IQ2_XXS",
                          CompressOptions(ladder=tuple(LADDER), probe_tokens=probe, progress=False), None)
    assert seen == [32, 8, 32]
    rc = main(["compress", str(model), "-o", str(tmp_path / "x.gguf"), "--target-bpw", "2.5",
               "--probe-tokens", "0"])
    assert rc != 0 and "--probe-tokens must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_kld_reuse_equals_fresh(arch, tiny, tables) -> None:
    """One PlanKLD over a sequence of plans (all-base, allocated, one group changed, the embedding changed, back
    to the first) gives each plan exactly plan_kld's number, though it restarts at the first changed layer."""
    from moepack.stages.sensitivity.measure import PlanKLD

    _, view, ids, stats, _ = tiny(arch)
    table = SensitivityTable.from_dict(tables(arch))
    base = {n: g.options[0].type for g in table.groups for n in g.tensors}
    alloc = allocate(table, (table.min_bytes + table.max_bytes) // 2).tensors
    late = next(g for g in reversed(table.groups) if len(g.options) > 1 and "token_embd.weight" not in g.tensors)
    other = next(o.type for o in late.options if o.type != alloc[late.tensors[0]])
    one = dict(alloc) | {n: other for n in late.tensors}
    emb = dict(one) | {"token_embd.weight": "Q8_0" if one["token_embd.weight"] != "Q8_0" else "IQ3_S"}
    measurer = PlanKLD(view, ids, imatrix=stats)
    plans = [base, alloc, one, emb, base]
    got = [measurer(p) for p in plans]
    want = [plan_kld(view, ids, p, imatrix=stats) for p in plans]
    assert got == want
    assert len(set(got[:4])) == 4  # the plans differ, so a stale hidden state would show


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])
def test_layer_major_probes_equal_one_at_a_time(keep_bytes, tiny) -> None:
    """Probes run layer-major (each base layer built once for every probe passing through it, kept or not) give
    bitwise the KLDs of one probe at a time, for every kind of group: token_embd, attention, experts, output."""
    _, view, ids, stats, _ = tiny("deepseek_v3")
    im, w = prepare_imatrix(view, stats)
    groups, _ = plan_groups(view, None, ["IQ2_XXS", "IQ3_S", "Q4_K"], im)
    store = QuantStore(view, im, proxy_weights=w, threads=2)
    quantize_groups(store, groups, False)
    ids_t = torch.as_tensor(ids)
    ref, _ = reference_logprobs(view, ids_t, None, None, 8)
    prober = Prober(view, FakeQuantWeights(view, store, typed_base(groups)), ids_t, ref, 8, keep_bytes)
    probes = [(g, o) for g in groups for o in g.options[1:]]
    assert {g.name for g, _ in probes} >= {"token_embd", "output", "blk.0.attn_output", "blk.1.ffn_up_exps"}
    together = prober.probe_many(probes)
    alone = [prober.probe_many([p])[0] for p in probes]
    assert together == alone
    assert len(set(together)) > len(probes) // 2  # distinct probes measure distinct KLDs


def test_measure_kld_shares_one_measurer_per_view_and_tokens(tiny, tables) -> None:
    """compress's KLDMeter.plan_kld: plans on the selection tokens and then on other tokens (the report's), through the
    view's cached measurers sharing quantized bytes, each equal to a fresh plan_kld."""
    from moepack.pipeline.measure import KLDMeter

    _, view, ids, stats, _ = tiny("qwen3_moe")
    table = SensitivityTable.from_dict(tables("qwen3_moe"))
    base = {n: g.options[0].type for g in table.groups for n in g.tensors}
    alloc = allocate(table, (table.min_bytes + table.max_bytes) // 2).tensors
    other = np.asarray(ids)[:, ::-1].copy()
    meter = KLDMeter(view, stats, threads=2)
    got = [meter.plan_kld(view, p, None, ids=x) for x, p in ((ids, base), (ids, alloc), (other, alloc), (other, base))]
    want = [plan_kld(view, x, p, reference_view=view, imatrix=stats)
            for x, p in ((ids, base), (ids, alloc), (other, alloc), (other, base))]
    assert got == want
    assert meter.measurers(view) == 2  # one measurer per token set


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_per_domain_dkld_adds_up_to_the_weighted_mean(tiny, mode) -> None:
    """With calibration domains, every option's ΔKLD is also kept per domain (plain means over each domain's
    sequences); the table's coefficients weigh them back into its (domain-weighted) ΔKLD: exactly for a probe,
    and for a fast table's predicted types too (α_g,d · Δerr is linear in the same Δerr). Probes that differ by
    domain are not all alike: the split carries information the mean does not."""
    _, view, ids, stats, _ = tiny("qwen3_moe")
    weights = (0.5, 1.5)  # the second domain counts three times the first
    t = _measure(view, ids, imatrix=stats, ladder=LADDER, sensitivity=mode, proxy_sample=1.0,
                 weights=weights, domains=("a", "b"), labels=(0, 1))
    info = t["base"]["domains"]
    assert info["names"] == ["a", "b"] and info["coef"] == pytest.approx([0.25, 0.75])
    assert len(info["kld"]) == 2 and all(x > 0 for x in info["kld"])
    ratios = []
    for g in t["groups"]:
        assert g["options"][0]["domains"] == [0.0, 0.0]
        for o in g["options"][1:]:
            parts = o["domains"]
            assert sum(c * d for c, d in zip(info["coef"], parts)) == pytest.approx(o["dkld"], rel=1e-6, abs=1e-9)
            if abs(parts[0]) > 1e-6:
                ratios.append(parts[1] / parts[0])
    assert len(ratios) > 3 and max(ratios) - min(ratios) > 0.1
    table = SensitivityTable.from_dict(json.loads(json.dumps(t)))
    assert table.groups[0].options[-1].domains == tuple(t["groups"][0]["options"][-1]["domains"])


def test_domain_labels_must_name_a_domain(tiny) -> None:
    _, view, ids, stats, _ = tiny("qwen3_moe")
    with pytest.raises(SensitivityError, match="labels"):
        _measure(view, ids, imatrix=stats, ladder=LADDER, domains=("a", "b"), labels=(0, 2))

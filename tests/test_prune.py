"""Expert selection, the pruned checkpoint (loads, routes exactly like the masked original), top-k, validation."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ARCHS
from moepack.model.checkpoint import open_checkpoint
from moepack.model.pruned import kept_count, pruned_view
from moepack.schema import CalibStats, PrunePlan, RouterStats
from moepack.stages.calibrate import calibrate
from moepack.stages.prune import (PruneError, PruneOptions, importance, make_plan, plan_shape, run_prune,
                                  select_experts, write_checkpoint)

IDS = np.random.default_rng(1).integers(0, 256, (4, 24))  # (N, L)


def _kw(arch: str) -> dict:
    # DeepSeek: 16 experts in 4 groups, so that keeping half leaves 2 per group (V3 scores groups by their top 2)
    return dict(n_experts=16) if arch.startswith("deepseek") else {}


def _calibrated(path: Path, run: Path) -> CalibStats:
    st = calibrate(open_checkpoint(path), IDS, progress=False, selection=IDS[:2])
    st.write(run / "calib")
    return st


def _router_of(mlp):
    if hasattr(mlp, "gate"):
        return getattr(mlp.gate, "wg", mlp.gate)  # Hunyuan: the linear map is mlp.gate.wg
    return mlp.router  # gpt-oss: mlp.router (with a bias)


def _moe_of(layer):
    return getattr(layer, "mlp", None) or layer.feed_forward  # Llama 4: feed_forward


def _mask_router(model, plan: PrunePlan) -> dict[int, torch.Tensor]:
    """Original model with the removed experts' router logits at -inf (and, for sigmoid + bias routers, their
    choice score at -inf so that they are never selected)."""
    masks: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for layer, d in plan.layers.items():
            mlp = _moe_of(model.model.layers[int(layer)])
            gate = _router_of(mlp)
            removed = torch.tensor(d.removed)
            masks[gate.weight.data_ptr()] = removed
            for holder in (gate, mlp):  # MiniMax-M2 keeps its correction bias beside the gate
                if hasattr(holder, "e_score_correction_bias"):
                    holder.e_score_correction_bias[removed] = float("-inf")
    return masks


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_equals_masked_original(arch, shared_tiny_model, tmp_path, monkeypatch):
    import transformers

    src = shared_tiny_model(arch, **_kw(arch))
    view = open_checkpoint(src)
    _calibrated(src, tmp_path / "run")
    k = view.facts.top_k
    plan = run_prune(src, tmp_path / "run", tmp_path / "out", PruneOptions(keep=0.5, top_k=k), progress=False)
    n_keep = view.facts.n_experts // 2
    assert plan.n_kept == n_keep and plan.top_k_new == k
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    orig = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for layer, d in plan.layers.items():
        mlp_p, mlp_o = _moe_of(pruned.model.layers[int(layer)]), _moe_of(orig.model.layers[int(layer)])
        assert mlp_p.experts.gate_up_proj.shape[0] == n_keep == len(d.kept)
        assert torch.equal(mlp_p.experts.down_proj, mlp_o.experts.down_proj[d.kept])
        assert torch.equal(_router_of(mlp_p).weight, _router_of(mlp_o).weight[d.kept])
        if getattr(_router_of(mlp_o), "bias", None) is not None:  # router bias rows go with the router rows
            assert torch.equal(_router_of(mlp_p).bias, _router_of(mlp_o).bias[d.kept])
    if view.facts.n_group and view.facts.n_group > 1:  # group-limited routers (GLM-4.5, Kimi-K2: one group)
        assert plan.groups.mode == "preserve"
        per = view.facts.n_experts // view.facts.n_group
        for d in plan.layers.values():
            assert np.bincount(np.array(d.kept) // per).tolist() == [n_keep // view.facts.n_group] * 4
    masks = _mask_router(orig, plan)
    linear = torch.nn.functional.linear

    def masked_linear(x, w, b=None):
        y = linear(x, w, b)
        removed = masks.get(w.data_ptr())
        if removed is not None:
            y = y.clone()
            y[..., removed] = float("-inf")
        return y

    ids = torch.as_tensor(IDS)
    with torch.no_grad():
        got = pruned(ids).logits
        monkeypatch.setattr(torch.nn.functional, "linear", masked_linear)
        want = orig(ids).logits
    assert (got - want).abs().max().item() < 1e-5
    assert (tmp_path / "out" / "prune_plan.json").is_file()


def test_default_top_k_config_and_lazy_view(shared_tiny_model, tmp_path):
    src = shared_tiny_model("qwen3_moe")
    st = _calibrated(src, tmp_path / "run")
    view = open_checkpoint(src)
    plan = make_plan(view, st, PruneOptions(keep=0.75))
    assert plan.n_kept == 6 and plan.top_k_new == 2  # round(0.75 * 2) = 2 (half up)
    assert PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # the JSON round trip is exact
    pv = pruned_view(view, plan)
    assert pv.facts.n_experts == 6 and pv.config["num_local_experts"] == 6 and "num_experts" not in pv.config
    kept = plan.kept(1)
    name = "model.layers.1.mlp.experts.{}.up_proj.weight"
    assert torch.equal(pv.load(name.format(5)), view.load(name.format(kept[5])))
    assert pv.tensors["model.layers.1.mlp.gate.weight"].shape == (6, view.facts.hidden)
    assert name.format(6) not in pv.tensors
    # several shards with an index load in transformers too
    import transformers

    write_checkpoint(pv, tmp_path / "sharded", max_shard_bytes=200_000, progress=False)
    assert json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert m.config.num_experts == 6 and m.model.layers[0].mlp.experts.down_proj.shape[0] == 6


def _router(counts, weights, saliency, tokens=10, k=2) -> RouterStats:
    return RouterStats(np.array(counts, float), np.array(weights, float), np.array(saliency, float), tokens, k)


def test_importance_criteria_and_group_selection():
    r = _router([10, 5, 5, 0], [2.0, 4.0, 1.0, 0.0], [1.0, 3.0, 0.5, 0.0])
    rng = np.random.default_rng(0)
    f, s = r.freq, r.score  # f = [.5, .25, .25, 0], s = [.2, .8, .2, 0]
    np.testing.assert_allclose(importance(r, "score", 0.5, rng), 0.5 * f / f.max() + 0.5 * s / s.max())
    assert select_experts(importance(r, "score", 0.5, rng), 2) == [0, 1]
    assert select_experts(importance(r, "frequency", 0.5, rng), 2) == [0, 1]  # tie 1 vs 2: lower id
    assert select_experts(importance(r, "reap", 0.5, rng), 1) == [1]
    a = importance(r, "random", 0.5, np.random.default_rng(7))
    assert np.array_equal(a, importance(r, "random", 0.5, np.random.default_rng(7)))
    scores = np.array([9, 8, 7, 6, 1, 2, 3, 4.0])
    assert select_experts(scores, 4) == [0, 1, 2, 3]
    assert select_experts(scores, 4, n_group=2) == [0, 1, 6, 7]  # the same count from each group


def test_validation_messages(shared_tiny_model, tmp_path):
    ds = open_checkpoint(shared_tiny_model("deepseek_v3", n_experts=16))
    qw = open_checkpoint(shared_tiny_model("qwen3_moe"))
    cases = [
        (qw, PruneOptions(keep=0.0), "outside (0, 1]"),
        (qw, PruneOptions(keep=1.5), "outside (0, 1]"),
        (qw, PruneOptions(keep=0.25, top_k=3), "exceeds the 2 experts kept"),
        (qw, PruneOptions(top_k=0), "at least one"),
        (qw, PruneOptions(criterion="magic"), "unknown criterion"),
        (ds, PruneOptions(keep=0.25), "at least 2 kept experts"),  # 1 per group
        (ds, PruneOptions(keep=0.5, top_k=5), "exceeds the experts a token can reach (4"),
        (dataclasses.replace(qw, facts=dataclasses.replace(qw.facts, moe_layers=())), PruneOptions(), "no MoE"),
    ]
    for view, opts, msg in cases:
        with pytest.raises(PruneError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            plan_shape(view, opts)
    assert plan_shape(ds, PruneOptions(keep=0.25, groups="collapse")).new_groups == (1, 1)
    st = _calibrated(shared_tiny_model("qwen3_moe"), tmp_path / "run")
    with pytest.raises(PruneError, match="another model"):
        make_plan(ds, st, PruneOptions())


def test_kept_count_is_one_formula(shared_tiny_model, tmp_path, capsys):
    """Keep 0.8 of 8 experts keeps ⌈6.4⌉ = 7: what prune writes, and what compress validates --top-k against."""
    from moepack.cli import main

    qw = open_checkpoint(shared_tiny_model("qwen3_moe"))
    assert qw.facts.n_experts == 8 and kept_count(qw, 0.8) == 7 and plan_shape(qw, PruneOptions(keep=0.8)).n_keep == 7
    assert kept_count(qw, 0.7) == 6  # 0.7 * 8 = 5.6000000000000005 → 6, not 7
    ds = open_checkpoint(shared_tiny_model("deepseek_v3", n_experts=16))
    assert kept_count(ds, 0.3) == 8 and kept_count(ds, 0.3, "collapse") == 5  # 4 groups keep the same number
    out = str(tmp_path / "x.gguf")
    assert main(["compress", str(qw.root), "--target-size", "10MB", "--keep", "0.8", "--top-k", "8", "-o", out]) == 2
    assert "--top-k 8 exceeds the experts kept per layer at --keep 0.8 (7)" in capsys.readouterr().err


def test_top_k_auto_and_cli(shared_tiny_model, tmp_path, capsys):
    from moepack.cli import main

    src = shared_tiny_model("olmoe")
    _calibrated(src, tmp_path / "run")
    out = tmp_path / "out"
    args = ["prune", str(src), "--calib-dir", str(tmp_path / "run"), "--keep", "0.5", "--top-k", "auto",
            "--kld-tol", "1e9", "-o", str(out)]
    assert main(args) == 0
    plan = json.loads((out / "prune_plan.json").read_text())
    table = plan["top_k_table"]
    assert [r["top_k"] for r in table] == [1, 2]  # round(0.5 * 2) .. k
    assert all(r["kld_mean"] >= 0 and 0 <= r["top1_agree"] <= 1 for r in table)
    assert table[0]["active_bytes"] < table[1]["active_bytes"]
    assert plan["top_k_new"] == 1  # huge tolerance: the cheapest candidate
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    assert "top-k 2 -> 1" in capsys.readouterr().out
    assert main(args[:-2] + ["--keep", "2", "-o", str(tmp_path / "bad")]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err


def test_multi_token_prediction_layer_is_left_out(tiny_model, tmp_path):
    """DeepSeek-V3 checkpoints carry an extra (MTP) layer after num_hidden_layers: not run, not calibrated, not
    written; the pruned checkpoint still loads."""
    import transformers
    from safetensors.torch import load_file, save_file

    src = tiny_model("deepseek_v3", n_experts=16)
    sd = load_file(src / "model.safetensors")
    sd.update({n.replace("layers.1.", "layers.2."): t.clone() for n, t in sd.items() if ".layers.1." in n})
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    view = open_checkpoint(src)
    assert view.facts.moe_layers == (1, 2) and view.facts.n_layers == 2
    st = _calibrated(src, tmp_path / "run")
    assert sorted(st.router) == [1]
    plan = run_prune(src, tmp_path / "run", tmp_path / "out", PruneOptions(keep=0.5), progress=False)
    assert list(plan.layers) == ["1"] and "multi-token" in plan.notes[-1]
    assert not [n for n in open_checkpoint(tmp_path / "out").tensors if ".layers.2." in n]
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_prune_reuses_a_finished_matching_output(shared_tiny_model, tmp_path, caplog):
    """`moepack prune` into the same directory: the same model, statistics and options reuse the finished checkpoint
    (nothing rewritten); other options prune again; a stage interrupted before its plan was written is redone."""
    src = shared_tiny_model("qwen3_moe")
    _calibrated(src, tmp_path / "run")
    out = tmp_path / "out"
    first = run_prune(src, tmp_path / "run", out, PruneOptions(keep=0.5), progress=False)
    shard = out / "model.safetensors"
    stamp = shard.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        again = run_prune(src, tmp_path / "run", out, PruneOptions(keep=0.5), progress=False)
    assert again == first and shard.stat().st_mtime_ns == stamp and "reusing pruned checkpoint" in caplog.text
    other = run_prune(src, tmp_path / "run", out, PruneOptions(keep=0.75), progress=False)
    assert other.n_kept == 6 and open_checkpoint(out).facts.n_experts == 6
    (out / "prune_plan.json").write_text((out / "prune_plan.json").read_text() + "\n")  # edited after it finished
    caplog.clear()
    with caplog.at_level("INFO"):
        redone = run_prune(src, tmp_path / "run", out, PruneOptions(keep=0.75), progress=False)
    assert redone == other and "reusing pruned checkpoint" not in caplog.text  # its plan changed: not trusted

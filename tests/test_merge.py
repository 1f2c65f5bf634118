"""Expert merging (stages.merge): assignments within routing groups, merged tensors and router rows as weighted
averages, the merged model written as a checkpoint transformers loads and a GGUF llama.cpp runs, the plan record."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from family_checks import gguf_logits, hf_logits
from moepack.model.checkpoint import open_checkpoint
from moepack.model.pruned import align_neurons, pruned_view
from moepack.model.runner import LayerRunner
from moepack.schema import CalibStats, PrunePlan
from moepack.stages.calibrate import calibrate
from moepack.stages.merge import MergeError, MergeOptions, assign_hosts
from moepack.stages.prune import PruneOptions, make_plan, run_prune

IDS = np.random.default_rng(1).integers(0, 256, (4, 24))  # (N, L)


def _calibrated(path: Path, run: Path | None = None) -> CalibStats:
    st = calibrate(open_checkpoint(path), IDS, progress=False, selection=IDS[:2])
    if run is not None:
        st.write(run / "calib")
    return st


def _name(layer: int, e: int, proj: str, prefix: str = "mlp") -> str:
    return f"model.layers.{layer}.{prefix}.experts.{e}.{proj}.weight"


def test_assignments_stay_in_their_routing_group(shared_tiny_model):
    # the most similar kept expert is in another group: the host is the best one of d's own group
    sim = np.eye(8)
    sim[1, 4], sim[1, 2] = 0.9, 0.1
    assert assign_hosts(sim, kept=[0, 2, 4, 6], n_group=2) == {1: 2, 3: 0, 5: 4, 7: 4}
    assert assign_hosts(sim, kept=[0, 2, 4, 6])[1] == 4  # one group: the globally closest
    with pytest.raises(MergeError, match="keeps no expert"):
        assign_hosts(sim, kept=[0, 1, 2, 3], n_group=2)
    src = shared_tiny_model("deepseek_v3", n_experts=16)  # 4 groups of 4
    view, st = open_checkpoint(src), _calibrated(src)
    assert st.router[1].out_gram is not None and st.router[1].out_gram.shape == (16, 16)
    for sim_kind in ("output", "weight"):
        plan = make_plan(view, st, PruneOptions(keep=0.5, merge=MergeOptions(similarity=sim_kind)))
        for layer, groups in plan.merge.layers.items():
            dropped = sorted(m for g in groups for m in g.members[1:])
            assert dropped == plan.layers[layer].removed  # every dropped expert goes to exactly one host
            for g in groups:
                assert g.host in plan.layers[layer].kept and {m // 4 for m in g.members} == {g.host // 4}
                assert abs(sum(g.weights) - 1) < 1e-12


@pytest.mark.parametrize("align", [False, True])
def test_merged_tensors_and_router_rows_are_weighted_averages(shared_tiny_model, align):
    src = shared_tiny_model("qwen3_moe")
    view, st = open_checkpoint(src), _calibrated(src)
    plan = make_plan(view, st, PruneOptions(keep=0.5, merge=MergeOptions(weighting="saliency", align=align)))
    pv = pruned_view(view, plan)
    layer = 1
    r = st.router[layer]
    for g in plan.merge.layers[str(layer)]:
        sal = np.array([r.saliency_sum[m] for m in g.members])
        np.testing.assert_allclose(g.weights, sal / sal.sum())
        new = plan.kept(layer).index(g.host)
        def load(e: int, p: str) -> torch.Tensor:
            return view.load(_name(layer, e, p)).float()

        projs = ("gate_proj", "up_proj", "down_proj")
        perms = [align_neurons(*(load(e, p).numpy() for e in (g.host, m) for p in projs)) if align and i
                 else np.arange(load(m, "up_proj").shape[0]) for i, m in enumerate(g.members)]
        for p, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            want = sum(w * load(m, p).index_select(axis, torch.from_numpy(perm))
                       for m, w, perm in zip(g.members, g.weights, perms))
            assert torch.allclose(pv.load(_name(layer, new, p)), want, atol=1e-6)
        rows = view.load(f"model.layers.{layer}.mlp.gate.weight")  # (E, H)
        want = sum(w * rows[m] for m, w in zip(g.members, g.weights))
        assert torch.allclose(pv.load(f"model.layers.{layer}.mlp.gate.weight")[new], want, atol=1e-6)
    if align:  # the greedy matching is a permutation, and the identity for an expert matched with itself
        w = [view.load(_name(layer, 0, p)).numpy() for p in ("gate_proj", "up_proj", "down_proj")]
        assert np.array_equal(align_neurons(*w, *w), np.arange(w[0].shape[0]))
        perm = perms[-1]
        assert sorted(perm.tolist()) == list(range(len(perm)))
    unmerged = [e for e in plan.kept(layer) if e not in {g.host for g in plan.merge.layers[str(layer)]}]
    for e in unmerged:  # kept experts nobody merged into, and their router rows, are the originals
        new = plan.kept(layer).index(e)
        assert torch.equal(pv.load(_name(layer, new, "up_proj")), view.load(_name(layer, e, "up_proj")))
    host = make_plan(view, st, PruneOptions(keep=0.5, merge=MergeOptions(router="host")))
    drop = make_plan(view, st, PruneOptions(keep=0.5))
    name = f"model.layers.{layer}.mlp.gate.weight"
    assert torch.equal(pruned_view(view, host).load(name), pruned_view(view, drop).load(name))
    assert pruned_view(view, drop).fingerprint() != pv.fingerprint() != pruned_view(view, host).fingerprint()


def test_a_copy_of_a_kept_expert_merges_into_it_unchanged(tmp_path):
    """One expert of layer 0 dropped, made an exact copy of a kept one: it merges into that one, whose tensors and
    output stay as they were."""
    from safetensors.torch import load_file, save_file

    src = build_tiny_model("qwen3_moe", tmp_path / "m")
    opts = PruneOptions(keep=0.875)  # 8 experts → 7: one dropped per layer
    plan = make_plan(open_checkpoint(src), _calibrated(src), opts)
    d, h = plan.layers["0"].removed[0], plan.kept(0)[0]
    sd = load_file(src / "model.safetensors")
    for p in ("gate_proj", "up_proj", "down_proj"):
        sd[_name(0, d, p)] = sd[_name(0, h, p)].clone()
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    view = open_checkpoint(src)
    merge = MergeOptions(router="host")
    plan = make_plan(view, _calibrated(src), PruneOptions(keep=0.875, merge=merge))
    assert plan.layers["0"].removed == [d]  # layer 0's routing does not depend on its experts
    (g,) = plan.merge.layers["0"]
    assert (g.host, g.members) == (h, [h, d])
    pv = pruned_view(view, plan)
    w = {p: view.load(_name(0, h, p)) for p in ("gate_proj", "up_proj", "down_proj")}
    m = {p: pv.load(_name(0, plan.kept(0).index(h), p)) for p in w}
    assert all(torch.allclose(m[p], w[p], atol=1e-6) for p in w)
    x = torch.randn(16, view.facts.hidden)  # (T, H)

    def expert(t):
        return (torch.nn.functional.silu(x @ t["gate_proj"].T) * (x @ t["up_proj"].T)) @ t["down_proj"].T  # (T, H)

    assert torch.allclose(expert(m), expert(w), atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_merged_checkpoint_loads_in_transformers_with_the_views_logits(arch, shared_tiny_model, tmp_path):
    from moepack.cli import main

    src = shared_tiny_model(arch, **({"n_experts": 16} if arch == "deepseek_v3" else {}))
    _calibrated(src, tmp_path / "run")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--calib-dir", str(tmp_path / "run"), "--keep", "0.5", "--merge",
                 "--merge-weighting", "saliency", "-o", str(out)]) == 0
    plan = PrunePlan.read(out / "prune_plan.json")
    assert plan.merge is not None and plan.merge.weighting == "saliency" and plan.options["merge"]["align"]
    ids = IDS[0]
    view = pruned_view(open_checkpoint(src), plan)
    want = LayerRunner(view).forward(torch.as_tensor(ids)[None])[0].numpy()  # (T, V)
    assert np.abs(hf_logits(out, ids) - want).max() < 1e-4
    if arch == "gpt_oss":  # expert biases are merged too
        b = view.load("model.layers.0.mlp.experts.0.down_proj.bias")
        assert b.shape == (view.facts.hidden,)


def test_gguf_of_a_merged_plan_runs_in_llama_cpp(tmp_path):
    from moepack.gguf.writer import write_gguf

    src = build_tiny_model("qwen3_moe", tmp_path / "m", tokenizer=True, vocab=320)
    view = open_checkpoint(src)
    plan = make_plan(view, _calibrated(src), PruneOptions(keep=0.5, merge=MergeOptions()))
    pv = pruned_view(view, plan)
    path = write_gguf(pv, tmp_path / "merged.gguf", prune_plan=plan, progress=False).path
    ids = IDS[0] + 1
    want = LayerRunner(pv).forward(torch.as_tensor(ids)[None])[0].numpy()  # (T, V)
    assert np.abs(gguf_logits(path, ids) - want).max() < 1e-3


def test_plan_record_round_trips_and_leaves_plain_plans_as_they_were(shared_tiny_model, tmp_path):
    src = shared_tiny_model("qwen3_moe")
    view, st = open_checkpoint(src), _calibrated(src, tmp_path / "run")
    plan = make_plan(view, st, PruneOptions(keep=0.75, merge=MergeOptions(similarity="weight")))
    d = json.loads(json.dumps(plan.to_dict()))
    assert PrunePlan.from_dict(d) == plan and d["merge"]["similarity"] == "weight"
    assert set(d["merge"]["layers"]["0"][0]) == {"host", "members", "weights"}
    plain = run_prune(src, tmp_path / "run", tmp_path / "out", PruneOptions(keep=0.75), progress=False)
    raw = json.loads((tmp_path / "out" / "prune_plan.json").read_text())
    assert "merge" not in raw and "merge" not in raw["options"]  # a plan that drops is written as before
    assert PrunePlan.from_dict(raw).merge is None and not pruned_view(view, plain).merged
    with pytest.raises(MergeError, match="--merge-router 'max'"):
        MergeOptions(router="max")


def test_cli_mirrors_merge_choices():
    from moepack.cli import options as o
    from moepack.stages import merge

    assert (o.MERGE_SIMILARITIES, o.MERGE_WEIGHTINGS, o.MERGE_ROUTERS) == (merge.SIMILARITIES, merge.WEIGHTINGS,
                                                                           merge.ROUTERS)


def test_merged_fp8_checkpoint_is_written_decoded(tmp_path):
    """Merged experts have no FP8 bytes: a merging plan writes every tensor decoded, without quantization_config,
    and the result equals the same merge of the dequantized copy."""
    from test_stored_formats import to_fp8

    from moepack.stages.prune import write_checkpoint

    src = build_tiny_model("deepseek_v3", tmp_path / "src", hidden=64, ffn=32, n_experts=16)
    views = [open_checkpoint(p) for p in to_fp8(src, tmp_path, (48, 48))]
    plan = make_plan(views[0], calibrate(views[0], IDS, progress=False), PruneOptions(keep=0.5, merge=MergeOptions()))
    outs = [write_checkpoint(pruned_view(v, plan), tmp_path / k, progress=False) for v, k in zip(views, "ab")]
    assert "quantization_config" not in json.loads((outs[0] / "config.json").read_text())
    a, b = open_checkpoint(outs[0]), open_checkpoint(outs[1])
    assert a.tensors.keys() == b.tensors.keys() and not any(t.stored and t.stored.format == "fp8"
                                                            for t in a.tensors.values())
    assert all(torch.allclose(a.load(n).float(), b.load(n).float(), atol=1e-6) for n in a.tensors)

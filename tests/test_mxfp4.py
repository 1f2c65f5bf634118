"""gpt-oss's MXFP4 experts as a lossless GGML type (issue 28): the release's own blocks and scales, repacked into
ggml's block_mxfp4, are a candidate type of the ladder for those tensors; the writer writes them without
re-quantizing, and the sensitivity stage's fake quantization sees them as exactly the source values."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from moepack.model.checkpoint import open_checkpoint
from test_stored_formats import _mxfp4_encode, _mxfp4_reference, _write_pair

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def mx_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny gpt-oss stored as its MXFP4 release and its dequantized bf16 copy (widths multiples of 32)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("mxfp4")
    src = build_tiny_model("gpt_oss", root / "src", hidden=64, ffn=64, n_experts=4, tokenizer=True, vocab=320)
    packed, deq = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _mxfp4_encode(t)
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            deq[name] = _mxfp4_reference(blocks, scales).to(torch.bfloat16).contiguous()
        else:
            packed[name], deq[name] = t, t
    q = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    return _write_pair(src, root, ("mxfp4", packed, q), deq)


def _exps(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors if "_exps" in t.name and t.name.endswith(".weight")}


def _release_bytes(view, o) -> np.ndarray:
    """(E, rows, 17·G) ggml bytes of GGUF tensor `o` straight from the release's blocks/scales, rows as gpt-oss's
    converter cuts them (gate: even rows of gate_up, up: odd rows, down: all)."""
    from moepack.gguf.mxfp4 import repack

    step = {"gate": slice(0, None, 2), "up": slice(1, None, 2), "down": slice(None)}[o.name.split("_")[1]]
    per = []
    for s in o.sources:
        blocks, scales = (p.read().numpy() for p in view.tensors[s].stored.parts)  # (R, G, 16), (R, G)
        per.append(repack(blocks[step], scales[step]))
    return np.stack(per)


def test_repack_matches_ggml_dequantization() -> None:
    """Random release bytes (every code; exponents 100..149) → ggml bytes that dequantize to the release's values
    under gguf's own MXFP4 dequantization (nibble order and scale bias checked)."""
    from gguf.quants import dequantize

    from moepack.gguf.mxfp4 import repack
    from moepack.model.formats import mxfp4
    from moepack.model.stored import Stored

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 4, 16), dtype=np.uint8)  # (R, G, 16)
    scales = rng.integers(100, 150, (3, 4), dtype=np.uint8)  # (R, G)
    want = mxfp4([torch.from_numpy(blocks), torch.from_numpy(scales)], Stored("mxfp4", ())).numpy()  # (R, 128)
    got = dequantize(repack(blocks, scales), T.MXFP4)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_mxfp4_experts_written_from_the_source_bytes(mx_pair, tmp_path: Path) -> None:
    """A plan with the experts at MXFP4 on the MXFP4 release: the GGUF holds the release's own bytes, repacked, and
    they dequantize to exactly the checkpoint's values (and the F32 file's); the dequantized bf16 copy has no
    MXFP4 source to keep."""
    from gguf.quants import dequantize

    from moepack.gguf.mxfp4 import is_source
    from moepack.gguf.names import gguf_outputs
    from moepack.cli import main

    mx, plain = mx_pair
    view = open_checkpoint(mx)
    outs = {o.name: o for o in gguf_outputs(view)}
    plan = {n: "MXFP4" for n, o in outs.items() if o.quantizable and is_source(view, o)}
    assert len(plan) == 3 * 2 and all("_exps" in n for n in plan)  # gate, up, down in 2 layers
    assert not is_source(open_checkpoint(plain), outs[next(iter(plan))])
    out = tmp_path / "mx.gguf"
    assert main(["quantize", str(mx), "--type", "F32", "-o", str(tmp_path / "f32.gguf")]) == 0
    (tmp_path / "plan.json").write_text(json.dumps({"tensors": {n: plan.get(n, "F32") for n, o in outs.items()
                                                                if o.quantizable}}))
    assert main(["quantize", str(mx), "--plan", str(tmp_path / "plan.json"), "-o", str(out)]) == 0
    written = _exps(out)
    assert set(written) == set(plan)
    for n, t in written.items():
        assert t.tensor_type == T.MXFP4
        o = outs[n]
        want = np.stack([view.load_numpy_f32(s) for s in o.sources])  # (E, rows, n): the decoded checkpoint
        assert np.array_equal(dequantize(t.data, T.MXFP4).reshape(o.shape), want), n
        # the release's own bytes (ggml's quantizer of the same values picks other bytes: see the fake-quant test)
        assert np.array_equal(t.data.reshape(-1), _release_bytes(view, o).reshape(-1)), n
    ref = _exps(tmp_path / "f32.gguf")
    for n in written:  # the F32 file holds the same values
        assert np.array_equal(dequantize(written[n].data, T.MXFP4).reshape(-1), ref[n].data.reshape(-1)), n


def test_fake_quant_sees_mxfp4_as_the_source(mx_pair, monkeypatch) -> None:
    """The sensitivity stage's QuantStore quantizes through the writer: MXFP4 on MXFP4-stored experts is zero
    error, while Q4_0 of the same tensor is not."""
    from moepack.gguf.writer import resolve_types
    from moepack.gguf.names import gguf_outputs
    from moepack.stages.sensitivity import fakequant
    from moepack.stages.sensitivity.fakequant import QuantStore

    view = open_checkpoint(mx_pair[0])
    o = next(o for o in gguf_outputs(view) if o.name == "blk.0.ffn_down_exps.weight")
    store = QuantStore(view)
    store.quantize([(o, resolve_types([o], "MXFP4") + resolve_types([o], "Q4_0"))])
    assert store.err(o.name, T.MXFP4) == 0.0 and store.err(o.name, T.Q4_0) > 0.0
    want = np.stack([view.load_numpy_f32(s) for s in o.sources])
    assert np.array_equal(store.dequantized(o, T.MXFP4), want)
    assert np.array_equal(store.raw(o.name, T.MXFP4).reshape(-1), _release_bytes(view, o).reshape(-1))
    from moepack.gguf import kernels as ggml

    # fast sensitivity's row-sampled errors (a sample of these tiny tensors allowed): MXFP4 of the source is taken
    # whole, exactly 0, while Q8_0 is sampled
    monkeypatch.setattr(fakequant, "MIN_SAMPLE_ROWS", 1)
    fresh = QuantStore(view)
    fresh.sample_errors([(o, resolve_types([o], "MXFP4") + resolve_types([o], "Q8_0"), resolve_types([o], "Q4_0")[0])],
                        1 / 2)
    assert fresh.err(o.name, T.MXFP4) == 0.0 and ("blk.0.ffn_down_exps.weight", "MXFP4") not in fresh.sampled_errors()
    assert ("blk.0.ffn_down_exps.weight", "Q8_0") in fresh.sampled_errors()
    requant = ggml.quantize(want, T.MXFP4)  # ggml's own quantizer: other bytes (here: the same values)
    assert not np.array_equal(requant.reshape(-1), _release_bytes(view, o).reshape(-1))


def test_ladder_offers_mxfp4_for_mxfp4_sources(mx_pair) -> None:
    """MXFP4 joins the candidate types of groups whose source is MXFP4 (bytes from GGML_QUANT_SIZES), and only
    theirs; the allocator can pick it."""
    from moepack.gguf.types import tensor_bytes
    from moepack.stages.sensitivity.groups import plan_groups

    mx, plain = mx_pair
    groups, _ = plan_groups(open_checkpoint(mx), base="Q4_0", ladder=("Q4_0", "Q8_0"))
    for g in groups:
        types = [opt.type for opt in g.options]
        assert ("MXFP4" in types) == g.cls.endswith("_exps"), (g.name, types)
        for opt in g.options:
            if opt.type == "MXFP4":
                assert opt.bytes == sum(tensor_bytes(o.shape, T.MXFP4) for o in g.outs)
    plain_groups, _ = plan_groups(open_checkpoint(plain), base="Q4_0", ladder=("Q4_0", "Q8_0"))
    assert not any(opt.type == "MXFP4" for g in plain_groups for opt in g.options)


def test_allocator_keeps_mxfp4_and_llama_cpp_runs_it(mx_pair, tmp_path: Path) -> None:
    """calibrate → sensitivity (proxy) → allocate → quantize on the MXFP4 release with ladder Q4_0,Q8_0: MXFP4 is
    smaller than Q4_0 (4.25 vs 4.5 bpw) and loses nothing, so the allocator keeps every expert tensor in it; the
    file's llama.cpp logits stay near the F32 file's (llama.cpp's MXFP4 matmul quantizes activations to Q8_0, so
    not bit for bit), nearer than with the experts at Q4_0."""
    from conftest import DATA
    from family_checks import gguf_logits
    from moepack.cli import main

    mx = mx_pair[0]
    text = str(DATA / "tinystories-valid.txt")
    run = tmp_path / "run"
    assert main(["calibrate", str(mx), "--calib-text", text, "--calib-tokens", "128", "--seq-len", "64",
                 "--sens-tokens", "64", "-o", str(run)]) == 0
    assert main(["sensitivity", str(mx), "--calib-dir", str(run), "--calib-text", text, "--mode", "proxy",
                 "--base", "Q4_0", "--ladder", "Q4_0,Q8_0", "-o", str(tmp_path / "s.json")]) == 0
    table = json.loads((tmp_path / "s.json").read_text())
    mx_opt = {g["name"]: next(o for o in g["options"] if o["type"] == "MXFP4") for g in table["groups"]
              if g["name"].endswith("_exps")}
    assert len(mx_opt) == 6 and all(o["dkld"] < 0 for o in mx_opt.values())  # better than the Q4_0 base
    # room for every group at Q8_0: MXFP4 is kept because it is lossless, not because it is small
    budget = table["fixed_bytes"] + sum(max(o["bytes"] for o in g["options"]) for g in table["groups"])
    assert main(["allocate", "--sensitivity", str(tmp_path / "s.json"), "--budget-bytes", str(budget),
                 "-o", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())["tensors"]
    exps = {n: t for n, t in plan.items() if "_exps.weight" in n}
    assert len(exps) == 6 and set(exps.values()) == {"MXFP4"}, exps
    assert plan["output.weight"] == "Q8_0"  # the others took the room
    # the F32-vs-file check: experts at the plan's MXFP4 (or Q4_0 for contrast), every other tensor F32
    files = {"f32": tmp_path / "f32.gguf"}
    assert main(["quantize", str(mx), "--type", "F32", "-o", str(files["f32"])]) == 0
    for name, t in (("mxfp4", None), ("q4", "Q4_0")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"tensors": {
            n: (t or v) if n in exps else "F32" for n, v in plan.items()}}))
        files[name] = tmp_path / f"{name}.gguf"
        assert main(["quantize", str(mx), "--plan", str(tmp_path / f"{name}.json"), "-o", str(files[name])]) == 0
    ids = np.random.default_rng(0).integers(1, 320, 16)
    ref = gguf_logits(files["f32"], ids)
    err = {k: float(np.abs(gguf_logits(files[k], ids) - ref).max()) for k in ("mxfp4", "q4")}
    # measured: mxfp4 1e-3, q4 8e-3 of logits up to 0.8 (the Q8_0 activations of ggml's MXFP4 dot product)
    assert np.isfinite(ref).all() and err["mxfp4"] < 0.005 * float(np.abs(ref).max()) and err["mxfp4"] < err["q4"], err


def test_pruned_view_writes_the_kept_experts_bytes(mx_pair, tmp_path: Path) -> None:
    """Through the lazy pruned view (compress's candidates), MXFP4 experts are the kept experts' own bytes."""
    from gguf.quants import dequantize

    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.writer import write_gguf
    from moepack.model.pruned import pruned_view
    from moepack.schema import QuantPlan
    from moepack.stages.calibrate import calibrate
    from moepack.stages.prune import PruneOptions, make_plan

    view = open_checkpoint(mx_pair[0])
    plan = make_plan(view, calibrate(view, np.random.default_rng(1).integers(0, 320, (2, 16)), progress=False),
                     PruneOptions(keep=0.5))
    pruned = pruned_view(view, plan)
    out = tmp_path / "p.gguf"
    mx = QuantPlan.by_hand({f"blk.{i}.ffn_{k}_exps.weight": "MXFP4" for i in range(2) for k in ("gate", "up", "down")})
    write_gguf(pruned, out, mx, default_type="F32", progress=False)
    written = _exps(out)
    assert len(written) == 6
    for n, t in written.items():
        o = next(o for o in gguf_outputs(pruned) if o.name == n)
        assert t.tensor_type == T.MXFP4 and o.shape[0] == 2
        want = np.stack([pruned.load_numpy_f32(s) for s in o.sources])
        assert np.array_equal(dequantize(t.data, T.MXFP4).reshape(o.shape), want), n
        assert np.array_equal(t.data.reshape(-1), _release_bytes(pruned, o).reshape(-1)), n

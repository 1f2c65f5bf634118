"""Checkpoints read as they ship (issue 28): FP8 block-scaled, compressed-tensors int4 packs and MXFP4, decoded by
the reader tensor by tensor. Each tiny model here is stored in the format by the test itself, with a reference
dequantization written here, independent of moepack's decoders."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import pytest

from conftest import DATA, build_tiny_model
from moepack.cli import main
from moepack.model.checkpoint import open_checkpoint

_KEEP_FLOAT = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")  # DeepSeek's FP8 release keeps these bf16


def _quantized(name: str, t) -> bool:
    return t.ndim == 2 and not any(k in name for k in _KEEP_FLOAT)


def _expand(scale, block: tuple[int, int], shape: tuple[int, ...]):
    """(⌈R/b0⌉, ⌈C/b1⌉) → (R, C): every element its block's scale; partial edge blocks cut."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def to_fp8(src: Path, out: Path, block: tuple[int, int]) -> tuple[Path, Path]:
    """`src` stored as DeepSeek-V3's release is (e4m3 weights, f32 `weight_scale_inv` per block, quantization_config),
    and its reference dequantization as an f32 checkpoint. Returns (fp8 dir, dequantized dir)."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for name, t in sd.items():
        if not _quantized(name, t):
            fp8[name], deq[name] = t, t.float()
            continue
        w = t.float()
        r, c = w.shape
        pad = torch.zeros(math.ceil(r / block[0]) * block[0], math.ceil(c / block[1]) * block[1])
        pad[:r, :c] = w.abs()
        blocks = pad.reshape(pad.shape[0] // block[0], block[0], -1, block[1])  # (⌈R/b0⌉, b0, ⌈C/b1⌉, b1)
        amax = blocks.amax(dim=(1, 3))  # (⌈R/b0⌉, ⌈C/b1⌉)
        scale = (amax / 448.0).clamp(min=1e-12)  # e4m3's largest finite value
        q = (w / _expand(scale, block, w.shape)).to(torch.float8_e4m3fn)
        fp8[name], fp8[name + "_scale_inv"] = q, scale
        deq[name] = q.float() * _expand(scale, block, w.shape)  # the reference: one f32 product per element
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return _write_pair(src, out, ("fp8", fp8, q), deq)


def _write_pair(src: Path, out: Path, stored: tuple[str, dict, dict], deq: dict) -> tuple[Path, Path]:
    """out/<kind>/model with the stored tensors and quantization_config, out/deq/model with the dequantized ones
    (one directory name for both: it is the GGUF's general.name)."""
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    kind, tensors, q = stored
    dirs = []
    for d, t, c in ((out / kind / "model", tensors, cfg | {"quantization_config": q}),
                    (out / "deq" / "model", deq, cfg)):
        shutil.copytree(src, d)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(c, indent=2))
        dirs.append(d)
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A DeepSeek-V3 whose widths (64, 32, 80, 128) leave partial edge blocks of 48 × 48."""
    root = tmp_path_factory.mktemp("fp8")
    src = build_tiny_model("deepseek_v3", root / "src", hidden=64, ffn=32, n_experts=16)  # 2 per group at keep 0.5
    return to_fp8(src, root, (48, 48))


def _same(x, y) -> bool:
    """Bit for bit (torch.equal takes -0.0 for 0.0)."""
    import torch

    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.contiguous().view(torch.uint8),
                                                                     y.contiguous().view(torch.uint8))


def test_fp8_decodes_to_the_reference_dequantization(fp8_pair) -> None:
    fp8, deq = fp8_pair
    a, b = open_checkpoint(fp8), open_checkpoint(deq)
    assert a.tensors.keys() == b.tensors.keys()
    assert not [n for n in a.tensors if "scale_inv" in n]  # the scales are bookkeeping, not tensors
    stored = [n for n, t in a.tensors.items() if t.stored is not None]
    assert any(a.tensors[n].shape[1] % 48 for n in stored) and any(a.tensors[n].shape[0] % 48 for n in stored)
    for n, ref in a.tensors.items():
        assert ref.shape == b.tensors[n].shape, n
        assert _same(a.load(n), b.load(n)), n
        if ref.stored is not None:  # e4m3 bytes + f32 scales, a quarter of the f32 it reads as (plus the scales)
            grid = math.ceil(ref.shape[0] / 48) * math.ceil(ref.shape[1] / 48)
            assert ref.stored_nbytes == ref.numel + 4 * grid and ref.nbytes == 4 * ref.numel


def _save_model(src: Path, out: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_fp8_logits_match_transformers(tmp_path: Path) -> None:
    """transformers' own FP8 dequantization (the op its loader runs without a GPU; it needs whole blocks) and
    moepack's decoded tensors make the same model: identical logits, close to the unquantized model's."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    src = build_tiny_model("deepseek_v3", tmp_path / "src", hidden=64, ffn=32, n_experts=8)
    fp8, _ = to_fp8(src, tmp_path, (16, 16))
    sd = load_file(str(fp8 / "model.safetensors"))
    deq = Fp8Dequantize(None)._dequantize_one
    theirs = {n: deq(t, sd[n + "_scale_inv"], output_dtype=torch.float32) if n + "_scale_inv" in sd else t.float()
              for n, t in sd.items() if not n.endswith("_scale_inv")}
    view = open_checkpoint(fp8)
    models = [transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32) for d in (
        _save_model(src, tmp_path / "theirs", theirs),
        _save_model(src, tmp_path / "ours", {n: view.load(n) for n in view.tensors}), src)]
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, orig = (m(ids).logits for m in models)
    assert torch.equal(a, b)
    assert 0 < (b - orig).abs().max() < 0.1 * orig.abs().max()  # FP8 moved the logits, a little


_QUICK = ["--calib-text", str(DATA / "tinystories-valid.txt"), "--calib-tokens", "512", "--seq-len", "128",
          "--sens-tokens", "128", "--ladder", "Q4_K,Q6_K,Q8_0", "--sensitivity", "fast", "--refine", "0"]


def test_compress_fp8_equals_compress_of_its_dequantized_copy(tmp_path: Path) -> None:
    """Same calibration, same options: the FP8 checkpoint and its f32 dequantized copy give the same GGUF bytes."""
    src = build_tiny_model("qwen3_moe", tmp_path / "src", tokenizer=True, hidden=256, ffn=256, n_experts=8,
                           top_k=2, vocab=512)
    fp8, deq = to_fp8(src, tmp_path, (96, 80))  # partial blocks on both axes of every 256-wide weight
    model, out = tmp_path / "w" / "model", tmp_path / "w" / "x.gguf"  # one path: the GGUF records it
    outs = []
    for d in (fp8, deq):
        shutil.rmtree(tmp_path / "w", ignore_errors=True)
        shutil.copytree(d, model)
        assert main(["compress", str(model), "--target-size", "2.3MB", "--keep", "0.75", "-o", str(out), *_QUICK]) == 0
        outs.append(out.rename(d.parent / "x.gguf"))
    a, b = (gguf.GGUFReader(p) for p in outs)
    assert a.fields.keys() == b.fields.keys()
    assert [k for k in a.fields if a.fields[k].parts[-1].tobytes() != b.fields[k].parts[-1].tobytes()] == []
    assert _gguf_tensors(outs[0]) == _gguf_tensors(outs[1])
    assert outs[0].read_bytes() == outs[1].read_bytes()


# ---- INT4 compressed-tensors (Kimi-K2-Thinking) ----------------------------------------------------------------
def _ct_config(group: int) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\\\.(gate|up|down)_proj.*"]}


def pack_int4(q):
    """(R, C) ints in [-8, 7] → (R, ⌈C/8⌉) int32: value + 8 as a nibble, column 8j + i at bits 4i of word j."""
    import torch

    r, c = q.shape
    u = torch.zeros(r, math.ceil(c / 8) * 8, dtype=torch.int64)
    u[:, :c] = q.to(torch.int64) + 8
    words = sum(u[:, i::8] << (4 * i) for i in range(8))  # (R, ⌈C/8⌉) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def to_int4(src: Path, out: Path, group: int = 32) -> tuple[Path, Path]:
    """`src` with its routed experts stored as Kimi-K2-Thinking ships them, and the reference dequantization."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(src / "model.safetensors"))
    packed, deq = {}, {}
    for name, t in sd.items():
        if ".experts." not in name:
            packed[name], deq[name] = t, t.float()
            continue
        w = t.float()
        n_groups = math.ceil(w.shape[1] / group)
        pad = torch.zeros(w.shape[0], n_groups * group)
        pad[:, : w.shape[1]] = w
        scale = (pad.abs().reshape(w.shape[0], n_groups, group).amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
        full = scale.float().repeat_interleave(group, 1)[:, : w.shape[1]]  # (R, C)
        q = (w / full).round().clamp(-8, 7).to(torch.int8)  # integers: no -0, as in the packs
        packed[name + "_packed"], packed[name + "_scale"] = pack_int4(q), scale
        packed[name + "_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        deq[name] = q.float() * full
    return _write_pair(src, out, ("int4", packed, _ct_config(group)), deq)


def _gguf_tensors(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def test_int4_packs_decode_and_write_the_dequantized_gguf(tmp_path: Path) -> None:

    src = build_tiny_model("deepseek_v3", tmp_path / "src", hidden=80, ffn=48, n_experts=8, tokenizer=True,
                           vocab=320)  # 80 columns: groups of 32, 32 and 16
    int4, deq = to_int4(src, tmp_path)
    a, b = open_checkpoint(int4), open_checkpoint(deq)
    assert a.tensors.keys() == b.tensors.keys()
    stored = [n for n, t in a.tensors.items() if t.stored is not None]
    assert stored and all(".experts." in n for n in stored)
    for n in a.tensors:
        assert _same(a.load(n), b.load(n)), n
    ref = a.tensors[stored[0]]  # 4 bits a value + one bf16 scale per 32 + the shape
    assert ref.stored_nbytes == ref.shape[0] * (4 * math.ceil(ref.shape[1] / 8) + 2 * math.ceil(ref.shape[1] / 32)) + 16
    for d in (int4, deq):
        assert main(["quantize", str(d), "--type", "F32", "-o", str(d.parent / "f32.gguf")]) == 0
    assert _gguf_tensors(int4.parent / "f32.gguf") == _gguf_tensors(deq.parent / "f32.gguf")


def test_int4_columns_not_a_multiple_of_8_come_from_weight_shape(tmp_path: Path) -> None:
    """C = 36 packs into 5 words (40 columns): only `weight_shape` says where the row ends."""
    import torch
    from safetensors.torch import save_file

    from moepack.model.checkpoint import raw_tensors
    from moepack.model.stored import FORMAT_ADAPTERS, decode

    q = torch.randint(-8, 8, (3, 36), generator=torch.Generator().manual_seed(1))
    scale = torch.rand(3, 2).to(torch.bfloat16) + 0.5
    save_file({"x.weight_packed": pack_int4(q), "x.weight_scale": scale,
               "x.weight_shape": torch.tensor([3, 36], dtype=torch.int32)}, str(tmp_path / "m.safetensors"))
    logical = FORMAT_ADAPTERS["compressed-tensors"](raw_tensors([tmp_path / "m.safetensors"]), _ct_config(32))
    assert list(logical) == ["x.weight"] and logical["x.weight"].shape == (3, 36)
    want = q.float() * scale.float().repeat_interleave(32, 1)[:, :36]
    assert torch.equal(decode(logical["x.weight"].stored), want)


# ---- MXFP4 (gpt-oss) -------------------------------------------------------------------------------------------
def _mxfp4_encode(w):
    """(E, K, R) float, K a multiple of 32 → blocks (E, R, K/32, 16) uint8, scales (E, R, K/32) uint8, as gpt-oss's
    release stores (E, K, R) weights: transposed, 32 values of a row per scale, low nibble first."""
    import torch

    from moepack.model.formats import E2M1_VALUES

    x = w.float().transpose(1, 2)  # (E, R, K)
    e, r, k = x.shape
    x = x.reshape(e, r, k // 32, 32)
    amax = x.abs().amax(-1).clamp(min=2.0 ** -100)
    exp = torch.ceil(torch.log2(amax / 6.0))  # the largest E2M1 magnitude is 6
    lut = torch.tensor(E2M1_VALUES[:8])
    mag = (x.abs() / torch.exp2(exp).unsqueeze(-1)).unsqueeze(-1)  # (.., 32, 1)
    code = (mag - lut).abs().argmin(-1) + 8 * (x < 0)  # nearest magnitude, sign in bit 3
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def _mxfp4_reference(blocks, scales):
    """The (E, K, R) float each (blocks, scales) stands for, value by value."""
    import torch

    from moepack.model.formats import E2M1_VALUES

    lut = torch.tensor(E2M1_VALUES)
    codes = torch.stack([blocks & 15, blocks >> 4], -1).long().flatten(-2)  # (E, R, G, 32)
    vals = lut[codes] * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return vals.flatten(-2).transpose(1, 2)  # (E, K, R)


def test_mxfp4_experts_split_as_the_bf16_release(tmp_path: Path) -> None:
    """gpt-oss's MXFP4 experts decode in transformers' row order and go through the family's fused split like the
    bf16 checkpoint; the F32 GGUF equals the dequantized checkpoint's, tensor for tensor."""
    import torch
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = build_tiny_model("gpt_oss", tmp_path / "src", hidden=64, ffn=64, n_experts=4, tokenizer=True, vocab=320)
    sd = load_file(str(src / "model.safetensors"))
    packed, deq = {}, {}
    for name, t in sd.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _mxfp4_encode(t)
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            deq[name] = _mxfp4_reference(blocks, scales).to(torch.bfloat16).contiguous()  # exact: E2M1 × 2^k
            theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert _same(theirs, _mxfp4_reference(blocks, scales)), name  # the row order transformers reads
        else:
            packed[name], deq[name] = t, t
    q = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    mx, plain = _write_pair(src, tmp_path, ("mxfp4", packed, q), deq)
    a, b = open_checkpoint(mx), open_checkpoint(plain)
    assert a.tensors.keys() == b.tensors.keys()
    stored = [n for n, t in a.tensors.items() if t.stored is not None and t.stored.format == "mxfp4"]
    assert len(stored) == 2 * 3 * 4  # layers × (gate, up, down) × experts
    for n in a.tensors:
        assert _same(a.load(n), b.load(n)), n
    ref = a.tensors[stored[0]]  # half a byte a value, one scale byte per 32, for the expert's slice of the pack
    assert ref.stored_nbytes == 2 * ref.numel // 2 + 2 * ref.numel // 32  # gate and up share one (H, 2I) slice
    for d in (mx, plain):
        assert main(["quantize", str(d), "--type", "F32", "-o", str(d.parent / "f32.gguf")]) == 0
    assert _gguf_tensors(mx.parent / "f32.gguf") == _gguf_tensors(plain.parent / "f32.gguf")
    # pruned: the kept experts' MXFP4 blocks and scales are stacked again as the release stores them, the config
    # keeps its quantization_config, and the pruned checkpoint reads back as the pruned dequantized one
    import numpy as np

    from moepack.model.pruned import pruned_view
    from moepack.stages.calibrate import calibrate
    from moepack.stages.prune import PruneOptions, make_plan, write_checkpoint

    plan = make_plan(a, calibrate(a, np.random.default_rng(1).integers(0, 320, (2, 16)), progress=False),
                     PruneOptions(keep=0.5))
    outs = [write_checkpoint(pruned_view(v, plan), tmp_path / "pruned" / k, progress=False)
            for v, k in ((a, "mx"), (b, "plain"))]
    assert json.loads((outs[0] / "config.json").read_text())["quantization_config"] == q
    from safetensors import safe_open

    with safe_open(str(outs[0] / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj_blocks").get_shape() == [2, 128, 2, 16]
        assert f.get_slice("model.layers.0.mlp.experts.down_proj_scales").get_shape() == [2, 64, 2]
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in f.keys())
    pa, pb = open_checkpoint(outs[0]), open_checkpoint(outs[1])
    assert pa.facts.n_experts == 2 and pa.tensors.keys() == pb.tensors.keys()
    assert sum(t.stored is not None and t.stored.format == "mxfp4" for t in pa.tensors.values()) == 2 * 3 * 2
    assert all(_same(pa.load(n), pb.load(n)) for n in pa.tensors)


def test_pruned_fp8_checkpoint_stays_fp8(fp8_pair, tmp_path: Path) -> None:
    """Calibration reads the FP8 model as its dequantized copy; the pruned checkpoint keeps e4m3 values and block
    scales (sliced with the experts), loads, and equals the pruned dequantized checkpoint tensor for tensor."""
    import numpy as np

    from moepack.model.pruned import pruned_view
    from moepack.stages.calibrate import calibrate
    from moepack.stages.prune import PruneOptions, make_plan, write_checkpoint

    ids = np.random.default_rng(1).integers(0, 256, (2, 16))
    views = [open_checkpoint(d) for d in fp8_pair]
    stats = [calibrate(v, ids, progress=False) for v in views]
    assert stats[0].router.keys() == stats[1].router.keys()
    for layer in stats[0].router:  # the same numbers from both: the runner read the same weights
        assert np.array_equal(stats[0].router[layer].saliency_sum, stats[1].router[layer].saliency_sum)
    assert all(np.array_equal(stats[0].imatrix[n].sums, e.sums) for n, e in stats[1].imatrix.items())
    plan = make_plan(views[0], stats[0], PruneOptions(keep=0.5))
    outs = [write_checkpoint(pruned_view(v, plan), tmp_path / k, max_shard_bytes=100_000, progress=False)
            for v, k in zip(views, ("fp8", "deq"))]
    cfg = json.loads((outs[0] / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8" and cfg["n_routed_experts"] == plan.n_kept
    weight_map = json.loads((outs[0] / "model.safetensors.index.json").read_text())["weight_map"]
    scales = [n for n in weight_map if n.endswith("_scale_inv")]
    assert scales and f"model.layers.1.mlp.experts.{plan.n_kept - 1}.down_proj.weight_scale_inv" in scales
    assert not any(f"experts.{plan.n_kept}." in n for n in weight_map)
    a, b = open_checkpoint(outs[0]), open_checkpoint(outs[1])
    assert a.tensors.keys() == b.tensors.keys()
    for n, ref in a.tensors.items():
        assert _same(a.load(n), b.load(n)), n
    experts = [n for n in a.tensors if ".experts." in n]  # a byte a value (plus scales) against f32's four
    assert sum(a.tensors[n].stored_nbytes for n in experts) < 0.26 * sum(b.tensors[n].nbytes for n in experts)


def test_inspect_shows_stored_bytes_beside_the_parameters(fp8_pair, capsys) -> None:
    from moepack.model.checkpoint import read_safetensors_header

    assert main(["inspect", str(fp8_pair[0]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    header, _ = read_safetensors_header(fp8_pair[0] / "model.safetensors")
    on_disk = sum(b - a for n, v in header.items() if n != "__metadata__" for a, b in [v["data_offsets"]])
    assert d["stored"]["bytes"] == on_disk and d["stored"]["bpw"] == 8 * on_disk / d["params_total"]
    assert set(d["stored"]["params"]) == {"fp8_block", "F32"}
    assert sum(d["stored"]["params"].values()) == d["params_total"]
    # config only: DeepSeek-V3's release is e4m3 with 128 × 128 f32 block scales but for embeddings, output, routers
    assert main(["inspect", str(DATA / "configs" / "deepseek-v3"), "--json"]) == 0
    v3 = json.loads(capsys.readouterr().out)
    assert 8.0 < v3["stored"]["bpw"] < 8.1 and v3["stored"]["params"]["fp8_block"] > 0.99 * v3["params_total"]
    assert main(["inspect", str(DATA / "configs" / "deepseek-v3")]) == 0
    assert "stored        626.9 GiB, 8.03 bits/weight (fp8_block 99.7%" in capsys.readouterr().out

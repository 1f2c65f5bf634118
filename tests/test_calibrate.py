"""Layer runner, calibration statistics, importance matrix (and its llama.cpp GGUF form), streaming memory."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ARCHS, ROOT
from moepack.model.arch import expert_key
from moepack.model.checkpoint import open_checkpoint
from moepack.model.runner import KLDReference, LayerRunner, layer_sources
from moepack.schema import CalibStats
from moepack.stages.calibrate import calibrate, imatrix_for

IDS = np.random.default_rng(0).integers(0, 256, (4, 24))  # (N, L)


def test_runner_reads_only_what_it_needs(shared_tiny_model):
    """Out of core: the embedding is gathered (no float32 copy of the (V, H) matrix is asked for), and the final
    norm for lm_head's importance matrix does not load lm_head; the result equals transformers' embedding."""
    import transformers

    path = shared_tiny_model("deepseek_v3")
    view = open_checkpoint(path)
    loaded: list[str] = []
    r = LayerRunner(view, loader=lambda n: loaded.append(n) or view.load(n))
    h = r.embed(torch.as_tensor(IDS))
    r.final_norm(h)
    assert "lm_head.weight" not in loaded and loaded.count("model.embed_tokens.weight") == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert torch.equal(h, model.model.embed_tokens(torch.as_tensor(IDS)))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_runner_matches_transformers(arch, shared_tiny_model):
    import transformers

    path = shared_tiny_model(arch)
    ids = torch.as_tensor(IDS)
    logits = LayerRunner(open_checkpoint(path)).forward(ids, batch_size=3)  # two batches: 3 + 1
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids).logits
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-4


def test_layer_runner_ranges_and_override(shared_tiny_model):
    view = open_checkpoint(shared_tiny_model("qwen3_moe"))
    r = LayerRunner(view)
    h0 = r.embed(torch.as_tensor(IDS))
    full = r.run(h0)
    part = r.run(r.run(h0, 0, 1), 1, None)
    assert torch.equal(h0, r.embed(torch.as_tensor(IDS)))  # run() leaves its input alone
    assert torch.allclose(full, part, atol=1e-6)
    seen: list[str] = []

    def zero_down(name: str, t: torch.Tensor) -> torch.Tensor | None:
        seen.append(name)
        return torch.zeros_like(t) if name.endswith("down_proj.weight") and ".experts." in name else None

    changed = r.run(h0, weight_override=zero_down)
    assert not torch.allclose(changed, full)
    assert set(seen) == {n for n, t in view.tensors.items() if t.layer is not None}
    assert r.logits(full).shape == (*IDS.shape, view.facts.vocab)
    # the sensitivity pattern: reference cached at layer 1, variants rerun from there
    ref = KLDReference(r, IDS, start=1, batch_size=3)
    same = ref.variant(LayerRunner(view))
    assert same["kld_mean"] < 1e-6 and same["top1_agree"] == 1.0 and np.isclose(same["ppl"], ref.base["ppl"])
    assert ref.variant(r, weight_override=zero_down)["kld_mean"] > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_statistics_consistent(arch, shared_tiny_model):
    view = open_checkpoint(shared_tiny_model(arch))
    st = calibrate(view, IDS, batch_size=3, progress=False)
    n_tok, k = IDS.size, view.facts.top_k
    assert sorted(st.router) == list(view.facts.moe_layers)
    for layer, r in st.router.items():
        assert r.counts.sum() == n_tok * k  # per token, the frequencies sum to k
        assert np.isclose(r.freq.sum(), 1.0)
        assert np.all(np.isfinite(r.score)) and np.all(r.score[r.counts > 0] > 0)
        assert np.all(r.saliency[r.counts > 0] > 0)
        srcs = layer_sources(view, layer)
        moe = "feed_forward" if "feed_forward.experts.down_proj" in srcs else "mlp"  # Llama 4: feed_forward
        gate = st.imatrix[expert_key(srcs[f"{moe}.experts.gate_up_proj"].names[0])]
        down = st.imatrix[expert_key(srcs[f"{moe}.experts.down_proj"].names[0])]
        assert np.array_equal(gate.counts, r.counts) and np.array_equal(down.counts, r.counts)
        assert gate.sums.shape == (view.facts.n_experts, view.facts.hidden)
        assert down.sums.shape == (view.facts.n_experts, view.facts.expert_ffn)
    # every quantizable weight matrix except the embedding has an importance matrix
    for name, ref in view.tensors.items():
        if ref.quantizable and ref.role.value != "embedding":
            v = imatrix_for(st, name)
            assert v.shape == (ref.shape[-1],) and np.all(np.isfinite(v)) and np.all(v >= 0), name
    assert st.imatrix["lm_head.weight"].counts[0] == n_tok


def test_calibration_matches_plain_forward(shared_tiny_model):
    """The instrumented experts compute what transformers computes: logits after calibration hooks are unchanged."""
    view = open_checkpoint(shared_tiny_model("deepseek_v3"))
    from moepack.stages.calib_hooks import Accumulator, preparer

    r = LayerRunner(view, attn_implementation="eager")  # as calibrate runs DeepSeek (attn_v_b needs the probs)
    h = r.embed(torch.as_tensor(IDS))
    plain = LayerRunner(view).run(h)
    hooked = r.run(h, prepare=preparer(view, Accumulator()))
    assert torch.allclose(plain, hooked, atol=1e-5)


def test_mla_v_b_input_is_attention_weighted_latent(shared_tiny_model):
    """With one-token sequences each head attends only to its own token: attn_v_b's input is kv_b's input."""
    view = open_checkpoint(shared_tiny_model("deepseek_v2"))
    st = calibrate(view, IDS[:, :1], progress=False)
    for layer in range(view.facts.n_layers):
        v_b = st.imatrix[f"model.layers.{layer}.self_attn.v_b_proj.weight"]
        kv_b = st.imatrix[f"model.layers.{layer}.self_attn.kv_b_proj.weight"]
        assert v_b.sums.shape == (view.config["num_attention_heads"], view.config["kv_lora_rank"])
        np.testing.assert_allclose(v_b.sums, np.broadcast_to(kv_b.sums, v_b.sums.shape), rtol=1e-5)
        assert np.all(v_b.counts == kv_b.counts[0])


def _never_routed_model(tiny_model) -> tuple[Path, int]:
    """A DeepSeek-V3 model (16 experts in 4 groups) whose expert 5 is never chosen (router bias -1e4)."""
    from safetensors.torch import load_file, save_file

    path = tiny_model("deepseek_v3", n_experts=16)
    f = path / "model.safetensors"
    sd = load_file(f)
    for n in sd:
        if n.endswith("e_score_correction_bias"):
            sd[n][5] = -1e4
    save_file(sd, f, metadata={"format": "pt"})
    return path, 5


def test_never_routed_expert_falls_back_and_is_reported(tiny_model, tmp_path):
    from moepack.gguf.imatrix import ImatrixFile, read_imatrix, write_imatrix_gguf

    path, dead = _never_routed_model(tiny_model)
    view = open_checkpoint(path)
    st = calibrate(view, IDS, progress=False)
    layer = view.facts.moe_layers[0]
    never = st.manifest.never_routed[str(layer)]
    assert dead in never
    r = st.router[layer]
    assert r.counts[dead] == 0 and r.score[dead] == 0 and r.saliency[dead] == 0
    name = view.expert_ref(layer, dead, "down_proj").name
    assert np.array_equal(imatrix_for(st, name), np.ones(view.facts.expert_ffn, np.float32))
    st.write(tmp_path / "calib")
    assert CalibStats.read(tmp_path).manifest.never_routed == st.manifest.never_routed
    values = read_imatrix(write_imatrix_gguf(ImatrixFile.of_stats(st, view), tmp_path / "imatrix.gguf")).means()
    down = values[f"blk.{layer}.ffn_down_exps.weight"]
    assert down.shape == (view.facts.n_experts, view.facts.expert_ffn)
    assert np.all(down[never] == 1.0) and np.all(np.isfinite(down))


def _ggml_reads(path: Path) -> tuple[int, str]:
    """(tensor count, general.type) through llama.cpp's own GGUF parser (libggml-base)."""
    from moepack.gguf.kernels import lib_dir

    lib = ctypes.CDLL(str(next(lib_dir().glob("libggml-base.so*"))))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, "llama.cpp's gguf parser rejected the file"
    try:
        return lib.gguf_get_n_tensors(ctx), lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")).decode()
    finally:
        lib.gguf_free(ctx)


def test_imatrix_gguf_round_trip(shared_tiny_model, tmp_path):
    import gguf

    from moepack.gguf.imatrix import ImatrixFile, imatrix_entries, read_imatrix, write_imatrix_gguf

    view = open_checkpoint(shared_tiny_model("deepseek_v3"))
    st = calibrate(view, IDS, progress=False)
    made = ImatrixFile.of_stats(st, view)
    assert made.datasets == [""] and (made.chunk_count, made.chunk_size) == IDS.shape  # no text named: calibrate()
    path = write_imatrix_gguf(ImatrixFile(made.entries, ["calib.txt"], *IDS.shape), tmp_path / "imatrix.gguf")
    f = read_imatrix(path)
    ours = imatrix_entries(st, view)
    assert set(f.entries) == set(ours) and f.datasets == ["calib.txt"]
    assert (f.chunk_count, f.chunk_size) == IDS.shape
    for name, e in ours.items():
        np.testing.assert_allclose(f.entries[name].sums, e.sums, rtol=1e-6)
        np.testing.assert_array_equal(f.entries[name].counts, e.counts)
    moe = view.facts.moe_layers[0]
    assert f.entries[f"blk.{moe}.ffn_gate_exps.weight"].sums.shape == (view.facts.n_experts, view.facts.hidden)
    heads, nope = view.config["num_attention_heads"], view.config["qk_nope_head_dim"]
    assert f.entries[f"blk.{moe}.attn_k_b.weight"].sums.shape == (1, heads * nope)  # llama.cpp's 3-D dense layout
    kv_lora = view.config["kv_lora_rank"]
    assert f.entries[f"blk.{moe}.attn_v_b.weight"].sums.shape == (1, heads * kv_lora)
    r = gguf.GGUFReader(path)
    assert r.get_field("general.architecture") is None  # as llama-imatrix writes it
    counts = next(t for t in r.tensors if t.name == f"blk.{moe}.ffn_down_exps.weight.counts")
    assert list(counts.shape) == [1, view.facts.n_experts]  # ggml ne = (1, n_mat)
    assert _ggml_reads(path) == (2 * len(ours), "imatrix")  # llama-cpp-python (a dependency) ships libggml-base


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.calibrate import calibrate
    def kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    torch.set_num_threads(1)  # one malloc arena: less allocator noise in the measurement
    view = open_checkpoint(sys.argv[1])
    ids = np.random.default_rng(0).integers(0, 256, (4, 32))
    calibrate(view, ids[:1, :8], progress=False)  # warm-up: imports, lazy kernels and thread pools
    base = kb("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    calibrate(view, ids, progress=False)
    print(json.dumps({"base_kb": base, "peak_kb": kb("VmHWM:")}))
""")


def test_calibration_streams_one_layer_at_a_time(tiny_model):
    """Peak RSS during calibration stays near one layer's weights, far below the model's size."""
    path = tiny_model("qwen3_moe", hidden=128, ffn=512, n_experts=16, n_layers=8)  # 12.5 MB of f32 per layer
    view = open_checkpoint(path)
    layer_kb = sum(t.nbytes for t in view.tensors.values() if t.layer == 0) / 1024
    model_kb = sum(t.nbytes for t in view.tensors.values()) / 1024
    if not os.access("/proc/self/clear_refs", os.W_OK):  # the one thing some sandboxes lack: a peak reset
        pytest.skip("cannot reset the RSS peak here (/proc/self/clear_refs is not writable)")
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # a calibration crash is a failure, not a skip
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grown = m["peak_kb"] - m["base_kb"]
    assert model_kb > 7 * layer_kb
    # one layer's tensors + its mapped file pages + allocator slack; loading the model would take > 7 layers
    assert grown < 3.5 * layer_kb, (grown, layer_kb, model_kb)


def test_calibrate_cli_and_resume(tmp_path, capsys):
    from conftest import DATA, build_tiny_model
    from moepack.cli import main

    model = build_tiny_model("qwen3_moe", tmp_path / "m", tokenizer=True, vocab=320)
    text = DATA / "tinyshakespeare.txt"
    args = ["calibrate", str(model), "--calib-text", str(text), "--calib-tokens", "256", "--seq-len", "64",
            "--sens-tokens", "128", "-o", str(tmp_path / "run"), "--imatrix-out", str(tmp_path / "im.gguf")]
    assert main(args) == 0
    man = json.loads((tmp_path / "run" / "calib" / "manifest.json").read_text())
    assert man["tokens"] == 256 and man["seq_len"] == 64 and man["selection_tokens"] == 128
    assert man["fingerprint"] == open_checkpoint(model).fingerprint() and len(man["text_sha256"]) == 64
    assert (tmp_path / "im.gguf").is_file()
    st = CalibStats.read(tmp_path / "run")
    assert st.selection.shape == (2, 64)
    assert main(args) == 0  # same inputs: reused, not recomputed
    assert json.loads((tmp_path / "run" / "calib" / "manifest.json").read_text())["seconds"] == man["seconds"]
    _check_shards_reuse(args, tmp_path / "run" / "calib" / "manifest.json")
    assert main(args[:4] + ["--calib-tokens", "8", "-o", str(tmp_path / "r2")]) == 2
    assert "less than one sequence" in capsys.readouterr().err
    # without --calib-text: the bundled calibration text, as compress uses: its five domains (no chat template: no
    # conversations), each a share of the statistics
    from moepack.model.textdata import BUNDLED_CALIB_DIR, BUNDLED_DOMAINS

    assert main(["calibrate", str(model), "--calib-tokens", "128", "--seq-len", "64", "--sens-tokens", "0",
                 "-o", str(tmp_path / "r3")]) == 0
    man3 = json.loads((tmp_path / "r3" / "calib" / "manifest.json").read_text())
    assert [d["name"] for d in man3["domains"]] == list(BUNDLED_DOMAINS)
    assert all(Path(d["path"]).parent == BUNDLED_CALIB_DIR.resolve() for d in man3["domains"])
    assert man3["n_sequences"] == len(BUNDLED_DOMAINS)  # 128 tokens over 5 domains: one sequence each


def _check_shards_reuse(args: list[str], manifest: Path) -> None:
    """The shard count is an input only when given: --shards 1 takes the one-shard statistics, --shards 2 makes new
    ones, which a run without --shards takes; other settings calibrate again."""
    from moepack.cli import main

    def written() -> int:
        return manifest.stat().st_mtime_ns

    first = written()
    assert main(args + ["--shards", "1"]) == 0 and written() == first
    assert main(args + ["--shards", "2"]) == 0 and json.loads(manifest.read_text())["shards"] == 2
    two = written()
    assert two != first and main(args) == 0 and written() == two
    assert main(args[:4] + ["--calib-tokens", "320"] + args[6:]) == 0
    assert json.loads(manifest.read_text())["tokens"] == 320 and written() != two

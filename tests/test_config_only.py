"""Inputs as users have them and plans before a download: a repo id in the local Hugging Face cache, a directory
holding only config.json, and llama.cpp's standard mixtures sized from the tensor table alone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import ARCHS, ROOT, build_tiny_model, fixture_dir
from moepack.cli import main
from moepack.model.checkpoint import open_checkpoint
from moepack.model.shapes import config_view

DSV3 = ROOT / "data" / "configs" / "deepseek-v3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(cache: Path, repo: str, src: Path) -> Path:
    """A hub cache laid out as huggingface_hub writes it (models--org--name/refs/main → snapshots/<commit>/)."""
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(COMMIT)
    shutil.copytree(src, d / "snapshots" / COMMIT)
    return d / "snapshots" / COMMIT


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub (already imported) looks in, offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ---------------------------------------------------------------------------------------------------- repo ids

def test_inspect_takes_a_cached_repo_id_from_hf_hub_cache(tmp_path: Path) -> None:
    """The whole command in a fresh process, the cache named by HF_HUB_CACHE as a user sets it."""
    snap = _cache_with(tmp_path / "hub", "deepseek-ai/DeepSeek-V3", DSV3)
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "moepack.cli", "inspect", "deepseek-ai/DeepSeek-V3", "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert Path(d["path"]).resolve() == snap.resolve()
    assert d["architecture"] == "deepseek_v3" and d["routed_experts"] == 256


def test_other_commands_take_a_cached_repo_id(hub_cache: Path, tmp_path: Path) -> None:
    """quantize (like calibrate, prune, sensitivity, compress: one resolver) reads the cached snapshot."""
    model = build_tiny_model("qwen3_moe", tmp_path / "m", tokenizer=True, vocab=512)
    _cache_with(hub_cache, "acme/tiny-moe", model)
    assert main(["quantize", "acme/tiny-moe", "--type", "Q8_0", "-o", str(tmp_path / "q.gguf")]) == 0
    names = {t.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert "blk.1.ffn_down_exps.weight" in names


def test_uncached_repo_id_says_where_it_looked_and_what_to_run(hub_cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["calibrate", "acme/absent-moe", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    for needle in ("acme/absent-moe", "no snapshot of that repo is in the local Hugging Face cache", str(hub_cache), "HF_HUB_CACHE",
                   "HF_HOME", "hf download acme/absent-moe", "does not download"):
        assert needle in err, needle
    assert "Traceback" not in err and not out.exists()
    missing = tmp_path / "no" / "such" / "dir"
    assert main(["prune", str(missing), "--calib-dir", str(tmp_path), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: not a directory (nothing is there)" in err and "Hugging Face cache" not in err


# ---------------------------------------------------------------------------------------------------- config only

def _models(tmp_path: Path) -> list[Path]:
    tiny = [build_tiny_model(a, tmp_path / a, hidden=256, ffn=256) for a in ARCHS]
    return [fixture_dir(n) for n in ("tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-deepseek-v3-multi")] + tiny


def test_config_alone_gives_every_header_entry(tmp_path: Path, capsys) -> None:
    """For the committed fixtures and a random model of each architecture: config.json alone gives every tensor
    the safetensors headers hold, with the same shape, dtype and byte count, and inspect prints the same report."""
    for model in _models(tmp_path):
        real = open_checkpoint(model)
        cfg_dir = tmp_path / "cfg" / model.name
        cfg_dir.mkdir(parents=True)
        shutil.copy(model / "config.json", cfg_dir / "config.json")
        derived = config_view(cfg_dir)
        assert set(derived.tensors) == set(real.tensors), model.name
        for name, t in real.tensors.items():
            d = derived.tensors[name]
            assert (d.shape, d.dtype, d.nbytes) == (t.shape, t.dtype, t.nbytes), (model.name, name)
        reports = []
        for path in (model, cfg_dir):
            assert main(["inspect", str(path), "--json"]) == 0
            reports.append(json.loads(capsys.readouterr().out) | {"path": None})
        assert reports[0] == reports[1], model.name  # facts, counts, estimates, mixtures and fingerprint


# ---------------------------------------------------------------------------------------------------- mixtures

# (architecture, experts, mixtures): 12 layers so that the n/8, n/16 and use_more_bits rules pick different
# layers; Mixtral's 8 experts take llama.cpp's 8-expert rules; DeepSeek's MLA has no attn_v but 3-D k_b/v_b.
LLAMA_CASES = [("qwen3_moe", 4, ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ2_M", "IQ3_XS")),
               ("mixtral", 8, ("Q3_K_M", "Q4_K_M", "IQ2_XXS")),
               ("deepseek_v3", 8, ("Q2_K", "IQ3_XXS")),
               ("qwen2_moe", 4, ("Q4_K_S",)),
               ("qwen3_next", 4, ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ2_XXS")),
               ("gpt_oss", 4, ("Q4_K_M", "IQ2_XXS")),  # expert biases, sinks: F32
               ("llama4_text", 4, ("Q3_K_M", "Q4_K_M"))]


@pytest.mark.slow
@pytest.mark.parametrize("arch,n_experts,ftypes", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_mixture_tables_match_llama_quantize(arch: str, n_experts: int, ftypes: tuple[str, ...],
                                             tmp_path: Path) -> None:
    """The type of every tensor and the tensor data bytes predicted from the tables equal what
    llama_model_quantize writes for the mixture (with an importance matrix)."""
    from moepack.gguf.imatrix import ImatrixFile, write_imatrix_gguf
    from moepack.gguf.names import gguf_outputs
    from moepack.stages.mixtures import mixture_sizes, mixture_types

    model = build_tiny_model(arch, tmp_path / "m", tokenizer=True, vocab=512, hidden=256, ffn=256,
                             n_experts=n_experts, n_layers=12)
    view = open_checkpoint(model)
    rng = np.random.default_rng(0)
    im = {o.key: rng.random((o.shape[0] if o.transform == "stack" else 1, o.n_per_row)).astype(np.float32) + 0.1
          for o in gguf_outputs(view) if o.quantizable and o.transform != "k_b"}
    write_imatrix_gguf(ImatrixFile.of_means(im), tmp_path / "imatrix.gguf")
    sizes = mixture_sizes(view, 1.0, ftypes)
    for ftype in ftypes:
        out = tmp_path / f"{ftype}.gguf"
        assert main(["quantize", str(model), "--ftype", ftype, "--imatrix", str(tmp_path / "imatrix.gguf"),
                     "-t", "2", "-o", str(out)]) == 0
        tensors = gguf.GGUFReader(out).tensors
        got = {t.name: t.tensor_type.name for t in tensors}
        predicted = {n: t.name for n, t in mixture_types(view, ftype).items()}
        assert predicted == got, (ftype, {n: (predicted.get(n), g) for n, g in got.items() if predicted.get(n) != g})
        assert sizes[ftype].total == sum(int(t.n_bytes) for t in tensors), ftype
        out.unlink()


def test_deepseek_v3_mixtures_at_128gb() -> None:
    """The paper's case from DeepSeek-V3's config alone: no standard mixture of the full model fits 128 GB at 8k
    context; at keep 0.75 (192 of 256 experts) IQ1_S does and IQ2_XXS does not. The mixtures raise some tensors
    above their base type, so each is larger than the uniform estimate of that type, and pruning shrinks only the
    routed experts, by exactly 64/256."""
    from moepack.stages.budget import BudgetRequest, budget_for
    from moepack.stages.fit import uniform_bytes
    from moepack.stages.mixtures import mixture_sizes

    view = config_view(DSV3)
    weights = budget_for(BudgetRequest(memory="128GB", ctx=8192), view).weights
    full, kept = mixture_sizes(view, 1.0), mixture_sizes(view, 0.75)
    assert all(m.total > weights for m in full.values())
    assert kept["IQ1_S"].total <= weights < kept["IQ2_XXS"].total
    for ftype in ("Q2_K", "IQ2_XXS", "IQ1_S"):
        assert full[ftype].total > uniform_bytes(view, ftype)
    for ftype, (total, routed, _) in full.items():
        assert kept[ftype].routed * 256 == routed * 192, ftype
        assert total - routed == kept[ftype].total - kept[ftype].routed, ftype
    # Files llama-quantize made (bartowski/deepseek-ai_DeepSeek-V3-0324-GGUF, llama.cpp b4944, the same
    # architecture and shapes; sizes in GB as the hub lists them): within 0.1 %.
    for ftype, gb in (("Q8_0", 713.29), ("Q6_K", 550.80), ("Q5_K_M", 475.40), ("Q5_K_S", 461.81),
                      ("Q4_K_M", 404.43)):
        assert abs(full[ftype].total / 1e9 - gb) < 1e-3 * gb, ftype


def test_inspect_prints_the_mixtures_that_fit(capsys) -> None:
    assert main(["inspect", str(DSV3), "--memory", "128GB", "-c", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    by_keep = {r["keep"]: r for r in d["fit"]["retentions"]}
    assert sorted(by_keep) == [0.625, 0.75, 0.875, 1.0]  # the retentions compress --keep auto tries
    r1, r75 = by_keep[1.0], by_keep[0.75]
    assert not any(m["fits"] for m in r1["mixtures"].values())
    assert r75["mixtures"]["IQ1_S"]["fits"] and not r75["mixtures"]["IQ2_XXS"]["fits"]
    assert d["mixtures"]["Q4_K_M"]["bytes"] == r1["mixtures"]["Q4_K_M"]["bytes"]
    assert main(["inspect", str(DSV3), "--memory", "128GB", "-c", "8192"]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp mixtures that fit: none (the smallest, IQ1_S" in out
    assert "llama.cpp mixtures that fit: IQ1_S" in out


def test_inspect_splits_mixtures_between_gpu_and_ram(capsys) -> None:
    """With --gpu-memory, a mixture fits when its GPU-resident tensors fit the GPU's share and the routed experts
    (and token_embd) the RAM's; the GPU share is the mixture minus what -ot exps=CPU leaves in RAM."""
    pytest.importorskip("moepack.stages.placement")
    assert main(["inspect", str(DSV3), "--gpu-memory", "24GB", "--memory", "128GB", "-c", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    b = d["fit"]["budget"]
    embd = d["params"]["embedding"]  # token_embd stays in RAM, at its mixture type: between 1 and 32 bits
    for r in d["fit"]["retentions"]:
        for t, m in r["mixtures"].items():
            ram = m["bytes"] - m["gpu_bytes"]
            assert m["routed_bytes"] + embd / 8 < ram < m["routed_bytes"] + 4 * embd, t
            assert m["fits"] == (m["gpu_bytes"] <= b["gpu_weights"] and ram <= b["weights"] - b["gpu_weights"]), t
    assert d["fit"]["retentions"][1]["mixtures"]["IQ1_S"]["fits"]
    assert not d["fit"]["retentions"][0]["mixtures"]["IQ1_S"]["fits"]

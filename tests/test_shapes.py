"""Tensor tables derived from config.json alone equal the headers of real checkpoints, for every architecture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ARCHS, ROOT, tiny_config
from moepack.model.checkpoint import CheckpointError, open_checkpoint
from moepack.model.shapes import ShapeError, config_view

# Variants beyond the tiny defaults: tied embeddings, a q projection without LoRA (DeepSeek-V2-Lite), dense layers
# inside a Qwen MoE stack, a second dense layer before the first MoE layer.
VARIANTS = [(a, {}) for a in ARCHS] + [
    ("qwen3_moe", {"tie_word_embeddings": True, "mlp_only_layers": [1], "num_hidden_layers": 3}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "num_hidden_layers": 4}),
    ("deepseek_v2", {"q_lora_rank": None}),
    ("deepseek_v3", {"first_k_dense_replace": 2, "num_hidden_layers": 4, "n_shared_experts": 2}),
    ("mixtral", {"num_key_value_heads": 4}),
]


def _save(arch: str, overrides: dict, out: Path) -> Path:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(arch, **(tiny_config(arch) | overrides))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch,overrides", VARIANTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_derived_tensors_equal_the_checkpoint(arch: str, overrides: dict, tmp_path: Path) -> None:
    real = open_checkpoint(_save(arch, overrides, tmp_path / "full"))
    (tmp_path / "cfg").mkdir()
    shutil.copy(tmp_path / "full" / "config.json", tmp_path / "cfg" / "config.json")
    derived = config_view(tmp_path / "cfg")
    assert set(derived.tensors) == set(real.tensors)
    for name, t in real.tensors.items():
        d = derived.tensors[name]
        assert (d.shape, d.role, d.kind, d.layer, d.expert) == (t.shape, t.role, t.kind, t.layer, t.expert), name
        assert d.nbytes == t.numel * (4 if t.dtype == "F32" else 2), name
    assert derived.facts == real.facts
    assert derived.param_counts() == real.param_counts()


def test_deepseek_v3_config_gives_the_published_size() -> None:
    """DeepSeek-V3's own config.json: 671B parameters in the main model (DeepSeek's figure, the 14B of the
    multi-token-prediction module left out), 256 routed experts in 58 MoE layers."""
    v = config_view(ROOT / "data" / "configs" / "deepseek-v3")
    assert round(sum(v.param_counts().values()) / 1e9, 1) == 671.0
    assert v.facts.moe_layers == tuple(range(3, 61)) and v.facts.n_experts == 256 and v.facts.top_k == 8
    assert v.facts.router_bias and v.facts.scoring == "sigmoid" and (v.facts.n_group, v.facts.topk_group) == (8, 4)
    assert v.tensors["model.layers.3.self_attn.kv_b_proj.weight"].shape == (128 * (128 + 128), 512)


def test_config_only_view_refuses_to_load_data(tmp_path: Path) -> None:
    shutil.copy(ROOT / "data" / "configs" / "deepseek-v3" / "config.json", tmp_path / "config.json")
    v = config_view(tmp_path)
    with pytest.raises(CheckpointError, match="config.json alone; download its weights"):
        v.load("model.embed_tokens.weight")


def test_missing_keys_are_errors(tmp_path: Path) -> None:
    cfg = json.loads((ROOT / "data" / "configs" / "deepseek-v3" / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeError, match="no kv_lora_rank"):
        config_view(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        config_view(tmp_path / "absent")

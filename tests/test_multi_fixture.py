"""The multi-domain fixture (issue: experts that specialise): its architecture is DeepSeek-V3's with fine-grained
experts, it fits the size limit, it learned every domain, and its card states what training.json holds."""
from __future__ import annotations

import json

import pytest

from conftest import MODELS

from moepack.model.checkpoint import open_checkpoint

MULTI = MODELS / "tiny-deepseek-v3-multi"
DOMAINS = ("stories", "encyclopedic", "dialogue", "code", "web")

pytestmark = pytest.mark.skipif(not any(MULTI.glob("*.safetensors")), reason="fixture not trained")
SHARDS = sorted(MULTI.glob("*.safetensors"))


def test_architecture_and_size() -> None:
    view = open_checkpoint(MULTI)
    f = view.facts
    assert view.config["model_type"] == "deepseek_v3"
    assert f.n_experts >= 32 and f.top_k >= 4
    assert view.config["n_group"] > 1 and view.config["topk_method"] == "noaux_tc"
    assert view.config["n_shared_experts"] >= 1 and view.config["first_k_dense_replace"] >= 1
    assert sum(f.stat().st_size for f in SHARDS) <= 64 * 10**6
    assert all(f.stat().st_size <= 45 * 10**6 for f in SHARDS)  # each file under git hosts' 50 MB warning


def test_learned_every_domain_and_card_matches() -> None:
    held = json.loads((MULTI / "training.json").read_text())["held_out"]
    card = (MULTI / "README.md").read_text()
    assert set(held) == set(DOMAINS)
    for d, r in held.items():
        assert r["ppl"] < r["unigram_ppl"] / 4, d  # far below a unigram model of the same text
        assert f"| {d} | {r['tokens']:,} | {r['ppl']:.2f} |" in card, d

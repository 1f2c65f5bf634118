"""Planning from the published configs: `moepack inspect data/configs/<model>` (config.json alone) gives the total and
active parameter counts the vendors publish, within the precision they publish them at.

The figures and how each vendor counts "active" are data (data/configs/published.json, sources in data/SOURCES.md).
A figure covers what its rounding covers (e.g. "5.1B": 5.05-5.15B; a model name's "A3B": 3-4B, names truncate),
widened by SLACK on both sides: published totals count parts the served text model does not have (Llama 4 Scout's
and Qwen3.5's vision encoders, GLM's multi-token-prediction layer). A config whose architecture moepack does not
support yet is skipped, naming the family; the skip goes away when the family registers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, bench_common
from moepack.cli import main

# The published figures and the reading of them, shared with bench/architectures.py (docs/architectures.md).
_common = bench_common()
CONFIGS, PUBLISHED, SLACK = _common.CONFIGS, _common.PUBLISHED, _common.SLACK
published_range, within, model_type = _common.published_range, _common.within, _common.model_type


def inspect_config(config: str, capsys) -> dict[str, Any]:
    """`moepack inspect data/configs/<config> --json`, as a user runs it; skipped for an unsupported family."""
    from moepack.model.arch import UnsupportedArchitecture, spec_for

    arch = model_type(config)
    try:
        spec_for(arch)
    except UnsupportedArchitecture:
        pytest.skip(f"moepack does not support the {arch} family yet ({config})")
    assert main(["inspect", str(CONFIGS / config), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def active_count(d: dict[str, Any], counts: str) -> int:
    return {"all": d["params_active"], "without_embedding": d["params_active_without_embedding"]}[counts]


@pytest.mark.parametrize("pub", PUBLISHED, ids=[p["config"] for p in PUBLISHED])
def test_config_alone_gives_published_counts(pub: dict[str, Any], capsys) -> None:
    d = inspect_config(pub["config"], capsys)
    total, active = d["params_total"], active_count(d, pub["active_counts"])
    cfg = json.loads((CONFIGS / pub["config"] / "config.json").read_text())
    assert d["architecture"] in (cfg["model_type"], cfg.get("text_config", {}).get("model_type"))  # Llama 4: text
    assert within(total, pub["total"], pub.get("total_reading", "rounded")), (total, pub["total"])
    assert within(active, pub["active"], pub.get("active_reading", "rounded")), (active, pub["active"])
    # the counts inspect prints are one split of the same total
    assert d["params_active_without_embedding"] <= d["params_active"] < total == sum(d["params"].values())


def test_every_config_has_published_figures_and_a_source() -> None:
    dirs = {p.name for p in CONFIGS.iterdir() if (p / "config.json").is_file()}
    assert dirs == {p["config"] for p in PUBLISHED}
    sources = (ROOT / "data" / "SOURCES.md").read_text()
    for name in dirs:
        assert f"configs/{name}/config.json" in sources, name


def test_published_ranges() -> None:
    assert published_range("5.1B") == pytest.approx((5.05e9, 5.15e9))
    assert published_range("1.04T") == pytest.approx((1.035e12, 1.045e12))
    assert published_range("3B", "name") == pytest.approx((3e9, 4e9))
    assert within(5_132_849_472, "5.1B") and not within(5_711_982_912, "5.1B")  # gpt-oss-120b with the embedding
    with pytest.raises(ValueError):
        published_range("about 5B")


def test_active_without_embedding_keeps_a_tied_head(tmp_path: Path) -> None:
    """Untied, the input embedding (a lookup) is what the second count leaves out; tied, the same matrix is the
    output head every token multiplies by, so both counts keep it."""
    from moepack.gguf.estimate import describe
    from moepack.model.shapes import config_view

    cfg = json.loads((CONFIGS / "qwen3-30b-a3b" / "config.json").read_text())
    untied = describe(config_view(CONFIGS / "qwen3-30b-a3b"))
    assert untied["params_active"] - untied["params_active_without_embedding"] == untied["params"]["embedding"] > 0
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    tied = describe(config_view(tmp_path))
    assert tied["params"]["output"] == 0 and tied["params_active_without_embedding"] == tied["params_active"]

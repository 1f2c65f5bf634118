"""`moepack usage`: per-domain expert shares from the calibrate stage, the barely-used and specialist shares, and
the heat map; on the multi-domain fixture the domains route to different experts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS

from moepack.cli import main
from moepack.eval.usage import BARELY, DomainUsage, UsageError, parse_texts

DATA = Path(__file__).resolve().parents[1] / "data" / "calib"
MULTI = MODELS / "tiny-deepseek-v3-multi"


def test_barely_used_and_specialists_count_what_they_say() -> None:
    E = 4
    share = np.array([[[0.97, 0.01, 0.01, 0.01]], [[0.25, 0.25, 0.25, 0.25]]])  # (D=2, L=1, E=4)
    u = DomainUsage(("a", "b"), (1,), share, {"a": 10, "b": 10})
    assert BARELY / E == 0.0625
    assert u.barely_used().tolist() == [[0.75], [0.0]]
    # expert 0: 0.97 / 1.22 is a's; experts 1-3: 0.25 / 0.26 are b's
    assert u.specialists().tolist() == [[0.25], [0.75]]
    d = u.to_dict()
    assert d["barely_used"] == {"a": [0.75], "b": [0.0]} and len(d["share"]["a"]["1"]) == E


def test_parse_texts_errors(tmp_path: Path) -> None:
    f = tmp_path / "code.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match="at least two"):
        parse_texts([str(f)])
    with pytest.raises(UsageError, match="twice"):
        parse_texts([str(f), f"code={f}"])
    with pytest.raises(UsageError, match="not found"):
        parse_texts([str(f), f"web={tmp_path / 'missing.txt'}"])
    assert list(parse_texts([str(f), f"other={f}"])) == ["code", "other"]


@pytest.mark.skipif(not any(MULTI.glob("*.safetensors")), reason="fixture not trained")
def test_usage_on_the_multi_domain_fixture_shows_specialisation(tmp_path: Path, capsys) -> None:
    out = tmp_path / "usage"
    rc = main(["usage", str(MULTI), "--calib-text", f"stories={DATA / 'stories.txt'}", "--calib-text", f"code={DATA / 'code.txt'}",
               "--calib-tokens", "2048", "--seq-len", "256", "-o", str(out)])
    assert rc == 0
    assert (out / "usage.png").stat().st_size > 10_000 and "![expert usage per domain](usage.png)" in (
        out / "usage.md").read_text()
    d = json.loads((out / "usage.json").read_text())
    assert d["domains"] == ["stories", "code"] and d["tokens"] == {"stories": 2048, "code": 2048}
    E = 64
    for L in d["layers"]:
        s, c = (np.array(d["share"][k][str(L)]) for k in ("stories", "code"))
        assert abs(s.sum() - 1) < 1e-4 and abs(c.sum() - 1) < 1e-4
        # an expert code leans on (over twice the uniform share) that stories barely touch: specialisation
        assert np.any((c > 2 / E) & (s < BARELY / E)), L
    assert "| code | 2,048 |" in capsys.readouterr().out

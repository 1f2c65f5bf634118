"""The bundled text: every domain's evaluation part shares no paragraph with any calibration text."""
from __future__ import annotations

import pytest

from conftest import DATA
from moepack.model.textdata import DEFAULT_CALIB_TEXT

DOMAINS = ("encyclopedic", "dialogue", "code", "web", "stories")


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if len(p.strip()) >= 200}  # long enough to be one text's own


def _eval_text(domain: str) -> str:
    path = DATA / "tinystories-valid.txt" if domain == "stories" else DATA / "eval" / f"{domain}.txt"
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("domain", DOMAINS)
def test_evaluation_never_calibrates(domain: str) -> None:
    held_out = _paragraphs(_eval_text(domain))
    assert len(held_out) >= 20
    calib = _paragraphs(DEFAULT_CALIB_TEXT.read_text(encoding="utf-8"))
    for d in DOMAINS:
        calib |= _paragraphs((DATA / "calib" / f"{d}.txt").read_text(encoding="utf-8"))
    assert not held_out & calib


def test_default_calibration_text_mixes_every_domain() -> None:
    """Any prefix a calibration run reads holds every domain: the first 20 kB already do."""
    head = DEFAULT_CALIB_TEXT.read_text(encoding="utf-8")[:20_000]
    markers = {"stories": "once upon a time", "encyclopedic": " @-@ ", "dialogue": ":\n", "code": "# ===== Lib/",
               "web": ". "}
    assert [d for d, m in markers.items() if m not in head] == []

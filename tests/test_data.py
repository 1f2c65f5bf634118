"""The bundled text: every domain's evaluation part shares no paragraph with any calibration text, the package's
conversations included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA
from moepack.model.textdata import BUNDLED_CALIB_DIR, BUNDLED_CHAT, BUNDLED_DOMAINS, bundled_sources

DOMAINS = ("encyclopedic", "dialogue", "code", "web", "stories")
CHAT = BUNDLED_CALIB_DIR / f"{BUNDLED_CHAT}.jsonl"
EVAL_CHAT = DATA / "eval" / "dialogue-chat.jsonl"


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if len(p.strip()) >= 200}  # long enough to be one text's own


def _turns(path: Path) -> list[str]:
    return [m["content"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            for m in json.loads(line)["messages"]]


def _eval_text(domain: str) -> str:
    path = DATA / "tinystories-valid.txt" if domain == "stories" else DATA / "eval" / f"{domain}.txt"
    return path.read_text(encoding="utf-8")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("domain", DOMAINS)
def test_evaluation_never_calibrates(domain: str) -> None:
    held_out = _paragraphs(_eval_text(domain))
    assert len(held_out) >= 20
    calib = {p.strip() for p in _turns(CHAT) if len(p.strip()) >= 200}
    for d in DOMAINS:
        calib |= _paragraphs(_read(BUNDLED_CALIB_DIR / f"{d}.txt"))
        calib |= _paragraphs(_read(DATA / "calib" / f"{d}.txt"))
    assert not held_out & calib


def test_bundled_set_is_every_domain() -> None:
    """Five text domains and the conversations, none empty, each its own domain's text."""
    sources = bundled_sources()
    assert [s.name for s in sources] == [*BUNDLED_DOMAINS, BUNDLED_CHAT]
    assert [s.chat for s in sources] == [False] * len(BUNDLED_DOMAINS) + [True]
    assert all(s.bundled and s.path.stat().st_size > 0 for s in sources)
    markers = {"stories": "once upon a time", "encyclopedic": " @-@ ", "dialogue": ":\n", "code": "# ===== Lib/",
               "web": ". "}
    assert [d for d, m in markers.items() if m not in _read(BUNDLED_CALIB_DIR / f"{d}.txt")] == []
    assert all(80_000 < len(_read(BUNDLED_CALIB_DIR / f"{d}.txt")) <= 90_000 for d in BUNDLED_DOMAINS)


def test_conversations_come_from_their_own_part() -> None:
    """The package's conversations are speeches of the dialogue calibration part that dialogue.txt does not hold;
    the evaluation twin's are speeches of the evaluation text only."""
    calib_speeches = {p.strip("\n") for p in _read(DATA / "calib" / "dialogue.txt").split("\n\n")}
    turns = _turns(CHAT)
    assert len(turns) >= 100 and set(turns) <= calib_speeches
    assert not {t for t in turns if len(t) >= 200} & _paragraphs(_read(BUNDLED_CALIB_DIR / "dialogue.txt"))
    eval_speeches = {p.strip("\n") for p in _read(DATA / "eval" / "dialogue.txt").split("\n\n")}
    twin = _turns(EVAL_CHAT)
    assert len(twin) >= 300 and set(twin) <= eval_speeches

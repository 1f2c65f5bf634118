"""Multiple-choice tasks for `moepack eval`: PIQA, HellaSwag and a TinyStories cloze set, scored by log-likelihood.

Every item is a context and a few endings; a model picks the ending whose tokens have the highest log-likelihood given
the context, as lm-eval-harness and llama-perplexity do. Two numbers per task:

- `acc`: argmax of the summed log-likelihood of the ending's tokens;
- `acc_norm`: argmax of that sum divided by the ending's length in characters (lm-eval's `acc_norm`, which divides by
  `len(continuation)`, the leading space included). llama-perplexity's HellaSwag instead divides by the token count.

The headline metric (`HEADLINE`) is `acc_norm` for PIQA and HellaSwag (as lm-eval reports them) and `acc` for the
cloze set, whose endings are single words where a length penalty only adds noise.

Tokenization follows lm-eval: the ending's tokens are those of `context + ending` after the context's own tokens
(falling back to the ending tokenized alone when the tokenizer merges across the boundary).
"""
from __future__ import annotations

import bz2
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from moepack.errors import MoepackError

__all__ = [
    "TASKS",
    "MC_DATA",
    "HEADLINE",
    "McItem",
    "McResult",
    "EndingScorer",
    "McDataError",
    "load_piqa",
    "load_hellaswag",
    "build_cloze",
    "load_task",
    "split_ending",
    "choose",
    "score_items",
]

log = logging.getLogger(__name__)

TASKS = ("cloze", "piqa", "hellaswag")
# Package data: PIQA and HellaSwag validation sets (sources and licences in data/SOURCES.md of the repository).
MC_DATA = Path(__file__).resolve().parents[1] / "data"
HEADLINE = {"cloze": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm"}

Tokenize = Callable[[str], list[int]]


class McDataError(MoepackError, ValueError):
    pass


class EndingScorer(Protocol):
    def ending_logprobs(self, context: list[int], endings: list[list[int]]) -> list[float]:
        """Summed log-probability of each ending's tokens given the context tokens."""


@dataclass(frozen=True)
class McItem:
    context: str
    endings: tuple[str, ...]  # each with its leading space, as it is appended to the context
    gold: int


@dataclass(frozen=True)
class McResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    logliks: tuple[tuple[float, ...], ...]  # per item, per ending (not written to reports)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"n": self.n, "acc": self.acc, "acc_norm": self.acc_norm, "metric": HEADLINE[self.task],
                "score": self.acc if HEADLINE[self.task] == "acc" else self.acc_norm}


def _need(path: Path) -> Path:
    if not path.is_file():
        raise McDataError(f"multiple-choice data not found: {path}; --data-dir must hold mc/ as moepack's own "
                          f"({MC_DATA}) does")
    return path


def load_piqa(data_dir: Path, n: int | None = None) -> list[McItem]:
    """PIQA validation in lm-eval's prompt: 'Question: {goal}\\nAnswer:' + ' {sol}'."""
    lines = _need(data_dir / "mc" / "piqa-valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = _need(data_dir / "mc" / "piqa-valid-labels.lst").read_text().split()
    if len(lines) != len(labels):
        raise McDataError(f"PIQA: {len(lines)} items but {len(labels)} labels")
    items = []
    for line, lab in zip(lines, labels):
        d = json.loads(line)
        items.append(McItem(f"Question: {d['goal']}\nAnswer:", (" " + d["sol1"], " " + d["sol2"]), int(lab)))
        if n is not None and len(items) >= n:
            break
    return items


def _hs_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(data_dir: Path, n: int | None = None) -> list[McItem]:
    """HellaSwag validation in llama.cpp's layout: 6 lines per item (context, gold index, four endings)."""
    with bz2.open(_need(data_dir / "mc" / "hellaswag-val.txt.bz2"), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) % 6:
        raise McDataError(f"HellaSwag file has {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        ctx, gold, ends = lines[i], int(lines[i + 1]), lines[i + 2: i + 6]
        items.append(McItem(_hs_clean(ctx), tuple(" " + _hs_clean(e) for e in ends), gold))
        if n is not None and len(items) >= n:
            break
    return items


_SENT = re.compile(r"[^.!?]+[.!?]")
_LAST = re.compile(r"^(.*\S)\s+([a-z]+)\s*[.!?]$", re.S)


def _sentence_ends(paragraph: str) -> list[tuple[int, int, int, str]]:
    """(start of the last word, sentence index, words before it in the sentence, last word) of every sentence that
    ends in a lower-case word."""
    out = []
    for k, m in enumerate(_SENT.finditer(paragraph)):
        last = _LAST.match(m.group(0))
        if last:
            out.append((m.start() + len(last.group(1)), k, len(last.group(1).split()), last.group(2)))
    return out


def build_cloze(text_path: Path, n: int | None = None, *, seed: int = 0, pool_size: int = 200,
                n_choices: int = 4, max_context_words: int = 80) -> list[McItem]:
    """Deterministic cloze items: the last word of a sentence among `n_choices` candidates.

    Candidates come from the `pool_size` words that most often end a sentence in the text (ties by spelling), so
    every distractor is a plausible sentence end and only the context decides. Items are the sentences, in text
    order, that are not the first of their paragraph, have at least 4 words before the last, and end in a pool word
    (sentences split at . ! ?).
    Paragraphs are lines. The context is the paragraph up to that word (its last `max_context_words` words).
    A prefix of the list does not depend on `n`.
    """
    paragraphs = [p.strip() for p in Path(text_path).read_text(encoding="utf-8").splitlines() if p.strip()]
    ends = [_sentence_ends(p) for p in paragraphs]
    counts = Counter(w for e in ends for *_, w in e if len(w) >= 3)
    pool = sorted(counts, key=lambda w: (-counts[w], w))[:pool_size]
    if len(pool) < n_choices:
        raise McDataError(f"{text_path}: too few sentence-final words for a cloze set")
    pool_set = set(pool)
    rng = random.Random(seed)
    items: list[McItem] = []
    for para, para_ends in zip(paragraphs, ends):
        for start, k, n_before, word in para_ends:
            if k == 0 or n_before < 4 or word not in pool_set:
                continue
            words = para[:start].split()
            distract = rng.sample([w for w in pool if w != word], n_choices - 1)
            gold = rng.randrange(n_choices)
            choices = distract[:gold] + [word] + distract[gold:]
            context = " ".join(words[-max_context_words:])
            items.append(McItem(context, tuple(" " + c for c in choices), gold))
            if n is not None and len(items) >= n:
                return items
    return items


def load_task(task: str, data_dir: Path = MC_DATA, n: int | None = None,
              cloze_text: Path | None = None) -> list[McItem]:
    if task == "piqa":
        return load_piqa(data_dir, n)
    if task == "hellaswag":
        return load_hellaswag(data_dir, n)
    if task == "cloze":
        if cloze_text is None:
            raise McDataError("the cloze task builds its items from a text: pass --cloze-text FILE, held-out text "
                              "of the model's domain (never its calibration text)")
        return build_cloze(_need(cloze_text), n)
    raise McDataError(f"unknown multiple-choice task {task!r}; choose from {', '.join(TASKS)}")


def split_ending(tokenize: Tokenize, context: str, ending: str) -> tuple[list[int], list[int]]:
    """(context tokens, ending tokens) as lm-eval splits them."""
    ctx = tokenize(context)
    whole = tokenize(context + ending)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenize(ending)


def choose(logliks: Sequence[float], endings: Sequence[str]) -> tuple[int, int]:
    """(index picked by summed log-likelihood, index picked by log-likelihood per character)."""
    raw = max(range(len(logliks)), key=lambda i: logliks[i])
    norm = max(range(len(logliks)), key=lambda i: logliks[i] / max(1, len(endings[i])))
    return raw, norm


def score_items(task: str, scorer: EndingScorer, tokenize: Tokenize, items: Sequence[McItem],
                desc: str = "") -> McResult:
    """Accuracy of `scorer` on `items`."""
    if not items:
        raise McDataError(f"{task}: no items to score")
    hits = hits_norm = 0
    all_ll: list[tuple[float, ...]] = []
    for item in tqdm(items, desc=desc or task, unit="item", leave=False, disable=None):
        ctx: list[int] = []
        conts = []
        for e in item.endings:
            ctx, cont = split_ending(tokenize, item.context, e)
            conts.append(cont)
        ll = tuple(scorer.ending_logprobs(ctx, conts))
        raw, norm = choose(ll, item.endings)
        hits += raw == item.gold
        hits_norm += norm == item.gold
        all_ll.append(ll)
    n = len(items)
    return McResult(task, n, hits / n, hits_norm / n, tuple(all_ll))

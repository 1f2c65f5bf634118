"""The multi-domain corpus: train / calibration / evaluation parts of five domains, from the sources in data/.

Every domain is cut into three parts that share no text (see `splits`):
- train: for training fixture models (`corpus()` below; not written, derived on use);
- calibration: data/calib/<domain>.txt (for `compress --calib-text`, one domain), and the package's default
  calibration set src/moepack/data/calibration/: <domain>.txt, the head of every domain's calibration part, and
  chat.jsonl, conversations made from the dialogue part's next speeches (see `conversations`);
- evaluation: data/eval/<domain>.txt, never used to calibrate, select or train, and data/eval/dialogue-chat.jsonl,
  the conversations of data/eval/dialogue.txt.

`--stdlib [DIR]` copies the code domain anew from a CPython standard library into data/cpython-stdlib/ (three disjoint
module sets; the committed files are CPython 3.11.7's). Run `python scripts/build_data.py` after changing a source or
a split; its outputs are committed. Sources and licences: data/SOURCES.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
PACKAGE_CALIB = ROOT / "src" / "moepack" / "data" / "calibration"
DOMAINS = ("stories", "encyclopedic", "dialogue", "code", "web")

# Disjoint module sets of the code domain: no file is in two parts.
CALIB_MODULES = ("argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "heapq.py", "shlex.py", "csv.py",
                 "difflib.py", "fractions.py", "statistics.py", "pprint.py", "bisect.py", "string.py", "enum.py",
                 "fnmatch.py", "configparser.py", "calendar.py", "colorsys.py", "glob.py", "queue.py")
EVAL_MODULES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "shutil.py", "tempfile.py", "random.py",
                "base64.py", "gettext.py", "ipaddress.py", "pathlib.py", "zipfile.py")
# Everything else of the pure-Python standard library, but tests, tools and bundled third-party code.
SKIP_DIRS = ("test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "pydoc_data", "encodings", "ensurepip",
             "site-packages", "distutils", "lib-dynload", "__pycache__")
TRAIN_CODE_CHARS = 3_000_000
PER_DOMAIN_CHARS = 90_000  # of each domain in the package calibration set
CALIB_CHARS = 300_000  # of each domain's calibration file
EVAL_CHARS = 120_000  # of each domain's evaluation file
CHAT_CHARS = 60_000  # of speeches in a conversation file, at most (the calibration one gets what is left, ~21,000)
CHAT_TURNS = (4, 2, 6, 8)  # turns of the conversations, in turn: even, so that each ends on the assistant's turn


def _read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def _module(stdlib: Path, name: str) -> str:
    return f"# ===== Lib/{name} =====\n\n" + (stdlib / name).read_text(encoding="utf-8") + "\n\n"


def _train_modules(stdlib: Path) -> list[str]:
    taken = set(CALIB_MODULES) | set(EVAL_MODULES)
    names = sorted(p.relative_to(stdlib).as_posix() for p in stdlib.rglob("*.py")
                   if not set(p.relative_to(stdlib).parts[:-1]) & set(SKIP_DIRS) and not p.name.startswith("config"))
    return [n for n in names if n not in taken]


def copy_stdlib(stdlib: Path) -> None:
    out = DATA / "cpython-stdlib"
    out.mkdir(exist_ok=True)
    (out / "calib.txt").write_text("".join(_module(stdlib, n) for n in CALIB_MODULES), encoding="utf-8")
    (out / "eval.txt").write_text("".join(_module(stdlib, n) for n in EVAL_MODULES), encoding="utf-8")
    train, size = [], 0
    for n in _train_modules(stdlib):
        text = _module(stdlib, n)
        if size + len(text) > TRAIN_CODE_CHARS:
            continue
        train.append(text)
        size += len(text)
    (out / "train.txt").write_text("".join(train), encoding="utf-8")


def _wiki_articles(text: str) -> list[str]:
    """WikiText articles, each from its top-level heading line ` = Title = `; one paragraph a line, so blank lines
    are put between lines to make paragraphs as in the other domains."""
    arts: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = "):
            arts.append("")
        if arts:
            arts[-1] += line + "\n"
    return arts


def _cut(text: str, share: float) -> int:
    """An index near `share` of the text, at a paragraph end."""
    i = text.find("\n\n", int(len(text) * share))
    return len(text) if i < 0 else i + 2


def _three(text: str, a: float, b: float) -> tuple[str, str, str]:
    i, j = _cut(text, a), _cut(text, b)
    return text[:i], text[i:j], text[j:]


def splits() -> dict[str, tuple[str, str, str]]:
    """domain → (train, calibration, evaluation) text; no two parts of a domain overlap."""
    stories = _read("tinystories-train.txt")
    i = _cut(stories, 0.9)
    arts = _wiki_articles(_read("wikitext-2-raw-test.txt"))
    a, b = int(len(arts) * 0.6), int(len(arts) * 0.8)
    docs = _read("c4-validation-2k.txt").split("\n\n")
    return {
        "stories": (stories[:i], stories[i:], _read("tinystories-valid.txt")),
        "encyclopedic": ("".join(arts[:a]), "".join(arts[a:b]), "".join(arts[b:])),
        "dialogue": _three(_read("tinyshakespeare.txt"), 0.8, 0.9),
        "code": (_read("cpython-stdlib/train.txt"), _read("cpython-stdlib/calib.txt"), _read("cpython-stdlib/eval.txt")),
        "web": ("\n\n".join(docs[:1400]), "\n\n".join(docs[1400:1700]), "\n\n".join(docs[1700:])),
    }


def corpus(part: str) -> dict[str, str]:
    """domain → its `part` ("train", "calib" or "eval") text, for scripts that train or measure on the corpus."""
    k = ("train", "calib", "eval").index(part)
    return {d: s[k] for d, s in splits().items()}


def whole_paragraphs(text: str, limit: int) -> int:
    """Length of the longest head of `text` that is whole paragraphs and at most `limit` characters."""
    if len(text) <= limit:
        return len(text)
    i = text.rfind("\n\n", 0, limit - 1)
    return i + 2 if i > 0 else limit


def _speaker(speech: str) -> str:
    return speech.split(":\n", 1)[0]


def conversations(text: str, limit: int) -> list[dict[str, list[dict[str, str]]]]:
    """Tiny Shakespeare's speeches as chat conversations: consecutive speeches as alternating "user" / "assistant"
    turns, each turn one speech verbatim (its "NAME:" line first), CHAT_TURNS turns a conversation in turn, until
    `limit` characters of speech. The text has no scene headings: a speaker speaking twice in a row most often marks
    a scene change, so a conversation ends there (on an assistant turn: an odd last turn, or a lone one, is dropped).
    Speeches without words (a name alone) are skipped."""
    speeches = [p.strip("\n") for p in text.split("\n\n") if ":\n" in p.strip("\n")]
    turns = itertools.cycle(CHAT_TURNS)
    want, cur, out = next(turns), [], []
    for sp in speeches:
        if cur and _speaker(sp) == _speaker(cur[-1]):  # a new scene, most likely
            if len(cur) >= 2:
                out.append(cur[: len(cur) // 2 * 2])
                want = next(turns)
            cur = []
        cur.append(sp)
        if len(cur) == want:
            out.append(cur)
            want, cur = next(turns), []
        if sum(len(t) for c in out for t in c) >= limit:
            break
    else:  # the text ran out first: its last conversation may be short
        out += [cur[: len(cur) // 2 * 2]] if len(cur) >= 2 else []
    return [{"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(c)]}
            for c in out]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: _cut(text[: limit], 0.98)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", type=Path, nargs="?", const=Path(sysconfig.get_paths()["stdlib"]),
                    help="copy the code domain anew from this CPython standard library (default: this interpreter's)")
    args = ap.parse_args()
    if args.stdlib:
        copy_stdlib(args.stdlib)
    parts = splits()
    for sub in ("calib", "eval"):
        (DATA / sub).mkdir(exist_ok=True)
    for d, (_, calib, evals) in parts.items():
        (DATA / "calib" / f"{d}.txt").write_text(_head(calib, CALIB_CHARS), encoding="utf-8")
        if d != "stories":  # the stories domain's evaluation text is data/tinystories-valid.txt itself
            (DATA / "eval" / f"{d}.txt").write_text(_head(evals, EVAL_CHARS), encoding="utf-8")
    PACKAGE_CALIB.mkdir(exist_ok=True)
    for d, (_, calib, _) in parts.items():
        (PACKAGE_CALIB / f"{d}.txt").write_text(calib[: whole_paragraphs(calib, PER_DOMAIN_CHARS)], encoding="utf-8")
    dialogue = parts["dialogue"][1]  # the chat part: the dialogue calibration part after dialogue.txt's head
    write_jsonl(PACKAGE_CALIB / "chat.jsonl",
                conversations(dialogue[whole_paragraphs(dialogue, PER_DOMAIN_CHARS):], CHAT_CHARS))
    write_jsonl(DATA / "eval" / "dialogue-chat.jsonl",
                conversations((DATA / "eval" / "dialogue.txt").read_text(encoding="utf-8"), CHAT_CHARS))
    for d, s in parts.items():
        print(f"{d:<13} train {len(s[0]):>9,}  calib {len(s[1]):>9,}  eval {len(s[2]):>9,} characters")


if __name__ == "__main__":
    main()

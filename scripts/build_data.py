"""Build the bundled text sets from the source files in data/ (see data/SOURCES.md).

Writes, deterministically:
- data/cpython-stdlib/{calib,eval}.txt, only with `--stdlib DIR`: two disjoint sets of CPython standard-library
  modules (the code domain), copied from that standard library (CPython 3.11's in the committed files);
- data/eval/{encyclopedic,dialogue,code,web}.txt: evaluation text of each domain, never used to calibrate (the
  stories domain's is data/tinystories-valid.txt);
- src/moepack/data/calibration.txt: the package's default calibration text, paragraphs of five domains taken in
  turn (so that any prefix a calibration run reads holds every domain), none of it in data/eval/.

Run `python scripts/build_data.py` after changing a source or a split; the outputs are committed.
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
PACKAGE_CALIB = ROOT / "src" / "moepack" / "data" / "calibration.txt"

# Disjoint module sets: calibration code and evaluation code never share a file.
CALIB_MODULES = ("argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "heapq.py", "shlex.py", "csv.py",
                 "difflib.py", "fractions.py", "statistics.py", "pprint.py", "bisect.py", "string.py", "enum.py",
                 "fnmatch.py", "configparser.py", "calendar.py", "colorsys.py", "glob.py", "queue.py")
EVAL_MODULES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "shutil.py", "tempfile.py", "random.py",
                "base64.py", "gettext.py", "ipaddress.py", "pathlib.py", "zipfile.py")
PER_DOMAIN_CHARS = 90_000  # of each domain in the package calibration text
CHUNK_CHARS = 1_500  # a domain's turn in the interleaving
EVAL_CHARS = 120_000  # of each domain's evaluation text


def _read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def _copy_modules(stdlib: Path, names: tuple[str, ...]) -> str:
    return "".join(f"# ===== Lib/{n} =====\n\n" + (stdlib / n).read_text(encoding="utf-8") + "\n\n" for n in names)


def _wiki_articles(text: str) -> list[str]:
    """WikiText articles: each starts at a top-level heading line ` = Title = `."""
    arts: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = "):
            arts.append("")
        if arts:
            arts[-1] += line
    return arts


def _pieces(text: str, limit: int) -> list[str]:
    """Blank-line separated paragraphs grouped into pieces of about CHUNK_CHARS, up to `limit` characters in all."""
    lines = [ln for para in text.split("\n\n") if para.strip()
             for ln in (para.splitlines() + [""])]  # "" marks a paragraph end
    out: list[str] = [""]
    total = 0
    for ln in lines:
        if len(out[-1]) >= CHUNK_CHARS and ln == "":
            out.append("")
            continue
        out[-1] += ln + "\n"
        total += len(ln) + 1
        if total >= limit:
            break
    return [p.strip("\n") for p in out if p.strip()]


def splits() -> tuple[dict[str, str], dict[str, str]]:
    """(calibration source, evaluation text) per domain; the two never overlap."""
    stories_train = _read("tinystories-train.txt")
    arts = _wiki_articles(_read("wikitext-2-raw-test.txt"))
    half = len(arts) // 2
    shakespeare = _read("tinyshakespeare.txt")
    cut = int(len(shakespeare) * 0.9)
    cut = shakespeare.index("\n\n", cut) + 2  # at a speech boundary
    docs = _read("c4-validation-2k.txt").split("\n\n")
    # WikiText holds one paragraph a line: blank lines between them make paragraphs as in the other domains.
    calib = {"stories": stories_train, "encyclopedic": "".join(arts[:half]).replace("\n", "\n\n"), "dialogue": shakespeare[:cut],
             "code": _read("cpython-stdlib/calib.txt"), "web": "\n\n".join(docs[: len(docs) // 2])}
    evals = {"encyclopedic": "".join(arts[half:]), "dialogue": shakespeare[cut:],
             "code": _read("cpython-stdlib/eval.txt"), "web": "\n\n".join(docs[len(docs) // 2:])}
    return calib, evals


def interleave(domains: dict[str, str]) -> str:
    pieces = {d: _pieces(t, PER_DOMAIN_CHARS) for d, t in domains.items()}
    out: list[str] = []
    for i in range(max(len(p) for p in pieces.values())):
        out.extend(p[i] for p in pieces.values() if i < len(p))
    return "\n\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", type=Path, nargs="?", const=Path(sysconfig.get_paths()["stdlib"]),
                    help="copy the code domain anew from this CPython standard library (default: this interpreter's)")
    args = ap.parse_args()
    if args.stdlib:
        (DATA / "cpython-stdlib").mkdir(exist_ok=True)
        for part, names in (("calib", CALIB_MODULES), ("eval", EVAL_MODULES)):
            (DATA / "cpython-stdlib" / f"{part}.txt").write_text(_copy_modules(args.stdlib, names), encoding="utf-8")
    calib, evals = splits()
    (DATA / "eval").mkdir(exist_ok=True)
    for d, t in evals.items():
        (DATA / "eval" / f"{d}.txt").write_text(t[:EVAL_CHARS], encoding="utf-8")
    PACKAGE_CALIB.parent.mkdir(exist_ok=True)
    PACKAGE_CALIB.write_text(interleave(calib), encoding="utf-8")
    for p in sorted([*(DATA / "eval").iterdir(), PACKAGE_CALIB]):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

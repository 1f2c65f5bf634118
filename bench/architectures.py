"""docs/architectures.md: one row per MoE family moepack knows of, regenerated from the code and the tests.

Per family: its Hugging Face model_type, llama.cpp's architecture name (from moepack's table when the family is
supported, else gguf-py's name for it), which of the issue's checks pass in the tests (from a JUnit report of the
families' tests), and, per config in data/configs/, `moepack inspect`'s config-only total and active parameters
beside the vendor's published figures (common.within: the reading tests/test_published_configs.py checks) and what
fits 64 GB, 128 GB and a 24 GB GPU + 128 GB RAM at 32k context.

Run from the repository root (the tests take several minutes; --junit reuses a report of an earlier run, e.g.
`pytest --junitxml=out/junit.xml`):
    .venv/bin/python bench/architectures.py [--junit out/junit.xml] [--md docs/architectures.md]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

import gguf

from common import CONFIGS, PUBLISHED, ROOT, model_type, within

# model_type → gguf-py's MODEL_ARCH member: llama.cpp's name for a family moepack does not support yet.
FAMILIES = {
    "qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "deepseek_v3": "DEEPSEEK2", "deepseek_v2": "DEEPSEEK2",
    "mixtral": "LLAMA", "olmoe": "OLMOE", "glm4_moe": "GLM4_MOE", "gpt_oss": "GPT_OSS", "minimax_m2": "MINIMAXM2",
    "qwen3_next": "QWEN3NEXT", "qwen3_5_moe": "QWEN35MOE", "kimi_k2": "DEEPSEEK2", "ernie4_5_moe": "ERNIE4_5_MOE",
    "hunyuan_v1_moe": "HUNYUAN_MOE", "dots1": "DOTS1", "llama4": "LLAMA4", "glm_moe_dsa": "GLM_DSA",
}
# Words in test names that stand for a family when the test is not parametrized by model_type.
KEYWORDS = {"glm5": "glm_moe_dsa", "glm_moe_dsa": "glm_moe_dsa", "gpt_oss": "gpt_oss", "glm": "glm4_moe", "kimi": "kimi_k2", "minimax": "minimax_m2", "hunyuan":
            "hunyuan_v1_moe", "dots1": "dots1", "ernie": "ernie4_5_moe", "llama4": "llama4", "qwen_next":
            "qwen3_next", "qwen3_next": "qwen3_next", "qwen3_5": "qwen3_5_moe"}
# The checks, recognised by words in the test name.
CHECKS = {"F32 logits = transformers": ("logits",), "compress → llama.cpp": ("compress",),
          "pruned → transformers": ("pruned",), "tokenizer = HF": ("tokeniz", "vocab"), "inspect": ("inspect",),
          "published counts": ("published",)}
TEST_ARGS = ["tests/test_gguf_out.py::test_f32_logits_match_transformers",
             "tests/test_gguf_out.py::test_vocab_tokenizes_like_hf", "tests/test_inspect.py::test_inspect_every_arch", "tests/test_published_configs.py",
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_families_*.py"))]
BUDGETS = {"64 GB": ["--memory", "64GB"], "128 GB": ["--memory", "128GB"],
           "24 GB GPU + 128 GB": ["--gpu-memory", "24GB", "--memory", "128GB"]}
CTX = ["-c", "32768"]


def llama_cpp_name(arch: str) -> tuple[str, bool]:
    """(llama.cpp's architecture name, whether moepack supports the family)."""
    from moepack.model.arch import UnsupportedArchitecture, spec_for

    try:
        return spec_for(arch).gguf_arch, True
    except UnsupportedArchitecture:
        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[FAMILIES[arch]]], False


def run_tests(junit: Path) -> None:
    junit.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    *TEST_ARGS], cwd=ROOT, check=False)


def _family_of(classname: str, name: str, config_types: dict[str, str]) -> str | None:
    param = name.partition("[")[2].rstrip("]")
    if param in FAMILIES:
        return param
    if param in config_types:
        return config_types[param]
    text = f"{classname}.{name}".lower()
    return next((fam for word, fam in KEYWORDS.items() if word in text), None)


def report_files(junit: Path) -> list[str]:
    """The test modules a JUnit report covers (a check no module of them runs shows as –)."""
    return sorted({c.get("classname", "").rsplit(".", 1)[-1] for c in ET.parse(junit).iter("testcase")})


def check_results(junit: Path) -> dict[str, dict[str, str]]:
    """family → check → 'pass' | 'FAIL' | 'skip' from a JUnit report."""
    config_types = {p["config"]: model_type(p["config"]) for p in PUBLISHED}
    seen: dict[tuple[str, str], list[str]] = defaultdict(list)
    for case in ET.parse(junit).iter("testcase"):
        fam = _family_of(case.get("classname", ""), case.get("name", ""), config_types)
        if fam is None:
            continue
        outcome = ("FAIL" if case.find("failure") is not None or case.find("error") is not None
                   else "skip" if case.find("skipped") is not None else "pass")
        for check, words in CHECKS.items():
            if any(w in case.get("name", "").lower() for w in words):
                seen[(fam, check)].append(outcome)
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for (fam, check), outcomes in seen.items():
        out[fam][check] = "FAIL" if "FAIL" in outcomes else "pass" if "pass" in outcomes else "skip"
    return out


def _inspect(config: str, *flags: str) -> dict[str, Any]:
    """inspect's JSON; {"error": first line} when inspect refuses the budget itself (nothing left on one side)."""
    from moepack.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["inspect", str(CONFIGS / config), *flags, "--json"])
    if rc != 0:
        return {"error": err.getvalue().strip().splitlines()[0].removeprefix("moepack inspect: error: ")}
    return json.loads(out.getvalue())


def _fit_text(d: dict[str, Any]) -> str:
    if "error" in d:
        return f"no ({d['error'].rstrip(':')})"
    fit = d["fit"]
    v = fit["verdict"]
    if not v["fits"]:
        return "no"
    keep = "unpruned" if v["keep"] == fit["retentions"][0]["keep"] else f"keep {v['keep']:g}"
    return f"{keep}: {v['best_type']}" + (f" ({v['best_mixture']})" if v.get("best_mixture") else "")


def config_rows() -> list[dict[str, Any]]:
    from moepack.model.arch import UnsupportedArchitecture, spec_for

    rows = []
    for pub in PUBLISHED:
        arch, row = model_type(pub["config"]), dict(pub)
        row["arch"] = arch
        try:
            spec_for(arch)
        except UnsupportedArchitecture:
            rows.append(row)
            continue
        d = _inspect(pub["config"])
        active = d["params_active" if pub["active_counts"] == "all" else "params_active_without_embedding"]
        row |= {"ours_total": d["params_total"], "ours_active": active,
                "ok": within(d["params_total"], pub["total"], pub.get("total_reading", "rounded"))
                and within(active, pub["active"], pub.get("active_reading", "rounded")),
                "fit": {b: _fit_text(_inspect(pub["config"], *flags, *CTX)) for b, flags in BUDGETS.items()}}
        rows.append(row)
    return rows


def _b(n: int) -> str:
    return f"{n / 1e12:.3f}T" if n >= 1e12 else f"{n / 1e9:.2f}B"


def render(checks: dict[str, dict[str, str]], rows: list[dict[str, Any]], command: str, files: list[str]) -> str:
    lines = ["# Architectures", "",
             "Every MoE family moepack reads or is meant to read (issue 27), with llama.cpp's name for it, the checks",
             "that pass in the tests, and config-only parameter counts against the vendors' figures. Generated by",
             f"`{command}`; do not edit by hand. Checks: pass / FAIL / skip in a test run of "
             + ", ".join(f"`{f}`" for f in files) + "; – where none of them checks it.", "",
             "| family (HF model_type) | llama.cpp arch | supported | " + " | ".join(CHECKS) + " |",
             "|---|---|---|" + "---|" * len(CHECKS)]
    for arch in FAMILIES:
        name, ok = llama_cpp_name(arch)
        marks = [checks.get(arch, {}).get(c, "–") for c in CHECKS]
        lines.append(f"| `{arch}` | `{name}` | {'yes' if ok else 'not yet'} | " + " | ".join(marks) + " |")
    lines += ["", "## Config-only counts vs published", "",
              "`moepack inspect data/configs/<config>` from config.json alone. *Active* is counted as the",
              "vendor counts it: *all* is every tensor a token touches including the input embedding",
              "(`params_active`), *w/o emb.* leaves out the input embedding, a lookup",
              "(`params_active_without_embedding`). A figure covers what its rounding covers (a model name's",
              "A3B truncates), ±2 % (published totals count vision encoders and MTP layers that the served text",
              "model lacks). Fit: what `inspect --memory ... -c 32768` finds (compress's retentions; largest",
              "uniform type, in brackets the largest llama.cpp mixture).",
              "",
              "| config | model_type | published total / active | counted | inspect total / active | match | "
              + " | ".join(f"fits {b}" for b in BUDGETS) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(BUDGETS)]
    for r in rows:
        pub = f"{r['total']} / {r['active']}"
        counted = "all" if r["active_counts"] == "all" else "w/o emb."
        if "ours_total" not in r:
            lines.append(f"| {r['config']} | `{r['arch']}` | {pub} | {counted} | family not supported yet | – | "
                         + " | ".join("–" for _ in BUDGETS) + " |")
            continue
        lines.append(f"| {r['config']} | `{r['arch']}` | {pub} | {counted} | {_b(r['ours_total'])} / "
                     f"{_b(r['ours_active'])} | {'yes' if r['ok'] else 'NO'} | "
                     + " | ".join(r["fit"][b] for b in BUDGETS) + " |")
    missing = sorted(set(FAMILIES) - {r["arch"] for r in rows})
    lines += ["", "No config in data/configs/ for: " + ", ".join(f"`{a}`" for a in missing) + ".", "",
              "How each vendor counts, and where the figures and configs are from: `data/configs/published.json`,",
              "`data/SOURCES.md`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--junit", type=Path, help="a JUnit report of the tests (default: run them into out/)")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "architectures.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    command = "python bench/architectures.py" + (f" --junit {args.junit}" if args.junit else "")
    junit = args.junit or ROOT / "out" / "architectures-junit.xml"
    if args.junit is None:
        run_tests(junit)
    text = render(check_results(junit), config_rows(), command, report_files(junit))
    args.md.write_text(text)
    print(text)
    print(f"wrote {args.md}; regenerate with: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model card of a compress run: a README.md with the YAML front matter model hubs read (base_model, tags,
quantized_by, license, library_name, pipeline_tag), then the base model, the quantization recipe, file size and
bits per weight, the eval table, the llama.cpp command and charts (PNG files beside it, linked relatively).

Every number comes from the run's files: summary.json, the GGUF's moepack.* metadata (the recipe), the prune and
quant plans, an eval JSON, the source model's config.json and README.md. Everything is checked before anything is
written; the charts go first and the card last, each atomically.
"""
from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

from moepack.atomic import atomic_copy, atomic_write_text
from moepack.eval.report import (ReportError, RunArtifacts, eval_report, experts_chart, find_artifacts, load_eval,
                                 domain_rows, pareto_chart, pareto_points, result_tokens, speed_text, types_chart)
from moepack.gguf.keys import Keys
from moepack.gguf.metadata import QUANTIZED_BY
from moepack.schema import CalibManifest, RunSummary, SchemaError
from moepack.schema.run import RunLayout

__all__ = ["build_card", "card_path", "front_matter", "base_model_id", "source_license", "license_fields",
           "find_eval", "CARD_TAGS", "LICENSE_PLACEHOLDER"]

log = logging.getLogger(__name__)

CARD_TAGS = ("gguf", "moe", "moepack")
_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")  # the Hugging Face cache layout
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------------------------------------------- inputs

def _gguf_of(run_dir: Path, summary: RunSummary) -> Path:
    """The GGUF the card describes: compress's output, else the run's staged copy (the same bytes)."""
    out = Path(summary.out or "")
    for p in (out, run_dir / "model.gguf"):
        if str(p) and p.is_file() and p.stat().st_size == summary.file_bytes:
            return p
    raise ReportError(f"{run_dir}: neither {out} nor {run_dir / 'model.gguf'} is the {summary.file_bytes}-byte "
                      "GGUF summary.json describes; rerun `moepack compress` with this run directory")


def find_eval(run_dir: Path, gguf_path: Path) -> dict[str, Any] | None:
    """An eval report (`moepack eval --json-out`) that scored this GGUF: in the run directory (where compress's
    docs put it) or beside the GGUF (where the demo writes eval.json); else any eval report in the run directory."""
    reports = []
    for folder in dict.fromkeys((run_dir, gguf_path.parent)):
        reports += [(folder, d) for p in sorted(folder.glob("*.json")) if (d := load_eval(p)) is not None]
    mine = [d for _, d in reports if any(Path(str(m.get("file", ""))).name == gguf_path.name for m in d["models"])]
    return (mine or [d for f, d in reports if f == run_dir] or [None])[0]


def _gguf_meta(path: Path) -> dict[str, Any]:
    import gguf

    fields = gguf.GGUFReader(path).fields
    get = {k: fields[k].contents() for k in ("general.quantized_by", Keys.VERSION, Keys.RECIPE,
                                                  "general.architecture") if k in fields}
    get["recipe"] = json.loads(get.pop(Keys.RECIPE)) if Keys.RECIPE in get else None
    return get


def _manifest(run_dir: Path) -> CalibManifest | None:
    """The run's calibration manifest; None where it has none, or one this moepack cannot read (the card then says
    less about the calibration, rather than nothing at all)."""
    calib = RunLayout(run_dir).calib
    if not (calib / "manifest.json").is_file():
        return None
    try:
        return CalibManifest.read(calib)
    except SchemaError as e:
        log.warning("the model card leaves the calibration out: %s", e)
        return None


def _source_dir(a: RunArtifacts, manifest: CalibManifest | None) -> Path | None:
    """The checkpoint the run compressed, as calibration (or else pruning) recorded it."""
    model = manifest.model if manifest is not None else None
    if model is None and a.prune_plan is not None:
        model = a.prune_plan.model
    return Path(model) if model else None


def base_model_id(source: Path | None) -> str | None:
    """The Hugging Face repo id of the source: from a hub cache snapshot path, else config.json's _name_or_path."""
    if source is None:
        return None
    if m := _SNAPSHOT.search(source.as_posix()):
        return f"{m.group(1)}/{m.group(2)}"
    cfg = source / "config.json"
    name = json.loads(cfg.read_text()).get("_name_or_path") if cfg.is_file() else None
    return name if isinstance(name, str) and _REPO_ID.fullmatch(name) and not Path(name).exists() else None


def _card_fields(source: Path) -> dict[str, str]:
    """The scalar keys of the source model card's YAML front matter (README.md), as written."""
    card = source / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    out: dict[str, str] = {}
    if text.startswith("---\n") and (end := text.find("\n---", 4)) > 0:
        for line in text[4:end].splitlines():
            key, _, value = line.partition(":")
            if value.strip() and not line.startswith((" ", "-")):
                out[key.strip()] = value.strip().strip("'\"")
    return out


def _license_found(source: Path | None) -> dict[str, str]:
    """license, license_name and license_link as the source's card front matter (or config.json's "license") says."""
    fields = _card_fields(source) if source is not None else {}
    out = {k: fields[k] for k in ("license", "license_name", "license_link") if fields.get(k)}
    cfg = source / "config.json" if source is not None else None
    if "license" not in out and cfg is not None and cfg.is_file():
        lic = json.loads(cfg.read_text()).get("license")
        if isinstance(lic, str) and lic:
            out["license"] = lic
    return out


def source_license(source: Path | None) -> str | None:
    """`license:` of the source model's card front matter (or config.json's "license"), if either says."""
    return _license_found(source).get("license")


LICENSE_PLACEHOLDER = "FILL IN: the source model's licence (see its model card) before uploading"


def license_fields(source: Path | None) -> dict[str, str]:
    """The card's license keys: the source's; a licence "other" without a name or link, or none at all, gets the
    placeholder name LICENSE_PLACEHOLDER, which the user must replace."""
    out = _license_found(source)
    if "license" not in out:
        return {"license": "other", "license_name": LICENSE_PLACEHOLDER}
    if out["license"] == "other" and not out.get("license_name") and not out.get("license_link"):
        out["license_name"] = LICENSE_PLACEHOLDER
    return out


# ---------------------------------------------------------------------------------------------------- text

def front_matter(fields: dict[str, Any]) -> str:
    """YAML front matter: scalars as JSON strings (valid YAML), lists as block sequences; None values left out."""
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines += [f"{key}:"] + [f"- {json.dumps(str(v))}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value if isinstance(value, (int, float)) else str(value))}")
    return "\n".join(lines + ["---", ""])


def _types_rows(types: dict[str, dict[str, int]]) -> list[str]:
    out = ["| tensor class | GGML types (tensors) |", "|---|---|"]
    for cls, counts in sorted(types.items()):
        out.append(f"| `{cls}` | " + ", ".join(f"{t} × {n}" for t, n in sorted(counts.items())) + " |")
    return out


def _size_flag(n: Any) -> str:
    """A byte count as a size flag takes it (a unit is required): GB or GiB when exact, else B."""
    n = int(n or 0)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("GiB", 2**30), ("MB", 10**6), ("MiB", 2**20)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _budget_line(b: dict[str, Any]) -> str:
    src = b.get("from", b.get("source"))
    size = _size_flag
    if src == "memory" and b.get("gpu_weights") is not None:  # GPU + RAM: two budgets (stages.placement)
        how = (f"`--gpu-memory {size(b.get('gpu_memory'))} --memory {size(b.get('memory'))} "
               f"--ctx-size {b.get('ctx')}`: "
               f"{b['gpu_weights']:,} bytes of GPU-resident tensors, the rest in system RAM")
    elif src == "memory":
        how = f"`--memory {size(b.get('memory'))} --ctx-size {b.get('ctx')}`"
    elif src == "target_bpw":
        how = f"`--target-bpw {b.get('bpw')}` over {b.get('n_params'):,} parameters"
    else:
        how = f"`--target-size {size(b.get('target'))}`"
    limit = b.get("file_limit", b.get("weights", 0) + b.get("overhead", 0))
    return f"{limit:,} bytes of GGUF file ({how})"


def _recipe_rows(recipe: dict[str, Any], summary: RunSummary) -> list[str]:
    e = recipe.get("experts") or {"kept": summary.n_experts[0], "of": summary.n_experts[1]}
    rows = ["| | |", "|---|---|",
            f"| routed experts kept per MoE layer | {e['kept']} of {e['of']} (keep {recipe.get('keep', summary.keep):g})"
            + (f", in {e['layers']} MoE layers" if e.get("layers") else "") + " |",
            f"| experts used per token (k') | {recipe.get('top_k', summary.top_k)} |"]
    if budget := recipe.get("budget") or summary.budget:
        rows.append(f"| budget | {_budget_line(budget)} |")
    if recipe.get("solver"):
        rows.append(f"| allocation | `{recipe['solver']}`, on measured per-tensor KLD sensitivity |")
    return rows


def _command(summary: RunSummary, gguf_path: Path) -> str:
    """The run's llama.cpp command, with the file named as it is shared (beside this card)."""
    if not summary.llama_command:
        from moepack.gguf.runtime import llama_command

        ctx = (summary.budget or {}).get("ctx") or 4096  # a size budget names none: llama.cpp's default
        return llama_command(gguf_path.name, ctx)
    return summary.llama_command.replace(shlex.quote(str(summary.out)), shlex.quote(gguf_path.name))


def _calibration_rows(manifest: CalibManifest | None) -> list[str]:
    """Which text decided the experts removed and the bits per tensor, and its domains."""
    if manifest is None:
        return ["No calibration manifest in the run directory.", ""]
    from moepack.model.textdata import BUNDLED_CALIB_DIR

    inputs = manifest.inputs
    domains = (inputs.domains or []) if inputs is not None else []
    if domains:
        bundled = all(Path(str(d["path"])).parent.name == BUNDLED_CALIB_DIR.name for d in domains)
        files = ", ".join(f"`{Path(str(d['path'])).name}`" for d in domains)
        names = ", ".join(f"{d['name']}{' (conversations)' if d.get('chat') else ''}" for d in domains)
        rows = [f"| calibration text | {'moepack' + chr(39) + 's bundled set: ' if bundled else ''}{files} |",
                f"| domains | {names}: every choice had to hold on each one |"]
    else:
        text = Path(str(manifest.text or ""))
        sha = str(manifest.text_sha256 or "")[:16]
        rows = [f"| calibration text | `{text.name}` (sha256 {sha}…) |",
                f"| domain | {text.stem} (from the file name) |"]
    report = inputs.report_requested if inputs is not None else 0
    return ["The calibration text decided which experts were removed and where the bits went:", "",
            "| | |", "|---|---|", *rows,
            f"| tokens | {manifest.tokens:,} for the statistics, {manifest.selection_tokens:,} "
            f"selection tokens every choice was measured on, {report:,} report tokens no choice saw |", ""]


def _run_rows(summary: RunSummary, gguf_path: Path, runtime: str | None) -> list[str]:
    """llama-cli, llama-server and ollama, as compress verified the file; and the build it was verified with."""
    server = _command(summary, gguf_path)
    cli = server.replace("llama-server", "llama-cli", 1) + ' -p "Once upon a time"'
    ctx = m.group(1) if (m := re.search(r" -c (\d+)", server)) else 4096  # the context compress verified
    name = gguf_path.stem.lower().replace("_", "-")
    built = (f"Verified by `moepack compress` with {runtime}; older llama.cpp builds may not know this "
             "architecture." if runtime else "The llama.cpp build it was verified with was not recorded (a run from "
             "an older moepack).")
    return ["```sh", cli, f"{server} --port 8080", "```", "",
            "With ollama (a Modelfile naming the file; ollama has no `--no-repack` or `-ot`, so on CPUs with AMX a "
            "DeepSeek-style file may abort there, see llama.cpp's `--no-repack`):", "",
            "```sh", f"printf 'FROM ./{gguf_path.name}\\nPARAMETER num_ctx {ctx}\\n' > Modelfile",
            f"ollama create {name} -f Modelfile && ollama run {name}", "```", "", built, ""]


def _charts(a: RunArtifacts, s: RunSummary, out: Path, pareto: Path | None) -> list[tuple[str, str, Any]]:
    """(title, file name, how to write it) of each chart the run's files allow."""
    stem, charts = out.stem, []
    if (prune_plan := a.prune_plan) is not None:
        charts.append(("Experts kept per MoE layer (pruning importance; kept outlined, removed crossed)",
                       f"{stem}-experts.png", lambda p: experts_chart(prune_plan, p)))
    if (quant_plan := a.quant_plan) is not None:
        charts.append(("GGML type per tensor (bits per weight)", f"{stem}-types.png",
                       lambda p: types_chart(quant_plan, p)))
    if pareto is not None:
        charts.append(("Size vs KLD", f"{stem}-pareto.png",
                       lambda p: None if pareto.resolve() == p.resolve() else atomic_copy(pareto, p)))
    else:
        sizes, points = pareto_points(s.candidates, a.eval)
        if points:
            what = "eval report's files" if sizes == "file" else "retentions compress measured"
            charts.append((f"Size vs KLD (the {what})", f"{stem}-pareto.png",
                           lambda p: pareto_chart(points, sizes, p)))
    return charts


def _head(s: RunSummary, gguf_path: Path, meta: dict[str, Any], base: str | None, source: Path | None) -> list[str]:
    """The title, the base model and the recipe."""
    name = base or (source.name if source is not None else "the source model")
    version = f"moepack {meta[Keys.VERSION]}" if Keys.VERSION in meta else "moepack"
    link = f"[{base}](https://huggingface.co/{base})" if base else f"`{name}`"
    return [f"# {name.split('/')[-1]}: moepack GGUF", "",
            f"`{gguf_path.name}` is {link} with routed experts pruned and weights quantized by {version} "
            "to fit a byte budget, for llama.cpp.", "",
            "## Base model", "",
            f"- `{base}`" if base else f"- `{name}`: no Hugging Face repo id recorded (the source directory is not a "
            "hub cache snapshot and its config.json names none); add `base_model: ORG/NAME` above before uploading",
            f"- architecture: `{meta.get('general.architecture', '?')}` (llama.cpp)", "",
            "## Quantization recipe", "", *_recipe_rows(meta.get("recipe") or {}, s), ""]


def _body(a: RunArtifacts, s: RunSummary, manifest: CalibManifest | None, gguf_path: Path, meta: dict[str, Any],
          charts: list[tuple[str, str, Any]]) -> list[str]:
    """Everything after the title and the recipe: types, file, calibration, evaluation, commands, charts."""
    types = (meta.get("recipe") or {}).get("types") or {c: n for c, n in s.types.items() if set(n) != {"F32"}}
    size = gguf_path.stat().st_size
    lines = ["Types per tensor class (as written; norms, routers and biases stay F32):", "", *_types_rows(types), "",
             "## File", "", "| | |", "|---|---|", f"| file | `{gguf_path.name}` |",
             f"| size | {size:,} bytes ({size / 2**20:.2f} MiB) |",
             f"| bits per weight | {s.bpw:.3f} (file bits over the original model's parameters) |", ""]
    if sp := speed_text(s):
        lines[-1:-1] = [f"| speed | {sp} |"]
    lines += ["## Calibration", "", *_calibration_rows(manifest), "## Evaluation", "",
              f"Mean KLD vs the original on {result_tokens(s)}, as compress measured the chosen plan "
              f"(fake-quantized forward): {s.result_kld:.5f}.", ""]
    if s.domains:
        lines += ["Per calibration domain (mean KLD ± 95 % CI; the plan had to be no worse than the best llama.cpp "
                  "mixture on each domain of the selection tokens):", "", *domain_rows(s), ""]
    if a.eval:
        from moepack.eval.evaluate import to_markdown

        lines += [to_markdown(a.eval), ""]
    else:
        lines += ["No eval report in the run directory or beside the GGUF (`moepack eval ... --json-out "
                  "RUN_DIR/eval.json` adds one).", ""]
    lines += ["## Run it", "", *_run_rows(s, gguf_path, s.runtime)]
    for title, file, _ in charts:
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return lines


def _finished(run_dir: Path) -> tuple[RunArtifacts, RunSummary]:
    a = find_artifacts(run_dir)
    if a.summary is None:
        raise ReportError(f"{run_dir}: no summary.json; a model card needs a finished `moepack compress` run")
    return a, a.summary


def card_path(run_dir: str | Path) -> Path:
    """README.md beside the run's GGUF: where a model hub upload takes it from."""
    run_dir = Path(run_dir)
    return _gguf_of(run_dir, _finished(run_dir)[1]).with_name("README.md")


def build_card(run_dir: str | Path, out: str | Path, pareto: str | Path | None = None,
               eval_json: str | Path | None = None) -> Path:
    """Write the model card `out` (e.g. beside the GGUF: DIR/README.md) and its charts; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    a, s = _finished(run_dir)
    if eval_json is not None:
        a.eval = eval_report(eval_json)
    if pareto is not None and not Path(pareto).is_file():
        raise ReportError(f"{pareto}: no such Pareto plot")
    gguf_path = _gguf_of(run_dir, s)
    if eval_json is None:
        a.eval = find_eval(run_dir, gguf_path)
    manifest = _manifest(run_dir)
    meta, source = _gguf_meta(gguf_path), _source_dir(a, manifest)
    base = base_model_id(source)
    charts = _charts(a, s, out, None if pareto is None else Path(pareto))
    tags = [*CARD_TAGS, meta.get("general.architecture")]
    lic = license_fields(source)
    head = front_matter({"base_model": base, "base_model_relation": "quantized" if base else None,
                         "license": lic["license"], "license_name": lic.get("license_name"),
                         "license_link": lic.get("license_link"), "library_name": "gguf",
                         "pipeline_tag": "text-generation",
                         "quantized_by": meta.get("general.quantized_by", QUANTIZED_BY),
                         "tags": [t for t in tags if t]})
    body = _head(s, gguf_path, meta, base, source) + _body(a, s, manifest, gguf_path, meta, charts)
    text = head + "\n".join(body)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _, file, write in charts:
        write(out.with_name(file))
    atomic_write_text(out, text)
    log.info("wrote the model card %s (%d charts)", out, len(charts))
    return out

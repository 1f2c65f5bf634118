"""What the benchmark scripts share: paths, budgets and the ladder, llama.cpp's size points, the hand rules and the
verdict of the claim, the evaluator, the commit a result was measured at, result files and page sections, the
published parameter counts, and a synthetic DeepSeek-V3-shaped checkpoint.

A library, not a script: the scripts import it as `common` (Python puts a script's own folder first on sys.path),
tests load it through tests/conftest.py. It imports no script and no test (tests/test_claim_bench.py checks).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = ["ROOT", "DATA", "EVAL_TEXT", "DOMAINS", "eval_text", "CALIB_TEXT", "GOAL", "HAND_STEPS", "DEFAULT_MODELS", "PAPER_PRUNE", "FTYPES",
           "SENS_LADDER", "EVAL_KEYS", "CONFIGS", "PUBLISHED", "SLACK", "V3_CONFIG", "file_limit", "ladder", "up",
           "size_points", "unsloth_plan", "authors_plan", "plan_bytes", "verdict", "verdict_cell", "Evaluator",
           "code_commit", "calib_tag", "rel", "portable", "write_json", "write_section", "cells", "commits_line",
           "settings", "reproduce", "default_paths", "published_range", "within", "model_type", "v3_config",
           "disk_shapes", "SyntheticView", "v3_layer_checkpoint"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
EVAL_TEXT = DATA / "tinystories-valid.txt"
DOMAINS = ("stories", "encyclopedic", "dialogue", "code", "web")  # the bundled text's parts, each with eval text


def eval_text(domain: str) -> Path:
    """A domain's evaluation text, never calibrated on (data/SOURCES.md)."""
    return EVAL_TEXT if domain == "stories" else DATA / "eval" / f"{domain}.txt"


# The calibration (and importance matrix) text of the claim by default: the fixtures' own domain, held out from
# EVAL_TEXT (the fixtures were trained on it, which calibration may be; data/SOURCES.md). `--calib-text bundled`:
# compress's own default, the bundled multi-domain text.
CALIB_TEXT = DATA / "calib" / "stories.txt"
GOAL = 0.25  # the KLD reduction the claim asks for
HAND_STEPS = 3  # Unsloth-style rule: non-expert tensors this many ladder steps above the routed experts
DEFAULT_MODELS = ("models/tiny-deepseek-v3", "models/tiny-qwen3-moe")
PAPER_PRUNE = {"keep": 0.75, "criterion": "score", "alpha": 0.5}
# The mixtures and sensitivity ladder of bench/domain.py's comparison; the ladder of bench/sensitivity.py.
FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ1_M")
SENS_LADDER = ("IQ1_S", "IQ2_XXS", "IQ2_S", "IQ3_S", "Q4_K", "Q6_K")
EVAL_KEYS = ("size_bytes", "tensor_bytes", "bpw", "ppl", "kld_mean", "kld_ci95_low", "kld_ci95_high", "kld_median",
             "kld_p99", "kld_p999", "top1", "top1_ci95_low", "top1_ci95_high", "dp_rms", "dp_rms_ci95_low",
             "dp_rms_ci95_high", "ppl_ratio", "ppl_ratio_ci95_low", "ppl_ratio_ci95_high", "eval_seconds")


# ---- budgets, the ladder, llama.cpp's size points ----------------------------------------------------------------
def file_limit(model: Path, bpw: float) -> int:
    """The file bytes compress allows `model` at `bpw` (budget_for's limit)."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.budget import BudgetRequest, budget_for

    return int(budget_for(BudgetRequest(target_bpw=bpw), open_checkpoint(model)).file_limit)


def ladder() -> tuple[str, ...]:
    from moepack.gguf.types import LADDER

    return LADDER


def up(t: str, n: int) -> str:
    """The ladder type `n` steps above `t` (the top one at most)."""
    lad = ladder()
    return lad[min(lad.index(t) + n, len(lad) - 1)]


def size_points(model: Path) -> list[str]:
    """llama.cpp's mixtures predicted between IQ1_S and Q4_K_M in size for `model`, smallest first."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.mixtures import mixture_sizes

    sizes = {f: s.total for f, s in mixture_sizes(open_checkpoint(model)).items()}
    lo, hi = sizes["IQ1_S"], sizes["Q4_K_M"]
    return sorted((f for f, s in sizes.items() if lo <= s <= hi), key=lambda f: (sizes[f], f))


# ---- the claim's hand rules and verdict (bench/claim.py) -----------------------------------------------------------
def unsloth_plan(view: Any, base: str) -> dict[str, str]:
    """Unsloth-style dynamic mixture: ffn_gate/up_exps at `base`, ffn_down_exps and token_embd one step up; attention,
    shared experts, dense FFN and output HAND_STEPS steps up."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.arch import Role

    plan = {}
    for o in (o for o in gguf_outputs(view) if o.quantizable):
        if o.role is Role.ROUTED_EXPERTS:
            plan[o.name] = up(base, "ffn_down" in o.name)
        elif o.role is Role.EMBEDDING:
            plan[o.name] = up(base, 1)
        else:
            plan[o.name] = up(base, HAND_STEPS)
    return plan


def authors_plan(view: Any, base: str) -> dict[str, str]:
    """Chen et al.'s fixed rules: routed experts at `base`, the first and last eighth of MoE layers one step higher,
    ffn_down_exps one more step; attention Q4_K (dense FFN too), shared experts Q6_K, token_embd Q2_K, output Q5_K."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.arch import Role

    outs = [o for o in gguf_outputs(view) if o.quantizable]
    moe = sorted({o.layer for o in outs if o.role is Role.ROUTED_EXPERTS})
    edge = max(1, math.ceil(len(moe) / 8))
    edges = set(moe[:edge]) | set(moe[-edge:])
    plan: dict[str, str] = {}
    for o in outs:
        if o.role is Role.ROUTED_EXPERTS:
            plan[o.name] = up(base, (o.layer in edges) + ("ffn_down" in o.name))
        elif o.role is Role.SHARED_EXPERTS:
            plan[o.name] = "Q6_K"
        elif o.name.startswith("token_embd"):
            plan[o.name] = "Q2_K"
        elif o.name.startswith("output"):
            plan[o.name] = "Q5_K"
        else:
            plan[o.name] = "Q4_K"
    return plan


def plan_bytes(view: Any, types: dict[str, str]) -> int:
    """Tensor bytes of `view` written with `types` (F32 for tensors the plan leaves out), fallbacks included."""
    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.types import written_bytes

    return sum(written_bytes(o.shape, types.get(o.name, "F32")) for o in gguf_outputs(view))


def verdict(moe: dict[str, Any] | None, uni: dict[str, Any] | None, goal: float = GOAL) -> dict[str, Any] | None:
    """moepack's eval vs the uniform file's: the KLD reduction, no larger, CIs apart, whether all three hold, and
    whether moepack's is worse (its file larger, or its KLD's CI above the uniform file's)."""
    if not moe or not uni:
        return None
    reduction = 1 - moe["kld_mean"] / uni["kld_mean"] if uni["kld_mean"] > 0 else float("-inf")
    out = {"kld_reduction": reduction, "no_larger": moe["size_bytes"] <= uni["size_bytes"],
           "cis_apart": moe["kld_ci95_high"] < uni["kld_ci95_low"], "goal": goal}
    out["holds"] = bool(reduction >= goal and out["no_larger"] and out["cis_apart"])
    out["worse"] = bool(not out["no_larger"] or moe["kld_ci95_low"] > uni["kld_ci95_high"])  # CIs apart, above
    return out


def verdict_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "— (not measured)"
    worse = v["kld_reduction"] < 0  # then the CIs are not "overlapping" but on the wrong side, or both
    why = [w for w, ok in (("KLD higher" if worse else f"reduction below {100 * v['goal']:.0f} %",
                            v["kld_reduction"] >= v["goal"]), ("file larger", v["no_larger"]),
                           ("CIs overlap", v["cis_apart"] or worse)) if not ok]
    return "**holds**" if v["holds"] else "falls short: " + ", ".join(why)


# ---- evaluation ------------------------------------------------------------------------------------------------------
class Evaluator:
    """moepack.eval of GGUF files against one checkpoint on `text` (windows of `ctx`, `tokens` of text: 0 is eval's
    default of 16k scored); the reference's log-probs cached under `work`."""

    def __init__(self, model: Path, work: Path, ctx: int, tokens: int, text: Path = EVAL_TEXT) -> None:
        from moepack.eval.reference import EvalConfig

        self.model, self.text = model, text
        self.cfg = EvalConfig(ctx=ctx, tokens=tokens, mc=(), threads=1, speed=False, cache_dir=work / "evalcache")
        self.ref: Any = None

    def reference(self) -> Any:
        from moepack.eval.reference import prepare_reference

        if self.ref is None:
            self.ref = prepare_reference(self.model, self.text, self.cfg)
            self.ref.release()
        return self.ref

    def __call__(self, path: Path) -> dict[str, Any]:
        from moepack.eval.evaluate import evaluate_model

        e = evaluate_model(path, self.reference(), {}, self.cfg)
        return {k: e[k] for k in EVAL_KEYS if k in e}


# ---- results: commits, names, files, page sections --------------------------------------------------------------
def code_commit() -> str | None:
    """The commit whose code results are measured with: the last one that changed anything but the results benches
    write (bench/results/) and the pages made from them (docs/), so a results commit does not restamp later cells;
    `+changes` where the tree's code differs from it. None outside git."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=True).stdout.strip()

    not_code = (":(exclude)bench/results", ":(exclude)docs")
    try:
        head = git("log", "-1", "--format=%h", "--", ".", *not_code) or git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", *not_code)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def calib_tag(text: Path | None, default: Path | None) -> str:
    """The suffix of a bench's result names for calibration text `text` (None: compress's bundled text): none for the
    bench's `default`, "-bundled", or "-STEM", so runs on different texts never mix."""
    if text == default or (text is not None and default is not None and text.resolve() == default.resolve()):
        return ""
    return "-bundled" if text is None else f"-{text.stem}"


def rel(p: Path | str) -> str:
    """`p` relative to the repository where it is inside it (committed results hold no absolute paths)."""
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def portable(obj: Any, work: Path) -> Any:
    """`obj` with every path relative to `work` (files) or the repository (anything else), as JSON-ready values."""
    if isinstance(obj, dict):
        return {k: portable(v, work) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, work) for v in obj]
    if isinstance(obj, Path):
        p = obj.resolve()
        return str(p.relative_to(work) if p.is_relative_to(work) else p.relative_to(ROOT) if p.is_relative_to(ROOT)
                   else p.name)
    if isinstance(obj, str):
        for base in (str(work) + "/", str(ROOT) + "/"):
            obj = obj.replace(base, "")
        return obj
    return obj


def write_json(path: Path, obj: Any) -> None:
    """A results file, whole or not at all (a long run saves each finished row at once)."""
    from moepack.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def write_section(md: Path, section: str, begin: str, end: str) -> None:
    """`section` (from `begin` to `end`) in place of the one between those markers in `md`, appended where there is
    none; copies an older run appended after it are dropped."""
    text = md.read_text() if md.is_file() else ""
    if begin not in text or end not in text:
        md.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    head, rest = text[: text.index(begin)], text[text.index(end) + len(end):].lstrip("\n")
    while begin in rest and end in rest:
        rest = rest[: rest.index(begin)] + rest[rest.index(end) + len(end):].lstrip("\n")
    md.write_text(head + section + ("\n" + rest if rest.strip() else ""))


# ---- the claim's results file (bench/claim.py) ----------------------------------------------------------------------
def cells(rec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A fixture's size points in order of the uniform file's size (unmade ones last)."""
    return sorted(rec["cells"].items(), key=lambda fc: (fc[1].get("target_bytes") or math.inf, fc[0]))


def commits_line(rec: dict[str, Any]) -> str:
    """Which commit of moepack measured which size points (a page can hold cells of several runs)."""
    by: dict[str, list[str]] = {}
    for f, c in cells(rec):
        by.setdefault(c.get("commit") or "not recorded", []).append(f)
    return "Measured at commit " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by.items()) + "."


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a claim cell depends on besides the fixture and size point: cells of other settings never mix."""
    from moepack.pipeline.options import CompressOptions

    d = CompressOptions()
    from moepack.model.textdata import DEFAULT_CALIB_TEXT

    calib = f"bundled ({rel(DEFAULT_CALIB_TEXT)})" if args.calib_text is None else f"`{portable(args.calib_text, ROOT)}`"
    return {"calib_text": calib, "calib_tokens": args.calib_tokens,
            "seq_len": args.seq_len, "sens_tokens": args.selection_tokens, "keep": d.keep, "criterion": d.criterion,
            "sensitivity": d.sensitivity, "eval_text": str(EVAL_TEXT.relative_to(ROOT)), "ctx": args.ctx,
            "eval_tokens": args.eval_tokens, "goal": GOAL, "hand_steps": HAND_STEPS, "paper_prune": PAPER_PRUNE}


def reproduce(results: dict[str, Any], argv: list[str], default_models: tuple[str, ...] = DEFAULT_MODELS) -> str:
    """The one command that makes every cell in `results` (runs that added size points or fixtures one at a time
    resume into the same JSON): this run's other flags, with --models and --ftypes widened to all cells held
    (--domains left to the caller)."""
    keep, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in ("--models", "--ftypes", "--domains")
        if not skip:
            keep.append(a)
    models = [str(rec["model"]) for rec in results["fixtures"].values()]
    if sorted(models) != sorted(default_models):
        keep += ["--models", *models]
    held = {f for rec in results["fixtures"].values() for f in rec["cells"]}
    order = [f for rec in results["fixtures"].values()
             for f in (rec.get("points") or size_points(ROOT / str(rec["model"])))]
    if held != set(order):
        keep += ["--ftypes", *sorted(held, key=lambda f: order.index(f) if f in order else len(order))]
    return "python bench/claim.py " + " ".join(keep)


def default_paths(args: argparse.Namespace) -> None:
    """Paths not given follow the calibration text (CALIB: none for CALIB_TEXT, "bundled" for compress's bundled
    text, else the file's stem), so runs on different calibration texts never resume into, or overwrite, each other's
    results."""
    if args.calib_text == Path("bundled"):
        args.calib_text = None
    tag = calib_tag(args.calib_text, CALIB_TEXT)
    args.work = args.work or ROOT / "out" / f"bench-claim{tag}"
    args.out = args.out or ROOT / "bench" / "results" / f"claim{tag}.json"
    args.md = args.md or ROOT / "docs" / f"results{tag}.md"
    args.png = args.png or ROOT / "docs" / f"results{tag}-pareto.png"


# ---- published parameter counts (bench/architectures.py; tests/test_published_configs.py) -------------------------
CONFIGS = DATA / "configs"
PUBLISHED: list[dict[str, Any]] = json.loads((CONFIGS / "published.json").read_text())["models"]
SLACK = 0.02  # published totals count parts the served text model lacks (vision encoders, MTP layers)
_UNITS = {"M": Decimal(10) ** 6, "B": Decimal(10) ** 9, "T": Decimal(10) ** 12}


def published_range(figure: str, reading: str = "rounded") -> tuple[float, float]:
    """The parameter counts a figure as written covers: '5.1B' → (5.05e9, 5.15e9); as a model name's 'A3B', which
    truncates, '3B' → (3e9, 4e9)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([MBT])", figure)
    if not m:
        raise ValueError(f"not a parameter count: {figure!r}")
    value, scale = Decimal(m.group(1)), _UNITS[m.group(2)]
    step = Decimal(1).scaleb(value.as_tuple().exponent)  # one unit in the last digit written
    lo, hi = (value - step / 2, value + step / 2) if reading == "rounded" else (value, value + step)
    return float(lo * scale), float(hi * scale)


def within(count: int, figure: str, reading: str = "rounded") -> bool:
    lo, hi = published_range(figure, reading)
    return lo * (1 - SLACK) <= count <= hi * (1 + SLACK)


def model_type(config: str) -> str:
    return json.loads((CONFIGS / config / "config.json").read_text())["model_type"]


# ---- a synthetic DeepSeek-V3-shaped checkpoint (bench/scale.py, quantize_speed.py, distributed_cost.py) --------------
TOKENIZER_FROM = ROOT / "models" / "tiny-deepseek-v3"  # its tokenizer, padded to V3's vocab by the GGUF writer
# DeepSeek-V3's config.json, but for the layer and routed-expert counts (set per run).
V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "n_group": 8, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "n_routed_experts": 256,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-6, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                           "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                           "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280,
}


def v3_config(n_layers: int, n_experts: int) -> dict[str, Any]:
    """V3's config with `n_layers` layers (the first dense, as V3's first three) of `n_experts` routed experts in
    n_experts / 4 groups (V3: 8 groups of 32; a group needs at least two experts after pruning, as V3 ranks groups
    by their top-2 scores, so keep 0.5 needs four per group), of which half are searched, as in V3."""
    n_group = max(1, n_experts // 4)
    return dict(V3_CONFIG, num_hidden_layers=n_layers, n_routed_experts=n_experts, first_k_dense_replace=1,
                n_group=n_group, topk_group=max(1, n_group // 2))


def disk_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name → shape, from transformers' own DeepSeek-V3 module (built on the meta device), with
    the fused in-memory experts split into the per-expert tensors the hub's checkpoints hold."""
    import torch
    import transformers

    c = dict(cfg)
    c.pop("architectures")
    config = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in model.state_dict().items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            shapes[name] = tuple(t.shape)
            continue
        n_exp, rows, cols = t.shape  # (E, 2I, H) gate_up | (E, H, I) down
        for e in range(n_exp):
            if m.group(2) == "down_proj":
                shapes[f"{m.group(1)}.{e}.down_proj.weight"] = (rows, cols)
            else:
                shapes[f"{m.group(1)}.{e}.gate_proj.weight"] = (rows // 2, cols)
                shapes[f"{m.group(1)}.{e}.up_proj.weight"] = (rows // 2, cols)
    return shapes


class SyntheticView:
    """Just enough of a CheckpointView for `write_checkpoint`: random weights made on demand, tensor by tensor."""

    def __init__(self, cfg: dict[str, Any], seed: int = 0) -> None:
        from moepack.model.arch import spec_for

        self.root = TOKENIZER_FROM
        self.config = cfg
        self.spec = spec_for(cfg["model_type"])  # write_checkpoint asks it whether experts are stacked
        self.seed = seed
        self.tensors = {n: SimpleNamespace(shape=s, dtype="F32" if n.endswith("e_score_correction_bias") else "BF16",
                                           nbytes=int(np.prod(s)) * (4 if n.endswith("_bias") else 2))
                        for n, s in disk_shapes(cfg).items()}

    def load(self, name: str) -> Any:
        import torch

        shape = self.tensors[name].shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=torch.float32)
        std = 1.0 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def v3_layer_checkpoint(work: Path, n_experts: int = 2) -> Path:
    """A one-layer DeepSeek-V3-shaped checkpoint: its only layer a MoE layer with V3's attention, `n_experts` routed
    experts (top-2) and the shared one; the fixture tokenizer's 4096-token vocab, so that the layer's tensors
    dominate. For per-layer timings (bench/quantize_speed.py --v3-layer, bench/distributed_cost.py)."""
    from moepack.stages.prune import write_checkpoint

    cfg = dict(v3_config(1, n_experts), first_k_dense_replace=0, vocab_size=4096, n_group=1, topk_group=1,
               num_experts_per_tok=min(2, n_experts))
    out = work / f"v3-layer-{n_experts}E"
    write_checkpoint(SyntheticView(cfg), out, progress=False)
    return out

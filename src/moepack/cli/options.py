"""The flag vocabulary every `moepack` command shares, each flag defined once.

Names follow llama.cpp's tools (`-c/--ctx-size`, `-t/--threads`, `--cache-type-k`, `--flash-attn`, `--ubatch-size`,
`--imatrix FILE`) and Hugging Face's where they have one. Across commands:

- `-o/--output PATH`     what the command writes (a file or a directory);
- `--calib-text [NAME=]FILE`  calibration TEXT: text of the domain the model is deployed for, never the evaluation
                         text; repeat it for several domains (each judged on its own); `--calib-chat [NAME=]FILE.jsonl`
                         the same for conversations, rendered with the model's chat template;
- `--calib-dir DIR`      a calibration RUN DIRECTORY, the output of `moepack calibrate` (statistics, imatrix);
- `--calib-tokens N`, `--sens-tokens N`, `--seq-len N`: calibration tokens, held-out tokens, tokens per sequence;
- `-t/--threads N`       default 2 (`DEFAULT_THREADS`) for every command; with `--ray`, the smallest node's cores.

This module imports only light library modules (no torch, transformers or llama_cpp), so that building the parser
stays cheap; the choices mirrored from heavy modules are checked against them by the tests.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from moepack.errors import MoepackError
from moepack.stages.allocate import SOLVERS  # pure Python, as is budget
from moepack.stages.budget import DEFAULT_RESERVE_FRACTION, BudgetRequest
from moepack.stages.footprint import DEFAULT_UBATCH

if TYPE_CHECKING:
    from moepack.backends import Backend

__all__ = [
    "Container",
    "Subparsers",
    "DEFAULT_THREADS",
    "CALIB_TOKENS",
    "SELECTION_TOKENS",
    "SEQ_LEN",
    "BATCH_SIZE",
    "LADDER",
    "REFERENCE",
    "CRITERIA",
    "SENS_MODES",
    "add_sensitivity",
    "add_command",
    "resolve_models",
    "add_output",
    "add_model",
    "add_calib_text",
    "add_calib_sources",
    "calib_sources",
    "add_calib_dir",
    "add_calib_tokens",
    "add_selection_tokens",
    "add_seq_len",
    "add_batch_size",
    "add_threads",
    "add_backend",
    "add_budget",
    "add_target_size",
    "add_keep",
    "add_top_k",
    "add_criterion",
    "add_merge",
    "MERGE_SIMILARITIES",
    "MERGE_WEIGHTINGS",
    "MERGE_ROUTERS",
    "add_solver",
    "add_reference_types",
    "add_ladder",
    "add_reference",
    "add_repack",
    "add_quant_cache",
    "budget_request",
    "make_backend",
    "threads",
    "check_positive",
    "top_k_arg",
    "keep_arg",
    "ladder_arg",
    "size_arg",
    "SIZE_UNITS",
]

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2  # the cores of the smallest machine moepack supports
CALIB_TOKENS = 50_000
SELECTION_TOKENS = 4096
SEQ_LEN = 512
BATCH_SIZE = 8
# Mirrors of constants in modules that import torch (checked equal by tests/test_cli.py):
LADDER = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K", "Q5_K",
          "Q6_K", "Q8_0")  # gguf.types.LADDER
REFERENCE = "IQ1_S"  # gguf.types.DEFAULT_REFERENCE
CRITERIA = ("score", "frequency", "reap", "random")  # stages.prune.CRITERIA
MERGE_SIMILARITIES = ("output", "weight")  # stages.merge.SIMILARITIES
MERGE_WEIGHTINGS = ("frequency", "saliency")  # stages.merge.WEIGHTINGS
MERGE_ROUTERS = ("mean", "host")  # stages.merge.ROUTERS
SENS_MODES = ("kld", "proxy", "both")  # sensitivity.measure.MODES

_CALIB_TEXT_HELP = ("calibration text (UTF-8, paragraphs split by blank lines): a few hundred thousand characters of "
                    "what the model will see deployed, the domain it must stay good at; never the text you evaluate "
                    "on. Default: moepack's bundled mix of stories, encyclopedic prose, dialogue, code and web text")


class Container(Protocol):
    """A parser, an argument group or a mutually exclusive group."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


class Subparsers(Protocol):
    """What `ArgumentParser.add_subparsers()` returns, as far as the command modules use it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def add_command(sub: Subparsers, name: str, help: str, doc: str | None,
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A subcommand whose --help shows `doc` (the command module's docstring) as written."""
    # allow_abbrev=False: a renamed flag's old spelling (--ctx, --calib) fails instead of matching a prefix silently
    p = sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.set_defaults(func=lambda args: run(resolve_models(args)))
    # also after the subcommand; SUPPRESS: not given here leaves `moepack --debug CMD`'s value alone
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logging (also accepted before the command)")
    return p


def resolve_models(args: argparse.Namespace) -> argparse.Namespace:
    """MODEL_DIR and --reference as every command takes them: a directory, or a Hugging Face repo id already in the
    local cache (moepack.model.source; never a download). A --reference GGUF file stays as given."""
    from moepack.model.source import resolve_model  # no huggingface_hub import until a repo id needs it

    if getattr(args, "model_dir", None) is not None:
        args.model_dir = resolve_model(args.model_dir)
    ref = getattr(args, "reference", None)
    if ref is not None and not Path(ref).is_file() and Path(ref).suffix != ".gguf":
        args.reference = resolve_model(ref)
    return args


# ---------------------------------------------------------------------------------------------------- arg types

def top_k_arg(s: str) -> int | str:
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k takes a whole number or 'auto', not {s!r}") from None


def keep_arg(s: str) -> float | str:
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes a number in (0, 1] or 'auto', not {s!r}") from None


SIZE_UNITS = ("a unit is required: kB/MB/GB/TB are powers of 1000 (128GB = 128*10^9 bytes, as disks and "
              "vendors count), KiB/MiB/GiB/TiB and K/M/G/T powers of 1024 (128G = 128GiB = 137.4*10^9 bytes, as "
              "RAM is built), B bytes")
_UNITLESS = re.compile(r"\s*[\d_]*\.?[\d_]*(?:[eE][+-]?\d+)?\s*")


def size_arg(s: str) -> str:
    """A size with its unit, checked at parse time ("128" alone is refused: bytes or GB? the message says)."""
    from moepack.stages.sizes import parse_size  # pure Python

    if _UNITLESS.fullmatch(s) and any(c.isdigit() for c in s):
        n = s.strip()
        raise argparse.ArgumentTypeError(f"{s!r} has no unit; write {n}GB (10^9 bytes), {n}GiB or {n}G (2^30 bytes), "
                                         f"or {n}B for bytes")
    try:
        parse_size(s)
    except MoepackError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def ladder_arg(s: str) -> tuple[str, ...]:
    """"IQ2_XXS, q4_k,Q8_0" → ("IQ2_XXS", "Q4_K", "Q8_0"), each a GGML type name."""
    from moepack.gguf.types import parse_type  # at parse time only: gguf and numpy

    try:
        ladder = tuple(parse_type(t.strip()).name for t in s.split(",") if t.strip())
    except MoepackError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not ladder:
        raise argparse.ArgumentTypeError("--ladder needs at least one type, e.g. IQ2_XXS,IQ3_S,Q4_K")
    return ladder


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """MoepackError naming the flag when one of these whole-number options is below 1 (None = not given: fine)."""
    for dest in dests:
        v = getattr(args, dest, None)
        if v is not None and v < 1:
            raise MoepackError(f"--{dest.replace('_', '-')} must be at least 1 (got {v})")


# ---------------------------------------------------------------------------------------------------- inputs

def add_model(p: Container, note: str = "") -> None:
    """The positional MODEL every command but inspect, eval and report takes (resolve_models reads it)."""
    p.add_argument("model_dir", metavar="MODEL", help=f"Hugging Face checkpoint directory{note}, or the repo id of one "
                   "in the local Hugging Face cache (e.g. Qwen/Qwen3-30B-A3B; moepack never downloads)")


def add_output(p: Container, metavar: str, help: str, required: bool = True) -> None:
    p.add_argument("-o", "--output", type=Path, required=required, metavar=metavar, help=help)


def add_calib_text(p: Container, required: bool = False, help: str = _CALIB_TEXT_HELP) -> None:
    p.add_argument("--calib-text", type=Path, required=required, metavar="FILE", help=help)


_SOURCES_HELP = (" [NAME=]FILE: repeat for several domains; every choice must hold on each of them, not only on "
                 "their mean (NAME defaults to the file's stem; `bundled` adds moepack's bundled domains). Default: "
                 "moepack's bundled stories, encyclopedic prose, dialogue, code and web text (and conversations for a "
                 "model with a chat template)")


def add_calib_sources(p: Container) -> None:
    """--calib-text and --calib-chat, each repeatable (calibrate, compress)."""
    p.add_argument("--calib-text", action="append", metavar="[NAME=]FILE", help=_CALIB_TEXT_HELP.split(". Default")[0]
                   + "." + _SOURCES_HELP)
    p.add_argument("--calib-chat", action="append", metavar="[NAME=]FILE",
                   help="calibration conversations: JSONL, one conversation a line as {\"messages\": [{\"role\": ..., "
                        "\"content\": ...}, ...]}, rendered with the model's own chat template (from its "
                        "tokenizer_config.json), as the model is served; alone or with --calib-text; repeatable")


def calib_sources(args: argparse.Namespace) -> Path | list[Any] | None:
    """The calibration sources of --calib-text / --calib-chat (moepack.model.textdata.sources_of)."""
    from moepack.model.textdata import sources_of

    return sources_of(args.calib_text or [], args.calib_chat or [])


def add_calib_dir(p: Container, help: str, required: bool = True) -> None:
    p.add_argument("--calib-dir", type=Path, required=required, metavar="DIR",
                   help=f"{help}: a run directory of `moepack calibrate` (or its calib/ folder)")


def add_calib_tokens(p: Container) -> None:
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, metavar="N",
                   help=f"tokens of --calib-text the statistics are taken on (default {CALIB_TOKENS})")


def add_selection_tokens(p: Container, help: str) -> None:
    p.add_argument("--sens-tokens", dest="selection_tokens", type=int, default=SELECTION_TOKENS, metavar="N",
                   help=f"{help} (default {SELECTION_TOKENS})")


def add_seq_len(p: Container) -> None:
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, metavar="N",
                   help=f"tokens per sequence (default {SEQ_LEN})")


def add_batch_size(p: Container, what: str = "sequences per forward batch") -> None:
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="N", help=f"{what} (default {BATCH_SIZE})")


def add_reference(p: Container, help: str, required: bool = False, metavar: str = "MODEL") -> None:
    p.add_argument("--reference", type=Path, required=required, metavar=metavar, help=help)


# ---------------------------------------------------------------------------------------------------- where it runs

def add_threads(p: Container, what: str, ray: bool = False) -> None:
    """-t/--threads; with `ray`, not given means the smallest Ray node's cores (see `threads`)."""
    on_ray = "; with --ray the cores of the smallest node" if ray else ""
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help=f"{what} (default {DEFAULT_THREADS}, the cores of the smallest machine moepack supports"
                        f"{on_ray})")


def threads(args: argparse.Namespace, backend: Backend | None = None) -> int:
    """--threads as given, else DEFAULT_THREADS in-process and the smallest node's cores on Ray."""
    if args.threads is not None:
        return int(args.threads)
    return backend.default_threads(DEFAULT_THREADS) if backend is not None else DEFAULT_THREADS


def add_backend(p: Container, shards: bool = False) -> None:
    """--ray (and --shards for calibration)."""
    p.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                   help="run tasks on a Ray cluster: auto (a running cluster, else a local one), HEAD:6379 or "
                        "ray://HEAD:10001; the checkpoint must be at the same path on every machine "
                        "(needs moepack[ray]; see docs/distributed.md); default: in-process")
    if shards:
        p.add_argument("--shards", type=int, default=None, metavar="N",
                       help="calibration tasks, each a contiguous block of whole sequences (default 1; with --ray "
                            "the cluster's CPUs / --threads); the statistics are sums, so any N gives the same "
                            "numbers up to float64 rounding")


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend of --ray, after checking --shards (a context manager: `with make_backend(args) as b:`)."""
    from moepack.backends import make_backend as make

    check_positive(args, "shards")
    return make(args.ray)


# ---------------------------------------------------------------------------------------------------- budget

def add_target_size(g: Container, help: str) -> None:
    g.add_argument("--target-size", type=size_arg, metavar="SIZE",
                   help=f"GGUF file size, e.g. 103GB, 20MiB or 1.5GiB{help}; {SIZE_UNITS}")


def add_budget(p: argparse.ArgumentParser) -> None:
    """The device or size budget (`budget_request` reads it back)."""
    g = p.add_argument_group("budget (give --memory with -c/--ctx-size, or --target-size, or --target-bpw)")
    g.add_argument("--memory", type=size_arg, metavar="SIZE",
                   help="device memory, e.g. 16GiB, 128GB, 8G (= 8 GiB); with --gpu-memory, the system RAM that "
                        f"holds the routed experts; {SIZE_UNITS}")
    g.add_argument("--gpu-memory", type=size_arg, metavar="SIZE",
                   help="GPU memory for all but the routed experts, plus the KV cache (llama.cpp's -ngl 99 -ot "
                        "exps=CPU); needs --memory and -c (refused without them); units as --memory")
    g.add_argument("-c", "--ctx-size", type=int, metavar="N",
                   help="context length the device must hold, as llama.cpp's -c (sizes the KV cache)")
    g.add_argument("--reserve", type=size_arg, metavar="SIZE", help="memory kept free for the OS and the runtime "
                   f"(default {DEFAULT_RESERVE_FRACTION * 100:.0f}%% of --memory; needs --memory); units as --memory")
    add_target_size(g, "")
    g.add_argument("--target-bpw", type=float, metavar="X",
                   help="GGUF file size as bits per parameter of the original checkpoint (all its tensors)")
    g.add_argument("--cache-type-k", default="f16", metavar="TYPE", help="KV cache K type at run time (default f16)")
    g.add_argument("--cache-type-v", default=None, metavar="TYPE", help="KV cache V type (default: K's)")
    g.add_argument("--flash-attn", action="store_true",
                   help="the runtime uses flash attention (much smaller compute buffer at long contexts)")
    g.add_argument("--ubatch-size", type=int, default=DEFAULT_UBATCH, metavar="N",
                   help=f"runtime n_ubatch (default {DEFAULT_UBATCH})")


def budget_request(args: argparse.Namespace) -> BudgetRequest:
    """The budget flags as a request; flags that only qualify --memory are refused without it (never ignored)."""
    if args.memory is None:
        alone = [f for f, v in (("--gpu-memory", args.gpu_memory), ("--reserve", args.reserve)) if v is not None]
        if alone:
            raise MoepackError(f"{' and '.join(alone)} need{'s' if len(alone) == 1 else ''} --memory SIZE and "
                               "-c/--ctx-size N (with --gpu-memory, --memory is the system RAM that holds the routed "
                               "experts)")
    return BudgetRequest(memory=args.memory, ctx=args.ctx_size, reserve=args.reserve, target_size=args.target_size,
                         target_bpw=args.target_bpw, type_k=args.cache_type_k, type_v=args.cache_type_v,
                         n_ubatch=args.ubatch_size, flash_attn=args.flash_attn,
                         gpu_memory=args.gpu_memory)


# ---------------------------------------------------------------------------------------------------- pruning

def add_keep(p: Container, auto: bool) -> None:
    """`auto` (compress): the default searches the retention, keep 1.0 always among the candidates, so the default
    never removes experts the model needs; the paper's 0.75 is `--keep 0.75`."""
    p.add_argument("--keep", type=keep_arg if auto else float, default="auto" if auto else 0.75,
                   metavar="R" + ("|auto" if auto else ""), help="share R of routed experts kept per layer, in (0, 1]"
                   + (", or auto (default): measure 1.0, 0.875, 0.75 and 0.625 and keep the best" if auto
                      else " (default 0.75)"))


def add_top_k(p: Container, tol_flag: bool = True) -> None:
    """`tol_flag`: the command has --kld-tol (prune); compress uses prune's default tolerance."""
    tol = "--kld-tol" if tol_flag else "0.01 nats (prune's default tolerance)"
    p.add_argument("--top-k", type=top_k_arg, default=None, metavar="K|auto",
                   help="experts per token after pruning, k': a number, or auto (the smallest k' whose mean KLD on "
                        f"held-out tokens is within {tol} of the best); default max(1, round(R*k))")


def add_criterion(p: Container, auto: bool = False) -> None:
    """`auto` (compress): the default measures each criterion's pruning-only KLD and keeps the lowest."""
    if auto:
        p.add_argument("--criterion", choices=CRITERIA + ("auto",), default="auto",
                       help="expert importance criterion, or auto (default): score at alpha 0, 0.5 and 1, reap and "
                            "frequency, the lowest pruning-only KLD on held-out tokens")
    else:
        p.add_argument("--criterion", choices=CRITERIA, default="score",
                       help="expert importance criterion (default score)")


def add_merge(p: Container, auto: bool = False) -> None:
    """--merge and how it merges (stages.merge); the defaults are the variant that measured best (docs/pruning.md).
    `auto` (compress): without --merge, --criterion auto measures merging and takes it where it measures lower."""
    when = (" (without it, --criterion auto measures merging with the defaults below and merges where its "
            "pruning-only KLD is lower; a fixed --criterion discards)") if auto else ""
    p.add_argument("--merge", action="store_true",
                   help="fold each dropped expert into the most similar kept expert of its group (usage-weighted "
                        "average of their weights, router rows merged) instead of discarding it" + when)
    p.add_argument("--merge-similarity", choices=MERGE_SIMILARITIES, default="output",
                   help="--merge: similarity of the experts' outputs on calibration tokens (default) or of their "
                        "weights")
    p.add_argument("--merge-weighting", choices=MERGE_WEIGHTINGS, default="saliency",
                   help="--merge: weight each member by its summed REAP saliency (default) or its routed token slots")
    p.add_argument("--merge-router", choices=MERGE_ROUTERS, default="mean",
                   help="--merge: the host's router row becomes the members' weighted mean (default) or stays")
    p.add_argument("--no-merge-align", dest="merge_align", action="store_false",
                   help="--merge: average the experts' neurons in their stored order (default: match them first)")


# ---------------------------------------------------------------------------------------------------- types

def add_solver(p: Container) -> None:
    p.add_argument("--solver", choices=SOLVERS, default="greedy",
                   help="greedy: the paper's dynamic budgeting with back-off; exact: knapsack DP (default greedy)")


def add_reference_types(p: Container, default: str) -> None:
    p.add_argument("--base", metavar="TYPES", dest="reference_types",
                   help="reference types the sensitivity table measures from: TYPE, or ROLE|CLASS|GROUP=TYPE,... e.g. "
                        f"routed_experts=IQ2_XXS,attention=Q4_K (default: {default})")


def add_sensitivity(p: Container) -> None:
    p.add_argument("--sensitivity", choices=("auto", "fast", "full"), default="auto",  # fast.SENSITIVITY_MODES
                   help="full: a forward pass per tensor group and ladder type; fast: one per group, the other types "
                        "predicted from their quantization error; auto (default): fast when the full table's "
                        "estimate (timed on the first probes) exceeds 30 min")


def add_ladder(p: Container) -> None:
    p.add_argument("--ladder", type=ladder_arg, default=",".join(LADDER), metavar="T1,T2,...",
                   help="the types a group may take, comma-separated (default: every llama.cpp weight type, "
                        "%(default)s)")


def add_quant_cache(p: Container) -> None:
    p.add_argument("--quant-cache", type=Path, metavar="DIR",
                   help="keep the sensitivity stage's quantized tensors on disk in DIR instead of RAM (large models; "
                        "with --ray on storage every machine sees); default: none, in memory. (eval's --cache-dir is "
                        "another thing: its reference log-probabilities)")


def add_repack(p: Container, what: str) -> None:
    p.add_argument("--repack", action="store_true",
                   help=f"{what} with llama.cpp's CPU extra buffer types (weight repacking) on; off by default, as "
                        "llama.cpp's --no-repack, since on AMX CPUs they abort DeepSeek models")

"""`moepack eval MODEL.gguf [...] --reference MODEL_DIR|REF.gguf --text FILE [--json-out F] [--md-out F]`: quality,
speed and memory of GGUF files, measured through llama-cpp-python (the runtime users deploy with), against a
reference model.

- Text: the reference's tokenizer turns --text into ids once; every model is fed those same ids. --eval-chat
  FILE.jsonl instead: conversations rendered with the reference checkpoint's chat template (moepack.model.chat),
  the layout a chat model is served on (moepack's own: data/eval/dialogue-chat.jsonl). The first --tokens ids are
  cut into non-overlapping windows of --window tokens; as llama-perplexity does, the second half of each window is
  scored (--window/2 - 1 tokens per window), and --window is also the llama.cpp context size.
- `ppl`: perplexity of the scored tokens; `kld_*`: KL(reference || model) per scored token, in nats (mean, median,
  p99, p99.9, max); `top1`: share of positions where the model's most likely token is the reference's (same top);
  `dp_rms`: RMS of p_model(target) - p_ref(target); `ppl_ratio`: model PPL / reference PPL. Means, the RMS, the
  share and the ratio come with a 95 % confidence interval from the spread of the window means.
- --mc: multiple-choice accuracy (PIQA, HellaSwag, a cloze set built from --cloze-text), by log-likelihood.
- Speed and memory: each model alone in a fresh subprocess: prompt and decode tokens per second (median of
  repeated runs), peak RSS; a table of their own, apart from the quality numbers.
- `bpw`: 8 x file size / the reference's parameter count (the original model's, so pruning lowers it).

Scores do not depend on --threads; speed does (on a machine whose cores are shared with other jobs, ggml's spinning
worker threads make 2 threads much slower than 1: pass --threads 1 there). Reference log-probabilities are cached
under --cache-dir. The evaluation text must not be the calibration text. Details: moepack.eval.evaluate.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moepack.cli import options as o
from moepack.eval.mc import TASKS  # light: no numpy, no llama_cpp

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "eval", "perplexity, KLD, accuracy, speed and memory of GGUF files vs a reference",
                      __doc__, run)
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL.gguf")
    o.add_reference(p, "reference model: checkpoint directory or GGUF file", required=True, metavar="MODEL_DIR|GGUF")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", type=Path, metavar="FILE", help="evaluation text (UTF-8); not the calibration text")
    text.add_argument("--eval-chat", type=Path, metavar="FILE.jsonl",
                      help='evaluation conversations, one {"messages": [{"role": ..., "content": ...}, ...]} a line, '
                           "rendered with the reference checkpoint's chat template; not the calibration ones")
    p.add_argument("--mc", nargs="+", action="extend", default=[], choices=TASKS,
                   help="multiple-choice tasks (default: none)")
    p.add_argument("--mc-items", type=int, default=500, metavar="N", help="items per task (0 = all; default 500)")
    p.add_argument("--window", type=int, default=512, metavar="N",
                   help="scored window length in tokens, also the llama.cpp context size (default 512)")
    p.add_argument("--tokens", type=int, default=0, metavar="N",
                   help="text tokens to read (default 0: enough windows to score 16,384 tokens; a shorter text "
                        "scores what it holds, and the report says so)")
    o.add_threads(p, "llama.cpp threads for scoring and the speed test (results do not depend on it)")
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N",
                   help="prompt length of the speed test (default 128)")
    p.add_argument("--gen-tokens", type=int, default=64, metavar="N",
                   help="greedy decode steps of the speed test (default 64)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed and memory subprocess")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="where the reference's log-probabilities are cached between runs (default "
                        "~/.cache/moepack/eval; compress's --quant-cache is another cache: quantized tensors)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="directory holding mc/ (default: moepack's bundled PIQA and HellaSwag)")
    p.add_argument("--cloze-text", type=Path, metavar="FILE",
                   help="held-out text the cloze set is built from (needed by --mc cloze)")
    o.add_repack(p, "score and time")
    p.add_argument("--json-out", type=Path, metavar="FILE",
                   help="write the report as JSON (what `report --eval` reads)")
    p.add_argument("--md-out", type=Path, metavar="FILE", help="write the table as Markdown")


def run(args: argparse.Namespace) -> int:
    from moepack.eval.evaluate import evaluate, to_markdown, write_report
    from moepack.eval.reference import EvalConfig

    cfg = EvalConfig(ctx=args.window, tokens=args.tokens, mc=tuple(dict.fromkeys(args.mc)),
                     mc_items=args.mc_items or None, threads=o.threads(args), speed=not args.no_speed,
                     prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, cache_dir=args.cache_dir,
                     data_dir=args.data_dir, cloze_text=args.cloze_text, repack=args.repack,
                     chat=args.eval_chat is not None)
    report = evaluate(args.models, args.reference, args.eval_chat or args.text, cfg)
    if Path(sys.argv[0]).name == "moepack":  # not when called as a function, e.g. from the tests
        report["command"] = "moepack " + " ".join(sys.argv[1:])
    write_report(report, args.json_out, args.md_out)
    print(to_markdown(report))
    return 0

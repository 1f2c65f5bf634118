"""The one way moepack loads a GGUF in llama.cpp, and the one way it runs llama.cpp where a crash must not kill us.

`load_llama` builds a llama-cpp-python `Llama` with the CPU extra buffer types off (llama.cpp's `--no-repack`). With
them on (llama.cpp's default), a CPU with AMX puts weights in its AMX/repack buffers, where DeepSeek's 3-D
`attn_k_b`/`attn_v_b` mat-muls abort the process (`GGML_ASSERT(*cur_backend_id != -1)`), and on some hosts every
model load dies with SIGILL. Off, every CPU runs the same kernels, so our numbers are the same on every machine.
`Llama(...)` does not forward `use_extra_bufts`, so the default model parameters it starts from are replaced for
the duration of the load.

`run_isolated` runs a function of this module in a fresh Python process, so that an abort or an illegal instruction
inside llama.cpp becomes a `NativeCrash` (a `MoepackError` naming the signal and what to try) instead of the end
of the caller.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from moepack.errors import MoepackError

__all__ = ["llama_command", "load_llama", "run_isolated", "NativeCrash", "sample_text", "smoke_test", "NO_REPACK_HINT"]

log = logging.getLogger(__name__)

NO_REPACK_HINT = ("llama.cpp's CPU extra buffer types (weight repacking, AMX) are off by default in moepack; "
                  "if you turned them on, turn them off (llama.cpp: --no-repack)")
_LOAD_LOCK = threading.Lock()  # the swapped default parameters are process-wide while a load runs


class NativeCrash(MoepackError, RuntimeError):
    """llama.cpp killed the process that ran it."""


@contextlib.contextmanager
def _model_defaults(extra_bufts: bool) -> Iterator[None]:
    import llama_cpp.llama as high

    low = high.llama_cpp  # the module whose llama_model_default_params Llama.__init__ calls
    original = low.llama_model_default_params

    def defaults():  # -> llama_model_params
        p = original()
        p.use_extra_bufts = extra_bufts
        return p

    with _LOAD_LOCK:
        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


def load_llama(path: str | Path, *, extra_bufts: bool = False, **kwargs: Any):  # -> llama_cpp.Llama
    """`llama_cpp.Llama(model_path=path, verbose=False, **kwargs)` with llama.cpp's CPU extra buffer types off
    unless `extra_bufts` (see the module doc)."""
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    with _model_defaults(extra_bufts):
        return Llama(model_path=str(path), **kwargs)


def llama_command(path: str | Path, ctx: int, tool: str = "llama-server") -> str:
    """The llama.cpp command line that runs `path` as moepack verified it: the whole model on the CPU, the device's
    context, the CPU extra buffer types off (--no-repack: on AMX CPUs they abort DeepSeek files)."""
    import shlex

    return f"{tool} -m {shlex.quote(str(path))} -c {int(ctx)} --no-repack"


def sample_text(path: str, prompt: str, n_ctx: int, max_tokens: int, threads: int,
                extra_bufts: bool = False) -> dict[str, Any]:
    """Greedy continuation of `prompt` (an isolated task: see run_isolated)."""
    llm = load_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, extra_bufts=extra_bufts)
    try:
        text = llm(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    return {"text": text}


def smoke_test(path: str, n_ctx: int, threads: int, extra_bufts: bool = False) -> dict[str, Any]:
    """Load and evaluate a few tokens, to learn in a throwaway process whether this file runs here."""
    llm = load_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, extra_bufts=extra_bufts)
    try:
        llm.eval([int(llm.token_bos()) if llm.token_bos() >= 0 else 0] * min(4, n_ctx))
        return {"n_vocab": int(llm.n_vocab())}
    finally:
        llm.close()


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_isolated(target: str, payload: dict[str, Any], what: str, timeout: float | None = None) -> dict[str, Any]:
    """`module:function(**payload)` in a fresh Python process; its JSON result.

    `what` names the work in errors ("verifying model.gguf"). A process killed by a signal (llama.cpp's aborts,
    an illegal instruction) raises NativeCrash; any other failure raises it too, with the end of stderr."""
    cmd = [sys.executable, "-m", __name__, target, json.dumps(payload)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise NativeCrash(f"{what}: llama.cpp did not finish within {timeout:g} s") from e
    tail = p.stderr.strip()[-600:]
    if p.returncode < 0:
        raise NativeCrash(f"{what}: llama.cpp killed its process with {_signal_name(p.returncode)}"
                          f"{': ' + tail.splitlines()[-1] if tail else ''}. {NO_REPACK_HINT}; if it persists, "
                          "report the llama-cpp-python version and CPU (lscpu)")
    if p.returncode != 0:
        raise NativeCrash(f"{what}: llama.cpp failed (exit {p.returncode}): {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    mod, _, fn = argv[0].partition(":")
    result = getattr(importlib.import_module(mod), fn)(**json.loads(argv[1]))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    _child(sys.argv[1:])

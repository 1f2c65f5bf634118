"""The one way moepack loads a GGUF in llama.cpp, and the one way it runs llama.cpp where a crash must not kill us.

`load_llama` builds a llama-cpp-python `Llama` with the CPU extra buffer types off (llama.cpp's `--no-repack`). With
them on (llama.cpp's default), a CPU with AMX puts weights in its AMX/repack buffers, where DeepSeek's 3-D
`attn_k_b`/`attn_v_b` mat-muls abort the process (`GGML_ASSERT(*cur_backend_id != -1)`), and on some hosts every
model load dies with SIGILL. Off, every CPU runs the same kernels, so our numbers are the same on every machine.
`Llama(...)` does not forward `use_extra_bufts`, so the default model parameters it starts from are replaced for
the duration of the load.

`load_llama(..., overrides={"exps": "CPU"})` places the tensors whose names match a pattern in a backend's buffer
(llama.cpp's `-ot exps=CPU`: the routed experts in system RAM while `n_gpu_layers` puts the rest on the GPU).
llama-cpp-python's `Llama(...)` does not forward `tensor_buft_overrides` either, so the same swapped default
parameters carry them: a NULL-terminated array of {pattern, buffer type}, the buffer type looked up by device name
(`ggml_backend_dev_by_name`, "CPU" or e.g. "CUDA0") in the bundled libggml.

`run_isolated` runs a function of this module in a fresh Python process, so that an abort or an illegal instruction
inside llama.cpp becomes a `NativeCrash` (a `MoepackError` naming the signal and what to try) instead of the end
of the caller.
"""
from __future__ import annotations

import contextlib
import ctypes
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

__all__ = ["llama_command", "load_llama", "parse_overrides", "run_isolated", "NativeCrash", "sample_text", "smoke_test",
           "EXPERTS_ON_CPU", "GPU_LAYERS", "NO_REPACK_HINT"]

log = logging.getLogger(__name__)

NO_REPACK_HINT = ("llama.cpp's CPU extra buffer types (weight repacking, AMX) are off by default in moepack; "
                  "if you turned them on, turn them off (llama.cpp: --no-repack)")
# llama.cpp's placement for a MoE on a GPU too small for it: every layer offloaded (-ngl 99), then the tensors whose
# names match "exps" (the routed experts, blk.N.ffn_{gate,up,down}_exps) overridden back to CPU memory (-ot).
EXPERTS_ON_CPU = {"exps": "CPU"}
GPU_LAYERS = 99
_LOAD_LOCK = threading.Lock()  # the swapped default parameters are process-wide while a load runs


class NativeCrash(MoepackError, RuntimeError):
    """llama.cpp killed the process that ran it."""


class _Override(ctypes.Structure):
    """llama.h's llama_model_tensor_buft_override."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def parse_overrides(text: str) -> dict[str, str]:
    """llama.cpp's -ot value "exps=CPU,attn=CUDA0" → {"exps": "CPU", "attn": "CUDA0"}."""
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
    if not pairs or any(len(kv) != 2 or not kv[0] or not kv[1] for kv in pairs):
        raise MoepackError(f"cannot read tensor override {text!r}; write PATTERN=DEVICE[,...], e.g. exps=CPU")
    return {k: v for k, v in pairs}


def _override_array(overrides: dict[str, str]) -> ctypes.Array:
    """The NULL-terminated {pattern, buffer type} array llama_model_params.tensor_buft_overrides points to."""
    from llama_cpp._ggml import libggml

    by_name, buft_of = libggml.ggml_backend_dev_by_name, libggml.ggml_backend_dev_buffer_type
    by_name.argtypes, by_name.restype = [ctypes.c_char_p], ctypes.c_void_p
    buft_of.argtypes, buft_of.restype = [ctypes.c_void_p], ctypes.c_void_p
    arr = (_Override * (len(overrides) + 1))()
    for i, (pattern, device) in enumerate(overrides.items()):
        dev = by_name(device.encode())
        if not dev:
            raise MoepackError(f"tensor override {pattern}={device}: llama.cpp has no device {device!r} here "
                               "(CPU, or a GPU such as CUDA0 in a GPU build)")
        arr[i].pattern, arr[i].buft = pattern.encode(), buft_of(dev)
    return arr  # arr[-1] stays {NULL, NULL}


@contextlib.contextmanager
def _model_defaults(repack: bool, overrides: ctypes.Array | None = None) -> Iterator[None]:
    import llama_cpp.llama as high

    low = high.llama_cpp  # the module whose llama_model_default_params Llama.__init__ calls
    original = low.llama_model_default_params

    def defaults():  # -> llama_model_params
        p = original()
        p.use_extra_bufts = repack
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        return p

    with _LOAD_LOCK:
        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


def load_llama(path: str | Path, *, repack: bool = False, overrides: dict[str, str] | None = None,
               **kwargs: Any):  # -> llama_cpp.Llama
    """`llama_cpp.Llama(model_path=path, verbose=False, **kwargs)` with llama.cpp's CPU extra buffer types off
    unless `repack`, and tensors matching each pattern of `overrides` placed on its device (see the module
    doc)."""
    from llama_cpp import Llama

    kwargs.setdefault("verbose", False)
    arr = _override_array(overrides) if overrides else None
    with _model_defaults(repack, arr):
        llm = Llama(model_path=str(path), **kwargs)
    llm._moepack_overrides = arr  # llama.cpp keeps the patterns' pointers: they live as long as the model
    return llm


def llama_command(path: str | Path, ctx: int, tool: str = "llama-server", offload_experts: bool = False) -> str:
    """The llama.cpp command line that runs `path` as moepack placed and verified it: the device's context and the
    CPU extra buffer types off (--no-repack: on AMX CPUs they abort DeepSeek files); the whole model on the CPU, or
    with `offload_experts` every layer on the GPU but the routed experts (-ngl 99 -ot exps=CPU)."""
    import shlex

    gpu = ""
    if offload_experts:
        ot = ",".join(f"{k}={v}" for k, v in EXPERTS_ON_CPU.items())
        gpu = f" -ngl {GPU_LAYERS} -ot {shlex.quote(ot)}"
    return f"{tool} -m {shlex.quote(str(path))} -c {int(ctx)}{gpu} --no-repack"


def sample_text(path: str, prompt: str, n_ctx: int, max_tokens: int, threads: int, repack: bool = False,
                overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Greedy continuation of `prompt` (an isolated task: see run_isolated)."""
    llm = load_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, repack=repack,
                     overrides=overrides)
    try:
        text = llm(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    return {"text": text}


def smoke_test(path: str, n_ctx: int, threads: int, repack: bool = False) -> dict[str, Any]:
    """Load and evaluate a few tokens, to learn in a throwaway process whether this file runs here."""
    llm = load_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, repack=repack)
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

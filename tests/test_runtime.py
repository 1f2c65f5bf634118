"""The one llama.cpp loader (extra buffer types off unless asked) and crash isolation of llama.cpp work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA, build_tiny_model
from moepack.gguf.runtime import NativeCrash, load_llama, run_isolated

CRASHER = '''
import os, signal

def crash(sig):
    os.kill(os.getpid(), getattr(signal, sig))

def sample_text(**kw):
    crash("SIGILL")
'''


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    from moepack.gguf.quantize import quantize_model

    root = tmp_path_factory.mktemp("rt")
    model = build_tiny_model("qwen3_moe", root / "m", tokenizer=True, vocab=320)
    quantize_model(model, root / "m.gguf", qtype="F32", progress=False)
    return root / "m.gguf"


@pytest.fixture
def crasher(tmp_path, monkeypatch) -> str:
    (tmp_path / "crasher_mod.py").write_text(CRASHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child process imports it too
    return "crasher_mod"


@pytest.mark.parametrize("extra", [False, True])
def test_loader_sets_extra_buffer_types(gguf_file: Path, extra: bool) -> None:
    import llama_cpp

    llm = load_llama(gguf_file, n_ctx=32, repack=extra)
    try:
        assert llm.model_params.use_extra_bufts is extra
        llm.eval([1, 2, 3])
    finally:
        llm.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # llama.cpp's own default is restored


def test_loader_default_is_off(gguf_file: Path) -> None:
    llm = load_llama(gguf_file, n_ctx=32)
    assert llm.model_params.use_extra_bufts is False
    llm.close()


def test_isolated_run_returns_the_result(gguf_file: Path) -> None:
    res = run_isolated("moepack.gguf.runtime:smoke_test", {"path": str(gguf_file), "n_ctx": 32, "threads": 1},
                       what="smoke")
    assert res == {"n_vocab": 320}


@pytest.mark.parametrize("sig", ["SIGABRT", "SIGILL", "SIGSEGV"])
def test_native_crash_becomes_an_error(crasher: str, sig: str) -> None:
    with pytest.raises(NativeCrash, match=f"verifying x.gguf: llama.cpp killed its process with {sig}.*--no-repack"):
        run_isolated(f"{crasher}:crash", {"sig": sig}, what="verifying x.gguf")


def test_compress_survives_a_crash_in_verification(crasher: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """llama.cpp dies while compress verifies its file: one clear error, the GGUF stays at the output path and the
    run summary is written, saying why it was not verified."""
    from moepack.pipeline import compress
    from moepack.cli import main

    monkeypatch.setattr(compress, "VERIFY_TARGET", f"{crasher}:sample_text")
    model = build_tiny_model("qwen3_moe", tmp_path / "m", tokenizer=True, vocab=320)
    out, run = tmp_path / "x.gguf", tmp_path / "run"
    rc = main(["compress", str(model), "--target-bpw", "16", "--keep", "1.0", "-o", str(out), "--run-dir", str(run),
               "--calib-text", str(DATA / "tinystories-valid.txt"), "--calib-tokens", "256", "--seq-len", "64",
               "--sens-tokens", "128", "--ladder", "Q4_K,Q8_0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "could not run it here" in err and "SIGILL" in err and str(out) in err
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    summary = json.loads((run / "summary.json").read_text())
    assert "SIGILL" in summary["verify_error"] and summary["sample"] == ""

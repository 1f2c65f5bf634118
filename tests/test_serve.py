"""A compressed file served the way users serve GGUFs: llama-cpp-python's OpenAI-compatible server on a loopback
port, a real client asking for a chat completion, and the prompt built from the chat template the GGUF carries."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gguf
import pytest

from conftest import DATA, fixture_dir
from moepack.cli import main

for _mod in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
    pytest.importorskip(_mod, reason="llama-cpp-python's server extra is not installed (pip install -e '.[serve]')")

# ChatML as Qwen writes it, in our own words (not byte-identical to a template llama-cpp-python knows by name, so
# the server must take the GGUF's text rather than guess a built-in format).
TEMPLATE = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")
MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me about a cat."}]
CALIB = DATA / "tinystories-valid.txt"
# The leanest compress that still calibrates, prunes (keep 0.75) and allocates mixed types: serving is the check here.
LEAN = ["--calib-text", str(CALIB), "--calib-tokens", "512", "--seq-len", "128", "--sens-tokens", "128",
        "--ladder", "Q4_K,Q8_0", "--criterion", "reap", "--refine", "0", "--sensitivity", "fast"]
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_template(src: Path, dst: Path) -> Path:
    """A copy of the fixture whose tokenizer_config.json carries a chat template (the fixture has none)."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst


def _wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"server not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _chat(base: str, model: str) -> dict:
    """One chat completion with the openai client when installed, else plain HTTP."""
    try:
        import openai
    except ImportError:
        body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return json.loads(r.read())
    client = openai.OpenAI(base_url=base, api_key="not-needed", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0).model_dump()


def test_compressed_file_serves_chat_completions(tmp_path: Path) -> None:
    from jinja2 import Template
    from tokenizers import Tokenizer

    model = _with_template(fixture_dir("tiny-qwen3-moe"), tmp_path / "tiny-qwen3-moe")
    out = tmp_path / "tiny.gguf"
    target = (model / "model.safetensors").stat().st_size // 3  # bf16 → about 5 bits per weight
    assert main(["compress", str(model), "--target-size", f"{target}B", "--keep", "0.75", "-o", str(out),
                 *LEAN]) == 0
    fields = gguf.GGUFReader(out).fields
    stored = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert stored == TEMPLATE  # compress carried the template from tokenizer_config.json into the GGUF

    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(out), "--model_alias",
                                 "tiny", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
                                 "--n_threads", "2"], stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, base, log)
            reply = _chat(base, "tiny")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    server_log = log.read_text(errors="replace")
    assert "Using gguf chat template" in server_log, server_log[-3000:]
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] >= 1
    # The prompt the server evaluated is the GGUF's template rendered over the messages, token for token.
    prompt = Template(TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    expected = len(Tokenizer.from_file(str(model / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids)
    assert reply["usage"]["prompt_tokens"] == expected

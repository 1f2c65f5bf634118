"""Conversations as calibration text (issue 32): JSONL chats rendered with the model's own chat template as
transformers renders them, then token ids; every malformed input fails with a message that says where and what."""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, MODELS, build_tiny_model
from moepack.model.chat import (ChatError, chat_template, has_chat_template, read_conversations, render_conversations,
                                tokenize_chat)
from moepack.model.textdata import BUNDLED_CALIB_DIR, CalibSource, load_tokenizer, tokenize_source

# ChatML with the tokenizer's own special token around it: BOS first, EOS last (a template writes them, not encode)
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}")
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "ROMEO:\nBut soft!"},
     {"role": "assistant", "content": "JULIET:\nAy me."}],
    [{"role": "user", "content": "What light through yonder window breaks?"},
     {"role": "assistant", "content": "It is the east, and Juliet is the sun."}],
]


def _model(tmp_path: Path, template: str | None = CHATML) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODELS / "tiny-qwen3-moe" / name, d / name)
    if template is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return d


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rendering_is_transformers(tmp_path: Path) -> None:
    d = _model(tmp_path)
    got = render_conversations(d, CHATS)
    assert got[1] == ("<|endoftext|><|im_start|>user\nWhat light through yonder window breaks?<|im_end|>\n"
                      "<|im_start|>assistant\nIt is the east, and Juliet is the sun.<|im_end|>\n<|endoftext|>")
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(d).apply_chat_template(CHATS, tokenize=False, add_generation_prompt=False)
    assert got == want


def test_tokenize_chat(tmp_path: Path) -> None:
    d = _model(tmp_path)
    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS] + [""])  # a blank line is skipped
    assert read_conversations(path) == CHATS
    tok = load_tokenizer(d)
    want = [i for text in render_conversations(d, CHATS) for i in tok.encode(text, add_special_tokens=False).ids]
    ids = tokenize_chat(d, path)
    assert ids.dtype == np.int64 and ids.tolist() == want
    assert want[0] == 0 and want.count(0) == 4  # <|endoftext|>: one id each, BOS and EOS of both conversations
    first = len(tok.encode(render_conversations(d, CHATS[:1])[0], add_special_tokens=False).ids)
    assert tokenize_chat(d, path, max_tokens=5).tolist() == want[:5]
    assert tokenize_chat(d, path, max_tokens=first).tolist() == want[:first]  # the second is never rendered
    assert tokenize_source(d, CalibSource("chat", path, chat=True)).tolist() == want


def test_template_sources(tmp_path: Path) -> None:
    """Where transformers finds it: chat_template.jinja first, then tokenizer_config.json (one string, or named
    templates of which "default"), then chat_template.json; none: an error that says what to do."""
    d = _model(tmp_path, template=None)
    assert not has_chat_template(d)
    with pytest.raises(ChatError, match="no chat template.*--calib-text.*tokenizer_config.json"):
        chat_template(d)
    with pytest.raises(ChatError, match="no chat template"):
        tokenize_chat(d, _jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}]))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert chat_template(d) == "legacy"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "named"}]
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named}))
    assert chat_template(d) == "named"
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named[:1]}))
    with pytest.raises(ChatError, match="none named 'default'"):
        chat_template(d)
    (d / "chat_template.jinja").write_text(CHATML)
    assert has_chat_template(d) and chat_template(d) == CHATML
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(d).apply_chat_template(CHATS, tokenize=False)
    assert render_conversations(d, CHATS) == want


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"c.jsonl:2: not valid JSON"),
    ('{"turns": []}', r'c.jsonl:2: no "messages" list'),
    ('{"messages": []}', r'c.jsonl:2: no "messages" list'),
    ('[1, 2]', r'c.jsonl:2: no "messages" list'),
    ('{"messages": ["hi"]}', r"c.jsonl:2: message 0 is not an object"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"c.jsonl:2: message 0 has role 'bot'; expected one of"),
    ('{"messages": [{"content": "hi"}]}', r"c.jsonl:2: message 0 has role None"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [1]}]}',
     r"c.jsonl:2: message 1 \(user\) has content of type list; expected a string"),
    ('{"messages": [{"role": "user"}]}', r"c.jsonl:2: message 0 \(user\) has content of type NoneType"),
])
def test_malformed_lines(tmp_path: Path, line: str, message: str) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}, line])
    with pytest.raises(ChatError, match=message):
        read_conversations(path)


def test_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ChatError, match="no conversations"):
        read_conversations(_jsonl(tmp_path / "c.jsonl", ["", "  "]))
    with pytest.raises(ChatError, match="not found"):
        read_conversations(tmp_path / "none.jsonl")


def test_template_error_names_the_conversation(tmp_path: Path) -> None:
    d = _model(tmp_path, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    with pytest.raises(ChatError, match="fails on conversation 1: user first"):
        render_conversations(d, CHATS)


def test_tiktoken_vocabulary(tmp_path: Path) -> None:
    """Kimi-K2 style (a rank file, no tokenizer.json): the template's special tokens are their own ids, the rest
    is rank BPE (here: one token a byte)."""
    d = tmp_path / "kimi"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "kimi_k2"}))
    (d / "tiktoken.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    specials = ("[BOS]", "<|im_user|>", "<|im_end|>")
    added = {str(256 + k): {"content": c, "special": True} for k, c in enumerate(specials)}
    template = "{{ bos_token }}{% for m in messages %}<|im_user|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]", "added_tokens_decoder": added,
                                                         "chat_template": template}))
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert tokenize_chat(d, path).tolist() == [256, 257, ord("H"), ord("i"), 258]


def test_bundled_conversations_read() -> None:
    """The package's chat part is well formed: user / assistant turns that end on the assistant's."""
    chats = read_conversations(BUNDLED_CALIB_DIR / "chat.jsonl")
    assert len(chats) >= 20
    for c in chats:
        assert 2 <= len(c) <= 8 and len(c) % 2 == 0
        assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2)


def test_eval_chat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`moepack eval --eval-chat`: the reference's windows are the conversations in its chat template; a GGUF
    reference (no checkpoint template to render with) is refused, and so is --text beside it."""
    from moepack.cli import main
    from moepack.eval.reference import EvalConfig, EvalError, prepare_reference
    from moepack.gguf.quantize import quantize_model

    d = build_tiny_model("qwen3_moe", tmp_path / "tiny", vocab=4096, hidden=64, ffn=64, n_experts=8, top_k=2,
                         n_layers=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODELS / "tiny-qwen3-moe" / name, d / name)
    (d / "chat_template.jinja").write_text(CHATML)
    gguf = tmp_path / "tiny-f32.gguf"
    quantize_model(d, gguf, qtype="F32", progress=False)
    chats, cache, out = DATA / "eval" / "dialogue-chat.jsonl", tmp_path / "cache", tmp_path / "eval.json"
    assert main(["eval", str(gguf), "--reference", str(d), "--eval-chat", str(chats), "--window", "64",
                 "--tokens", "256", "--no-speed", "--cache-dir", str(cache), "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["chat"] and r["settings"]["windows"] == 4 and r["models"][0]["tokenizer_agrees"]
    assert r["models"][0]["kld_mean"] < 1e-3  # the F32 file of the reference itself
    assert "(conversations, the reference's chat template)" in capsys.readouterr().out
    cfg = EvalConfig(ctx=64, tokens=256, speed=False, cache_dir=cache, chat=True)
    ref = prepare_reference(d, chats, cfg)  # from the cache the run wrote
    assert ref.windows.ravel().tolist() == tokenize_chat(d, chats, 256).tolist()
    assert ref.windows[0, 0] == 0  # BOS, from the template
    with pytest.raises(EvalError, match="--eval-chat .* not a GGUF file"):
        prepare_reference(gguf, chats, cfg)
    with pytest.raises(SystemExit):
        main(["eval", str(gguf), "--reference", str(d), "--eval-chat", str(chats), "--text", str(chats)])

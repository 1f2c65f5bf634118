"""Conversations as calibration or evaluation text: JSONL chats rendered with the model's own chat template, exactly
as transformers renders them (`apply_chat_template(..., tokenize=False)`), then token ids with the model's tokenizer.

A chat model is served on text in its template's layout (role headers, turn ends, BOS); calibrating it on that
layout shows the experts and the quantizer the tokens it will run on. The template is rendered from its string and
the special-token strings of tokenizer_config.json, without loading a transformers tokenizer, so that tiktoken
vocabularies (Kimi-K2, moepack.model.tiktoken_vocab) work the same way.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moepack.model.tokenizer import TextDataError, load_tokenizer
from moepack.model.tiktoken_vocab import TiktokenText, family_of, model_json

__all__ = ["ROLES", "SPECIAL_TOKEN_KEYS", "ChatError", "Conversation", "chat_template", "has_chat_template",
           "read_conversations", "render_conversations", "special_token_strings", "tokenize_chat"]

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]

ROLES = ("system", "user", "assistant", "tool")
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the special-token strings apply_chat_template hands the template
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template here; it wins over tokenizer_config.json's
LEGACY_TEMPLATE_FILE = "chat_template.json"  # {"chat_template": ...}, as older processors saved it
FORMAT = 'one JSON object a line: {"messages": [{"role": "user", "content": "..."}, ...]}'


class ChatError(TextDataError):
    """Conversations or a chat template moepack cannot use; the message says what is wrong and what to do."""


def _json_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return data if isinstance(data, dict) else {}


def _pick(template: Any, where: Path) -> str | None:
    """A template entry: a string, or named templates ([{"name", "template"}] or a dict) of which "default"."""
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        if "default" not in template:
            raise ChatError(f"{where}: several chat templates ({', '.join(map(str, template))}) and none named "
                            "'default'; name the one to use 'default'")
        template = template["default"]
    return template if isinstance(template, str) and template.strip() else None


def _find_template(model_dir: str | Path) -> str | None:
    root = Path(model_dir)
    if (root / TEMPLATE_FILE).is_file():
        return (root / TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", LEGACY_TEMPLATE_FILE):
        if (found := _pick(_json_file(root / name).get("chat_template"), root / name)) is not None:
            return found
    return None


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether chat_template() gives a template (several without a "default" give none)."""
    try:
        return _find_template(model_dir) is not None
    except ChatError:
        return False


def chat_template(model_dir: str | Path) -> str:
    """The model's chat template, found where transformers finds it: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or named templates: "default"), else chat_template.json."""
    found = _find_template(model_dir)
    if found is None:
        raise ChatError(f"{model_dir} has no chat template (no {TEMPLATE_FILE}, no \"chat_template\" in "
                        "tokenizer_config.json): pass the conversations as plain text (--calib-text) instead, or add "
                        "the model's chat_template to its tokenizer_config.json")
    return found


def special_token_strings(model_dir: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... as the template sees them: tokenizer_config.json's, else special_tokens_map.json's
    (a plain string, or an AddedToken record's "content")."""
    root = Path(model_dir)
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _json_file(root / name)
        for key in SPECIAL_TOKEN_KEYS:
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and key not in out:
                out[key] = value
    return out


def _message(where: str, i: int, m: Any) -> dict[str, str]:
    if not isinstance(m, dict):
        raise ChatError(f"{where}: message {i} is not an object with \"role\" and \"content\"")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ChatError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}; "
                        "expected a string")
    return {"role": role, "content": content}


def _conversation(where: str, line: str) -> Conversation:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ChatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected {FORMAT}") from None
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: no \"messages\" list (or an empty one); expected {FORMAT}")
    return [_message(where, i, m) for i, m in enumerate(messages)]


def read_conversations(path: str | Path) -> list[Conversation]:
    """JSONL conversations, one a line, OpenAI style; blank lines skipped. Only "role" and "content" are kept."""
    p = Path(path)
    if not p.is_file():
        raise ChatError(f"conversation file not found: {p}")
    out = [_conversation(f"{p}:{n}", line)
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not out:
        raise ChatError(f"{p}: no conversations; expected {FORMAT}")
    return out


def _renderer(model_dir: str | Path) -> Callable[[int, Conversation], str]:
    """Renders one conversation as transformers' apply_chat_template(tokenize=False, add_generation_prompt=False)
    does: its own sandboxed Jinja renderer, the template and the special-token strings."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    template, specials = chat_template(model_dir), special_token_strings(model_dir)

    def render(i: int, conversation: Conversation) -> str:
        try:
            rendered, _ = render_jinja_template([conversation], chat_template=template, add_generation_prompt=False,
                                                **specials)
        except jinja2.TemplateError as e:
            raise ChatError(f"{model_dir}'s chat template fails on conversation {i + 1}: {e}") from None
        return rendered[0]

    return render


def render_conversations(model_dir: str | Path, conversations: list[Conversation]) -> list[str]:
    render = _renderer(model_dir)
    return [render(i, c) for i, c in enumerate(conversations)]


def _tiktoken_specials(model_dir: Path, tok: TiktokenText) -> dict[str, int]:
    """A tiktoken vocabulary's special tokens (the ids after the ranks), as gguf.vocab_tiktoken.special_tokens names
    them: the family's fixed list, or tokenizer_config.json's added_tokens_decoder."""
    fam = family_of(model_dir)
    if fam.specials:
        return {s: len(tok.ranks) + i for i, s in enumerate(fam.specials)}
    named = model_json(model_dir, "tokenizer_config.json").get("added_tokens_decoder") or {}
    return {a["content"]: int(i) for i, a in named.items() if isinstance(a, dict) and "content" in a}


def _encoder(model_dir: str | Path) -> Callable[[str], list[int]]:
    """Rendered text → ids, the template's special tokens as their own ids (tokenizers does this itself; a tiktoken
    vocabulary encodes ordinary text only, so the text is split at its special tokens first)."""
    tok = load_tokenizer(model_dir)
    if not isinstance(tok, TiktokenText):
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    specials = _tiktoken_specials(Path(model_dir), tok)
    split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

    def encode(text: str) -> list[int]:
        parts = split.split(text) if specials else [text]
        # split() keeps the matches at odd positions
        return [i for k, part in enumerate(parts) if part
                for i in ([specials[part]] if k % 2 else tok.encode(part).ids)]

    return encode


def tokenize_chat(model_dir: str | Path, path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of a JSONL conversation file: each conversation rendered with the model's chat template and encoded
    without added special tokens (the template writes BOS and turn ends itself), concatenated; stops early once
    `max_tokens` are reached, as tokenize_file."""
    conversations = read_conversations(path)
    render, encode = _renderer(model_dir), _encoder(model_dir)
    ids: list[int] = []
    for i, conversation in enumerate(conversations):
        ids.extend(encode(render(i, conversation)))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    log.debug("%s: %d tokens from %d conversations", path, len(ids), i + 1)
    return np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int64)

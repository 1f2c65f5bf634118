"""`moepack eval`: perplexity against an independent transformers computation, KLD of a model against itself,
reproducibility, the cloze set and multiple-choice arithmetic."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, MODELS, build_tiny_model, fixture_dir
from moepack.eval import mc
from moepack.cli import main
from moepack.eval.evaluate import evaluate, to_markdown
from moepack.eval.reference import SCORED_TOKENS, EvalConfig, EvalError, prepare_reference, tokens_for
from moepack.eval.speed import SPEED_RUNS
from moepack.model import metrics

TEXT = DATA / "tinystories-valid.txt"
CFG = EvalConfig(ctx=64, tokens=512, threads=1, speed=False, mc_items=None)
TIMING = {"eval_seconds", "load_seconds", "prompt_tps", "decode_tps", "peak_rss_bytes", "base_rss_bytes",
          "speed_each_run"}


def _tokenizer_dir() -> Path:
    for name in ("tiny-qwen3-moe", "tiny-deepseek-v3"):
        if (MODELS / name / "tokenizer.json").is_file():
            return MODELS / name
    pytest.fail("no fixture tokenizer.json under models/ (the fixtures are committed: restore them from git)")


def _f32_gguf(model_dir: Path, out: Path) -> Path:
    from moepack.gguf.quantize import quantize_model

    quantize_model(model_dir, out, qtype="F32", progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, its F32 GGUF) of a random qwen3_moe with the fixtures' 4096-token tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    d = build_tiny_model("qwen3_moe", root / "tiny", vocab=4096, hidden=64, ffn=64, n_experts=8, top_k=2, n_layers=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (_tokenizer_dir() / f).is_file():
            shutil.copy(_tokenizer_dir() / f, d / f)
    return d, _f32_gguf(d, root / "tiny-f32.gguf")


def _independent_ppl(model_dir: Path, ctx: int, tokens: int) -> float:
    """exp(mean NLL) of the second half of each window, from tokenizers + transformers alone."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids: list[int] = []
    for para in TEXT.read_text(encoding="utf-8").split("\n\n"):
        if para.strip():
            ids += tok.encode(para + "\n\n", add_special_tokens=False).ids
        if len(ids) >= tokens:
            break
    n = tokens // ctx
    x = torch.tensor(ids[: n * ctx]).reshape(n, ctx)  # (N, ctx)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.double(), -1)  # (N, ctx, V)
    first = ctx // 2
    nll = -logp[:, first:-1].gather(-1, x[:, first + 1:, None])[..., 0]  # (N, ctx/2 - 1)
    return math.exp(nll.mean().item())


def test_kld_against_itself_is_zero(tiny, tmp_path) -> None:
    _, gguf_path = tiny
    r = evaluate([gguf_path], gguf_path, TEXT, replace(CFG, cache_dir=tmp_path))
    m = r["models"][0]
    assert r["reference"]["kind"] == "gguf"
    assert m["kld_mean"] == 0.0 and m["kld_max"] == 0.0 and m["kld_p99"] == 0.0
    assert m["top1"] == 1.0 and m["top1_ci95_low"] == m["top1_ci95_high"] == 1.0
    assert m["dp_rms"] == 0.0 and m["dp_rms_ci95_high"] == 0.0 and m["dp_mean"] == 0.0
    assert m["ppl_ratio"] == 1.0 and m["ppl_ratio_ci95_low"] == m["ppl_ratio_ci95_high"] == 1.0
    assert m["ppl"] == pytest.approx(r["reference"]["ppl"], rel=1e-12)
    assert r["settings"]["scored_tokens"] == (512 // 64) * (64 // 2 - 1)
    assert r["settings"]["short_text"] is None


def test_ppl_equals_transformers(tiny, tmp_path) -> None:
    model_dir, gguf_path = tiny
    r = evaluate([gguf_path], model_dir, TEXT, replace(CFG, cache_dir=tmp_path))
    want = _independent_ppl(model_dir, CFG.ctx, CFG.tokens)
    assert r["reference"]["ppl"] == pytest.approx(want, rel=1e-6)  # the cached reference, same framework
    m = r["models"][0]
    assert m["ppl"] == pytest.approx(want, rel=1e-3)  # llama.cpp on the F32 GGUF
    assert m["tokenizer_agrees"] is True
    assert 0.0 <= m["kld_mean"] < 1e-3 and m["top1"] > 0.95
    # llama.cpp vs transformers: the ratio is exactly the two PPLs', the differences small but not nil.
    assert m["ppl_ratio"] == pytest.approx(m["ppl"] / r["reference"]["ppl"], rel=1e-9)
    assert m["ppl_ratio_ci95_low"] <= m["ppl_ratio"] <= m["ppl_ratio_ci95_high"]
    assert 0.0 < m["dp_rms"] < 1e-2 and m["dp_rms_ci95_low"] <= m["dp_rms"] <= m["dp_rms_ci95_high"]
    n_params = r["reference"]["params"]
    assert m["bpw"] == pytest.approx(8 * gguf_path.stat().st_size / n_params)
    assert m["bpw_tensors"] == pytest.approx(32.0, rel=0.01)


def _numbers(report: dict) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in report["models"]] + [report["reference"]]


def test_reproducible_and_cached(tiny, tmp_path) -> None:
    model_dir, gguf_path = tiny
    cfg = replace(CFG, mc=("cloze",), cloze_text=TEXT, mc_items=6, cache_dir=tmp_path / "a")
    first = evaluate([gguf_path], model_dir, TEXT, cfg)
    cached = list((tmp_path / "a").glob("ref-*/meta.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = evaluate([gguf_path], model_dir, TEXT, cfg)  # reference read from the cache
    assert cached[0].stat().st_mtime_ns == mtime
    fresh = evaluate([gguf_path], model_dir, TEXT, replace(cfg, cache_dir=tmp_path / "b"))  # recomputed
    assert _numbers(first) == _numbers(again) == _numbers(fresh)
    assert first["models"][0]["mc"]["cloze"]["n"] == 6
    # The GGUF and the checkpoint it came from agree on every choice.
    assert first["models"][0]["mc"] == first["reference"]["mc"]


def test_cli_json_markdown_and_speed(tiny, tmp_path, capsys) -> None:
    model_dir, gguf_path = tiny
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    rc = main(["eval", str(gguf_path), "--reference", str(model_dir), "--text", str(TEXT), "--window", "64",
               "--tokens", "256", "--mc", "cloze", "--cloze-text", str(TEXT), "--mc-items", "4", "--prompt-tokens", "16", "--gen-tokens", "8",
               "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out_json), "--md-out", str(out_md),
               "--threads", "1"])
    assert rc == 0
    r = json.loads(out_json.read_text())
    m = r["models"][0]
    for key in ("file", "size_bytes", "bpw", "ppl", "kld_mean", "kld_median", "kld_p99", "kld_p999", "top1", "mc",
                "top1_ci95_low", "dp_rms", "dp_rms_ci95_high", "ppl_ratio", "ppl_ratio_ci95_low", "ln_ppl_ratio",
                "prompt_tps", "decode_tps", "peak_rss_bytes"):
        assert key in m, key
    assert m["prompt_tps"] > 0 and m["decode_tps"] > 0
    runs = m["speed_each_run"]["decode_tps"]
    assert r["settings"]["speed_runs"] == SPEED_RUNS == len(runs) and m["decode_tps"] == pytest.approx(np.median(runs), rel=1e-3)
    assert m["peak_rss_bytes"] > m["base_rss_bytes"] > 0
    assert set(m["mc"]["cloze"]) == {"n", "acc", "acc_norm", "metric", "score"}
    md = out_md.read_text()
    assert md == to_markdown(r) and "`tiny-f32.gguf`" in md and "cloze (acc) %" in md
    quality, speed = md.split("\n\n", 1)[0], md.split("\n\n", 2)[2]
    assert {"PPL ratio", "RMS Δp %", "same top %", "KLD p99.9"} <= {c.strip() for c in quality.splitlines()[0].split("|")}
    assert "tok/s" not in quality and "decode tok/s" in speed and f"median of {SPEED_RUNS} run(s)" in speed
    assert md.splitlines()[0] in capsys.readouterr().out


def test_bad_inputs(tiny, tmp_path, capsys) -> None:
    model_dir, gguf_path = tiny
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    assert main(["eval", str(not_gguf), "--reference", str(model_dir), "--text", str(TEXT)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    with pytest.raises(EvalError, match="less than one window"):
        evaluate([gguf_path], model_dir, TEXT, replace(CFG, tokens=32))
    with pytest.raises(EvalError, match="reference not found"):
        evaluate([gguf_path], tmp_path / "missing", TEXT, replace(CFG, cache_dir=tmp_path))


def test_cloze_set_is_deterministic() -> None:
    a = mc.build_cloze(TEXT, 40)
    b = mc.build_cloze(TEXT, 40)
    assert a == b and len(a) == 40
    assert mc.build_cloze(TEXT, 10) == a[:10]  # a prefix does not depend on n
    text = TEXT.read_text(encoding="utf-8")
    for item in a:
        assert len(item.endings) == 4 and len(set(item.endings)) == 4
        gold = item.endings[item.gold]
        assert (item.context + gold) in text  # the gold word really ends that sentence
    assert {i.gold for i in a} == {0, 1, 2, 3}


class _TableScorer:
    """Log-likelihood of an ending = -(its first token id): a toy whose answers are known."""

    def ending_logprobs(self, context: list[int], endings: list[list[int]]) -> list[float]:
        assert context
        return [-float(sum(e)) for e in endings]


def test_choice_arithmetic() -> None:
    # Summed log-likelihood picks the short ending; per character, the long one.
    assert mc.choose([-4.0, -6.0], [" ab", " abcdefgh"]) == (0, 1)
    tokenize = lambda s: [ord(c) - 96 if c.isalpha() else 30 for c in s]  # noqa: E731 (one token per character)
    assert mc.split_ending(tokenize, "ab", " cd") == ([1, 2], [30, 3, 4])
    items = [mc.McItem("ab", (" a", " z"), 0), mc.McItem("ab", (" z", " a"), 0), mc.McItem("ab", (" a", " aa"), 1)]
    r = mc.score_items("cloze", _TableScorer(), tokenize, items)
    # logliks: item 1 (-31, -56); item 2 (-56, -31); item 3 (-31, -32), per char (-15.5, -10.67)
    assert r.logliks[2] == (-31.0, -32.0)
    assert r.acc == pytest.approx(1 / 3) and r.acc_norm == pytest.approx(2 / 3)


def test_mc_loaders() -> None:
    p = mc.load_piqa(mc.MC_DATA, 3)
    assert len(p) == 3 and p[0].context.startswith("Question: ") and p[0].context.endswith("\nAnswer:")
    assert all(len(i.endings) == 2 and i.gold in (0, 1) for i in p)
    h = mc.load_hellaswag(mc.MC_DATA, 3)
    assert len(h) == 3 and all(len(i.endings) == 4 and i.endings[0].startswith(" ") for i in h)


def test_trained_fixture_picks_obvious_answers(tmp_path) -> None:
    model_dir = fixture_dir("tiny-qwen3-moe")
    gguf_path = _f32_gguf(model_dir, tmp_path / "fixture-f32.gguf")
    from moepack.eval.reference import LlamaScorer, Reference

    scorer = LlamaScorer(gguf_path, 128, 1)
    tokenize = scorer.tokenize
    item = mc.McItem("once upon a time, there was a little girl named", (" quickly", " the", " lily", " jumped"), 2)
    assert mc.score_items("cloze", scorer, tokenize, [item]).acc == 1.0
    scorer.close()
    cfg = replace(CFG, ctx=128, tokens=1024, mc=("cloze",), cloze_text=TEXT, mc_items=20, cache_dir=tmp_path)
    r = evaluate([gguf_path], model_dir, TEXT, cfg)
    m = r["models"][0]
    assert m["ppl"] == pytest.approx(r["reference"]["ppl"], rel=1e-3)
    assert m["ppl"] < 100  # a trained model, far below the 4096 of a uniform guess
    assert m["mc"]["cloze"]["acc"] >= 0.5  # chance is 0.25
    assert isinstance(prepare_reference(model_dir, TEXT, cfg), Reference)


def test_kld_summary_ci_from_window_means() -> None:
    from moepack.model import metrics

    rng = np.random.default_rng(0)
    kld = rng.exponential(0.01, size=(40, 31))  # 40 windows of 31 scored tokens
    kld[::2] *= 3  # windows differ: the interval must come from their spread
    s = metrics.kld_summary(kld.reshape(-1), blocks=40)
    means = kld.mean(axis=1)
    half = 1.96 * means.std(ddof=1) / np.sqrt(40)
    assert s["kld_ci95_low"] == pytest.approx(kld.mean() - half) and s["kld_ci95_high"] == pytest.approx(kld.mean() + half)
    token_half = 1.96 * kld.std(ddof=1) / np.sqrt(kld.size)
    assert half > token_half  # between-window spread is wider than the naive token-level error here
    assert s["kld_p99"] <= s["kld_p999"] <= s["kld_max"]
    assert "kld_ci95_low" not in metrics.kld_summary(kld.reshape(-1))  # no windows given: no interval claimed


def test_pair_summary_by_hand() -> None:
    same = metrics.pair_summary(np.full(6, 1.5), np.full(6, 1.5), np.ones(6, bool), blocks=3)
    assert same["dp_rms"] == 0.0 and same["top1"] == 1.0 and same["ppl_ratio"] == 1.0
    assert same["ppl_ratio_ci95_low"] == same["ppl_ratio_ci95_high"] == 1.0
    # Two windows of two tokens; the reference gives each target p = 1/2, the model 1/4 in the first window.
    ln2 = math.log(2)
    s = metrics.pair_summary(np.full(4, ln2), np.array([2 * ln2, 2 * ln2, ln2, ln2]),
                             np.array([True, False, True, True]), blocks=2)
    assert s["dp_mean"] == pytest.approx(-0.125) and s["dp_rms"] == pytest.approx(math.sqrt(0.25 ** 2 / 2))
    assert s["ln_ppl_ratio"] == pytest.approx(ln2 / 2) and s["ppl_ratio"] == pytest.approx(math.sqrt(2))
    half = 1.96 * (ln2 / math.sqrt(2)) / math.sqrt(2)  # window means (ln 2, 0)
    assert s["ppl_ratio_ci95_low"] == pytest.approx(math.exp(ln2 / 2 - half))
    assert s["ppl_ratio_ci95_high"] == pytest.approx(math.exp(ln2 / 2 + half))
    sq_half = 1.96 * (0.0625 / math.sqrt(2)) / math.sqrt(2)  # window means of dp^2: (1/16, 0)
    assert s["dp_rms_ci95_low"] == 0.0  # mean(dp^2) - half < 0: clipped before the square root
    assert s["dp_rms_ci95_high"] == pytest.approx(math.sqrt(0.03125 + sq_half))
    assert s["top1"] == 0.75 and s["top1_ci95_high"] == 1.0  # window shares (1/2, 1): 0.75 + 0.49 clipped
    assert s["top1_ci95_low"] == pytest.approx(0.75 - 1.96 * (0.5 / math.sqrt(2)) / math.sqrt(2))
    assert "dp_rms_ci95_low" not in metrics.pair_summary(np.zeros(4), np.ones(4), np.ones(4, bool))


def test_default_tokens_score_16k() -> None:
    for ctx in (64, 128, 256, 512, 1024, 4096):
        t = tokens_for(ctx)
        scored = (t // ctx) * (ctx - ctx // 2 - 1)
        assert SCORED_TOKENS <= scored < SCORED_TOKENS + (ctx - ctx // 2 - 1), ctx  # the fewest windows that do
    assert EvalConfig().tokens == tokens_for(512) and EvalConfig(ctx=64).tokens == tokens_for(64)
    assert EvalConfig(ctx=64, tokens=100).tokens == 100


def test_short_text_scores_what_it_has(tiny, tmp_path) -> None:
    _, gguf_path = tiny
    short = tmp_path / "short.txt"
    short.write_text(TEXT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    r = evaluate([gguf_path], gguf_path, short, replace(CFG, tokens=tokens_for(64), cache_dir=tmp_path))
    s = r["settings"]
    assert 1 <= s["windows"] < tokens_for(64) // 64 and s["scored_tokens"] == s["windows"] * 31
    assert f"{s['scored_tokens']} tokens scored instead of" in s["short_text"]
    assert "Short text:" in to_markdown(r) and r["models"][0]["kld_mean"] == 0.0

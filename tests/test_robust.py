"""Choosing for every domain: calibration sources keep their names through the held-out tokens, a plan worse than
the best llama.cpp mixture on one domain is not chosen however good its mean, and the run reports each domain."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, ROOT, build_tiny_model, small_compress_options
from moepack.cli import main
from moepack.pipeline.robust import WINDOWS, DomainKLD, robust_choice

FIXTURE = ROOT / "models" / "tiny-qwen3-moe"


def _dom(per_domain: dict[str, float], n_seq: int = 2, length: int = 64, noise: float = 0.0,
         seed: int = 0) -> DomainKLD:
    """Per-token KLDs of `n_seq` sequences per domain, each at the domain's level (± uniform `noise`)."""
    rng = np.random.default_rng(seed)
    names = tuple(per_domain)
    labels = np.repeat(np.arange(len(names)), n_seq)  # (N,)
    base = np.asarray([per_domain[names[i]] for i in labels])[:, None]  # (N, 1)
    tokens = base * (1 + noise * rng.uniform(-1, 1, size=(len(labels), length)))  # (N, L)
    return DomainKLD(names, labels, tokens)


def test_worse_needs_a_paired_loss_beyond_the_rivals_own_ci() -> None:
    mixture = _dom({"a": 0.010, "b": 0.020}, noise=0.5, seed=1)
    # the same tokens' noise, shifted: 50 % worse on b is worse; 1 % worse on a is not (within b's band)
    plan = DomainKLD(mixture.names, mixture.labels, mixture.tokens * np.where(mixture.labels == 1, 1.5, 1.01)[:, None])
    assert plan.worse_than(mixture) == ["b"]
    assert mixture.worse_than(plan) == []
    means = plan.means()
    assert set(means) == {"a", "b"} and means["b"][0] > means["a"][0] and all(h > 0 for _, h in means.values())
    assert plan.record()["b"] == list(means["b"])
    assert WINDOWS * 2 == len(mixture._windows(0))  # windows of a sequence are the CIs' unit


def test_robust_choice_takes_the_lowest_mean_that_is_nowhere_worse() -> None:
    mixture = _dom({"a": 0.010, "b": 0.020}, noise=0.2)
    lopsided = DomainKLD(mixture.names, mixture.labels,
                         mixture.tokens * np.where(mixture.labels == 1, 1.2, 0.1)[:, None])  # mean lower, b worse
    even = DomainKLD(mixture.names, mixture.labels, mixture.tokens * 0.95)
    options = [("lopsided", float(lopsided.tokens.mean()), lopsided),
               ("mixture", float(mixture.tokens.mean()), mixture), ("even", float(even.tokens.mean()), even)]
    assert options[0][1] < options[2][1] < options[1][1]
    best, worse = robust_choice(options, mixture)
    assert options[best][0] == "even" and worse == {0: ["b"], 1: [], 2: []}
    assert robust_choice(options, None)[0] == 0  # no baseline (one domain): the lowest mean


def test_envelope_takes_each_domains_best_mixture() -> None:
    from moepack.pipeline.robust import envelope

    a = _dom({"x": 0.010, "y": 0.030})
    b = _dom({"x": 0.020, "y": 0.015})
    env, which = envelope([("A", a), ("B", b)])
    assert which == {"x": "A", "y": "B"}
    assert {k: round(m, 6) for k, (m, _) in env.means().items()} == {"x": 0.010, "y": 0.015}
    assert a.worse_than(env) == ["y"] and b.worse_than(env) == ["x"]  # neither mixture alone is the envelope


def test_selection_weights_balance_the_domains() -> None:
    """With scales s_d the weighted mean is the mean over domains of mean_d / s_d, times the scales' mean: a plan at
    the scales' levels measures its plain mean, and a 10 % loss counts alike on a domain of small and of large KLD."""
    from moepack.schema import CalibStats

    stats = CalibStats(None, {}, {}, selection_domain=np.array([0, 1, 0, 1, 1]),
                       domain_scales=np.array([0.01, 0.1]))
    w = stats.selection_weights()
    at_scale = np.array([0.01, 0.1, 0.01, 0.1, 0.1])
    assert abs((w * at_scale).mean() - 0.055) < 1e-12
    worse_small = np.where(stats.selection_domain == 0, 1.1, 1.0) * at_scale
    worse_large = np.where(stats.selection_domain == 1, 1.1, 1.0) * at_scale
    assert abs((w * worse_small).mean() - (w * worse_large).mean()) < 1e-12
    assert stats.selection_weights(2).shape == (2,) and CalibStats(None, {}, {}).selection_weights() is None


def test_calibration_keeps_each_domains_name(tmp_path: Path) -> None:
    from moepack.model.textdata import CalibSource
    from moepack.schema import CalibStats
    from moepack.stages.calibrate import run_calibrate

    sources = [CalibSource("stories", DATA / "calib" / "stories.txt"), CalibSource("code", DATA / "calib" / "code.txt")]
    stats = run_calibrate(FIXTURE, sources, tmp_path / "run", tokens=512, seq_len=64, selection_tokens=256,
                          report_tokens=128, progress=False)
    assert stats.domain_names == ["stories", "code"]
    assert stats.selection.shape == (4, 64) and stats.selection_domain.tolist() == [0, 1, 0, 1]  # in turn
    assert stats.report.shape == (2, 64) and stats.report_domain.tolist() == [0, 1]
    assert stats.manifest.tokens == 512  # 256 of each domain for the statistics
    again = CalibStats.read(tmp_path / "run")  # what a resumed compress reads
    assert again.domain_names == ["stories", "code"] and again.selection_domain.tolist() == [0, 1, 0, 1]
    assert np.array_equal(again.selection, stats.selection)
    # the code sequences are code: their ids are the tokenizer's of the code text
    from moepack.model.textdata import tokenize_file

    assert stats.selection[1].tolist() == tokenize_file(FIXTURE, DATA / "calib" / "code.txt", 512)[256:320].tolist()


def test_calib_text_flags_name_the_domains(tmp_path: Path, capsys) -> None:
    stories, code = DATA / "calib" / "stories.txt", DATA / "calib" / "code.txt"
    base = ["calibrate", str(FIXTURE), "--calib-tokens", "256", "--seq-len", "64", "--sens-tokens", "128"]
    assert main(base + ["--calib-text", f"s={stories}", "--calib-text", str(code), "-o", str(tmp_path / "a")]) == 0
    man = json.loads((tmp_path / "a" / "calib" / "manifest.json").read_text())
    assert [d["name"] for d in man["domains"]] == ["s", "code"] and not any(d["chat"] for d in man["domains"])
    assert main(base + ["--calib-text", f"x={stories}", "--calib-text", f"x={code}", "-o", str(tmp_path / "b")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(base + ["--calib-text", f"x={tmp_path / 'none.txt'}", "-o", str(tmp_path / "c")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "c" / "calib" / "manifest.json").exists()
    # one unnamed text: a one-domain run, as before domains existed
    assert main(base + ["--calib-text", str(stories), "-o", str(tmp_path / "d")]) == 0
    assert "domains" not in json.loads((tmp_path / "d" / "calib" / "manifest.json").read_text())


def test_a_too_short_domain_is_named(tmp_path: Path) -> None:
    from moepack.model.textdata import CalibSource
    from moepack.stages.calibrate import CalibError, run_calibrate

    short = tmp_path / "short.txt"
    short.write_text("a few words only\n", encoding="utf-8")
    with pytest.raises(CalibError, match="'tiny'.*fewer than one sequence"):
        run_calibrate(FIXTURE, [CalibSource("stories", DATA / "calib" / "stories.txt"), CalibSource("tiny", short)],
                      tmp_path / "run", tokens=256, seq_len=64, selection_tokens=0, progress=False)


@pytest.fixture(scope="module")
def two_domain_run(tmp_path_factory) -> Path:
    model = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("m") / "q", tokenizer=True, hidden=256, ffn=256,
                             n_experts=8, top_k=2, vocab=512)
    tmp = tmp_path_factory.mktemp("run")
    flags = small_compress_options("--keep", "1.0", fast=True)
    flags = flags[2:]  # the two domains below instead of the one text
    assert main(["compress", str(model), "--target-bpw", "4", "-o", str(tmp / "x.gguf"), "--run-dir",
                 str(tmp / "run"), "--calib-text", f"stories={DATA / 'calib' / 'stories.txt'}",
                 "--calib-text", f"code={DATA / 'calib' / 'code.txt'}", *flags]) == 0
    return tmp


@pytest.mark.slow
def test_compress_judges_and_reports_every_domain(two_domain_run: Path) -> None:
    from moepack.schema import RunSummary

    s = RunSummary.read(two_domain_run / "run" / "summary.json")
    assert s.domains is not None and s.domains["names"] == ["stories", "code"]
    for part in ("selection", "report"):
        assert set(s.domains[part]["chosen"]) == {"stories", "code"}
        mix = s.domains[part]["best_mixture"]
        names = {m["name"] for m in s.mixtures["mixtures"]}
        assert mix["name"] in names | {"best mixture per domain"} and set(mix["kld"]) == {"stories", "code"}
    assert set(s.mixtures["domains"]["best_mixture_by_domain"].values()) <= names
    # the chosen plan is no worse than the best mixture on either domain of the selection tokens
    assert s.mixtures["chosen"] not in s.mixtures["domains"]["worse_on"]
    # every choice's KLD weighs each domain by the level a same-size mixture has there: the selection KLD is the
    # mean over domains of (domain KLD / its scale), times the scales' mean
    scales = s.domains["scales"]
    assert isinstance(scales["mixture"], str) and scales["stories"] > 0 and scales["code"] > 0
    chosen = s.domains["selection"]["chosen"]
    balanced = sum(chosen[d][0] / scales[d] for d in ("stories", "code")) / 2 * (scales["stories"] + scales["code"]) / 2
    assert abs(balanced - s.selection_kld) < 1e-6 * s.selection_kld
    from moepack.eval.report import build_report

    page = build_report(two_domain_run / "run", two_domain_run / "report.md").read_text()
    assert "| stories |" in page and "| code |" in page and f"{mix['name']} (report)" in page


def _templated(tmp_path: Path) -> Path:
    """The fixture with a ChatML chat template (weights linked, not copied)."""
    import shutil

    d = tmp_path / "chat-model"
    d.mkdir()
    for f in FIXTURE.iterdir():
        (d / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, d / f.name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_conversations_are_a_domain_rendered_with_the_template(tmp_path: Path, capsys) -> None:
    from moepack.model.chat import tokenize_chat
    from moepack.model.textdata import BUNDLED_CALIB_DIR, BUNDLED_DOMAINS
    from moepack.schema import CalibStats

    model, chat = _templated(tmp_path), BUNDLED_CALIB_DIR / "chat.jsonl"
    base = ["calibrate", "--calib-tokens", "256", "--seq-len", "64", "--sens-tokens", "128"]
    assert main([base[0], str(model), *base[1:], "--calib-text", f"s={DATA / 'calib' / 'stories.txt'}",
                 "--calib-chat", str(chat), "-o", str(tmp_path / "a")]) == 0
    stats = CalibStats.read(tmp_path / "a")
    assert [(d["name"], d["chat"]) for d in stats.manifest.inputs.domains] == [("s", False), ("chat", True)]
    assert stats.selection[1].tolist() == tokenize_chat(model, chat, 256)[128:192].tolist()  # rendered ids
    # the bundled set holds its conversations for a model with a template, and leaves them out for one without
    assert main([base[0], str(model), *base[1:], "-o", str(tmp_path / "b")]) == 0
    assert CalibStats.read(tmp_path / "b").domain_names == [*BUNDLED_DOMAINS, "chat"]
    assert main([base[0], str(FIXTURE), *base[1:], "--calib-chat", str(chat), "-o", str(tmp_path / "c")]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "c" / "calib" / "manifest.json").exists()


@pytest.mark.slow
def test_the_card_names_the_domains(two_domain_run: Path) -> None:
    from moepack.eval.card import build_card

    card = build_card(two_domain_run / "run", two_domain_run / "README.md").read_text()
    assert "| domains | stories, code: every choice had to hold on each one |" in card
    assert "Per calibration domain" in card and "| code |" in card


def _table(coef: tuple[float, float] = (0.5, 0.5)):
    """Two groups, each with a base (2 bytes) and a smaller option (1 byte); group "g" matters on domain a,
    group "h" on domain b (per-domain ΔKLDs of the smaller option)."""
    from moepack.schema import Group, Option, SensitivityTable

    def group(name: str, per: tuple[float, float]) -> Group:
        dk = sum(c * d for c, d in zip(coef, per))
        return Group(name, (name,), (Option("Q8_0", 2, 0.0, domains=(0.0, 0.0)), Option("Q4_0", 1, dk, domains=per)))

    return SensitivityTable((group("g", (0.010, 0.000)), group("h", (0.000, 0.008))),
                            base={"domains": {"names": ["a", "b"], "coef": list(coef), "kld": [0.01, 0.01]}})


def test_reweighted_weighs_each_domains_dkld() -> None:
    from moepack.pipeline.repair import reweighted

    t = _table()
    assert [o.dkld for o in t.groups[0].options] == [0.0, 0.005]
    up = reweighted(t, {"b": 4.0})
    assert up is not None and [g.options[1].dkld for g in up.groups] == pytest.approx([0.005, 0.016])
    import dataclasses

    assert reweighted(dataclasses.replace(t, base={}), {"b": 2.0}) is None  # no per-domain ΔKLDs: no repair


def test_repair_weighs_up_the_lost_domain_until_the_plan_holds() -> None:
    """The allocated plan demoted the group domain b needs (it saves the same byte and costs less on the mean, as
    the table estimates it); weighing b up moves the demotion to the other group, whose real cost on a is within the
    mixture's own CI there, and the plan measured no worse anywhere ends the repair."""
    from moepack.pipeline.repair import repair
    from moepack.schema import QuantPlan
    from moepack.stages.allocate import allocate

    t = _table()
    mixture = _dom({"a": 0.010, "b": 0.010}, noise=0.2)
    truth = {"g": (0.0001, 0.0), "h": (0.0, 0.008)}  # what demoting each group really costs per domain

    def judge(tensors: dict[str, str]) -> DomainKLD:
        extra = np.zeros(2)
        for name, typ in tensors.items():
            if typ == "Q4_0":
                extra += truth[name]
        return DomainKLD(mixture.names, mixture.labels, mixture.tokens + extra[mixture.labels][:, None])

    def replan(table) -> QuantPlan:
        return allocate(table, 3, "greedy")  # one of the two groups must drop a byte

    first = replan(t)
    assert first.tensors == {"g": "Q8_0", "h": "Q4_0"} and judge(first.tensors).worse_than(mixture) == ["b"]
    options, record = repair(t, ["b"], mixture, replan, lambda ts: float(judge(ts).tokens.mean()), judge)
    assert [o[3] for o in options] == ["repaired for b (x2)"]
    assert options[0][0].tensors == {"g": "Q4_0", "h": "Q8_0"}
    assert record == [{"factors": {"b": 2.0}, "kld": options[0][1], "worse_on": []}]
    # a domain still lost after a step is weighed up with the others at the next one; the steps end at the last
    options, record = repair(t, ["b"], mixture, replan, lambda ts: 0.0, lambda ts: judge({"g": "Q8_0", "h": "Q4_0"}))
    assert [o[3] for o in options] == ["repaired for b (x2)", "repaired for b (x4)", "repaired for b (x8)"]
    assert all(r["worse_on"] == ["b"] for r in record)


def test_a_repaired_plan_meets_the_speed_limits_the_run_applies(monkeypatch) -> None:
    """CandidateSearch._replan: the reweighted allocation is moved to the speed floor only where the floor can be
    met, and to --min-decode-tps always (a repaired plan slower than the hard limit would fail the run's check)."""
    from types import SimpleNamespace

    import moepack.pipeline.search as search_mod
    import moepack.stages.speed_limit as speed_limit
    from moepack.pipeline.options import CompressOptions
    from moepack.pipeline.search import CandidateSearch

    reach = {"floor": 90.0, "hard": 90.0}  # the fastest tokens/s a limit's re-allocation reaches

    def limited(table, plan, view, clock, limit, solver):  # -> (plan, before, after), as limited_plan
        after = min(limit, reach["floor"] if limit == 100.0 else reach["hard"])
        return f"{plan}>{limit:g}", 50.0, after

    monkeypatch.setattr(search_mod, "allocate_within", lambda table, budget, solver: ("plan", 0))
    monkeypatch.setattr(speed_limit, "limited_plan", limited)

    def replan(min_tps: float | None) -> str:
        s = object.__new__(CandidateSearch)
        s.opts, s.budget, s._clock = CompressOptions(min_decode_tps=min_tps), None, None
        s.__dict__["speed_floor"] = {"decode_tps": 100.0}  # the cached property
        return s._replan(SimpleNamespace(view=None), table=None)

    assert replan(None) == "plan"  # the floor (100) cannot be met: the plan stays
    reach["floor"] = 120.0
    assert replan(None) == "plan>100"
    assert replan(200.0) == "plan>100>200"  # the hard limit applies even where it is not met (the check then fails)

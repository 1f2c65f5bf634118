"""Every subcommand builds its parser and prints its help."""
from __future__ import annotations

import pytest

from moepack.cli import COMMANDS, build_parser, main


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_every_listed_module_adds_a_command() -> None:
    assert len(_subcommands()) == len(COMMANDS)


@pytest.mark.parametrize("command", _subcommands())
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: moepack" in capsys.readouterr().out


def test_closed_pipe_exits_quietly() -> None:
    """`moepack inspect ... --json | head -c 1`: no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys

    from conftest import MODELS

    many = [str(MODELS / "tiny-deepseek-v3")] * 200  # ~200 kB of JSON: more than a pipe buffers
    p = subprocess.Popen([sys.executable, "-m", "moepack.cli", "inspect", *many, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(1) == b"{"
    p.stdout.close()  # the reader goes away, as `head` does, before the command has written everything
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_building_the_parser_imports_no_heavy_library() -> None:
    """`moepack --help` loads the command modules only: no torch, transformers or llama_cpp."""
    import subprocess
    import sys

    code = ("import sys; from moepack.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_mirrored_choices_match_the_library() -> None:
    """options.py keeps copies of constants that live in modules importing torch; they must not drift."""
    from moepack.cli import options
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.prune import CRITERIA
    from moepack.gguf.types import DEFAULT_REFERENCE
    from moepack.gguf.types import LADDER as DEFAULT_LADDER
    from moepack.stages.sensitivity.measure import MODES

    assert options.CRITERIA == CRITERIA
    assert options.LADDER == DEFAULT_LADDER == CompressOptions.ladder
    assert options.REFERENCE == DEFAULT_REFERENCE and options.SENS_MODES == MODES
    assert CompressOptions.calib_tokens == options.CALIB_TOKENS and CompressOptions.selection_tokens == options.SELECTION_TOKENS
    assert CompressOptions.seq_len == options.SEQ_LEN and CompressOptions.threads == options.DEFAULT_THREADS


def _flags() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def test_one_vocabulary() -> None:
    """The old flag names are gone everywhere; shared concepts have one name."""
    flags = _flags()
    old = {"--out", "--calib", "--text", "--tokens", "--selection-tokens", "--ctx", "--json", "--md", "--ubatch"}
    allowed = {"eval": {"--text", "--tokens"}, "inspect": {"--json"}}  # evaluation text and tokens; inspect's switch
    for name, opts in flags.items():
        assert not (opts & old) - allowed.get(name, set()), (name, opts & old)
        assert "--threads" not in opts or "-t" in opts
    for name in ("calibrate", "prune", "eval", "allocate", "quantize", "sensitivity", "compress"):
        assert "--threads" in flags[name] or name in ("prune", "allocate"), name
    for name in ("calibrate", "prune", "allocate", "quantize", "sensitivity", "compress", "report"):
        assert {"-o", "--output"} <= flags[name], name
    assert {"--calib-text", "--calib-tokens", "--sens-tokens"} <= flags["calibrate"] & flags["compress"]
    assert all("--calib-dir" in flags[n] for n in ("prune", "sensitivity", "quantize"))
    assert {"-c", "--ctx-size"} <= flags["compress"] and "--window" in flags["eval"]
    assert {"--json-out", "--md-out"} <= flags["eval"]


def test_threads_default_and_ftype_alias() -> None:
    from moepack.cli import options
    from moepack.cli.quantize import check_ftype
    from moepack.errors import MoepackError

    import argparse

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("calibrate", "eval", "quantize", "sensitivity", "compress"):
        action = next(a for a in sub.choices[name]._actions if "--threads" in a.option_strings)
        assert action.default is None and "default 2" in action.help, name
    assert options.threads(argparse.Namespace(threads=None)) == 2
    assert options.threads(argparse.Namespace(threads=5)) == 5
    for ok in ("Q4_K_M", "q4_k_s", "IQ2_XXS", "Q8_0", "Q6_K", "Q2_K", "BF16"):
        check_ftype(ok)
    for alias in ("Q4_K", "q3_k", "Q5_K"):
        with pytest.raises(MoepackError, match=r"--type .* or\s+--ftype Q\d_K_M"):
            check_ftype(alias)


# ---- issue 30: no silent misreadings, errors that name the command and the fix, one meaning per flag

SIZE_FLAGS = ("--memory", "--gpu-memory", "--reserve", "--target-size")


def test_sizes_without_a_unit_are_refused_with_the_fix(capsys) -> None:
    from conftest import ROOT

    cfg = str(ROOT / "data" / "configs" / "qwen3-30b-a3b")
    for argv in (["inspect", cfg, "--memory", "128", "-c", "8192"], ["inspect", cfg, "--target-size", "5000000"],
                 ["compress", cfg, "-o", "x.gguf", "--memory", "128", "-c", "8192"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "has no unit" in err, err
        assert f"moepack {argv[0]}: error: argument" in err and "GB (10^9 bytes)" in err and "GiB" in err
    assert main(["inspect", cfg, "--target-size", "5000000000B", "--json"]) == 0  # bytes, said so: fine
    capsys.readouterr()


def test_every_size_flag_explains_its_units() -> None:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    seen = 0
    for name, p in sub.choices.items():
        for a in p._actions:
            if set(a.option_strings) & set(SIZE_FLAGS):
                seen += 1
                # the units spelled out, or "units as --memory" in a parser whose --memory spells them out
                text = a.help if "units as --memory" not in a.help else \
                    next(b.help for b in p._actions if "--memory" in b.option_strings)
                assert "powers of 1000" in text and "powers of 1024" in text and "128G = 128GiB" in text, name
    assert seen >= 9  # inspect and compress: four each; allocate: --target-size


def test_gpu_memory_and_reserve_need_memory(capsys) -> None:
    from conftest import ROOT

    cfg = str(ROOT / "data" / "configs" / "deepseek-v3")
    assert main(["inspect", cfg, "--gpu-memory", "24GB", "-c", "8192"]) == 2
    assert "moepack inspect: error: --gpu-memory needs --memory SIZE" in capsys.readouterr().err
    assert main(["inspect", cfg, "--reserve", "4GB", "--target-size", "100GB"]) == 2
    assert "--reserve needs --memory" in capsys.readouterr().err


def test_unknown_flag_names_the_command_and_the_closest_flag(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["inspect", "x", "--target-sizee", "100GB"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: moepack inspect" in err
    assert "moepack inspect: error: unrecognized arguments: --target-sizee 100GB" in err
    assert "did you mean --target-size?" in err
    with pytest.raises(SystemExit):
        main(["compress", "x", "-o", "y.gguf", "--kld-tol", "0.1"])  # prune's flag: no close one in compress
    assert "moepack compress: error: unrecognized arguments: --kld-tol" in capsys.readouterr().err


def test_debug_is_accepted_before_and_after_the_command(tmp_path, capsys) -> None:
    p = build_parser()
    assert p.parse_args(["--debug", "inspect", "m"]).debug and p.parse_args(["inspect", "m", "--debug"]).debug
    assert not getattr(p.parse_args(["inspect", "m"]), "debug", False)
    assert main(["inspect", str(tmp_path)]) == 2
    with pytest.raises(Exception, match="no config.json"):  # --debug after the command: the traceback
        main(["inspect", str(tmp_path), "--debug"])


def test_inspect_of_a_directory_without_config_says_so_first(tmp_path, caplog, capsys) -> None:
    import logging

    with caplog.at_level(logging.INFO):
        assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert "derived from config.json" not in caplog.text


def test_one_meaning_per_flag_and_stated_defaults() -> None:
    """compress and sensitivity name their quantized-tensor cache --quant-cache; eval's --cache-dir (reference
    log-probs) is the only --cache-dir; no help sends the user to a flag its command lacks (another command's is
    named as such); every option with a default value says it; the positional model is MODEL everywhere."""
    import argparse
    import re

    flags = _flags()
    assert [n for n, f in flags.items() if "--cache-dir" in f] == ["eval"]
    assert "--quant-cache" in flags["compress"] and "--quant-cache" in flags["sensitivity"]
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        mentioned = {f for a in p._actions for f in re.findall(r"--[a-z][a-z-]+", a.help or "")}
        own = {f for a in p._actions for f in a.option_strings}
        helps = " ".join(a.help or "" for a in p._actions)
        for flag in mentioned - own:  # a flag this command lacks is named as another tool's
            tools = r"(eval's|compress's|llama\.cpp's|llama-quantize|report|eval|calibrate|prune)"
            assert re.search(rf"{tools} {flag}\b", helps), (name, flag)
        for a in p._actions:
            if not a.option_strings or a.required or a.dest in ("help", "debug", "version"):
                if a.dest == "model_dir":
                    assert a.metavar == "MODEL" and "repo id" in a.help, name
                continue
            if isinstance(a, argparse._StoreTrueAction) or a.default in (None, argparse.SUPPRESS):
                continue
            assert "default" in (a.help or "").lower(), (name, a.option_strings)
        assert own  # every command has flags


def test_glossary_defines_the_words_the_help_uses() -> None:
    from conftest import ROOT

    text = (ROOT / "docs" / "usage.md").read_text()
    gloss = text[text.index("## Glossary"):]
    for term in ("k'", "KLD", "REAP", "importance matrix", "ladder", "selection tokens", "report tokens",
                 "retention", "reference type"):
        assert f"**{term}**" in gloss, term

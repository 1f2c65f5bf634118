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
    from moepack.gguf.types import DEFAULT_BASE
    from moepack.gguf.types import LADDER as DEFAULT_LADDER
    from moepack.stages.sensitivity.measure import MODES

    assert options.CRITERIA == CRITERIA
    assert options.LADDER == DEFAULT_LADDER == CompressOptions.ladder
    assert options.BASE == DEFAULT_BASE and options.SENS_MODES == MODES
    assert CompressOptions.calib_tokens == options.CALIB_TOKENS and CompressOptions.sens_tokens == options.SENS_TOKENS
    assert CompressOptions.seq_len == options.SEQ_LEN and CompressOptions.threads == options.DEFAULT_THREADS


def _flags() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def test_one_vocabulary() -> None:
    """The old flag names are gone everywhere; shared concepts have one name."""
    flags = _flags()
    old = {"--out", "--calib", "--text", "--tokens", "--heldout-tokens", "--ctx", "--json", "--md", "--ubatch"}
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

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

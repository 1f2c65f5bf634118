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

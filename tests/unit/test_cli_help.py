"""Every sub-command's --help says what each of its flags and arguments does."""
from __future__ import annotations

import argparse

import pytest

from imgfs.cli import build_parser


def sub_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    return dict(commands.choices)


@pytest.mark.parametrize("name", sorted(sub_parsers()))
def test_every_argument_is_explained(name: str) -> None:
    unexplained = [action.dest for action in sub_parsers()[name]._actions
                   if not isinstance(action, argparse._HelpAction) and not action.help]
    assert unexplained == []


def test_tools_are_commands() -> None:
    assert {"compare", "commit", "rebase", "measure", "amend"} <= set(sub_parsers())

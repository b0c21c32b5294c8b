"""Every subcommand and option of the three CLIs says what it does in --help."""

import argparse

import pytest

from daemon.cli import _parser as surgeond
from daemon.control.ctl import _parser as surgeonctl
from surgeon_core.bench.__main__ import build_parser as surgeon_bench


def _undocumented(parser, path):
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    missing.append(" ".join(path + [name]))
                missing += _undocumented(sub, path + [name])
        elif not action.help and not isinstance(action, argparse._HelpAction):
            missing.append(" ".join(path + ["/".join(action.option_strings) or action.dest]))
    return missing


@pytest.mark.parametrize("name, build", [("surgeond", surgeond), ("surgeonctl", surgeonctl),
                                         ("surgeon-bench", surgeon_bench)])
def test_every_subcommand_and_option_has_help(name, build):
    assert _undocumented(build(), [name]) == []

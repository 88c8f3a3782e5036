"""The README stays true: its config reference, make targets, CLI commands and config paths."""

from __future__ import annotations

import re

from collapse.config_reference import reference_markdown
from flows.cli import build_parser

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_config_reference_matches_the_code():
    start = README.index("<!-- config-reference:")
    start = README.index("\n", start) + 1
    end = README.index("<!-- /config-reference -->")
    assert README[start:end].strip() == reference_markdown().strip(), (
        "README's config reference is stale: paste `python -m collapse.config_reference` into it"
    )


def test_first_two_commands_are_make_demo_and_make_test():
    commands = re.findall(r"^(make \w+)", README, flags=re.MULTILINE)
    assert commands[:2] == ["make demo", "make test"]


def test_documented_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.MULTILINE))
    documented = set(re.findall(r"\bmake (\w+)", README))
    assert documented and documented <= targets, documented - targets


def test_documented_collapse_commands_exist():
    subcommands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    # commands in code: inline `collapse X ...` or a code-block line starting with `collapse X`
    documented = set(re.findall(r"(?:`|^)collapse ([a-z]+)", README, flags=re.MULTILINE))
    assert {"run", "status", "ui"} <= documented
    assert documented <= set(subcommands), documented - set(subcommands)


def test_documented_config_files_exist():
    for path in set(re.findall(r"configs/[\w.-]+\.yaml", README)):
        assert (REPO / path).is_file(), path

"""The README stays true: every ``make`` target and ``m2m`` command it shows (in code spans and code blocks) exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from m2m.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code() -> list[str]:
    """The README's code: fenced blocks line by line, and inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", README, flags=re.S)
    return [line for b in blocks for line in b.splitlines()] + re.findall(r"`([^`\n]+)`", prose)


def _commands(prefix: str) -> set[tuple[str, ...]]:
    """The words after ``prefix`` (``make`` or ``m2m``, also as ``.venv/bin/m2m``) in the README's code."""
    found = set()
    for snippet in _code():
        for m in re.finditer(rf"(?:^|[\s/(]){prefix} ((?:[a-z][a-z0-9-]*)(?: [a-z][a-z0-9-]*)?)", snippet):
            found.add(tuple(m.group(1).split()))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    named = {words[0] for words in _commands("make")}
    assert {"demo", "test"} <= named
    assert named <= targets, f"README names make targets that do not exist: {sorted(named - targets)}"


def test_every_m2m_command_the_readme_names_exists() -> None:
    top = _subcommands(build_parser())
    named = _commands("m2m")
    assert ("plan",) in {w[:1] for w in named}
    missing = []
    for words in named:
        if words[0] not in top:
            missing.append(" ".join(words))
            continue
        sub = _subcommands(top[words[0]])
        if sub and (len(words) < 2 or words[1] not in sub):
            missing.append(" ".join(words))
    assert not missing, f"README names m2m commands that do not exist: {sorted(missing)}"

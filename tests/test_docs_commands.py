"""Every `gigamim ...` command line shown in README.md and docs/*.md parses with the real CLI
(`tests.helpers.suggestions.check_command`: the verb's own argparse parser, `--set` keys
through the config loader, `gigamim launch`'s inner verb too), so the docs cannot drift from
the CLI (issue 23). Reference: the parsers themselves, not the docs' own text."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.helpers.suggestions import check_command

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`(gigamim [a-z-]+ [^`\n]+)`")  # with arguments: a bare verb name is prose


def _lines(text: str) -> list[str]:
    out = []
    for block in BLOCK.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            m = re.search(r"(?:^|&& |; |\| )(gigamim [a-z-]+(?: .*)?)$", line)
            if m:
                out.append(m.group(1))
    out += INLINE.findall(text)
    return out


def _args(line: str) -> tuple[str, list[str]]:
    line = re.sub(r"\[[^\]]*\]", "", line)  # [optional ...] syntax
    line = re.sub(r"\$\{?\w+\}?|<[^>]*>", "2", line)  # shell variables and <placeholders>: a value
    tokens = [t for t in shlex.split(line) if t not in ("...", "…")]
    return tokens[1], [t for t in tokens[2:] if t != "|"]


COMMANDS = sorted({(page.name, line) for page in PAGES for line in _lines(page.read_text())
                   if not re.match(r"gigamim (<verb>|[a-z-]+:)", line)})  # a placeholder verb, a quoted message


def test_the_pages_show_commands():
    assert len(COMMANDS) > 20 and {p for p, _ in COMMANDS} >= {"README.md", "cluster.md", "training.md"}


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_command_parses(page, line):
    verb, args = _args(line)
    check_command(verb, args)


def test_every_relative_link_resolves():
    """The docs split moved sections out of the README: each relative link still names a file."""
    bad = []
    for page in PAGES:
        for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not m.group(1).startswith(("http://", "https://")) and not (page.parent / m.group(1)).exists():
                bad.append(f"{page.relative_to(ROOT)}: {m.group(1)}")
    assert not bad, bad


def test_readme_is_the_front_door():
    """Issue 23: README ≤ 10 KB (what, two commands, own images, CLI, results), the rest in docs/."""
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024

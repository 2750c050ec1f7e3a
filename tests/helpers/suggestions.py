"""The checker of suggested command lines (tests/test_suggestions.py, tests/test_readme_own_images.py):
a `gigamim VERB ...` line through that verb's argparse parser (`gigamim.cli.parser_for`), a bare
`--flag value` through the parser of the verb that printed it, a `key=value` through the config
loader. Placeholders in capitals (N, NAME, OUT, CONFIG, ...) stand for a value of the right kind."""

from __future__ import annotations

import argparse
import re
import shlex

from gigamim import cli
from gigamim.config import load_config

PLACEHOLDERS = {"N": "2", "NAME": "swinv2_nano", "CONFIG": "demo", "OUT": "out.safetensors", "PATH": "x",
                "CKPT_DIR/TAG": "ckpt/step_00000001", "TAG": "step_00000001", "CKPT_DIR": "ckpt", "I": "0",
                "HOST0": "node0", "SRC": "x"}
CONFIG_KEY = re.compile(r"(?<![\w.])((?:model|data|train|optim|checkpoint|log|deepspeed|fsdp|finetune)\.\w+)=(\S+)")
COMMAND = re.compile(r"gigamim ([a-z-]+)(?=[\s`]|$)((?: +[^\s`;,()]+)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)((?:[ =](?!--|or\b|and\b|to\b|the\b|if\b|with\b)[^\s`;()]+)?)")


def _fill(token: str) -> str:
    if "=" in token and not token.startswith("-"):  # key=VALUE: the value may be a placeholder
        key, _, value = token.partition("=")
        return f"{key}={PLACEHOLDERS.get(value, value)}"
    return PLACEHOLDERS.get(token, token)


class Refused(Exception):
    pass


def _quiet_parse(parser: argparse.ArgumentParser, args: list[str]):
    def refuse(message):
        raise Refused(f"{parser.prog} {' '.join(args)}: {message}")

    parser.error = refuse  # argparse would print and exit; say what it refused instead
    return parser.parse_args(args)


def check_command(verb: str, args: list[str]) -> None:
    """`gigamim VERB ARGS` parses; `--set` items and `gigamim launch`'s inner verb too."""
    assert verb in cli.VERBS, f"`gigamim {verb}` is not a verb"
    args = [_fill(a) for a in args]
    parser = cli.parser_for(verb)
    required = {a.dest for a in parser._actions if a.option_strings and a.required}
    ns = _quiet_parse(parser, args + [x for d in sorted(required) if not any(
        s in args for s in parser._option_string_actions if parser._option_string_actions[s].dest == d)
        for x in (next(s for s in parser._option_string_actions if parser._option_string_actions[s].dest == d),
                  "x")])
    for item in getattr(ns, "overrides", None) or []:
        load_config(None, [item])  # the key exists and the value has its type
    if verb == "launch":
        check_command(ns.verb, ns.args)


def check_flag(verb: str, flag: str, value: str) -> None:
    """A bare `--flag [value]` in a message of `gigamim VERB`: the verb's parser has the flag and
    takes the value."""
    parser = cli.parser_for(verb)
    action = parser._option_string_actions.get(flag)
    assert action is not None, f"`gigamim {verb}` has no {flag}"
    value = _fill(value.strip(" ="))
    if action.nargs == 0 or not value:
        return
    if flag == "--set":
        load_config(None, [value])
        return
    if action.type is not None:
        action.type(value)
    if action.choices is not None:
        assert value in action.choices, f"`gigamim {verb} {flag} {value}`: not one of {action.choices}"


def check_message(verb: str, text: str) -> list[str]:
    """Check everything `text` (printed by `gigamim VERB`) suggests; returns what was checked."""
    checked = []
    spans = []
    for m in COMMAND.finditer(text):
        if m.group(1) not in cli.VERBS:
            continue  # prose ("gigamim finetune: ...") names no command
        args = shlex.split(m.group(2))
        check_command(m.group(1), [a.rstrip(".") for a in args])
        spans.append(m.span())
        checked.append(m.group(0))
    for m in FLAG.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue
        value = m.group(2).rstrip(".,:")
        check_flag(verb, m.group(1), value)
        checked.append(m.group(1) + value)
    for m in CONFIG_KEY.finditer(text):
        load_config(None, [f"{m.group(1)}={_fill(m.group(2).rstrip('.,;:)`'))}"])
        checked.append(m.group(0))
    return checked

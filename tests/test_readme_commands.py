"""Every `python <script>.py ...` command the README shows is one its script accepts: the script exists and its own
argument parser takes the command's options as written (names, choices, types, required arguments). The parser is
the script's, reached by running the script with `parse_args` stopped right after parsing: nothing else runs.

Commands with `[optional parts]` are checked option by option (the bracketed placeholders are not values)."""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"(?:\.venv/bin/)?python ([\w/]+\.py)\b")


def readme_commands() -> list[str]:
    """The README's python commands: lines of fenced blocks (backslash continuations joined) and inline code."""
    commands, in_block, pending = [], False, ""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            commands += [m.group(1) for m in re.finditer(r"`((?:\.venv/bin/)?python [\w/]+\.py[^`]*)`", line)]
            continue
        if pending or COMMAND.match(line.strip()):
            pending = f"{pending} {line.strip()}".strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            commands.append(pending)
            pending = ""
    return commands


COMMANDS = readme_commands()


class Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def script_parser(script: str, arguments: list[str], monkeypatch) -> argparse.ArgumentParser:
    """The parser `script` builds, after it parsed `arguments` (a parse error is the script's own SystemExit)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(Parsed) as parsed:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return parsed.value.parser


def test_the_readme_shows_commands_of_every_entry_point():
    scripts = {COMMAND.match(command).group(1) for command in COMMANDS}
    assert {"generate_flist.py", "stage1/train.py", "stage2/train.py", "stage2/test.py", "stage2/infer.py",
            "stage2/export.py", "stage2/app.py", "bench/inference.py"} <= scripts


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_is_accepted_by_its_script(command, monkeypatch, capsys):
    words = shlex.split(command, comments=True)
    script = words[1]
    assert (REPO / script).is_file(), f"{script} does not exist"
    # Placeholders such as DIR or N are not values: with [optional parts], parse the part before the first bracket,
    # then check that every bracketed option exists.
    parsed = words[2:] if "[" not in command else shlex.split(command.split("[")[0])[2:]
    try:
        parser = script_parser(script, parsed, monkeypatch)
    except SystemExit:
        pytest.fail(f"{script} refuses the README's command {command!r}: {capsys.readouterr().err.strip()}")
    known = set(parser._option_string_actions)
    options = [word.strip("[]").split("=")[0] for word in words[2:] if word.strip("[]").startswith("--")]
    unknown = [option for option in options if option not in known]
    assert unknown == [], f"{script} has no {unknown} (README: {command!r})"

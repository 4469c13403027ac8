"""`elmo-jax --help` and every subcommand's --help: they run, list exactly the documented options, explain each
one, and agree with the README's command table."""

import argparse
import re
import subprocess
import sys

import pytest

from elmo_jax.cli import build_parser, main
from tests.conftest import ROOT

# Every argument of every subcommand: positionals by name, options by their flag. Changing the command line
# means changing this table, the help strings and the README's command table together.
ARGUMENTS = {
    "embed": ["input", "output", "--model", "--options", "--weights", "--all", "--top", "--average", "--token",
              "--batch-size", "--block-steps", "--dtype", "--output-dtype", "--layout", "--tokenizer", "--empty-lines",
              "--vocab", "--distributed", "--quiet"],
    "convert": ["--model", "--options", "--weights", "--checkpoint", "--to"],
    "train": ["--train-prefix", "--vocab", "--options", "--out", "--resume", "--steps", "--init-weights",
              "--devices", "--distributed", "--seed", "--log-every", "--checkpoint-every", "--learning-rate",
              "--shard-softmax", "--dtype"],
    "perplexity": ["--test-prefix", "--vocab", "--run-dir", "--options", "--weights", "--shard-softmax",
                   "--batch-size", "--unroll-steps", "--distributed"],
    "export": ["run_dir", "--weights", "--options", "--vocab", "--token-embeddings"],
}


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def _flat(text: str) -> str:
    return " ".join(text.split())


def _help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping, so help strings appear verbatim
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return _flat(captured.out)


def test_top_level_help_lists_every_command(capsys, monkeypatch):
    text = _help([], capsys, monkeypatch)
    assert list(_commands(build_parser())) == list(ARGUMENTS)  # in the README's order
    for command in ARGUMENTS:
        assert command in text
    assert "COMMAND --help" in text and "exit status 2" in text


@pytest.mark.parametrize("command", list(ARGUMENTS))
def test_command_help_explains_each_option(command, capsys, monkeypatch):
    text = _help([command], capsys, monkeypatch)
    parser = _commands(build_parser())[command]
    assert parser.description, f"{command} has no description"
    assert _flat(parser.description) in text
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert sorted(map(_name, actions)) == sorted(ARGUMENTS[command])
    for action in actions:
        name = _name(action)
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{command} --help does not mention {name}"
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {name} has no help string"
        assert _flat(action.help) in text
        takes_value = action.nargs != 0 and action.option_strings
        if takes_value and action.default is not None:
            assert "default" in action.help, f"{command} {name}: the help does not state the default"
        if action.choices:
            assert all(str(choice) in text for choice in action.choices)


def test_readme_command_table_matches_the_parsers():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `elmo-jax (\w+)(.*?)` \|", table, re.MULTILINE)}
    assert sorted(rows) == sorted(ARGUMENTS)
    for command, usage in rows.items():
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage):
            assert flag in ARGUMENTS[command], f"README documents {command} {flag}, which the parser lacks"


def test_help_runs_as_a_program():
    for argv in ([], ["embed"], ["train"]):
        result = subprocess.run([sys.executable, "-m", "elmo_jax.cli", *argv, "--help"], capture_output=True,
                                text=True, cwd=ROOT, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        assert "usage: elmo-jax" in result.stdout

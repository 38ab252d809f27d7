"""Every command the docs show runs.

Commands are taken from the fenced code blocks of the README files (``\\``-continued lines
joined, ``#`` comments dropped). ``kla-launch`` and ``kla-pretrain`` commands run for real with
``--dry-run`` (the layout and the run config are checked against each other); every other
console script of ours must accept the documented arguments (parsed by its own argparse
parser, nothing executed). A command that needs an earlier step's output (an HF export, a
hostfile) gets an empty placeholder for it.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "launch/README.md", "kla_megatron/checkpoint/README.md", "data_tools/README.md",
        "configs/README.md", "bench/README.md", "recipes/fineweb_edu/README.md"]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
MODULES = {target.split(":")[0]: name for name, target in SCRIPTS.items()}


def _commands(doc: str):
    """(doc:line, argv) for each of our commands in the doc (fenced or indented code)."""
    lines = (REPO / doc).read_text().split("\n")
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):  # a continued command
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        line = re.sub(r"\s#\s.*$", "", line).strip()
        if not re.match(r"(kla-[a-z-]+|python3? -m [a-z_.]+)\s", line):
            continue  # not a command of ours (prose, Python code, other tools)
        if " && " in line or " | " in line or "..." in line or re.search(r"<[a-z_ ]+>", line):
            continue  # shell pipelines (the README's set-up commands run in CI) and templates
        words = shlex.split(line)
        if words[:2] == ["python", "-m"] and words[2] in MODULES:
            words = [MODULES[words[2]], *words[3:]]
        if words[0] in SCRIPTS:
            yield f"{doc}:{number}", words


COMMANDS = [c for doc in DOCS if (REPO / doc).exists() for c in _commands(doc)]


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, argv):
    """Run a console script's main(argv) up to its argument parsing, then stop."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        result = original(self, args, namespace)
        raise _Parsed(result)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    module, func = SCRIPTS[argv[0]].split(":")
    with pytest.raises(_Parsed) as parsed:
        getattr(importlib.import_module(module), func)(argv[1:])
    namespace, extra = parsed.value.args[0]
    return extra


def _placeholders(argv, cwd: Path):
    for word in argv:
        for key in ("checkpoint.init_from=",):
            if word.startswith(key):
                (cwd / word[len(key):]).mkdir(parents=True, exist_ok=True)
    if "--hostfile" in argv:
        (cwd / argv[argv.index("--hostfile") + 1]).write_text("node001 slots=8\nnode002 slots=8\n")


def test_the_docs_show_commands():
    names = {argv[0] for _, argv in COMMANDS}
    assert {"kla-launch", "kla-pretrain", "kla-convert", "kla-preprocess"} <= names, names


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(where, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for entry in ("configs", "launch", "data", "tests"):
        if (REPO / entry).exists():
            (tmp_path / entry).symlink_to(REPO / entry)
    _placeholders(argv, tmp_path)
    if argv[0] in ("kla-launch", "kla-pretrain"):
        module, func = SCRIPTS[argv[0]].split(":")
        rc = getattr(importlib.import_module(module), func)(argv[1:] + ["--dry-run"])
        assert rc in (0, None), f"{where}: {shlex.join(argv)} --dry-run exited {rc}: {capsys.readouterr().err}"
    else:
        extra = _parse_only(monkeypatch, argv)
        assert not extra, f"{where}: unknown arguments {extra}"

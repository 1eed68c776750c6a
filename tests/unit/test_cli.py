"""Every command line's --help shows its defaults; the installed scripts are the same commands."""
from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
from pathlib import Path

import pytest

from streamsim.cli import DefaultsHelpFormatter

REPO = Path(__file__).resolve().parents[2]


def test_formatter_shows_defaults_but_not_for_switches_none_or_defaults_in_words():
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    p.add_argument("--rate", type=float, default=2.5, help="samples/s")
    p.add_argument("--name", default="x")  # no help text: argparse shows no default
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--off", dest="on", action="store_false", help="another switch")
    p.add_argument("--out", default=None, help="where (the first run's folder)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    text = " ".join(p.format_help().split())
    assert "samples/s (default: 2.5)" in text
    assert "a switch --off" in text and "another switch" in text
    assert "(default: False)" not in text and "(default: True)" not in text
    assert "(default: None)" not in text
    assert text.count("(default:") == 2  # --rate's, and --port's own words


def _help_of(monkeypatch, capsys, module: str, func: str, argv: list[str]) -> str:
    """What ``python -m module ARGV --help`` prints, run in-process through ``func``."""
    monkeypatch.setattr("streamsim.logsetup.configure", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", [module, *argv, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), func)()
    assert exit_info.value.code in (0, None)
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("module,argv,shown", [
    ("scadles.launch", [], ["(default: smallcnn)", "(default: persistence)", "(default: 500)"]),
    ("scadles.predict", [], ["(default: persistence)", "(default: 8)"]),
    ("streamsim.pool", [], ["(default: even)", "(default: 224)"]),
    ("streamsim.produce", [], ["(default: trainer-)", "(default: iid)", "(default: auto)"]),
    ("streamsim.inspect", [], ["(default: 600.0)", "(default: 1.0)"]),
    ("streamsim.datasets", [], ["(default: train)", "(default: 224)"]),
])
def test_help_shows_defaults(monkeypatch, capsys, module, argv, shown):
    text = _help_of(monkeypatch, capsys, module, "main", argv)
    for piece in shown:
        assert piece in text, f"{module} --help lacks {piece!r}"
    assert "(default: None)" not in text and "(default: False)" not in text


def _console_scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_console_scripts_cover_the_tools():
    targets = set(_console_scripts().values())
    assert {t.split(":")[0] for t in targets} == {
        "scadles.launch", "scadles.report", "streamsim.broker", "streamsim.produce",
        "streamsim.inspect", "streamsim.topics"}


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_console_script_runs_the_module_on_sys_argv(monkeypatch, capsys, name):
    """The script's function reads sys.argv as ``python -m`` does: --help prints the usage of
    the same command and exits 0."""
    module, func = _console_scripts()[name].split(":")
    text = _help_of(monkeypatch, capsys, module, func, [])
    assert text.startswith(f"usage: python -m {module}")


def test_launch_help_groups_flags_as_config_sections_do(monkeypatch, capsys):
    """Each ``# -- title --`` section of Config is a --help group holding that section's
    flags, in order; the internal section shows nothing."""
    import re

    from scadles.config import HELP_GROUPS

    source = (REPO / "scadles" / "config.py").read_text()
    body = source[source.index("class Config:"):source.index("# -- derived")]
    sections = re.findall(r"# -- ([^-\n]+?) -+\n\s+(\w+):", body)
    assert [(HELP_GROUPS[f], f) for _, f in sections] == [(t.split(":")[0], f)
                                                         for t, f in sections]
    monkeypatch.setattr("streamsim.logsetup.configure", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["scadles.launch", "--help"])
    with pytest.raises(SystemExit):
        importlib.import_module("scadles.launch").main()
    text = capsys.readouterr().out
    titles = [t for t in HELP_GROUPS.values() if t != "internal"]
    positions = [text.index(f"\n{t}:\n") for t in titles]
    assert positions == sorted(positions)
    assert "internal:" not in text and "--stream-start-s" not in text
    between = text[text.index("\nstreams:\n"):text.index("\noptimization:\n")]
    assert "--rates RATES" in between and "--bootstrap" in between and "--lr" not in between

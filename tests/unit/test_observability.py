"""--tensorboard at config time, and the command that makes a run's plots."""
from __future__ import annotations

import sys

import pytest

from scadles.config import parse_args


def test_tensorboard_without_the_package_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tensorboard", "--source", "inprocess"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tensorboard needs the tensorboard package" in err


def test_tensorboard_with_the_package_is_fine():
    assert parse_args(["--tensorboard", "--source", "inprocess"]).tensorboard

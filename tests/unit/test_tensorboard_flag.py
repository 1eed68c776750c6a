"""--tensorboard at config time, and the command that makes a run's plots."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scadles.config import parse_args

REPO = Path(__file__).resolve().parents[2]


def test_tensorboard_without_the_package_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tensorboard", "--source", "inprocess"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tensorboard needs the tensorboard package" in err


def test_tensorboard_with_the_package_is_fine():
    assert parse_args(["--tensorboard", "--source", "inprocess"]).tensorboard


def test_scripts_pass_tensorboard_and_the_external_kafka_settings(tmp_path):
    """common.sh (what the paper scripts share): TENSORBOARD=1, KAFKA_CONFIG and
    REPLICATION_FACTOR reach the launcher; a script's own parameters still come first."""
    script = tmp_path / "script.sh"
    script.write_text('model="${MODEL:-smallcnn}"\nworld_size=2\nrates="S10"\n'
                      f'source "{REPO}/execution_scripts/common.sh"\nrun_scadles "$@"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("RATES", "WORLD_SIZE")}
    env.update(PYTHON="/bin/echo", LOG_DIR=str(tmp_path / "run"), TENSORBOARD="1",
               KAFKA_CONFIG="/etc/kafka/client.properties", REPLICATION_FACTOR="3")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split()
    assert "--tensorboard" in argv
    assert argv[argv.index("--kafka-config") + 1] == "/etc/kafka/client.properties"
    assert argv[argv.index("--replication-factor") + 1] == "3"
    env.update(TENSORBOARD="yes")
    bad = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "TENSORBOARD=yes" in bad.stderr

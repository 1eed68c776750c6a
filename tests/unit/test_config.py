"""Configuration: every bad setting exits 2 with one line, before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scadles.clock import CommModel
from scadles.config import Config, parse_args

REPO = Path(__file__).resolve().parents[2]

BAD = {
    "unknown backend": (["--backend", "tcp"], "--backend"),
    "unknown model": (["--model-name", "alexnet"], "--model-name"),
    "unknown dataset": (["--dataset", "mnist3d"], "--dataset"),
    "unknown mode": (["--mode", "async"], "--mode"),
    "unknown policy": (["--policy", "lifo"], "--policy"),
    "unknown compression": (["--compression", "qsgd"], "--compression"),
    "unknown partition": (["--partition", "skewed"], "--partition"),
    "rates != world size": (["--world-size", "3", "--rates", "10,20"], "--world-size"),
    "non-positive rate": (["--world-size", "2", "--rates", "10,0"], "> 0"),
    "rates != devices": (["--world-size", "2", "--devices-per-rank", "2", "--clock", "virtual",
                          "--compute-model", "fixed:0.1", "--rates", "10,20"],
                         "--devices-per-rank"),
    "devices per rank on the wall clock": (["--devices-per-rank", "2"], "--clock virtual"),
    "non-positive devices per rank": (["--devices-per-rank", "0"], "--devices-per-rank"),
    "bad rate spec": (["--rates", "S99x"], "--rates"),
    "non-positive train batch": (["--train-bsz", "0"], "--train-bsz"),
    "non-positive max batch": (["--max-train-bsz", "-1"], "--max-train-bsz"),
    "negative min batch": (["--min-train-bsz", "-2"], "--min-train-bsz"),
    "min batch > max batch": (["--min-train-bsz", "65", "--max-train-bsz", "64"],
                              "--min-train-bsz"),
    "bad compute model": (["--compute-model", "linear:1"], "--compute-model"),
    "bad comm model": (["--comm-model", "link:0"], "--comm-model"),
    "bad window": (["--window-s", "0"], "--window-s"),
    "bad ratio": (["--compression-ratio", "1.5"], "--compression-ratio"),
    "pool without topic": (["--alpha", "0.5", "--inject-from", "pool"], "--pool-topic"),
    "hosts do not add up": (["--world-size", "4", "--hosts", "a:2,b:1",
                             "--bootstrap", "127.0.0.1:1", "--master-port", "1"], "HOSTS"),
    "multi-node without broker": (["--world-size", "4", "--nnodes", "2",
                                   "--master-port", "29500"], "KAFKA_BOOTSTRAP"),
    "unknown flag": (["--learning-rate", "0.1"], "--learning-rate"),
    "not a number": (["--world-size", "three"], "--world-size"),
    "resume without checkpoint": (["--resume", "--log-dir", "/nonexistent/run"], "--resume"),
}


# Environment inputs: (variables, argv, what the one line names).
BAD_ENV = {
    "bootstrap without a port": ({"KAFKA_BOOTSTRAP": "localhost"}, [], "KAFKA_BOOTSTRAP"),
    "bootstrap port not a number": ({}, ["--bootstrap", "kafka:nine"], "HOST:PORT"),
    "one bad address of a list": ({"KAFKA_BOOTSTRAP": "a:9092,b"}, [], "HOST:PORT"),
    "master address with a port": ({"MASTER_ADDR": "10.0.0.1:29500"}, [], "MASTER_ADDR"),
    "master port out of range": ({"MASTER_PORT": "70000"}, [], "MASTER_PORT"),
    "NNODES not a number": ({"NNODES": "two"}, [], "NNODES"),
    "no broker binary": ({"TANSU_BIN": "/nonexistent/tansu"}, [], "TANSU_BIN"),
    "data folder missing": ({"SCADLES_DATA_DIR": "/nonexistent/data"}, [], "SCADLES_DATA_DIR"),
    "MPIEXEC not found": ({"MPIEXEC": "/nonexistent/mpiexec"}, ["--backend", "mpi"],
                          "MPIEXEC"),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("KAFKA_BOOTSTRAP", "HOSTS", "NNODES", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "MPIEXEC", "TANSU_BIN", "SCADLES_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", list(BAD_ENV))
def test_bad_environment_exits_2_with_one_line(name, monkeypatch, capsys):
    variables, argv, mentions = BAD_ENV[name]
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), lines
    assert mentions in lines[0]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_exits_2_with_one_line(name, capsys):
    argv, mentions = BAD[name]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("config error: ")
    assert mentions in lines[0]


def test_mpi_without_mpiexec(monkeypatch, capsys):
    monkeypatch.setenv("MPIEXEC", "/nonexistent/mpiexec")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--backend", "mpi"])
    assert exit_info.value.code == 2
    assert "mpiexec" in capsys.readouterr().err


def test_nccl_without_gpus(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--backend", "nccl"])
    assert exit_info.value.code == 2
    assert "GPU" in capsys.readouterr().err


def test_defaults_are_derived():
    cfg = parse_args(["--world-size", "3", "--rates", "10,20,40", "--log-dir", "/tmp/x"])
    assert cfg.global_bsz == 64 * 3
    assert cfg.duration_s >= cfg.max_steps * cfg.window_s
    assert cfg.topic_prefix == "trainer-"  # a private embedded broker
    external = parse_args(["--bootstrap", "127.0.0.1:9092"])
    assert external.topic_prefix.startswith("trainer-") and external.topic_prefix != "trainer-"
    ddp = parse_args(["--mode", "ddp", "--world-size", "2", "--rates", "8,64",
                      "--max-steps", "10"])
    assert ddp.duration_s >= 10 * 64 / 8  # the slowest stream fills a batch in 8 s


def test_argv_round_trip():
    cfg = parse_args(["--world-size", "3", "--rates", "10 20 40", "--milestones", "1,2.5",
                      "--no-error-feedback", "--clock", "virtual", "--log-dir", "/tmp/x"])
    again = parse_args(cfg.to_argv())
    assert again == cfg
    assert again.error_feedback is False and again.milestones == [1.0, 2.5]


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    monkeypatch.setenv("HOSTS", "a:2,b:2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    cfg = parse_args(["--world-size", "4"])
    assert cfg.bootstrap == "10.0.0.1:9092"
    assert cfg.host_slots == [("a", 2), ("b", 2)]
    assert list(cfg.local_ranks()) == [2, 3]


def test_comm_model():
    assert CommModel("link:8,0.01").seconds(0.5, 1_000_000) == pytest.approx(1.01)
    assert CommModel("fixed:0.2").seconds(0.5, 10) == 0.2
    from scadles.clock import ComputeModel

    assert CommModel("auto").for_compute(ComputeModel("fixed:1")).seconds(0.5, 10) == 0.0
    assert CommModel("auto").for_compute(ComputeModel("measured")).seconds(0.5, 10) == 0.5


def test_paper_presets_take_the_papers_batch_64_time_and_name_the_model():
    from scadles.clock import PAPER_COMPUTE, ComputeModel

    for name, seconds in (("resnet152", 1.2), ("vgg19", 1.6)):
        model = ComputeModel(f"paper-{name}")
        assert model.deterministic and model.seconds(99.0, 64, 3) == pytest.approx(seconds)
        assert model.seconds(0.0, 128, 0) > model.seconds(0.0, 64, 0)
        doc = model.describe()
        assert doc["preset"] == f"paper-{name}" and doc["hardware"] == "K80"
        assert doc["model_params"] == PAPER_COMPUTE[name]["params"]
    with pytest.raises(ValueError, match="paper-resnet152"):
        ComputeModel("paper-alexnet")


def test_ethernet_comm_model_charges_the_presets_model_by_world_size():
    from scadles.clock import ComputeModel

    comm = CommModel("paper-ethernet").for_compute(ComputeModel("paper-resnet152"))
    assert comm.describe()["charged_model"] == "ResNet152"
    grad = 60.2e6 * 4
    bytes_per_s = 5e9 / 8
    # Dense: a ring allreduce of ResNet152's gradient, whatever the trained model's size.
    for w in (2, 16):
        want = 2 * (w - 1) * 1e-4 + 2 * (w - 1) / w * grad / bytes_per_s
        assert comm.seconds(0.0, 1000, dense_bytes=1000, world_size=w) == pytest.approx(want)
    assert comm.seconds(0.0, 1000, dense_bytes=1000, world_size=1) == 0.0
    # Compressed: the allgather of every rank's payload (here a fifth of the dense bytes).
    want = 15 * 1e-4 + 15 * 0.2 * grad / bytes_per_s
    assert comm.seconds(0.0, 200, compressed=True, dense_bytes=1000,
                        world_size=16) == pytest.approx(want)
    # Without a preset it charges the trained model's own gradient.
    own = CommModel("ethernet:1,0").for_compute(ComputeModel("linear:0.1,0.01"))
    assert own.seconds(0.0, 1000, dense_bytes=1000, world_size=2) == pytest.approx(8e-6)
    with pytest.raises(ValueError):
        CommModel("ethernet:0")


def test_launch_rejects_bad_config_before_starting_anything(tmp_path):
    """The launcher itself: exit 2, one line, quickly, and no log dir (nothing started)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KAFKA_BOOTSTRAP", None)
    cases = [["--backend", "bogus"], ["--world-size", "3", "--rates", "1,2"],
             ["--model-name", "nope"]]
    for argv in cases:
        log_dir = tmp_path / "run"
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "scadles.launch", *argv, "--log-dir",
                               str(log_dir)], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stdout == ""
        assert time.monotonic() - started < 30
        assert not log_dir.exists()


def _run_common(tmp_path, script_body: str, env_extra: dict) -> subprocess.CompletedProcess:
    """Source common.sh from a throwaway script whose launcher is `echo`."""
    script = tmp_path / "script.sh"
    script.write_text(script_body + f'\nsource "{REPO}/execution_scripts/common.sh"\n'
                                    'run_scadles "$@"\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ("RATES", "WORLD_SIZE", "LOG_DIR", "EVAL_STEPS")}
    env.update(PYTHON="/bin/echo", **env_extra)
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=30)


def test_common_sh_trims_and_cycles_rate_lists(tmp_path):
    body = '\n'.join(['mode="${MODE:-scadles}"', 'backend="${BACKEND:-mpi}"',
                      'model="${MODEL:-resnet152}"', 'dataset="${DATASET:-cifar10}"',
                      'world_size="${WORLD_SIZE:-4}"', 'rates="${RATES:-92 38 62 42}"'])
    trimmed = _run_common(tmp_path, body, {"WORLD_SIZE": "3", "EVAL_STEPS": "7"})
    assert trimmed.returncode == 0, trimmed.stderr
    assert "using the first 3" in trimmed.stderr
    assert "--rates 92,38,62" in trimmed.stdout
    assert "--eval-steps 7" in trimmed.stdout  # unset in the script: from the environment
    assert f"--log-dir {REPO}/logs/resnet152_scadles_cifar10" in trimmed.stdout
    cycled = _run_common(tmp_path, body, {"WORLD_SIZE": "6"})
    assert "cycling" in cycled.stderr and "--rates 92,38,62,42,92,38" in cycled.stdout
    given = _run_common(tmp_path, body, {"WORLD_SIZE": "2", "RATES": "5,6",
                                         "LOG_DIR": "/tmp/somewhere"})
    assert "--rates 5,6" in given.stdout and "using" not in given.stderr
    assert "--log-dir /tmp/somewhere" in given.stdout


def test_common_sh_rejects_a_boolean_that_is_not_0_or_1(tmp_path):
    body = '\n'.join(['model="${MODEL:-resnet152}"', 'world_size=2', 'rates="S10"'])
    bad = _run_common(tmp_path, body, {"RESUME": "yes"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["config error: RESUME=yes: set it to 1 or 0 "
                                               "(or unset it)"]
    good = _run_common(tmp_path, body, {"RESUME": "1", "LOG_DIR": str(tmp_path / "run")})
    assert "--resume" in good.stdout, good.stderr


def test_devices_per_rank_multiplies_the_devices_each_device_sees_a_run_of_one_per_rank():
    """--world-size 2 --devices-per-rank 3: 6 devices (rates, partition, the reference global
    batch), 2 ranks; each device trains with the config of 6 ranks of one device."""
    cfg = parse_args(["--world-size", "2", "--devices-per-rank", "3", "--clock", "virtual",
                      "--compute-model", "fixed:0.1", "--rates", "1,2,3,4,5,6", "--source",
                      "inprocess"], check_environment=False)
    assert cfg.devices == 6 and cfg.ref_global_bsz == 6 * 64 and cfg.global_bsz == 6 * 64
    view = cfg.device_view()
    assert (view.world_size, view.devices_per_rank, view.devices) == (6, 1, 6)
    same = parse_args(["--world-size", "6", "--clock", "virtual", "--compute-model",
                       "fixed:0.1", "--rates", "1,2,3,4,5,6", "--source", "inprocess",
                       "--run-id", cfg.run_id, "--log-dir", cfg.log_dir],
                      check_environment=False)
    assert view.to_dict() == same.to_dict()

"""The acceptance commands of the compression and injection issues, through the real scripts.

Each test runs ``execution_scripts/<script>.sh`` as a user would (bash, environment overrides,
the launcher, a real broker, real gloo ranks), scaled down: smallcnn, Fashion-MNIST, a few
steps on the virtual clock with a modelled compute time. It then checks the property the
acceptance names, on the rows and ``run.json`` the run left behind:

- ``staticcompression_resnet152.sh``: bytes_sent per step at most a quarter of the same
  script's dense run (``COMPRESSION=none``);
- ``datainjection_resnet152.sh``: injected > 0, and trained labels (``label_hist``) that the
  device's own partition (``run.json`` "partition".labels_per_device) does not contain; from
  the peers' topics and, with ``INJECT_FROM=pool``, from the pool the launcher fills.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from scadles.metrics import read_rows

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "execution_scripts"
RUN_TIMEOUT_S = 180

# Scaled down, deterministic: the model, data, clock and a modelled compute time.
SMALL = {"BACKEND": "gloo", "MODEL": "smallcnn", "DATASET": "fashion-mnist",
         "CLOCK": "virtual", "COMPUTE_MODEL": "linear:0.05,0.002", "EVAL_SAMPLES": "200",
         "SEED": "0"}


def script_env(broker: str, log_dir: Path, **overrides: str) -> dict:
    """os.environ without any setting the scripts read (so nothing leaks in from the shell
    running the tests), plus the given ones, the test broker and the test's Python."""
    params = re.findall(r"(\w+):--", (SCRIPTS / "common.sh").read_text())
    assert "compression" in params and "alpha" in params  # the parameter list was found
    drop = {p.upper() for p in params} | {
        "RATES_SCHEDULE", "EXTRA_ARGS", "RESUME", "DOWNLOAD", "ERROR_FEEDBACK",
        "HOSTS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
        "LOCAL_RANK", "KAFKA_BOOTSTRAP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(SMALL)
    env.update(overrides)
    env.update(KAFKA_BOOTSTRAP=broker, LOG_DIR=str(log_dir), PYTHON=sys.executable)
    return env


def run_scripts(*runs: tuple[str, dict]) -> list[Path]:
    """Run ``(script, env)`` pairs side by side (start-up dominates these small runs); each
    must exit 0 and print its summary. Output goes to ``<LOG_DIR>.out``. Their log folders,
    in order."""
    procs = []
    try:
        for name, env in runs:
            out_path = Path(env["LOG_DIR"] + ".out")
            with open(out_path, "w") as out:
                procs.append((name, out_path, subprocess.Popen(
                    ["bash", str(SCRIPTS / name)], env=env, cwd=REPO, stdout=out,
                    stderr=subprocess.STDOUT)))
        for name, out_path, proc in procs:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
            output = out_path.read_text(errors="replace")
            assert code == 0, f"{name} exited {code}:\n{output[-5000:]}"
            assert "== run summary" in output, output[-2000:]
    finally:
        for _, _, proc in procs:  # after a failure or timeout: stop the rest (the launcher
            if proc.poll() is None:  # stops everything it started on SIGTERM)
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return [Path(env["LOG_DIR"]) for _, env in runs]


def train_rows(log_dir: Path, world_size: int) -> list[list[dict]]:
    rows = [read_rows(log_dir, r, "train") for r in range(world_size)]
    assert all(rows), f"a rank logged no training step in {log_dir}"
    return rows


def test_static_compression_sends_at_most_a_quarter_of_dense(broker, tmp_path):
    """Issue 4's acceptance: staticcompression_resnet152.sh, then the same with
    COMPRESSION=none; every step's bytes_sent at most a quarter of the dense run's."""
    world_size, steps = 2, 3
    common = {"WORLD_SIZE": str(world_size), "MAX_STEPS": str(steps)}
    script = "staticcompression_resnet152.sh"
    dense_dir, static_dir = run_scripts(
        (script, script_env(broker, tmp_path / "dense", COMPRESSION="none", **common)),
        (script, script_env(broker, tmp_path / "static", **common)))

    dense, static = train_rows(dense_dir, world_size), train_rows(static_dir, world_size)
    for rank in range(world_size):
        assert len(dense[rank]) == len(static[rank]) == steps
        assert all(r["compressed"] is False and r["ratio"] == 1.0 for r in dense[rank])
        assert all(r["compressed"] is True for r in static[rank])
        dense_per_step = max(r["bytes_sent"] for r in dense[rank])
        assert dense_per_step > 0
        for row in static[rank]:
            assert 0 < row["bytes_sent"] <= dense_per_step / 4, (rank, row["step"],
                                                                 row["bytes_sent"],
                                                                 dense_per_step)
    config = json.loads((static_dir / "run.json").read_text())["config"]
    assert (config["compression"], config["compression_ratio"]) == ("static", 0.01)
    summary = json.loads((static_dir / "run.json").read_text())["summary"]
    assert summary["bytes_sent_total"] == sum(r["bytes_sent"] for rows in static
                                              for r in rows)


def test_data_injection_trains_labels_the_device_lacks(broker, tmp_path):
    """Issue 5's acceptance: datainjection_resnet152.sh on 4 non-IID devices; the logs show
    injected > 0 and trained labels outside the device's own partition (run.json)."""
    world_size, steps = 4, 3
    peers_dir, pool_dir = run_scripts(
        ("datainjection_resnet152.sh", script_env(broker, tmp_path / "inject",
                                                  WORLD_SIZE=str(world_size),
                                                  MAX_STEPS=str(steps))),
        # The same from the shared pool: the launcher starts `streamsim.pool`.
        ("datainjection_resnet152.sh", script_env(broker, tmp_path / "inject-pool",
                                                  WORLD_SIZE=str(world_size),
                                                  MAX_STEPS=str(steps), INJECT_FROM="pool",
                                                  POOL_TOPIC=f"pool-{tmp_path.name}")))
    pool_log = (pool_dir / "pool-producer.log").read_text()
    assert re.search(r"pool pool-\S+: \d+ records", pool_log), pool_log
    for log_dir, sources in ((peers_dir, None), (pool_dir, ["pool"])):
        rows = _check_injection(log_dir, world_size)
        if sources is not None:
            assert all(r["injected_from"] == sources for rank_rows in rows for r in rank_rows
                       if r["injected"])


def _check_injection(log_dir: Path, world_size: int) -> list[list[dict]]:
    """injected > 0 on every rank, and labels trained beyond the rank's own partition."""
    run = json.loads((log_dir / "run.json").read_text())
    assert run["config"]["partition"] == "noniid"
    assert (run["config"]["alpha"], run["config"]["beta"]) == (0.25, 0.25)
    own_labels = run["partition"]["labels_per_device"]
    assert len(own_labels) == world_size
    rows = train_rows(log_dir, world_size)
    for rank in range(world_size):
        own = {int(label) for label in own_labels[rank]}
        injected = sum(r["injected"] for r in rows[rank])
        trained = {int(label) for r in rows[rank] for label in r["label_hist"]}
        assert injected > 0, f"rank {rank} injected nothing"
        assert sum(r["injected_bytes"] for r in rows[rank]) > 0
        assert trained - own, f"rank {rank} trained only its own labels {sorted(own)}"
        # What the rows count as injected is what the histogram shows beyond the stream.
        assert all(sum(r["label_hist"].values()) == r["local_bsz"] for r in rows[rank])
    return rows

"""End-to-end runs of the trainer through the launcher: real broker, real ranks, both modes.

Small on purpose (smallcnn, Fashion-MNIST, 2-4 ranks, a handful of steps): each run is a
few seconds of training plus process start-up.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scadles.metrics import expand_ranges, read_rows

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240

# A deterministic virtual-time run: modelled compute, dense exchange.
VIRTUAL = ["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--backend", "gloo",
           "--clock", "virtual", "--compute-model", "linear:0.05,0.002", "--eval-steps", "5",
           "--eval-samples", "300", "--seed", "3"]


def launch(args: list[str], env: dict, check: bool = True,
           timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scadles.launch", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_rows(log_dir: Path, world_size: int) -> list[list[dict]]:
    return [read_rows(log_dir, r, "train") for r in range(world_size)]


def comparable(rows: list[dict]) -> list[tuple]:
    """What must be bit-identical between two runs of the same seed."""
    return [(r["step"], r["clock_s"], r["local_bsz"], r["global_bsz"], r["lr"], r["loss"],
             json.dumps(r["seqs"]), json.dumps(r["label_hist"])) for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    """The repository on PYTHONPATH, the venv first on PATH, no run settings inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP", "HOSTS", "NNODES", "NODE_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture
def env():
    return clean_env()


# The reference run: 3 ranks at 10/20/40 samples/s, local batches capped at 32, so the fast
# stream builds a persistence backlog (8 more samples every step).
# Warmup over 300 samples: the first four or so of the ten steps warm up, the rest do not.
REFERENCE = [*VIRTUAL, "--world-size", "3", "--rates", "10,20,40", "--max-steps", "10",
             "--max-train-bsz", "32", "--warmup-epochs", "0.005"]
MAX_TRAIN_BSZ = 32


@pytest.fixture(scope="module")
def reference_run(broker, tmp_path_factory):
    """scadles, 3 gloo ranks at 10/20/40 samples/s, virtual time, through the real broker;
    the final model is checkpointed (step 10)."""
    log_dir = tmp_path_factory.mktemp("reference")
    env = clean_env()
    launch([*REFERENCE, "--bootstrap", broker, "--log-dir", str(log_dir),
            "--checkpoint-every", "10"], env)
    return log_dir


def test_scadles_virtual_batches_follow_rates(reference_run):
    from scadles.aggregate import step_lr

    rows = train_rows(reference_run, 3)
    rates = [10, 20, 40]
    assert [len(r) for r in rows] == [10, 10, 10]
    cfg = json.loads((reference_run / "run.json").read_text())["config"]
    warmup_samples = round(cfg["warmup_epochs"] * 60_000)  # Fashion-MNIST's training split
    samples_before = 0
    for step_rows in zip(*rows):
        local = [r["local_bsz"] for r in step_rows]
        global_bsz = step_rows[0]["global_bsz"]
        assert all(r["global_bsz"] == global_bsz for r in step_rows)
        assert sum(local) == global_bsz
        # One window of stream: local batch ~ rate x 1 s (the first window includes t=0),
        # at most --max-train-bsz.
        for b, rate in zip(local, rates):
            assert abs(b - min(rate * 1.0, MAX_TRAIN_BSZ)) <= 2, local
        assert step_rows[0]["lr"] == pytest.approx(
            step_lr(0.1, global_bsz, 64 * 3, samples_before, scale=True,
                    warmup_samples=warmup_samples, max_lr=cfg["max_lr"]))
        samples_before += global_bsz
        assert len({r["lr"] for r in step_rows}) == 1
        assert len({r["clock_s"] for r in step_rows}) == 1  # one group clock
    backlog = [r["buffer_len"] for r in rows[2]]
    assert backlog == sorted(backlog) and backlog[-1] >= 70  # persistence keeps the rest
    evals = [read_rows(reference_run, r, "eval") for r in range(3)]
    assert [e["step"] for e in evals[0]] == [5, 10]
    assert evals[0] == evals[1] == evals[2]  # sharded, summed: the same on every rank
    run = json.loads((reference_run / "run.json").read_text())
    assert run["partition"]["samples_per_device"] == [20000] * 3
    assert run["summary"]["steps"] == 10 and run["summary"]["final_top1"] is not None
    assert run["config"]["world_size"] == 3 and run["versions"]["torch"]
    # the launcher's stream plan: the one each rank builds from the same config
    from scadles.config import Config
    from streamsim.plan import StreamPlan

    plan = StreamPlan.from_dict(run["stream_plan"])
    assert plan == Config(**run["config"]).stream_plan()
    assert plan.devices == 3 and plan.stream_start_s == run["config"]["stream_start_s"]
    assert [d["rate_per_s"] for d in run["summary"]["devices"]] == rates


def test_resume_after_a_killed_rank(reference_run, broker, env, tmp_path):
    """Kill rank 2 at step 8 (checkpoint at step 6), resume: every sample trained exactly
    once, and all 10 steps (6 from the killed run, 4 resumed) are bit-identical to the
    reference run: virtual runs with a modelled compute time are deterministic per seed. The
    fast stream has a persistence backlog, and the resumed run's summary (per-device table,
    mean b_i, CNC line) counts the whole run: it equals the uninterrupted run's."""
    args = [*REFERENCE, "--bootstrap", broker, "--log-dir", str(tmp_path),
            "--checkpoint-every", "3"]
    failed = launch(args + ["--fail-at-step", "8"], env, check=False)
    assert failed.returncode != 0
    assert "rank 2 failed (exited with status 17): failing at step 8" in failed.stdout
    assert "Traceback" not in failed.stdout + failed.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    resumed = launch(args + ["--resume"], env)
    for rank, (rows, ref) in enumerate(zip(train_rows(tmp_path, 3),
                                          train_rows(reference_run, 3))):
        assert [r["step"] for r in rows] == list(range(1, 11))
        seqs = [s for r in rows for s in expand_ranges(r["seqs"])]
        assert seqs == list(range(len(seqs))), f"rank {rank}: a sample lost or repeated"
        assert comparable(rows) == comparable(ref)
        assert [r["kind"] for r in read_rows(tmp_path, rank)].count("resume") == 1
    assert train_rows(tmp_path, 3)[2][5]["buffer_len"] > 0  # a backlog at the checkpoint
    whole = json.loads((reference_run / "run.json").read_text())["summary"]
    summary = json.loads((tmp_path / "run.json").read_text())["summary"]
    assert summary["devices"] == whole["devices"]
    assert summary["devices"][2]["samples_trained"] == 10 * MAX_TRAIN_BSZ
    for key in ("steps", "samples", "bytes_sent_total", "compressed_steps", "dense_steps",
                "cnc_ratio", "final_top1", "stop_reason"):
        assert summary[key] == whole[key], key
    assert "device  rate/s  trained  mean b_i" in resumed.stdout
    assert "CNC ratio 0.00 (0 compressed / 10 dense steps)" in resumed.stdout


def test_the_training_loop_equals_a_single_process_reference(reference_run):
    """The real loop (3 gloo ranks, uneven rates, scaled and warmed-up lr) ends with the
    parameters of one process that trains the same model on each step's union batch (the
    samples the rows name) at the same learning rate: weighted aggregation is the gradient
    of the mean loss over the union, and every rank applies the same update."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from scadles.aggregate import step_lr
    from scadles.config import Config
    from scadles.models import build_model
    from scadles.train import device_streams
    from streamsim.datasets import load_dataset

    run = json.loads((reference_run / "run.json").read_text())
    cfg = Config(**run["config"])
    data = load_dataset(cfg.dataset, "train", cfg.data_dir, False, cfg.image_size, cfg.seed)
    index_of = []
    for stream in device_streams(cfg.stream_plan(), data):
        seqs, _, indices = stream.plan(cfg.duration_s)
        index_of.append(dict(zip(seqs.tolist(), indices.tolist())))
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    channels, height, _ = data.sample_shape
    model = build_model(cfg.model_name, data.num_classes, channels, height, seed=cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    rows = train_rows(reference_run, 3)
    samples_before = 0
    for step_rows in zip(*rows):
        step, global_bsz = step_rows[0]["step"], step_rows[0]["global_bsz"]
        idx = np.array([index_of[rank][s] for rank, r in enumerate(step_rows)
                        for s in expand_ranges(r["seqs"])])
        assert len(idx) == global_bsz
        lr = step_lr(cfg.lr, global_bsz, cfg.global_bsz, samples_before, scale=True,
                     warmup_samples=round(cfg.warmup_epochs * len(data)), max_lr=cfg.max_lr)
        samples_before += global_bsz
        assert all(r["lr"] == pytest.approx(lr, rel=1e-12) for r in step_rows)
        x = (torch.from_numpy(data.batch_pixels(idx)).float().div_(255) - mean) / std
        y = torch.from_numpy(data.labels[idx])
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    shared = torch.load(reference_run / "checkpoints" / "step-00000010" / "shared.pt",
                        map_location="cpu", weights_only=False)
    assert shared["step"] == 10
    trained = shared["model"]
    for name, param in model.state_dict().items():
        torch.testing.assert_close(trained[name], param, rtol=1e-4, atol=1e-5, msg=name)
    # It is no tautology: one step's update moves the parameters by far more than that.
    first = build_model(cfg.model_name, data.num_classes, channels, height, seed=cfg.seed)
    moved = max((trained[n] - p).abs().max().item() for n, p in first.state_dict().items())
    assert moved > 1e-2


@pytest.mark.parametrize("mode", ["scadles", "ddp"])
def test_wall_clock_through_the_broker(mode, broker, env, tmp_path):
    """Real time, real streams: scadles with the launcher's own embedded broker, ddp on the
    shared one. ddp trains a fixed batch on every rank with the base learning rate (warmed
    up over the default 0.1 epoch of samples, as in every mode)."""
    args = ["--mode", mode, "--world-size", "2", "--rates", "40,80", "--clock", "wall",
            "--max-steps", "4", "--eval-steps", "0", "--eval-samples", "200",
            "--train-bsz", "16", "--log-dir", str(tmp_path)]
    if mode == "ddp":
        args += ["--bootstrap", broker]
    proc = launch(args, env)
    if mode == "scadles":
        assert "embedded broker" in proc.stdout
    rows = train_rows(tmp_path, 2)
    assert [len(r) for r in rows] == [4, 4]
    for a, b in zip(*rows):
        assert a["global_bsz"] == b["global_bsz"] == a["local_bsz"] + b["local_bsz"]
        if mode == "ddp":
            assert a["local_bsz"] == b["local_bsz"] == 16
            # 32 samples a step, warmed up over 0.1 x 60,000: step s trains at s x 32 / 6,000
            assert a["lr"] == b["lr"] == pytest.approx(0.1 * a["step"] * 32 / 6000)
    clock = [r["clock_s"] for r in rows[0]]
    assert clock == sorted(clock) and clock[0] > 0
    assert "run summary" in proc.stdout


def test_mpi_ddp_slowest_stream_sets_the_pace(broker, env, tmp_path):
    """mpiexec through the launcher: one world of 3 ranks; in ddp mode every step waits for
    the slowest stream (8 samples/s -> 16 samples every 2 s)."""
    launch([*VIRTUAL, "--backend", "mpi", "--mode", "ddp", "--train-bsz", "16",
            "--world-size", "3", "--rates", "8,32,64", "--max-steps", "4",
            "--bootstrap", broker, "--log-dir", str(tmp_path)], env)
    rows = train_rows(tmp_path, 3)
    assert [len(r) for r in rows] == [4, 4, 4]
    for step_rows in zip(*rows):
        assert [r["global_bsz"] for r in step_rows] == [48] * 3  # the world is 3 ranks
    clock = [r["clock_s"] for r in rows[2]]
    gaps = [b - a for a, b in zip(clock, clock[1:])]
    assert all(g == pytest.approx(2.0, abs=0.2) for g in gaps), clock
    assert rows[2][1]["wait_s"] == pytest.approx(0.0, abs=0.05)  # the fast one never waits
    assert rows[0][1]["wait_s"] > 1.5  # the slow one always does


def test_two_nodes_on_loopback_form_one_group(broker, env, tmp_path):
    """Two launchers (NNODES=2, NODE_RANK=0/1) with an external broker: one group of 4."""
    node_env = dict(env, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    KAFKA_BOOTSTRAP=broker)
    args = [*VIRTUAL, "--world-size", "4", "--rates", "10,20,30,40", "--max-steps", "3",
            "--topic-prefix", f"twonode-{os.getpid()}-{tmp_path.name}-"]
    procs = [subprocess.Popen([sys.executable, "-m", "scadles.launch", *args, "--log-dir",
                               str(tmp_path / f"node{n}")], env=dict(node_env, NODE_RANK=str(n)),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for n in (0, 1)]
    outputs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rows = [read_rows(tmp_path / f"node{r // 2}", r, "train") for r in range(4)]
    assert [len(r) for r in rows] == [3] * 4
    for step_rows in zip(*rows):
        local = [r["local_bsz"] for r in step_rows]
        assert all(r["global_bsz"] == sum(local) for r in step_rows)
        assert abs(local[3] - 40) <= 2 and abs(local[0] - 10) <= 2
    assert (tmp_path / "node0" / "run.json").exists()
    assert not (tmp_path / "node1" / "run.json").exists()  # node 0 owns the run


def test_forked_ranks_train_exactly_as_spawned_ones(tmp_path):
    """--rank-start fork (the gloo default: one warm process forks the ranks) gives the same
    rows, bit for bit, as one interpreter per rank; the launcher says how it started them."""
    env = clean_env()
    args = [*VIRTUAL, "--world-size", "2", "--rates", "16,32", "--max-steps", "6",
            "--source", "inprocess"]
    rows = {}
    for how in ("spawn", "fork"):
        proc = launch([*args, "--rank-start", how, "--log-dir", str(tmp_path / how)], env)
        assert ("forked from one process" in proc.stdout) == (how == "fork")
        rows[how] = [comparable(r) for r in train_rows(tmp_path / how, 2)]
        assert (tmp_path / how / "rank-1.log").is_file()
    assert rows["fork"] == rows["spawn"] and len(rows["fork"][0]) == 6
    assert (tmp_path / "fork" / "rankhost.log").is_file()


# Plug-ins from outside the package (tests/plugins, put on PYTHONPATH as a user would).
PLUGINS = REPO / "tests" / "plugins"


def plugin_env() -> dict:
    env = clean_env()
    env["PYTHONPATH"] = str(PLUGINS) + os.pathsep + env["PYTHONPATH"]
    return env


def test_model_compressor_and_dataset_plugins_train_through_the_launcher(broker, tmp_path):
    """`--model-name mymodels:tiny --dataset mydata:stripes --compression static
    --compressor mycomp:RandomK`: 2 gloo ranks, 3 steps through the broker (so the producer
    resolves the dataset too); random-k takes the exchanger's general payload path."""
    args = [*VIRTUAL, "--model-name", "mymodels:tiny", "--dataset", "mydata:stripes",
            "--compression", "static", "--compressor", "mycomp:RandomK",
            "--compression-ratio", "0.25", "--world-size", "2", "--rates", "16,32",
            "--max-steps", "3", "--bootstrap", broker, "--log-dir", str(tmp_path)]
    launch(args, plugin_env())
    rows = train_rows(tmp_path, 2)
    assert [len(r) for r in rows] == [3, 3]
    params = 8 * 8 * 4 + 4  # tiny: one linear layer, 1x8x8 -> 4 classes
    kept = int(8 * 8 * 4 * 0.25)  # of the weight; the bias keeps max(1, 4 x 0.25) = 1
    for row in rows[0] + rows[1]:
        assert row["compressed"] and row["loss"] is not None
        # header (count + 4 lengths), then float32 values and int64 indices of each layer,
        # each 8-aligned
        assert row["bytes_sent"] == 8 * 5 + 4 * kept + 8 * kept + 8 + 8
        assert row["ratio"] < 1 and row["floats_sent"] < params
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["compressor"] == "mycomp:RandomK"
    assert run["partition"]["samples_per_device"] == [200, 200]
    assert run["summary"]["steps"] == 3


def test_qsgd_trains_a_plugin_model_on_the_builtin_dataset(tmp_path):
    """The shipped QSGD compressor between two real gloo ranks (in-process streams), with a
    plug-in model on Fashion-MNIST."""
    args = [*VIRTUAL, "--model-name", "mymodels:tiny", "--compression", "static",
            "--compressor", "qsgd", "--world-size", "2", "--rates", "16,32",
            "--max-steps", "3", "--source", "inprocess", "--log-dir", str(tmp_path)]
    launch(args, plugin_env())
    rows = train_rows(tmp_path, 2)
    assert [len(r) for r in rows] == [3, 3]
    for row in rows[0] + rows[1]:
        assert row["compressed"]
        assert row["bytes_sent"] == 8 * 5 + 8 + 28 * 28 * 10 + 8 + 16  # norms, int8 levels
    assert rows[0][-1]["loss"] < rows[0][0]["loss"] * 1.5
    assert "gradient compression: static qsgd" in (tmp_path / "rank-0.log").read_text()


def test_a_broken_plugin_stops_the_launcher_before_anything_starts(tmp_path):
    proc = launch(["--model-name", "mymodels:not_a_module", "--source", "inprocess",
                   "--log-dir", str(tmp_path / "run")], plugin_env(), check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "config error: --model-name 'mymodels:not_a_module' returned a str: it must return a "
        "torch.nn.Module"]
    assert not (tmp_path / "run").exists()

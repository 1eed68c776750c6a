"""--devices-per-rank: K simulated devices per rank train exactly as one process per device.

The same configuration runs twice through the launcher: 4 devices as 4 gloo ranks x 1, and
as 2 ranks x 2 (each rank a DeviceGroup of two device threads). After 10 steps the model
parameters, every device's rows and the run summary agree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scadles.metrics import read_rows
from tests.integration.test_train_e2e import clean_env, launch

# Uneven rates (a persistence backlog on the fast ones), modelled time, evaluations on the
# way, a checkpoint at step 10 (the parameters compared).
BASE = ["--model-name", "smallcnn-bn", "--dataset", "fashion-mnist", "--backend", "gloo",
        "--clock", "virtual", "--compute-model", "linear:0.05,0.002", "--comm-model",
        "link:1000", "--rates", "12,20,36,60", "--max-train-bsz", "32", "--max-steps", "10",
        "--eval-steps", "5", "--eval-samples", "200", "--seed", "5", "--checkpoint-every", "10",
        "--warmup-epochs", "0.002"]
CASES = {
    "uneven-rates": ["--source", "inprocess"],
    "static-topk": ["--source", "inprocess", "--compression", "static",
                    "--compression-ratio", "0.05"],
    "injection-kafka": ["--source", "kafka", "--alpha", "0.5", "--beta", "0.5",
                        "--policy", "truncation"],
}
# Row fields that are measured wall time, not simulation.
MEASURED = {"compress_s"}
# Row fields that are sums of floats: equal up to their order (K local terms first).
SUMS = {"loss", "signal"}


def run(tmp_path: Path, name: str, ranks: int, per_rank: int, extra: list[str],
        broker: str | None) -> Path:
    log_dir = tmp_path / name
    env = clean_env()
    if broker:
        env["KAFKA_BOOTSTRAP"] = broker
    launch([*BASE, *extra, "--world-size", str(ranks), "--devices-per-rank", str(per_rank),
            "--log-dir", str(log_dir)], env)
    return log_dir


def same(a, b, key: str) -> bool:
    if key in SUMS and isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    return a == b


@pytest.mark.parametrize("case", list(CASES))
def test_two_devices_per_rank_reproduce_four_ranks(case, broker, tmp_path):
    extra = CASES[case]
    kafka = broker if "kafka" in extra else None
    one = run(tmp_path, "4x1", 4, 1, extra, kafka)
    two = run(tmp_path, "2x2", 2, 2, extra, kafka)

    # The parameters after 10 steps (rank 0's checkpoint: identical on every device).
    def params(log_dir):
        return torch.load(log_dir / "checkpoints" / "step-00000010" / "shared.pt",
                          map_location="cpu", weights_only=False)["model"]

    a, b = params(one), params(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # Not a tautology: training moved the parameters far more than that.
    first = run_json(one)["summary"]
    assert first["steps"] == 10 and first["samples"] > 0

    # Every device's rows: batch sizes, seqs, clock, weights, lr, exchange, injection.
    for device in range(4):
        rows_a, rows_b = read_rows(one, device), read_rows(two, device)
        assert len(rows_a) == len(rows_b) > 10
        for ra, rb in zip(rows_a, rows_b):
            assert ra.keys() == rb.keys()
            for key in ra.keys() - MEASURED:
                assert same(ra[key], rb[key], key), (device, ra.get("step"), key, ra[key],
                                                       rb[key])
    train = read_rows(two, 3, "train")
    assert len({r["local_bsz"] for r in read_rows(two, 0, "train")}
               | {r["local_bsz"] for r in train}) > 1  # uneven rates: uneven batches
    if case == "static-topk":
        assert all(r["compressed"] for r in train)
    if case == "injection-kafka":
        assert sum(r.get("injected", 0) for r in train) > 0

    # The summaries, the device rows included (one row per device, not per rank).
    sa, sb = run_json(one)["summary"], run_json(two)["summary"]
    assert [d["device"] for d in sb["devices"]] == [0, 1, 2, 3]
    for key in sa.keys() - {"wall_s", "log_dir"}:
        if key in ("final_top1", "final_top5", "best_top1"):
            assert sa[key] == pytest.approx(sb[key], abs=0.51), key  # a tie may flip one
        else:
            assert sa[key] == sb[key], key
    config = run_json(two)["config"]
    assert (config["world_size"], config["devices_per_rank"]) == (2, 2)


def run_json(log_dir: Path) -> dict:
    return json.loads((log_dir / "run.json").read_text())


def test_many_devices_per_rank_write_one_row_per_device(tmp_path):
    """64 devices in 2 ranks: every device streams, trains and reports (its own rows file
    and summary row), and the partition covers all 64."""
    log_dir = tmp_path / "many"
    proc = launch(["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--backend",
                   "gloo", "--clock", "virtual", "--compute-model", "fixed:0.1",
                   "--comm-model", "fixed:0", "--source", "inprocess", "--rates", "S10",
                   "--world-size", "2", "--devices-per-rank", "32", "--max-steps", "3",
                   "--eval-steps", "0", "--eval-samples", "200", "--log-dir", str(log_dir)],
                  clean_env())
    summary = run_json(log_dir)["summary"]
    assert summary["steps"] == 3
    assert [d["device"] for d in summary["devices"]] == list(range(64))
    assert all(d["samples_trained"] > 0 for d in summary["devices"])
    assert len(list(log_dir.glob("rank-*.jsonl"))) == 64
    assert "on 64 devices" in proc.stdout
    # 2 rank processes, not 64
    assert len(list(log_dir.glob("rank-*.log"))) == 2


def test_a_failing_device_stops_its_rank_with_one_line(tmp_path):
    """A device that dies (the --fail-at-step hook on device 3, the second device of rank
    1) fails its rank with that device's cause, and the launcher stops the run."""
    log_dir = tmp_path / "fail"
    proc = launch([*BASE, "--source", "inprocess", "--world-size", "2", "--devices-per-rank",
                   "2", "--fail-at-step", "3", "--checkpoint-every", "0",
                   "--log-dir", str(log_dir)], clean_env(), check=False)
    assert proc.returncode != 0
    assert "failing at step 3" in (log_dir / "rank-1.log").read_text()


def test_resume_with_devices_per_rank_holds_every_devices_state(tmp_path):
    """2 ranks x 2 devices with static Top-k (each device's residuals) and a persistence
    backlog (each device's buffer): device 3 dies at step 8, the run resumes from the
    checkpoint of step 6 and ends exactly as the uninterrupted run: every device's rows,
    samples each trained once, the parameters."""
    from tests.integration.test_train_e2e import comparable

    args = [*BASE, *CASES["static-topk"], "--world-size", "2", "--devices-per-rank", "2",
            "--checkpoint-every", "3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    launch([*args, "--log-dir", str(whole)], clean_env())
    failed = launch([*args, "--log-dir", str(broken), "--fail-at-step", "8"], clean_env(),
                    check=False)
    assert failed.returncode != 0
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    launch([*args, "--log-dir", str(broken), "--resume"], clean_env())
    for device in range(4):
        rows = read_rows(broken, device, "train")
        assert [r["step"] for r in rows] == list(range(1, 11))
        assert comparable(rows) == comparable(read_rows(whole, device, "train")), device
    assert read_rows(broken, 2, "train")[5]["buffer_len"] > 0  # a backlog at the checkpoint
    a = torch.load(whole / "checkpoints" / "step-00000009" / "shared.pt", weights_only=False)
    b = torch.load(broken / "checkpoints" / "step-00000009" / "shared.pt", weights_only=False)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert run_json(broken)["summary"]["devices"] == run_json(whole)["summary"]["devices"]

"""scadles.devices: K device threads meeting at a rank's collectives (pure logic, a world of
one real rank; the multi-rank equivalence runs in tests/integration/test_devices_per_rank.py)."""
from __future__ import annotations

import threading
import types

import pytest
import torch

from scadles.devices import DeviceComm, DeviceGroup, GroupAborted, run_devices


class OneRank:
    """The real communicator of a one-rank world, counting its collectives."""

    backend, rank, world_size, local_rank, local_world_size = "gloo", 0, 1, 0, 1
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def allreduce_(self, tensor, op="sum"):
        self.calls += 1
        return tensor

    def allgather_varlen(self, tensor):
        self.calls += 1
        return [tensor.clone()]

    def broadcast_(self, tensor, src=0):
        self.calls += 1
        return tensor

    def barrier(self):
        self.calls += 1


def on_devices(k: int, fn):
    """fn(DeviceComm) on k device threads of one rank; their results in device order."""
    real = OneRank()
    group = DeviceGroup(real, k)
    out = [None] * k

    def work(local):
        out[local] = fn(DeviceComm(group, local))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    return out, real


def test_collectives_combine_the_devices_in_order_with_one_real_collective_each():
    def fn(comm):
        total = comm.allreduce_(torch.tensor([float(comm.rank + 1)]))
        biggest = comm.allreduce_(torch.tensor([float(comm.rank)]), op="max")
        gathered = comm.allgather_varlen(torch.arange(comm.rank + 1))
        shared = comm.broadcast_(torch.tensor([comm.rank * 10]), src=2)
        comm.barrier()
        return total.item(), biggest.item(), [g.tolist() for g in gathered], shared.item(), \
            (comm.rank, comm.world_size)

    out, real = on_devices(3, fn)
    for device, (total, biggest, gathered, shared, where) in enumerate(out):
        assert total == 6.0 and biggest == 2.0 and shared == 20
        assert gathered == [[0], [0, 1], [0, 1, 2]]
        assert where == (device, 3)
    # one real collective per collective, not per device (a gather in a world of one rank
    # needs none)
    assert real.calls == 4


def test_exclusive_sections_keep_each_devices_random_state():
    """Each device's draws continue its own sequence, whatever the others draw between."""
    def fn(comm):
        with comm.exclusive():
            torch.manual_seed(100 + comm.rank)
        draws = []
        for _ in range(3):
            with comm.exclusive():
                draws.append(torch.rand(1).item())
            comm.barrier()
        return draws

    out, _ = on_devices(3, fn)
    for device, draws in enumerate(out):
        torch.manual_seed(100 + device)
        assert draws == [torch.rand(1).item() for _ in range(3)]


def test_a_failing_device_stops_the_others_and_its_error_is_raised():
    """Device 1 raises before a collective the others wait in: they are released with
    GroupAborted and run_devices raises device 1's own error, without hanging."""
    seen = []

    def train(cfg, comm, display, stop):
        if comm.rank == 1:
            raise ValueError("device 1 broke")
        try:
            comm.allreduce_(torch.zeros(1))
        except GroupAborted as e:
            seen.append(str(e))
            raise

    cfg = types.SimpleNamespace(devices_per_rank=3, device_view=lambda: None)
    with pytest.raises(ValueError, match="device 1 broke"):
        run_devices(cfg, OneRank(), train, join_s=5)
    assert len(seen) == 2 and all("device 1 broke" in s for s in seen)


def test_run_devices_returns_every_devices_summary_in_order():
    def train(cfg, comm, display, stop):
        comm.barrier()
        return {"device": comm.rank, "world": comm.world_size, "cfg": cfg}

    cfg = types.SimpleNamespace(devices_per_rank=4, device_view=lambda: "view")
    assert run_devices(cfg, OneRank(), train) == [
        {"device": d, "world": 4, "cfg": "view"} for d in range(4)]

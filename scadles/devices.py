"""Many simulated devices in one rank (``--devices-per-rank K``).

A run with W ranks simulates D = W x K edge devices: rank r runs devices r*K ... r*K + K - 1,
each a thread that trains exactly as its own process would in a run of D ranks of one
device. Each device has its own stream, buffer, injector, compression residuals and vote,
clock, metrics rows (``rank-<device>.jsonl``), checkpoint part and its own copy of the model
(parameters identical on every device, as across processes; batch-norm running statistics
its own, averaged over all D devices at evaluation and checkpoint, as across processes).

How: every device thread gets a ``DeviceComm``, a communicator whose rank is the device id
and whose world is the D devices. A collective meets the rank's K devices at a
``DeviceGroup``: the last to arrive combines their tensors in device order (sum or max,
concatenation for gathers), runs the one real collective across the W ranks for all K, and
hands every device the result. So a step makes one exchange across ranks however many
devices a rank holds; with compression each device compresses its own gradient (with its
own residuals), and their payloads cross the network together.

Compute is taken in turn: ``DeviceComm.exclusive()`` holds the rank's compute lock and swaps
in the device's own random state (torch, numpy, Python), so model initialization, dropout
and anything else drawing from the global generators is what the device's process would
draw. Time: on the virtual clock each device's step is charged its own wait + compute +
sync, and the group moves to the latest, as with one process per device: the D devices are
timed as the parallel devices they stand for. A wall clock cannot simulate devices in turn:
K > 1 needs ``--clock virtual`` (``config.validate``).

Results equal those of D ranks of one device up to the order of floating-point sums (the K
local terms are added in device order before the sum across ranks).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

from scadles import checkpoint
from scadles.comm import Comm, _check_1d, _check_op


class GroupAborted(RuntimeError):
    """Another device of this rank failed: this one stops at its next collective."""


class DeviceGroup:
    """The K devices of one rank, meeting at every collective (one thread each)."""

    def __init__(self, comm: Comm, devices_per_rank: int):
        if devices_per_rank < 1:
            raise ValueError(f"devices_per_rank {devices_per_rank}: must be >= 1")
        self.comm = comm
        self.k = devices_per_rank
        self.compute_lock = threading.Lock()
        self._cond = threading.Condition()
        self._values: list = [None] * devices_per_rank
        self._arrived = 0
        self._generation = 0
        self._result = None
        self._error: BaseException | None = None

    def meet(self, local: int, value, combine: Callable[[list], object]):
        """Device ``local`` brings ``value``; when all K have, the last one computes
        ``combine(values in device order)`` (it may run the collective across ranks) and
        every device returns that result."""
        with self._cond:
            self._raise_if_aborted()
            generation = self._generation
            self._values[local] = value
            self._arrived += 1
            if self._arrived == self.k:
                values, self._values, self._arrived = self._values, [None] * self.k, 0
                try:
                    self._result = combine(values)
                except BaseException as e:
                    self._abort_locked(e)
                    raise
                self._generation += 1
                self._cond.notify_all()
                return self._result
            while self._generation == generation and self._error is None:
                self._cond.wait()
            if self._generation == generation:
                self._raise_if_aborted()
            return self._result

    def abort(self, error: BaseException) -> None:
        """A device failed: every device waiting at (or later reaching) a collective raises
        ``GroupAborted``."""
        with self._cond:
            self._abort_locked(error)

    def _abort_locked(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._cond.notify_all()

    def _raise_if_aborted(self) -> None:
        if self._error is not None:
            raise GroupAborted(f"another device of this rank failed: {self._error}")


class DeviceComm(Comm):
    """Device ``group.comm.rank * K + local``'s view of the D devices: the ``Comm`` interface,
    its collectives met by the rank's K devices (``DeviceGroup.meet``) and run once across
    the ranks. Gathered tensors are shared by the rank's devices: read them, never write."""

    def __init__(self, group: DeviceGroup, local: int):
        real = group.comm
        self.group, self.local = group, local
        self.backend = real.backend
        self.rank = real.rank * group.k + local
        self.world_size = real.world_size * group.k
        # CPU threads are shared by the node's ranks, not by the devices in one rank.
        self.local_rank, self.local_world_size = real.local_rank, real.local_world_size
        self.device = real.device
        self.bytes_sent = 0
        self._rng: dict | None = None

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        _check_op(op)
        real = self.group.comm

        def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
            total = tensors[0].clone()
            for t in tensors[1:]:
                if op == "sum":
                    total.add_(t)
                else:
                    torch.maximum(total, t, out=total)
            return real.allreduce_(total, op=op)

        tensor.copy_(self.group.meet(self.local, tensor, combine))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def allgather_varlen(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        _check_1d(tensor)
        real, k = self.group.comm, self.group.k

        def combine(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.int64,
                                   device=tensors[0].device)
            flat = torch.cat([t.reshape(-1) for t in tensors])
            if real.world_size == 1:
                per_rank, per_rank_lengths = [flat], [lengths]
            else:
                per_rank_lengths = real.allgather_varlen(lengths)
                per_rank = real.allgather_varlen(flat)
            out = []
            for rank_flat, rank_lengths in zip(per_rank, per_rank_lengths):
                out.extend(torch.split(rank_flat, rank_lengths.tolist()))
            if len(out) != real.world_size * k:
                raise RuntimeError(f"a gather returned {len(out)} device tensors for "
                                   f"{real.world_size} x {k} devices: every rank must run "
                                   f"--devices-per-rank {k}")
            return out

        gathered = self.group.meet(self.local, tensor, combine)
        self.bytes_sent += 8 + tensor.numel() * tensor.element_size()
        return list(gathered)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        real, k = self.group.comm, self.group.k
        src_rank, src_local = divmod(src, k)

        def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
            held = tensors[src_local] if real.rank == src_rank else tensors[0]
            return real.broadcast_(held.clone(), src=src_rank)

        tensor.copy_(self.group.meet(self.local, tensor, combine))
        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def barrier(self) -> None:
        self.group.meet(self.local, None, lambda _: self.group.comm.barrier())

    def close(self) -> None:
        """Nothing: the rank closes the real communicator once its devices are done."""

    @contextlib.contextmanager
    def exclusive(self):
        """The rank's compute, taken in turn, with this device's random state (torch, numpy,
        Python) swapped in for the duration."""
        with self.group.compute_lock:
            if self._rng is not None:
                checkpoint.set_rng_state(self._rng)
            try:
                yield
            finally:
                self._rng = checkpoint.rng_state()


def run_devices(cfg, comm: Comm, train: Callable, display=None, stop_requested=None,
                join_s: float = 5.0) -> list[dict]:
    """Train the rank's ``cfg.devices_per_rank`` devices, one thread each, on ``comm`` (the
    real communicator of this rank); returns their summaries in device order. The first
    device to fail stops the others (at their next collective) and its exception is raised
    here; devices still blocked in a collective across ranks after ``join_s`` are left to
    the process exit."""
    group = DeviceGroup(comm, cfg.devices_per_rank)
    device_cfg = cfg.device_view()
    summaries: list = [None] * group.k
    errors: list[BaseException] = []
    failed = threading.Event()

    def work(local: int) -> None:
        try:
            summaries[local] = train(device_cfg, DeviceComm(group, local), display,
                                     stop_requested)
        except BaseException as e:  # noqa: BLE001  (raised again in the rank's thread)
            if not isinstance(e, GroupAborted):
                errors.append(e)
            group.abort(e)
            failed.set()

    threads = [threading.Thread(target=work, args=(local,), daemon=True,
                                name=f"device-{comm.rank * group.k + local}")
               for local in range(group.k)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not failed.is_set():
        failed.wait(0.2)
    if failed.is_set():
        for t in threads:
            t.join(timeout=join_s)
        if not errors:  # only GroupAborted: cannot happen without a first failure
            errors.append(RuntimeError("a device stopped without a cause"))
        raise errors[0]
    for t in threads:
        t.join()
    return summaries


def devices_in_process(comm) -> int:
    """How many devices this process simulates (``comm``: a device's communicator)."""
    return comm.group.k if isinstance(comm, DeviceComm) else 1


def exclusive(comm) -> contextlib.AbstractContextManager:
    """``comm.exclusive()`` when the communicator simulates devices, else nothing."""
    section = getattr(comm, "exclusive", None)
    return section() if section is not None else contextlib.nullcontext()


__all__ = ["DeviceComm", "DeviceGroup", "GroupAborted", "devices_in_process", "exclusive",
           "run_devices"]

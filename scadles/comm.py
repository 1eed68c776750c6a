"""One communicator interface over torch.distributed (gloo, nccl) and mpi4py (mpi).

The training loop never asks which backend it has: it gets a ``Comm`` with ``rank``,
``world_size``, ``device`` and a handful of collectives on tensors.

- ``gloo`` / ``nccl``: ``torch.distributed`` with the ``env://`` rendezvous (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK`` as torchrun sets them;
  under ``mpiexec`` the ``PMI_RANK`` / ``PMI_SIZE`` it sets are used when ``RANK`` is absent).
  With ``SCADLES_RENDEZVOUS_FILE`` (the launcher sets it on one machine) the ranks meet
  through a file store instead, so no rendezvous port is opened (torch's TCP store listens
  on every interface). nccl puts the rank on ``cuda:LOCAL_RANK``.
- ``mpi``: ``torch.distributed``'s MPI backend when the torch build has one, otherwise
  ``MPIComm``, which runs mpi4py collectives directly on numpy views of CPU tensors.

``bytes_sent`` counts the payload bytes this rank contributed to collectives (the tensor it
reduced, gathered or broadcast as root), not the bytes an algorithm moves on the wire.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable

import torch

REDUCE_OPS = ("sum", "max")
RENDEZVOUS_FILE_ENV = "SCADLES_RENDEZVOUS_FILE"


def _env_int(*names: str, default: int | None = None) -> int | None:
    """The first of ``names`` set in the environment, as an int."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as e:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from e
    return default


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {', '.join(REDUCE_OPS)}")


def _check_1d(tensor: torch.Tensor) -> None:
    if tensor.dim() != 1:
        raise ValueError(f"allgather_varlen takes 1-D tensors, got shape {tuple(tensor.shape)}")


def _contiguous_in_place(tensor: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> None:
    """Run the in-place collective ``fn`` on ``tensor``, through a contiguous copy if needed."""
    if tensor.is_contiguous():
        fn(tensor)
    else:
        staging = tensor.contiguous()
        fn(staging)
        tensor.copy_(staging)


class Comm:
    """The interface every backend implements."""

    backend: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    bytes_sent: int

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over all ranks, in place; returns it."""
        raise NotImplementedError

    def allgather_varlen(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D ``tensor`` (lengths may differ), indexed by rank."""
        raise NotImplementedError

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place; returns it."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Comm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, rank={self.rank}, "
                f"world_size={self.world_size}, device={self.device})")


class TorchComm(Comm):
    """torch.distributed process group: gloo, nccl, or mpi when the torch build has it."""

    def __init__(self, backend: str, timeout_s: float = 300.0):
        import torch.distributed as dist

        self._dist = dist
        self.backend = backend
        self.bytes_sent = 0
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "mpi":
            # The MPI backend takes rank and size from the MPI launcher itself.
            dist.init_process_group("mpi", timeout=timeout)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = _env_int("LOCAL_RANK", "MPI_LOCALRANKID",
                                       "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        else:
            self.rank, self.world_size, self.local_rank = _rendezvous_env()
            if backend == "nccl":
                _check_cuda_for_nccl(self.local_rank)
                torch.cuda.set_device(self.local_rank)
            store_file = os.environ.get(RENDEZVOUS_FILE_ENV)
            if self.world_size == 1 and "MASTER_PORT" not in os.environ and not store_file:
                # A single rank needs no rendezvous: an in-memory store will do.
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout)
            elif store_file:
                store = dist.FileStore(store_file, self.world_size)
                store.set_timeout(timeout)
                dist.init_process_group(backend, store=store, rank=self.rank,
                                        world_size=self.world_size, timeout=timeout)
            else:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                if "MASTER_PORT" not in os.environ:
                    raise ValueError(f"backend {backend!r} with WORLD_SIZE={self.world_size} "
                                     "needs MASTER_PORT (and MASTER_ADDR) in the environment")
                dist.init_process_group(backend, init_method="env://", rank=self.rank,
                                        world_size=self.world_size, timeout=timeout)
        self.local_world_size = _env_int("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS",
                                         "OMPI_COMM_WORLD_LOCAL_SIZE",
                                         default=self.world_size)
        self.device = (torch.device("cuda", self.local_rank) if backend == "nccl"
                       else torch.device("cpu"))

    def _reduce_op(self, op: str):
        _check_op(op)
        return {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX}[op]

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        reduce_op = self._reduce_op(op)
        _contiguous_in_place(tensor, lambda t: self._dist.all_reduce(t, op=reduce_op))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def allgather_varlen(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather the lengths, then an all_gather of tensors padded to the longest."""
        _check_1d(tensor)
        length = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
        lengths = [torch.empty_like(length) for _ in range(self.world_size)]
        self._dist.all_gather(lengths, length)
        sizes = [int(n.item()) for n in lengths]
        longest = max(sizes)
        self.bytes_sent += length.element_size() + longest * tensor.element_size()
        if longest == 0:
            return [tensor.new_empty(0) for _ in sizes]
        padded = tensor.new_zeros(longest)
        padded[: tensor.numel()] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(gathered, padded)
        return [g[:n] for g, n in zip(gathered, sizes)]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        _contiguous_in_place(tensor, lambda t: self._dist.broadcast(t, src=src))
        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def barrier(self) -> None:
        if self.backend == "nccl":
            self._dist.barrier(device_ids=[self.local_rank])
        else:
            self._dist.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class MPIComm(Comm):
    """mpi4py collectives on CPU tensors, through numpy views (no copies for contiguous
    tensors of numpy-compatible dtypes)."""

    def __init__(self, timeout_s: float | None = None):
        from mpi4py import MPI  # lazy: only mpi runs need it

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.backend = "mpi"
        self.bytes_sent = 0
        self.rank, self.world_size = self._comm.Get_rank(), self._comm.Get_size()
        expected = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
        if expected is not None and expected != self.world_size:
            raise RuntimeError(
                f"mpi4py sees a world of {self.world_size} rank(s) but the environment says "
                f"{expected}: start the ranks with the mpiexec of the MPI that mpi4py was "
                "built against (the one next to this Python)")
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_world_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.device = torch.device("cpu")

    def _op(self, op: str):
        _check_op(op)
        return {"sum": self._MPI.SUM, "max": self._MPI.MAX}[op]

    def _in_place(self, tensor: torch.Tensor, fn: Callable[[Any], None]) -> torch.Tensor:
        """Run ``fn`` on a numpy view of ``tensor``; copy through a staging buffer only
        when the tensor is not a contiguous CPU tensor of a numpy dtype."""
        if (tensor.device.type == "cpu" and tensor.is_contiguous()
                and tensor.dtype not in (torch.bfloat16, torch.float16)):
            fn(tensor.detach().numpy())
            return tensor
        staging = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point()
                                     else tensor.dtype).contiguous()
        fn(staging.numpy())
        tensor.copy_(staging)
        return tensor

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        mpi_op = self._op(op)
        self._in_place(tensor, lambda a: self._comm.Allreduce(self._MPI.IN_PLACE, a, op=mpi_op))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def allgather_varlen(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """MPI Allgatherv into one receive buffer; the results are views of it."""
        import numpy as np

        _check_1d(tensor)
        send = tensor.detach().to("cpu").contiguous()
        if send.dtype in (torch.bfloat16, torch.float16):
            send = send.float()
        send_np = send.numpy()
        sizes = np.empty(self.world_size, dtype=np.int64)
        self._comm.Allgather(np.array([send_np.size], dtype=np.int64), sizes)
        recv = np.empty(int(sizes.sum()), dtype=send_np.dtype)
        self._comm.Allgatherv(send_np, [recv, sizes.tolist()])
        self.bytes_sent += 8 + tensor.numel() * tensor.element_size()
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        flat = torch.from_numpy(recv).to(tensor.dtype)
        return [flat[offsets[i]:offsets[i + 1]].to(tensor.device)
                for i in range(self.world_size)]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._in_place(tensor, lambda a: self._comm.Bcast(a, root=src))
        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        return tensor

    def barrier(self) -> None:
        self._comm.Barrier()

    def close(self) -> None:
        """Nothing to tear down: mpi4py finalizes MPI at interpreter exit."""


def env_rank() -> int:
    """This process's rank as its launcher set it (``RANK``, or the MPI launcher's), before
    any process group exists; 0 when none is set."""
    try:
        return _env_int("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", default=0)
    except ValueError:
        return 0


def _rendezvous_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, or mpiexec's PMI ones."""
    rank = _env_int("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", default=0)
    world_size = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", default=1)
    local_rank = _env_int("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                          default=rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}: "
                         "check RANK and WORLD_SIZE")
    return rank, world_size, local_rank


def _check_cuda_for_nccl(local_rank: int) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs CUDA GPUs and none is visible: "
                           "use --backend gloo or mpi on CPU machines")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"backend 'nccl': LOCAL_RANK={local_rank} but only {count} GPU(s) "
                           "are visible: start at most one rank per GPU on each node")


def _make_mpi(timeout_s: float) -> Comm:
    import torch.distributed as dist

    if dist.is_available() and dist.is_mpi_available():
        return TorchComm("mpi", timeout_s)
    return MPIComm(timeout_s)


BACKENDS: dict[str, Callable[[float], Comm]] = {
    "gloo": lambda timeout_s: TorchComm("gloo", timeout_s),
    "nccl": lambda timeout_s: TorchComm("nccl", timeout_s),
    "mpi": _make_mpi,
}


def make_comm(backend: str, timeout_s: float = 300.0) -> Comm:
    """The communicator for ``backend`` (``gloo``, ``nccl`` or ``mpi``), rank and world size
    read from the environment (or, for mpi, from the MPI communicator). ``timeout_s`` bounds
    torch.distributed's rendezvous and collectives; MPI has no such timeout."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](timeout_s)


def share_cpu_threads(comm: Comm) -> int:
    """Give each rank on this node an equal share of the CPU cores it may use; returns the
    number of torch threads set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, comm.local_world_size))
    torch.set_num_threads(threads)
    return threads

"""``python -m scadles.rankhost``: one node's gloo ranks, forked from one warm process.

Every rank imports torch and the training code and loads the dataset before it trains: a
second and a half of CPU each, so a 16-rank run on two cores spends about 12 s of wall time
starting up. The host pays it once, then forks one child per rank; a child sets the rank's
environment (``RANK``, ``LOCAL_RANK``, ... as torchrun does) and runs ``scadles.train`` as
a process of its own would, sharing the host's pages until it writes them.

Only for CPU backends: a CUDA context does not survive a fork (nccl ranks are started as
processes), and mpiexec starts the mpi ranks. The launcher (``scadles.launch``) starts the
host in a process group of its own, so stopping the group stops every rank. The host exits
with the first failing rank's status, after stopping the others, or 0 when all succeeded.

    python -m scadles.rankhost --ranks 0:16 --local-world-size 16 -- <train flags>
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

STOP_GRACE_S = 10.0


def warm_up(train_argv: list[str]) -> None:
    """Import what every rank imports and load the datasets it reads (shared after fork)."""
    from scadles import train  # noqa: F401  (torch, the models, the exchangers, ...)
    from scadles.config import parse_args
    from streamsim.datasets import load_dataset

    cfg = parse_args(train_argv, prog="python -m scadles.train", check_environment=False)
    for split in ("train", "test"):
        ds = load_dataset(cfg.dataset, split, cfg.data_dir, cfg.download, cfg.image_size,
                          cfg.seed)
        _ = (ds.mean, ds.std)  # computed once, here
    if cfg.model_name in ("resnet152", "resnet18", "vgg19"):
        import torchvision  # noqa: F401


def run_rank(rank: int, local_rank: int, train_argv: list[str]) -> None:
    """In the forked child: become rank ``rank`` and train; never returns."""
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(local_rank)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # train installs its own
    code = 1
    try:
        from scadles import train

        code = train.main(train_argv, exit_fast=True)  # exits itself
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (the child must exit with a status, never return)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(children: dict[int, int]) -> int:
    """Wait for every child (pid -> rank); on the first failure stop the rest and return its
    status."""
    failed = 0
    while children:
        pid, status = os.wait()
        rank = children.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            failed = code if code > 0 else 128 - code
            print(f"rankhost: rank {rank} failed with exit status {code}: stopping the "
                  f"other ranks", file=sys.stderr, flush=True)
            _stop(children)
    return failed


def _stop(children: dict[int, int]) -> None:
    for pid in children:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while children and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in list(children):
        _kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        children.pop(pid)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("rankhost: usage: python -m scadles.rankhost --ranks FIRST:STOP -- <train flags>",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    from streamsim.cli import DefaultsHelpFormatter

    p = argparse.ArgumentParser(prog="python -m scadles.rankhost",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ranks", required=True, help="FIRST:STOP, the global ranks of this node")
    args = p.parse_args(argv[:split])
    train_argv = argv[split + 1:]
    first, stop = (int(v) for v in args.ranks.split(":"))
    # The launcher forwards Ctrl-C to the whole group: the ranks stop after an agreed step,
    # and the host waits for them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warm_up(train_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    children = {}
    for local_rank, rank in enumerate(range(first, stop)):
        pid = os.fork()
        if pid == 0:
            run_rank(rank, local_rank, train_argv)
        children[pid] = rank
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main())

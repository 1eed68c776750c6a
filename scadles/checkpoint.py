"""Atomic checkpoints and exact resume.

A checkpoint of step N is a folder ``LOG_DIR/checkpoints/step-<N>/`` holding
``shared.pt`` (written by rank 0: model, optimizer, the group's training state: step, samples
trained by the group (the LR schedule's position), clock) and ``rank-<r>.pt`` (written by each
rank: the committed stream offset, RNG states, the exchanger's residuals, anything else that
is rank-local). Every file is written to a temporary name and renamed into place; once every
rank has written (a barrier), rank 0 points ``checkpoints/latest`` at the folder, again by
rename. A crash at any moment leaves ``latest`` naming a complete checkpoint.

Resuming from the committed offsets means no sample is trained twice or skipped: the offset
is that of the oldest sample not yet trained (``StreamBuffer.commit_used``).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scadles.metrics import atomic_write_text

LATEST = "latest"
KEEP = 2  # complete checkpoints kept


def checkpoint_root(log_dir: str | Path) -> Path:
    return Path(log_dir) / "checkpoints"


def step_dir(log_dir: str | Path, step: int) -> Path:
    return checkpoint_root(log_dir) / f"step-{step:08d}"


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(log_dir: str | Path, step: int, rank: int, rank_state: dict,
         shared_state: dict | None, barrier: Callable[[], None]) -> Path:
    """Write this rank's part of the checkpoint of ``step`` (rank 0 also ``shared_state``),
    wait for every rank, then (rank 0) publish it as the latest and prune old ones."""
    folder = step_dir(log_dir, step)
    atomic_save(rank_state, folder / f"rank-{rank}.pt")
    if rank == 0:
        atomic_save(shared_state, folder / "shared.pt")
    barrier()
    if rank == 0:
        atomic_write_text(checkpoint_root(log_dir) / LATEST, folder.name + "\n")
        done = sorted(p for p in checkpoint_root(log_dir).glob("step-*") if p.is_dir())
        for old in done[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()  # nobody starts the next step's checkpoint while pruning runs
    return folder


def latest(log_dir: str | Path) -> Path | None:
    """The folder of the latest complete checkpoint, or None."""
    pointer = checkpoint_root(log_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoint_root(log_dir) / pointer.read_text().strip()
    return folder if (folder / "shared.pt").is_file() else None


def load(log_dir: str | Path, rank: int, map_location="cpu") -> tuple[dict, dict]:
    """(shared_state, this rank's state) of the latest checkpoint."""
    folder = latest(log_dir)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_root(log_dir)}")
    rank_file = folder / f"rank-{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {rank_file.name}: was it written "
                                f"by a run with another world size?")
    shared = torch.load(folder / "shared.pt", map_location=map_location, weights_only=False)
    mine = torch.load(rank_file, map_location="cpu", weights_only=False)
    return shared, mine

"""Shared fixtures: a real Kafka-protocol broker on loopback, unique topic names, datasets."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def broker():
    """One real embedded broker for the whole session; its bootstrap address."""
    from streamsim.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b.bootstrap


@pytest.fixture
def unique_name(request):
    """A topic/group prefix unique to this test, so tests never share state."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"t-{base}-{uuid.uuid4().hex[:8]}-"


@pytest.fixture(scope="session")
def fashion_mnist():
    """The real Fashion-MNIST training split; fails (never skips) when it is missing."""
    from streamsim.datasets import load_dataset

    return load_dataset("fashion-mnist", split="train")


@pytest.fixture
def repo_env():
    """Environment for subprocesses: the repository on PYTHONPATH, the venv's bin first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env

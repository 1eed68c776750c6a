"""scadles.optim.SGD against torch.optim.SGD: the same parameters, bit for bit."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from scadles.optim import SGD


def _steps(model, optimizer, lrs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=False)
        x = torch.randn(8, 4, generator=gen)
        model(x).pow(2).mean().backward()
        optimizer.step()


def test_matches_torch_sgd_bit_for_bit_and_resumes_exactly():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    theirs = copy.deepcopy(ours)
    mine = SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    lrs = [0.01, 0.05, 0.1, 0.1, 0.02]
    _steps(ours, mine, lrs)
    _steps(theirs, ref, lrs)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    # A checkpoint round trip continues exactly.
    resumed = copy.deepcopy(ours)
    again = SGD(resumed.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
    again.load_state_dict(mine.state_dict())
    _steps(ours, mine, [0.03, 0.04], seed=1)
    _steps(resumed, again, [0.03, 0.04], seed=1)
    for a, b in zip(ours.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parameters"):
        SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1).load_state_dict(mine.state_dict())


def test_no_dynamo_import():
    """The point of this module: a training process does not pay torch._dynamo's import."""
    code = ("import sys, torch; from scadles.optim import SGD; m = torch.nn.Linear(2, 2); "
            "o = SGD(m.parameters(), lr=0.1, momentum=0.9); m(torch.ones(1, 2)).sum().backward(); "
            "o.step(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"

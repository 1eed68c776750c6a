"""A model plug-in from outside the package (``--model-name mymodels:tiny`` with this folder
on PYTHONPATH), and broken ones for the error paths."""
from __future__ import annotations

from torch import nn


def tiny(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """One linear layer over the flattened image."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size,
                                                 num_classes))


def not_a_module(num_classes: int, in_channels: int, image_size: int):
    return "a string"


def raises(num_classes: int, in_channels: int, image_size: int):
    raise RuntimeError("no such\narchitecture")


NOT_CALLABLE = 3

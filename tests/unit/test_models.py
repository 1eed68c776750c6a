"""Model registry: shapes for small and large inputs, deterministic init, clear errors."""
from __future__ import annotations

import pytest
import torch

from scadles.models import MODELS, build_model, parameter_digest


@pytest.mark.parametrize("name,in_channels,image_size", [
    ("smallcnn", 1, 28), ("smallcnn", 3, 32), ("smallcnn-bn", 1, 28), ("resnet18", 1, 28), ("resnet18", 3, 32),
    ("vgg19", 1, 28), ("vgg19", 3, 32),
    ("resnet152", 3, 8),  # 8x8 keeps the deepest model fast; the stem is the same
])
def test_models_take_small_inputs(name, in_channels, image_size):
    model = build_model(name, 7, in_channels, image_size, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)


def test_resnet_keeps_imagenet_stem_for_large_inputs():
    model = build_model("resnet18", 5, 1, 96, seed=0).eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 96)).shape == (1, 5)


def test_init_depends_on_seed_only_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model("resnet18", 10, 3, 32, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = build_model("resnet18", 10, 3, 32, seed=5)
    c = build_model("resnet18", 10, 3, 32, seed=6)
    assert parameter_digest(a) == parameter_digest(b) != parameter_digest(c)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="unknown model 'alexnet'.*" + ", ".join(MODELS)):
        build_model("alexnet", 10, 3, 32, seed=0)

"""Model registry: name -> constructor, with deterministic initialization from a seed.

``resnet152`` and ``vgg19`` (with batch norm) are the paper's models, from torchvision;
``resnet18``, ``smallcnn`` and ``smallcnn-bn`` are for CPU runs and tests. Every model is built for the
dataset's number of classes, input channels and image size: inputs of at most
``SMALL_IMAGE_MAX`` pixels (CIFAR's 32x32, Fashion-MNIST's 28x28) get the CIFAR-style
variants (ResNet: 3x3 stride-1 first conv, no max-pool; VGG: ceil-mode pooling down to 1x1
and a 512 -> classes classifier).

``--model-name module:callable`` builds a model from outside the package (``model_builder``):
``callable(num_classes: int, in_channels: int, image_size: int) -> torch.nn.Module``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from streamsim import plugins

SMALL_IMAGE_MAX = 64


def _resnet(arch: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                                 zero_init_residual=True)
        if image_size <= SMALL_IMAGE_MAX:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1,
                                    bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3,
                                    bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        return model

    return build


def _vgg19(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    model = torchvision.models.vgg19_bn(weights=None, num_classes=num_classes)
    if in_channels != 3:
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3,
                                      padding=1)
        nn.init.kaiming_normal_(model.features[0].weight, mode="fan_out",
                                nonlinearity="relu")
        nn.init.zeros_(model.features[0].bias)
    if image_size <= SMALL_IMAGE_MAX:
        # Five 2x2 pools take 32 -> 1 and, with ceil mode, 28 -> 14 -> 7 -> 4 -> 2 -> 1.
        for layer in model.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
        nn.init.normal_(model.classifier.weight, 0, 0.01)
        nn.init.zeros_(model.classifier.bias)
    return model


class SmallCNN(nn.Module):
    """Two strided conv layers and two linear ones: a Fashion-MNIST step at batch 64 takes
    about 5 ms on one CPU core. Without batch norm any batch size (even 1) behaves the same.

    ``batch_norm=True`` (``smallcnn-bn``) adds a BatchNorm2d after each conv. Like the paper's
    ResNet152 and VGG19-bn, its normalization statistics then come from the device's own
    batch, which is what makes non-IID label skew hurt (and injection help) at CPU scale.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int,
                 batch_norm: bool = False):
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, stride=2, padding=2), norm(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1), norm(32),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "resnet152": _resnet("resnet152"),
    "vgg19": _vgg19,
    "resnet18": _resnet("resnet18"),
    "smallcnn": SmallCNN,
    "smallcnn-bn": lambda classes, channels, size: SmallCNN(classes, channels, size,
                                                            batch_norm=True),
}


def model_builder(name: str) -> Callable[[int, int, int], nn.Module]:
    """The constructor of ``name``: a key of ``MODELS``, or a plug-in ``module:callable``
    taking ``(num_classes, in_channels, image_size)`` (imported here; ``PluginError``, a
    ValueError, when it cannot be)."""
    return plugins.resolve(name, MODELS, "--model-name", "unknown model", "MODULE:CALLABLE")


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                seed: int) -> nn.Module:
    """Model ``name`` (built-in or ``module:callable``) on the CPU, initialized from ``seed``
    alone: every rank that passes the same arguments gets bit-identical parameters. The
    global RNG is left untouched. A plug-in that raises, or returns anything but an
    ``nn.Module`` with trainable parameters, is a one-line ``PluginError``."""
    builder = model_builder(name)
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ValueError(f"model {name!r}: num_classes, in_channels and image_size must be "
                         f"positive, got {num_classes}, {in_channels}, {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if name in MODELS:
            return builder(num_classes, in_channels, image_size)
        model = plugins.call(builder, name, "--model-name", num_classes, in_channels,
                             image_size)
    if not isinstance(model, nn.Module):
        raise plugins.PluginError(f"--model-name {name!r} returned a {type(model).__name__}: "
                                  f"it must return a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise plugins.PluginError(f"--model-name {name!r} returned a module without trainable "
                                  f"parameters")
    return model


def parameter_digest(model: nn.Module) -> str:
    """A SHA-256 of every parameter and buffer, to check that ranks hold the same model."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

"""The networks the recipes train: the digits CNN and ResNet-18 for 32x32 images.

The small CNN has no BatchNorm on purpose: every tensor is a plain weight or bias, so the
task vectors of all merge methods cover the whole model. ResNet-18 (CIFAR variant) has
BatchNorm; its running statistics are buffers, which the merge engine copies from the
base model instead of negating (only weights and biases are merged).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from negmerge_cli.recipes import ModelConfig

NUM_CLASSES = 10


class SmallCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool 2 -> linear -> ReLU -> linear."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64) -> None:
        super().__init__()
        first, second = channels
        self.conv1 = nn.Conv2d(1, first, 3, padding=1)
        self.conv2 = nn.Conv2d(first, second, 3, padding=1)
        self.fc1 = nn.Linear(second * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def resnet18_cifar(num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(
    config: ModelConfig, seed: int | None = None, num_classes: int = NUM_CLASSES
) -> nn.Module:
    """A freshly initialised model; ``seed`` makes the initial weights reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    if config.arch == "resnet18":
        return resnet18_cifar(num_classes)
    if config.arch != "small_cnn":  # the recipe schema already refuses other names
        raise ValueError(f"unknown architecture {config.arch!r}")
    return SmallCNN(tuple(config.channels), config.hidden)  # type: ignore[arg-type]

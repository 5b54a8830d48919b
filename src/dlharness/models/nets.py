"""Plain `nn.Module` networks, built from a small JSON-able spec.

The spec travels in the LightningModule's hyperparameters, so a checkpoint alone can rebuild
its network (`ClassifierModule.load_from_checkpoint(path)` needs no extra arguments).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18


def build_net(spec: dict[str, Any]) -> nn.Module:
    if spec["name"] == "cnn":
        return SmallCNN(**{k: v for k, v in spec.items() if k != "name"})
    if spec["name"] == "resnet18":
        return small_image_resnet18(spec["in_channels"], spec["num_classes"])
    raise ValueError(f"unknown network {spec['name']!r}")


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv stages that halve the image until about 2–4 px remain, then a linear classifier.

    The number of stages follows the image size (8 px → 2 stages, 28–32 px → 3), so the same
    class suits the 8×8 digits and 32×32 colour images.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        stages = max(1, min(3, int(math.log2(image_size)) - 1))
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage in range(stages):
            c_out = width * 2**stage
            layers += [_conv_block(c_in, c_out), _conv_block(c_out, c_out), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_image_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's resnet18, untrained, with the usual small-image stem.

    The ImageNet stem (7×7 stride-2 conv + max-pool) shrinks a 32 px image to 8 px before the
    first block; a 3×3 stride-1 conv and no pool keep the resolution the blocks expect.
    """
    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net

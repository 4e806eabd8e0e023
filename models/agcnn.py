"""AG-CNN: global branch -> attention crop -> local branch -> fusion head, on a batch."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.attention import attention_boxes, crop_boxes
from models.branch import Branch
from models.fusion import FusionHead


def attention_crops(images: torch.Tensor, features: torch.Tensor, size: int, threshold: float = 0.7, mode: str = "max_abs") -> tuple[torch.Tensor, torch.Tensor]:
    """(crops (B, C, size, size), boxes (B, 4)) from images (B, C, H, W) and the global
    branch's features (B, C', h, w): the local branch's input."""
    # In float32 whatever autocast the caller runs under (CUDA training, bf16 scoring): a
    # threshold on half-precision heatmaps moves boxes by whole pixels.
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        boxes = attention_boxes(features.float(), tuple(images.shape[-2:]), threshold, mode)
    return crop_boxes(images, boxes, size), boxes


class AGCNNOutput(NamedTuple):
    """global_logits, local_logits, fusion_logits: (B, K); boxes: (B, 4) int64 y0, x0, y1, x1
    inclusive in input pixels; global_features: (B, C, h, w) (for class activation maps)."""

    global_logits: torch.Tensor
    local_logits: torch.Tensor
    fusion_logits: torch.Tensor
    boxes: torch.Tensor
    global_features: torch.Tensor


class AGCNN(nn.Module):
    """The three branches of Guan et al. (2018) wired together for inference and evaluation."""

    def __init__(self, global_branch: Branch, local_branch: Branch, fusion: FusionHead, *, local_size: int, threshold: float = 0.7, mode: str = "max_abs"):
        super().__init__()
        self.global_branch = global_branch
        self.local_branch = local_branch
        self.fusion = fusion
        self.local_size = local_size
        self.threshold = threshold
        self.mode = mode

    def forward(self, images: torch.Tensor) -> AGCNNOutput:
        g = self.global_branch(images)
        crops, boxes = attention_crops(images, g.features, self.local_size, self.threshold, self.mode)
        local = self.local_branch(crops)
        fused = self.fusion(g.pooled, local.pooled)
        return AGCNNOutput(g.logits, local.logits, fused, boxes, g.features)

"""AG-CNN building blocks (torch/torchvision only): branches, attention crops, fusion, loss."""

from models.attention import (
    HEATMAP_MODES,
    attention_boxes,
    attention_heatmap,
    attention_mask,
    crop_boxes,
    largest_component_boxes,
)
from models.branch import BACKBONES, Branch, BranchOutput, WeightsUnavailable, build_branch
from models.fusion import FusionHead
from models.loss import WeightedBCE, weighted_bce_with_logits

__all__ = [
    "BACKBONES",
    "HEATMAP_MODES",
    "Branch",
    "BranchOutput",
    "FusionHead",
    "WeightedBCE",
    "WeightsUnavailable",
    "attention_boxes",
    "attention_heatmap",
    "attention_mask",
    "build_branch",
    "crop_boxes",
    "largest_component_boxes",
    "weighted_bce_with_logits",
]

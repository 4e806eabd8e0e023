"""AG-CNN building blocks (torch/torchvision only): branches (torchvision backbones and
EfficientNet-Lite0), attention crops, fusion, loss."""

from models.attention import (
    HEATMAP_MODES,
    attention_boxes,
    attention_heatmap,
    attention_mask,
    crop_boxes,
    largest_component_boxes,
)
from models.branch import BACKBONES, Branch, BranchOutput, WeightsUnavailable, backbone_catalog, build_branch
from models.efficientnet import EfficientNetLite0, efficientnet_lite0
from models.fusion import FusionHead
from models.loss import WeightedBCE, weighted_bce_with_logits

__all__ = [
    "BACKBONES",
    "HEATMAP_MODES",
    "Branch",
    "EfficientNetLite0",
    "BranchOutput",
    "FusionHead",
    "WeightedBCE",
    "WeightsUnavailable",
    "attention_boxes",
    "attention_heatmap",
    "attention_mask",
    "backbone_catalog",
    "build_branch",
    "crop_boxes",
    "efficientnet_lite0",
    "largest_component_boxes",
    "weighted_bce_with_logits",
]

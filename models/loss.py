"""Class-weighted binary cross-entropy on logits (AG-CNN's multi-label loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weighted_bce_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pos_weight: torch.Tensor,
    neg_weight: torch.Tensor,
) -> torch.Tensor:
    """Weighted BCE, averaged over every element.

    loss = -mean(pos_weight * y * log sigmoid(z) + neg_weight * (1 - y) * log sigmoid(-z))

    logits z: (B, K) float; targets y: (B, K) in [0, 1]; pos_weight, neg_weight:
    (K,) per-class weights (broadcast over the batch). Returns a 0-d tensor (nats).
    """
    targets = targets.to(logits.dtype)
    # logsigmoid avoids log(0) / overflow for large |z|.
    per_element = pos_weight * targets * F.logsigmoid(logits) + neg_weight * (1 - targets) * F.logsigmoid(-logits)
    return -per_element.mean()


class WeightedBCE(nn.Module):
    """Module form of `weighted_bce_with_logits`; weights are buffers (move with .to())."""

    def __init__(self, pos_weight: torch.Tensor, neg_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32).clone())
        self.register_buffer("neg_weight", torch.as_tensor(neg_weight, dtype=torch.float32).clone())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits, targets: (B, K) -> 0-d loss tensor."""
        return weighted_bce_with_logits(logits, targets, self.pos_weight, self.neg_weight)

"""AG-CNN fusion branch: one linear layer on the concatenated pooled features."""

from __future__ import annotations

import torch
from torch import nn


class FusionHead(nn.Module):
    """Linear(global_dim + local_dim, num_classes) on [pooled_global, pooled_local]."""

    def __init__(self, global_dim: int, local_dim: int, num_classes: int = 14):
        super().__init__()
        self.global_dim = global_dim
        self.local_dim = local_dim
        self.fc = nn.Linear(global_dim + local_dim, num_classes)

    @classmethod
    def from_branches(cls, global_head: nn.Linear, local_head: nn.Linear) -> "FusionHead":
        """A head that starts at the two branches' ensemble: W = [W_g / 2, W_l / 2] and
        b = (b_g + b_l) / 2, so its logits are the mean of the branches' logits on the same
        pooled features, before any update. Stage III learns from there."""
        if global_head.out_features != local_head.out_features:
            raise ValueError(f"branch heads disagree on classes ({global_head.out_features} vs {local_head.out_features})")
        head = cls(global_head.in_features, local_head.in_features, global_head.out_features)
        with torch.no_grad():
            head.fc.weight.copy_(torch.cat([global_head.weight, local_head.weight], dim=1) / 2)
            head.fc.bias.copy_((global_head.bias + local_head.bias) / 2)
        return head

    def forward(self, pooled_global: torch.Tensor, pooled_local: torch.Tensor) -> torch.Tensor:
        """pooled_global: (B, global_dim), pooled_local: (B, local_dim) -> logits (B, num_classes)."""
        return self.fc(torch.cat([pooled_global, pooled_local], dim=1))

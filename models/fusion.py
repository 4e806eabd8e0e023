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

    def forward(self, pooled_global: torch.Tensor, pooled_local: torch.Tensor) -> torch.Tensor:
        """pooled_global: (B, global_dim), pooled_local: (B, local_dim) -> logits (B, num_classes)."""
        return self.fc(torch.cat([pooled_global, pooled_local], dim=1))

"""Branch, FusionHead and the weighted BCE loss."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F

from models import (
    BACKBONES,
    Branch,
    FusionHead,
    WeightedBCE,
    WeightsUnavailable,
    build_branch,
    weighted_bce_with_logits,
)


@pytest.mark.parametrize("backbone, dim", [("resnet18", 512), ("densenet121", 1024)])
def test_branch_shapes_and_max_pooling(backbone, dim):
    torch.manual_seed(0)
    branch = build_branch(backbone).eval()
    assert isinstance(branch, Branch) and branch.feature_dim == dim
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = branch(x)
    assert out.logits.shape == (2, 14)
    assert out.features.shape == (2, dim, 2, 2)
    assert out.pooled.shape == (2, dim)
    torch.testing.assert_close(out.pooled, out.features.amax((2, 3)))
    torch.testing.assert_close(out.logits, branch.classifier(out.pooled))
    assert (out.features >= 0).all()  # after the final ReLU (densenet applies it outside `features`)


def test_branch_is_trainable_and_num_classes():
    branch = build_branch("resnet18", num_classes=3)
    out = branch(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3)
    out.logits.sum().backward()
    assert branch.body[0].weight.grad is not None


def test_backbone_feature_dims_without_running():
    assert build_branch("resnet34").feature_dim == 512
    assert build_branch("resnet50").feature_dim == 2048


def test_unknown_backbone_and_pretrained():
    with pytest.raises(ValueError, match="resnet50") as err:
        build_branch("vgg16")
    assert all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="imagenet"):
        build_branch("resnet18", pretrained="chexpert")


def test_imagenet_weights_unavailable_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # Simulate no network deterministically (and fast) even where there is one.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable) as err:
        build_branch("resnet18", pretrained="imagenet")
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert "resnet18" in msg and str(tmp_path) in msg and torch.hub.get_dir() in msg
    assert "pretrained: none" in msg and "resnet18-" in msg  # names the file to pre-place
    assert "\n" not in msg
    assert err.value.__suppress_context__ and err.value.__cause__ is None


def test_fusion_head():
    head = FusionHead(512, 1024)
    g, l = torch.randn(3, 512), torch.randn(3, 1024)
    out = head(g, l)
    assert out.shape == (3, 14)
    torch.testing.assert_close(out, head.fc(torch.cat([g, l], 1)))
    assert head.fc.in_features == 1536


def test_loss_matches_direct_formula():
    torch.manual_seed(0)
    z = torch.randn(6, 14, dtype=torch.float64) * 3
    y = (torch.rand(6, 14) < 0.3).double()
    pw, nw = torch.rand(14, dtype=torch.float64), torch.rand(14, dtype=torch.float64)
    p = torch.sigmoid(z)
    direct = -(pw * y * torch.log(p) + nw * (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(weighted_bce_with_logits(z, y, pw, nw), direct)
    # With unit weights it is plain BCE.
    ones = torch.ones(14, dtype=torch.float64)
    torch.testing.assert_close(weighted_bce_with_logits(z, y, ones, ones), F.binary_cross_entropy_with_logits(z, y))


def test_loss_is_stable_for_large_logits():
    z = torch.tensor([[1e4, -1e4]])
    y = torch.tensor([[0.0, 1.0]])
    loss = weighted_bce_with_logits(z, y, torch.ones(2), torch.ones(2))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1e4)
    assert weighted_bce_with_logits(-z, y, torch.ones(2), torch.ones(2)).item() == pytest.approx(0.0, abs=1e-6)


def test_balanced_weights_balance_positive_and_negative_gradients():
    # AG-CNN weights: pos = |N| / (|P| + |N|), neg = |P| / (|P| + |N|) per class.
    torch.manual_seed(1)
    y = (torch.rand(200, 14) < torch.linspace(0.02, 0.5, 14)).float()
    y[0] = 1.0  # every class has at least one positive
    pos = y.sum(0)
    neg = y.shape[0] - pos
    pw, nw = neg / y.shape[0], pos / y.shape[0]
    z = torch.zeros(200, 14, requires_grad=True)
    weighted_bce_with_logits(z, y, pw, nw).backward()
    grad = z.grad
    pos_pull = -(grad * y).sum(0)  # total push of positives towards +
    neg_pull = (grad * (1 - y)).sum(0)  # total push of negatives towards -
    torch.testing.assert_close(pos_pull, neg_pull)


def test_weighted_bce_module_buffers():
    crit = WeightedBCE(torch.full((14,), 2.0), torch.ones(14))
    assert {n for n, _ in crit.named_buffers()} == {"pos_weight", "neg_weight"}
    assert not list(crit.parameters())
    z, y = torch.randn(4, 14), (torch.rand(4, 14) < 0.5).float()
    torch.testing.assert_close(crit(z, y), weighted_bce_with_logits(z, y, crit.pos_weight, crit.neg_weight))
    assert "pos_weight" in crit.state_dict()

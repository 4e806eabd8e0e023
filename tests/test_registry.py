"""The model registry records the trained model and refuses weights that are not registered."""

from __future__ import annotations

import shutil

import pytest

from cxr.errors import DataError
from tasks.registry import read_registry, register, verify
from tasks.weights import model_digest


@pytest.fixture
def models_copy(trained, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(trained.paths.models, target, ignore=shutil.ignore_patterns("checkpoints", "registry.json"))
    return trained.model_copy(update={"paths": trained.paths.model_copy(update={"models": target})})


def test_register_then_verify(models_copy):
    with pytest.raises(DataError, match="no model registry"):
        verify(models_copy.paths.models)
    entry = register(models_copy)
    assert entry["digest"] == model_digest(models_copy.paths.models)
    assert entry["backbone"] == "resnet18" and len(entry["labels"]) == 14
    assert set(entry["stages"]) == {"global", "local", "fusion"}
    assert len(entry["training_data_version"]) == 64
    assert verify(models_copy.paths.models) == entry
    assert read_registry(models_copy.paths.models)["current"] == entry["digest"]


def test_swapped_weights_are_refused(models_copy, tmp_path):
    register(models_copy)
    local = models_copy.paths.models / "local.safetensors"
    data = bytearray(local.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    local.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not in the model registry.*local weights differ"):
        verify(models_copy.paths.models)


def test_inconsistent_chain_is_not_registered(models_copy, trained, tmp_path):
    # A global model that the local and fusion stages were not trained on.
    from models.branch import build_branch
    from tasks.weights import load_weights, save_weights

    _, meta = load_weights(models_copy.paths.models / "global.safetensors")
    save_weights(build_branch("resnet18"), models_copy.paths.models / "global.safetensors", meta)
    with pytest.raises(DataError, match="trained on another global model"):
        register(models_copy)

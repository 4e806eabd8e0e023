"""The registered model is one bundle: a folder per digest that holds everything scoring
needs, listed in the registry with a `current` alias, refused when incomplete or changed,
and loadable again after a newer one (rollback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cxr.core.errors import DataError
from tasks.bundle.bundle import MANIFEST, open_bundle
from tasks.bundle.registry import list_bundles, load_bundle, read_registry
from tasks.bundle.weights import load_weights, model_digest, save_weights
from tasks.scoring.run import score_studies
from tasks.scoring.scorer import Scorer
from tasks.training.registration import register
from tests.conftest import STUDIES, run_cxr


@pytest.fixture
def models_copy(trained, tmp_path):
    target = Path(trained.paths.models).parent / f"bundle-{tmp_path.name}"
    shutil.copytree(trained.paths.models, target, ignore=shutil.ignore_patterns("checkpoints", "registry.json", "[0-9a-f]" * 8 + "*"))
    yield trained.model_copy(update={"paths": trained.paths.model_copy(update={"models": target})})
    shutil.rmtree(target, ignore_errors=True)


def test_register_writes_a_whole_bundle(models_copy):
    manifest = register(models_copy)
    models = Path(models_copy.paths.models)
    digest = model_digest(models)
    assert manifest["digest"] == digest and manifest["backbone"] == "resnet18" and len(manifest["labels"]) == 14
    folder = models / digest
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["bundle.json", "global.safetensors", "local.safetensors", "fusion.safetensors", "ood_gate.safetensors"])
    assert manifest["model"]["image_size"] == models_copy.model.image_size
    assert set(manifest["thresholds"]) == {"youden"} and len(manifest["thresholds"]["youden"]["classes"]) == 14
    assert len(manifest["training_data_version"]) == 64 and manifest["ood_gate"]["threshold"] > 0
    assert read_registry(models)["current"] == digest
    assert load_bundle(models).digest == digest and load_bundle(models, digest[:8]).digest == digest


def test_changed_or_incomplete_bundles_are_refused(models_copy):
    register(models_copy)
    models = Path(models_copy.paths.models)
    folder = models / model_digest(models)
    local = folder / "local.safetensors"
    data = bytearray(local.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    local.write_bytes(bytes(data))
    with pytest.raises(DataError, match="local.safetensors do not match"):
        load_bundle(models)
    (folder / "ood_gate.safetensors").unlink()
    with pytest.raises(DataError, match="incomplete: ood_gate.safetensors missing"):
        open_bundle(folder)
    listed = list_bundles(models)
    assert listed[0]["usable"] is False and "incomplete" in listed[0]["problem"]


def test_inconsistent_chain_is_not_registered(models_copy):
    from models.branch import build_branch

    models = Path(models_copy.paths.models)
    _, meta = load_weights(models / "global.safetensors")
    save_weights(build_branch("resnet18"), models / "global.safetensors", meta)
    with pytest.raises(DataError, match="trained on another global model"):
        register(models_copy)


def test_rollback_and_scoring_without_training_data(models_copy, tmp_path):
    first = register(models_copy)["digest"]
    models = Path(models_copy.paths.models)
    # A second model: the same chain with a changed fusion head (its upstream digests still match).
    from tasks.bundle.weights import load_fusion

    state, meta = load_weights(models / "fusion.safetensors")
    head = load_fusion(models / "fusion.safetensors", 512, 512)
    with torch.no_grad():
        head.fc.bias.add_(0.5)
    save_weights(head, models / "fusion.safetensors", meta)
    second = register(models_copy)["digest"]
    assert second != first and read_registry(models)["current"] == second
    # The first bundle still holds the first weights: nothing was overwritten.
    assert load_bundle(models, first).digest == first

    # A scoring machine: only the bundles and the registry; no raw, interim, processed or cache.
    scoring = tmp_path / "scoring-machine"
    shutil.copytree(models, scoring / "models", ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    for digest in (first, second):
        shutil.copytree(models / digest, scoring / "models" / digest, dirs_exist_ok=True)
    gone = scoring / "absent"
    moved = {name: gone / name for name in type(models_copy.paths).model_fields if name not in ("models", "roots")}
    params = models_copy.model_copy(update={"paths": models_copy.paths.model_copy(update={
        **moved, "models": scoring / "models", "roots": (scoring, STUDIES.parent)})})
    out = score_studies(params, STUDIES, scoring / "out")
    assert out["model_digest"] == second and out["scored"] >= 1
    promoted = run_cxr("models", "promote", first[:12], "--params", str(_params_file(params, tmp_path)))
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout) == {"current": first}
    assert Scorer.load(params).digest == first
    again = score_studies(params, STUDIES, scoring / "out")
    assert again["model_digest"] == first and again["already_scored"] == 0
    listed = run_cxr("models", "list", "--params", str(_params_file(params, tmp_path)))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["digest"] for r in rows} == {first, second} and [r["digest"] for r in rows if r["current"]] == [first]
    wrong = run_cxr("models", "promote", "ffffffffffff", "--params", str(_params_file(params, tmp_path)))
    assert wrong.returncode == 2 and "is not a registered model" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_manifest_that_is_not_json_is_refused(models_copy):
    register(models_copy)
    models = Path(models_copy.paths.models)
    (models / model_digest(models) / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        load_bundle(models)


def _params_file(params, tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(json.loads(params.model_dump_json())))
    return path

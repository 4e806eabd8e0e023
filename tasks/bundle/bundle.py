"""A registered model as data: one folder per model digest that holds everything scoring needs.

Following torchvision's weights-as-data (the weights carry their files, metadata and
transform), a bundle folder `data/models/<digest>/` holds

    global.safetensors, local.safetensors, fusion.safetensors   the three stages' weights
    ood_gate.safetensors                                        the out-of-distribution gate
    bundle.json                                                 the manifest:
        digest, backbone, labels, model (the input geometry: ModelParams), files (name ->
        sha256), thresholds (rule key -> per-class thresholds fitted on the validation
        split, on the calibrated scale), calibration (per branch and class, fitted on the
        validation split; absent in bundles of format 1: the identity), ood_gate (its summary),
        training_data_version, training_data (its kind: synthetic or real, and what it was),
        stages (per-stage facts), evaluation (the evaluation summary, once `cxr evaluate` has run)

    model_card.md, figures/*.png                                the model card and its figures,
                                                                written by `cxr evaluate` (reports:
                                                                not in `files`, not digest-checked)

Scoring, the nightly job and the app read a bundle and nothing else: no params geometry,
no training data. `open_bundle` refuses a folder that is incomplete or whose files do not
match the digests its manifest records. A bundle is never changed in place except for its
manifest's derived facts (thresholds under another rule, the evaluation), rewritten
atomically, so an older bundle stays loadable for a rollback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cxr.core.atomic import atomic_write_json
from cxr.core.config import ModelParams, ScoreParams
from cxr.core.digest import file_sha256
from cxr.core.errors import DataError
from cxr.core.labels import PATHOLOGIES, STAGES
from tasks.bundle.calibration import Calibration
from tasks.bundle.ood_gate import GATE_FILE, OODGate, load_gate
from tasks.bundle.thresholds import rule_key
from tasks.bundle.weights import WEIGHT_FILES, load_agcnn, model_digest

MANIFEST = "bundle.json"
FORMAT = 2  # bump when what a bundle holds changes (2: calibration, a two-part gate, training_data)
MODEL_CARD = "model_card.md"
FIGURES = "figures"

#: What the out-of-distribution statement says, by the kind of images a model learned from.
OOD_STATEMENTS = {
    "synthetic": "This model learned from synthetic images; its scores for this film are not meaningful.",
    "real": "This film is unlike the radiographs this model learned from; its scores for it are not meaningful.",
}


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle folder."""

    folder: Path
    manifest: dict

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def model(self) -> ModelParams:
        """The input geometry and architecture the weights were trained with."""
        return ModelParams.model_validate(self.manifest["model"])

    def agcnn(self):
        """The AG-CNN of the bundle's weights (on the CPU, in eval mode)."""
        return load_agcnn(self.folder, self.model)

    def gate(self) -> OODGate | None:
        return load_gate(self.folder, self.digest)

    def calibration(self) -> Calibration:
        """The probability calibration (the identity for a bundle registered without one)."""
        return Calibration.from_manifest(self.manifest.get("calibration"))

    @property
    def training_kind(self) -> str:
        """"synthetic" or "real" (what the model learned from); "real" when not recorded."""
        return (self.manifest.get("training_data") or {}).get("kind", "real")

    def ood_statement(self) -> str:
        """The plain-words sentence shown above the probabilities of a study marked out of distribution."""
        return OOD_STATEMENTS.get(self.training_kind, OOD_STATEMENTS["real"])

    def thresholds(self, score: ScoreParams) -> dict:
        """The per-class thresholds under `score`'s rule: {rule, data_version, valid_images,
        classes: {pathology: {threshold, source, ...}}}; DataError when not fitted for it."""
        key = rule_key(score)
        entry = self.manifest.get("thresholds", {}).get(key)
        if entry is None:
            fitted = ", ".join(sorted(self.manifest.get("thresholds", {}))) or "none"
            raise DataError(f"model {self.digest[:12]} has no thresholds for the rule {key} (fitted: {fitted}); "
                            f"compute them with `cxr models thresholds {self.digest[:12]}`", where=str(self.folder))
        return entry

    def threshold_values(self, score: ScoreParams) -> list[float]:
        classes = self.thresholds(score)["classes"]
        return [float(classes[p]["threshold"]) for p in PATHOLOGIES]

    def summary(self) -> dict:
        """What `cxr models list/show` prints of a bundle (no file paths beyond its folder)."""
        m = self.manifest
        return {"digest": self.digest, "folder": str(self.folder), "backbone": m["backbone"],
                "image_size": m["model"]["image_size"], "local_size": m["model"]["local_size"],
                "training_data_version": m["training_data_version"], "thresholds": sorted(m.get("thresholds", {})),
                "ood_gate": m.get("ood_gate"), "evaluation": m.get("evaluation"), "stages": m.get("stages"),
                "calibration": (m.get("calibration") or {}).get("method", "identity"),
                "training_data": m.get("training_data")}


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise DataError(f"not a model bundle: {MANIFEST} is missing", where=str(folder))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"the bundle manifest is not readable JSON ({exc})", where=str(path)) from None
    missing = [k for k in ("digest", "model", "files", "backbone", "training_data_version") if k not in manifest]
    if missing:
        raise DataError(f"the bundle manifest lacks {', '.join(missing)}", where=str(path))
    return manifest


def open_bundle(folder: Path, *, verify: bool = True) -> Bundle:
    """The bundle in `folder`; DataError when it is incomplete or its files do not match.

    verify: hash every file against the manifest (the weights' content is what the digest
    names); without it only presence is checked (listing many bundles).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("model bundle not found", where=str(folder))
    manifest = _read_manifest(folder)
    expected = {*WEIGHT_FILES.values(), GATE_FILE}
    missing = sorted(name for name in expected | set(manifest["files"]) if not (folder / name).is_file())
    if missing:
        raise DataError(f"the model bundle is incomplete: {', '.join(missing)} missing", where=str(folder))
    if verify:
        changed = [name for name, digest in sorted(manifest["files"].items()) if file_sha256(folder / name) != digest]
        if changed:
            raise DataError(f"the model bundle's {', '.join(changed)} do not match the digests in its manifest; "
                            "refusing to use weights that are not the registered ones", where=str(folder))
        if model_digest(folder) != manifest["digest"]:
            raise DataError(f"the bundle's weights have digest {model_digest(folder)[:12]}, its manifest says "
                            f"{manifest['digest'][:12]}", where=str(folder))
    return Bundle(folder, manifest)


def write_bundle(models_dir: Path, source: Path, manifest: dict, gate_file: Path) -> Bundle:
    """Create the bundle folder `models_dir/<digest>` from the stage weights in `source` and
    the fitted gate file, with `manifest` (files and format are filled in here).

    Written into a temporary folder beside it and renamed into place, so a bundle folder is
    either whole or absent. An existing bundle of the same digest is replaced (same weights;
    a re-registration refits its gate and thresholds).
    """
    models_dir, source = Path(models_dir), Path(source)
    digest = manifest["digest"]
    target = models_dir / digest
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=models_dir))
    try:
        for stage in STAGES:
            shutil.copy2(source / WEIGHT_FILES[stage], tmp / WEIGHT_FILES[stage])
        shutil.copy2(gate_file, tmp / GATE_FILE)
        files = {name: file_sha256(tmp / name) for name in sorted([*WEIGHT_FILES.values(), GATE_FILE])}
        atomic_write_json(tmp / MANIFEST, {**manifest, "format": FORMAT, "files": files})
        if model_digest(tmp) != digest:
            raise DataError("the stage weights changed while the bundle was written", where=str(source))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.old.", dir=models_dir))
            target.rename(old / "bundle")
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_bundle(target)


def update_manifest(bundle: Bundle, **facts) -> Bundle:
    """Rewrite the bundle's manifest with `facts` merged in (derived facts only: thresholds,
    evaluation); the weights and their digests never change."""
    if {"digest", "files", "model"} & set(facts):
        raise ValueError("a bundle's weights, files and geometry are fixed once written")
    manifest = {**bundle.manifest, **facts}
    atomic_write_json(bundle.folder / MANIFEST, manifest)
    return Bundle(bundle.folder, manifest)

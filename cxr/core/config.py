"""One params file (`params.yaml`) parsed into one typed config.

Unknown keys and wrong types are refused before any work starts, with the offending key
named; profiles (the CPU demo, the paper's full-scale GPU setting) are params files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr.core.errors import DataError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Strict):
    raw: Path = Path("data/raw")
    images: Path = Path("data/raw/images")
    interim: Path = Path("data/interim")
    processed: Path = Path("data/processed")
    cache: Path = Path("data/cache")
    models: Path = Path("data/models")
    metrics: Path = Path("data/metrics")
    reports: Path = Path("data/reports")
    # New studies land here; the nightly deployment scores what it has not scored before.
    incoming: Path = Path("data/incoming")
    # Every path above must resolve (symlinks followed) inside one of these folders, so a
    # params file cannot point the workflow at, or make it write into, anything else.
    roots: tuple[Path, ...] = (Path("data"),)

    @model_validator(mode="after")
    def _confined(self):
        for name in type(self).model_fields:
            if name != "roots":
                self.confine(f"paths.{name}", getattr(self, name))
        return self

    def confine(self, key: str, path: Path) -> None:
        """Refuse `path` (params key `key`) unless it resolves inside one of the roots."""
        roots = [r.resolve() for r in self.roots]
        path = path.resolve()
        if not any(path == r or r in path.parents for r in roots):
            raise ValueError(
                f"{key} resolves to {path}, outside the data roots ({', '.join(map(str, roots))}); "
                "add its folder to paths.roots if it is meant to be used"
            )


class SynthParams(_Strict):
    patients: int = Field(300, ge=3)
    image_size: int = Field(128, ge=32, le=1024)
    # Keeps the demo CPU-sized: some NIH patients have over a hundred follow-ups.
    max_images_per_patient: int = Field(4, ge=1)
    # Rare classes (Hernia) are sampled first so every class is in the demo.
    min_patients_per_class: int = Field(8, ge=0)


class SplitParams(_Strict):
    train: float = Field(0.7, gt=0, lt=1)
    valid: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    # Allowed absolute deviation of each split's image fraction from its ratio.
    tolerance: float = Field(0.05, ge=0, le=0.5)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:.4f}")
        return self

    def ratios(self) -> dict[str, float]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


class AttentionParams(_Strict):
    threshold: float = Field(0.7, gt=0, lt=1)
    mode: Literal["max_abs", "l1"] = "max_abs"


class ModelParams(_Strict):
    backbone: Literal["resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_lite0"] = "resnet18"
    pretrained: Literal["imagenet", "none"] = "none"
    # Side of the network input (the global branch sees image_size x image_size pixels).
    image_size: int = Field(128, ge=32)
    # The paper's input pipeline: images are resized to `resize` (by the loader or the image
    # cache), then an image_size crop of that is the network input: random per image and
    # epoch in stage-I training (`train.random_crop`), the centre everywhere else. Unset means
    # resize = image_size: the whole resized image is the input, no crop.
    resize: int | None = Field(None, ge=32, le=1024)
    local_size: int = Field(128, ge=32)
    attention: AttentionParams = AttentionParams()

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(
                f"model.resize ({self.resize}) is smaller than model.image_size ({self.image_size}); the network "
                "input is an image_size crop of the image resized to `resize`, so resize must be at least image_size "
                "(leave resize unset for no crop)"
            )
        return self

    @property
    def load_size(self) -> int:
        """Side every image is resized to before the image_size crop is taken."""
        return self.image_size if self.resize is None else self.resize


class StageParams(_Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    # lr is divided by `lr_gamma` every `lr_step` epochs (the paper: /10 every 20).
    lr_step: int = Field(20, ge=1)
    lr_gamma: float = Field(0.1, gt=0, le=1)
    # A pretrained body (model.pretrained: imagenet) learns at lr * body_lr_scale while the new
    # head learns at lr: small data should nudge ImageNet features, not overwrite them. No
    # effect on a random-init body or on the fusion head.
    body_lr_scale: float = Field(1.0, gt=0, le=1)
    # Early stopping: end the stage once `patience` epochs in a row bring no better validation
    # mean AUROC (the best epoch's weights are kept either way). Unset: run every epoch.
    patience: int | None = Field(None, ge=1)

    def fingerprint_dump(self) -> dict:
        """The fields a checkpoint is valid for; the newer ones only when set, so checkpoints
        made before they existed keep their fingerprint."""
        out = self.model_dump(mode="json")
        for key, default in (("body_lr_scale", 1.0), ("patience", None)):
            if out[key] == default:
                del out[key]
        return out


class AugmentParams(_Strict):
    """Stage I/II training augmentation for radiographs, beyond the horizontal flip: per image
    and epoch, drawn from the epoch's seeded generator and applied to the batch as tensor ops.
    Never a vertical flip (a radiograph is never upside down). All zero: none."""

    # Rotation uniform in [-rotation, rotation] degrees and zoom uniform in [1 - scale, 1 + scale]
    # (one affine resampling, border pixels extended).
    rotation: float = Field(0.0, ge=0, le=30)
    scale: float = Field(0.0, ge=0, lt=0.5)
    # Intensity on [0, 1] pixels: p * c + b with c uniform in [1 - contrast, 1 + contrast] and
    # b uniform in [-brightness, brightness], clipped to [0, 1].
    brightness: float = Field(0.0, ge=0, le=0.5)
    contrast: float = Field(0.0, ge=0, lt=1)

    @property
    def enabled(self) -> bool:
        return any((self.rotation, self.scale, self.brightness, self.contrast))


class TrainParams(_Strict):
    workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    flip: bool = True
    # Stage I trains on a random image_size crop of the `model.resize` image (per image and
    # epoch, drawn from the epoch's seeded generator like the flips), the paper's augmentation.
    # No effect without model.resize > image_size. Stages II/III read their crops from the crop
    # cache, computed once from the centre crop, so they (and all evaluation) see the centre.
    random_crop: bool = True
    augment: AugmentParams = AugmentParams()
    # On CUDA: NHWC memory lets tensor cores run the convolutions without transposes.
    channels_last: bool = True
    global_: StageParams = Field(StageParams(), alias="global")
    local: StageParams = StageParams()
    fusion: StageParams = StageParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def stage(self, name: str) -> StageParams:
        return {"global": self.global_, "local": self.local, "fusion": self.fusion}[name]


class CacheParams(_Strict):
    # Resolution stored in the image cache; it serves training, evaluation and the crop-cache
    # build when equal to the size images are resized to: model.resize, or model.image_size
    # when resize is unset (the network input is then cropped from the cached pixels).
    image_size: int = Field(128, ge=32, le=1024)
    # Images per shard file = per build chunk: the unit of resume and of fan-out.
    shard_images: int = Field(512, ge=1)
    # Global-branch batch while building the crop cache.
    batch_size: int = Field(64, ge=1)
    # Stages II and III read crops from the crop cache instead of re-running the global branch.
    enabled: bool = True


class DaskParams(_Strict):
    """Fan-out of the mapped cache builds to Dask worker processes (Prefect's DaskTaskRunner)."""

    enabled: bool = False
    # Scheduler of an existing Dask cluster ("tcp://host:8786"); empty starts a local one per run.
    address: str = ""
    # Local cluster size: worker processes x threads each, sized to the cores.
    workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)


class EvaluateParams(_Strict):
    bootstrap: int = Field(200, ge=0)


class ScoreParams(_Strict):
    """Batch scoring of new studies (`cxr score`)."""

    batch_size: int = Field(16, ge=1)
    # Arithmetic of the forward pass: "bf16" runs it under bfloat16 autocast with channels-last
    # tensors where the device has bf16 units (CUDA, or a CPU with AVX512-BF16 or AMX) and falls
    # back to fp32 elsewhere; attention boxes, maps and probabilities stay float32 either way.
    # Off by default: it moves per-class AUROCs (benchmarks/results/score.json says by how much).
    precision: Literal["fp32", "bf16"] = "fp32"
    # Operating points per class, chosen on the validation split's fusion predictions.
    threshold_rule: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    # Used for a class without positives (or negatives) in the validation split.
    fallback_threshold: float = Field(0.5, gt=0, lt=1)
    top_findings: int = Field(3, ge=1, le=14)
    # Loader limits: a decompression-bomb guard and the smallest plausible radiograph side.
    max_pixels: int = Field(60_000_000, ge=1)
    min_side: int = Field(32, ge=1)
    # Files larger than this are rejected unread: no radiograph is this big, a mistaken upload may be.
    max_bytes: int = Field(200_000_000, ge=1)
    # Longest side of the radiograph panels in the overlay JPEGs. 256: the radiograph and three
    # maps side by side are 1024 px wide, shown unscaled on a laptop screen; the maps come from a
    # 4x4 to 8x8 feature grid, so a larger panel adds no detail to them. Drawing and compressing
    # the overlay is most of scoring's non-model work (benchmarks/bench_score.py): 384 px costs
    # 2.25x the pixels of 256.
    overlay_size: int = Field(256, ge=64, le=2048)
    # Out of distribution (tasks/ood.py). Non-radiographs (photos, text, noise, MR/CT slices) are
    # refused by a model-free precheck unless "off". A radiograph unlike this model's training
    # data (feature-space distance over the gate's threshold): "reject" refuses it, "flag" scores
    # it with ood_flag set, "off" checks nothing. Default "flag": the demo model learned from
    # synthetic images, so every real film is far from its training data, and real films must
    # stay scoreable (ARCHITECTURE.md, "Out of distribution has two degrees").
    ood: Literal["reject", "flag", "off"] = "flag"
    # Target false-rejection rate of the feature gate on the validation split (its threshold).
    ood_false_rejection: float = Field(0.01, gt=0, lt=0.5)
    # false: no overlay JPEG or thumbnail PNG (rows, JSON, Parquet and the report still written).
    pictures: bool = True
    # Data Docs of the score gates: rebuilt only when a suite's outcome changes ("changed"), or every run.
    data_docs: Literal["changed", "always"] = "changed"
    # Store the results (a Structured Report and a Secondary Capture per instance) back into the
    # PACS over STOW-RS. None: true for a PACS (DICOMweb) source; a folder source has nowhere to store.
    write_back: bool | None = None


class SourceParams(_Strict):
    """A PACS as a scoring source (`cxr score --dicomweb URL`, nightly.source: dicomweb)."""

    # Studies newer than the last successful run less this many days are queried again, so a
    # study that reaches the PACS late is not missed (instances already scored are skipped).
    lookback_days: int = Field(7, ge=0)


class NightlyParams(_Strict):
    """The `nightly-scoring` deployment served by `cxr serve`."""

    cron: str = "0 2 * * *"
    # IANA name of the time zone `cron` is read in, the same for `cxr serve` and prefect.yaml.
    timezone: str = "UTC"
    # Where the nightly job's studies come from: paths.incoming, or a PACS over DICOMweb.
    source: Literal["folder", "dicomweb"] = "folder"
    # The DICOMweb root (no credentials: CXR_DICOMWEB_USER/PASSWORD or CXR_DICOMWEB_TOKEN).
    dicomweb_url: str = ""
    # A failed or crashed nightly run POSTs a JSON notice here (a Prefect automation made by
    # `cxr alerts` or `cxr serve`); empty: no alert. Kept in a Prefect Secret-valued block.
    alert_webhook: str = ""

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone name (for example UTC or Europe/Berlin)") from None
        return value

    @field_validator("alert_webhook")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL, or empty for no alert")
        return value


class AppParams(_Strict):
    """The local web app (`cxr app`): uploads scored one at a time by people or integrations."""

    # Uploads arriving within this many milliseconds of the first waiting one share one forward
    # pass (at most score.batch_size studies); 0 scores each upload alone.
    batch_window_ms: int = Field(15, ge=0, le=2000)
    # False: the app run keeps rows and per-study JSON only, never a picture of an upload
    # (for sites that must not keep images); the study page then shows the numbers alone.
    store_pixels: bool = True
    # The app's own run record (rows, per-study JSON, pictures); unset: paths.reports/app.
    store: Path | None = None
    # Folders searched for scoring runs (`cxr score` outputs, the nightly store and its dated
    # folders) shown in the runs browser; empty: paths.reports.
    runs: tuple[Path, ...] = ()
    # A study scored from a PACS links to it in the PACS viewer: a URL template with
    # {study_uid} (StudyInstanceUID, e.g. OHIF's .../viewer?StudyInstanceUIDs={study_uid}) or
    # {orthanc_study_id} (Orthanc Explorer's .../app/explorer.html#study?uuid={orthanc_study_id}).
    # Empty: no link (the StudyInstanceUID is still shown).
    viewer_url: str = ""

    @field_validator("viewer_url")
    @classmethod
    def _viewer_template(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("app.viewer_url must be an http:// or https:// URL template (or empty)")
        unknown = set(re.findall(r"{([^{}]*)}", value)) - {"study_uid", "orthanc_study_id"}
        if unknown:
            raise ValueError(f"app.viewer_url knows only the placeholders {{study_uid}} and {{orthanc_study_id}}, "
                             f"not {', '.join('{' + u + '}' for u in sorted(unknown))}")
        return value


class DataParams(_Strict):
    """Which data the pipeline runs on: the synthetic demo (all unset) or real NIH files."""

    # A Data_Entry CSV (2017 or v2020 header) to ingest; unset: `cxr synth` renders the demo data.
    metadata: Path | None = None
    # Folder of images named by image id; when set it is paths.images (one place reads images).
    images_dir: Path | None = None
    # An external split CSV (Image Index, split): checked for patient leakage and used as is;
    # unset: `cxr split` makes a patient-level split.
    split_assignments: Path | None = None


class Params(_Strict):
    seed: int = 42
    data: DataParams = DataParams()
    paths: Paths = Paths()
    synth: SynthParams = SynthParams()
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    cache: CacheParams = CacheParams()
    score: ScoreParams = ScoreParams()
    nightly: NightlyParams = NightlyParams()
    source: SourceParams = SourceParams()
    dask: DaskParams = DaskParams()
    app: AppParams = AppParams()

    @model_validator(mode="before")
    @classmethod
    def _images_dir_is_paths_images(cls, raw):
        data = raw.get("data") if isinstance(raw, dict) else None
        images = data.get("images_dir") if isinstance(data, dict) else None
        if images is None:
            return raw
        paths = dict(raw.get("paths") or {})
        # paths.images at its default value (as a copy of params.yaml has it) yields to
        # data.images_dir; only two different folders, both set on purpose, are a conflict.
        given = paths.get("images")
        if given is not None and Path(given) not in (Path(images), Paths.model_fields["images"].default):
            raise ValueError(f"data.images_dir ({images}) and paths.images ({given}) disagree; set one of them")
        return {**raw, "paths": {**paths, "images": images}}

    @model_validator(mode="after")
    def _data_files_confined(self):
        for name in ("metadata", "split_assignments"):
            value = getattr(self.data, name)
            if value is not None:
                self.paths.confine(f"data.{name}", value)
        return self


    @model_validator(mode="after")
    def _app_folders_confined(self):
        if self.app.store is not None:
            self.paths.confine("app.store", self.app.store)
        for i, folder in enumerate(self.app.runs):
            self.paths.confine(f"app.runs[{i}]", folder)
        return self

    def app_store(self) -> Path:
        """The app's run record folder."""
        return Path(self.app.store or Path(self.paths.reports) / "app")

    def app_runs(self) -> tuple[Path, ...]:
        """Folders the runs browser searches."""
        return tuple(self.app.runs) or (Path(self.paths.reports),)


def load_params(path: str | Path | None = "params.yaml") -> Params:
    """Read and validate a params file; a missing default file means all defaults."""
    if path is None:
        return Params()
    path = Path(path)
    if not path.exists():
        if path == Path("params.yaml"):
            return Params()
        raise DataError("params file not found", where=str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML ({exc.__class__.__name__}: {exc})", where=str(path)) from None
    if not isinstance(raw, dict):
        raise DataError("params must be a mapping of sections", where=str(path))
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise DataError(f"invalid params ({problems})", where=str(path)) from None

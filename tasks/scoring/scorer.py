"""The `Scorer`: one implementation of scoring for every path (`cxr score`, the nightly
deployment, the Dask shards, the web app and the evaluation's out-of-distribution report).

Loaded once per process from one verified bundle (`tasks.bundle`): its weights, input
geometry, probability calibration, operating thresholds (on the calibrated scale) and
out-of-distribution gate, on the params' device. Every probability a study gets (fusion,
global, local) is calibrated here, so every path that scores shows the same calibrated figures. It turns
files into `ScoredStudy`s (`prepare`: the one loader and the precheck; `infer`: one batched
forward and the verdict) and writes their per-study files (`write`).

Precision (`score.precision`): "fp32" runs the model's own forward. "bf16" runs the two
branches and the fusion head under bfloat16 autocast with channels-last tensors (oneDNN's
bf16 convolutions), only where the hardware has bf16 units (a CUDA device that supports it,
or a CPU with AVX512-BF16 or AMX); elsewhere it falls back to fp32 with one log line. The
attention boxes, the crops, the activation maps and every probability are computed in
float32 in both cases: autocast covers the network layers, never the thresholds.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cxr.core.atomic import atomic_write_bytes
from cxr.core.config import Params
from cxr.core.errors import DataError
from cxr.core.labels import BRANCHES, LABEL_COLUMNS, PATHOLOGIES
from models.agcnn import AGCNNOutput
from models.attention import crop_boxes
from models.device import pick_device
from tasks.bundle.bundle import Bundle
from tasks.bundle.registry import load_bundle, resolve_digest
from tasks.images.geometry import input_box_to_image, network_pixels_from_image, to_input
from tasks.images.loader import LoaderLimits, load_image
from tasks.scoring.overlay import OVERLAY_SUFFIX, display_shape, levels, overlay_jpeg, resize_gray, save_png, thumbnail
from tasks.scoring.precheck import precheck
from tasks.scoring.rows import BOX_COLUMNS, FLAG_COLUMNS, ScoredStudy, base_row, study_json_bytes
from tasks.scoring.studies import Study, output_name, reason_of, sha_or_reason
from tasks.scoring.verdict import OODVerdict, ood_verdict

log = logging.getLogger("cxr.score")


def class_activation_maps(features: torch.Tensor, weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM_k = relu(sum_c W[k, c] * features[c]), each map scaled to [0, 1].

    features: (B, C, h, w); weights: (K, C) the global classifier; classes: (B, T) indices.
    Returns (B, T, h, w) float32.
    """
    cams = torch.einsum("btc,bchw->bthw", weights[classes].float(), features.float()).clamp_min_(0)
    peak = cams.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams))


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix units


def cpu_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The bf16 matrix-unit flags this CPU reports (AMX, AVX512-BF16); [] when none or unknown.

    torch's own `get_cpu_capability()` names the vector width only ("AVX512"), and oneDNN
    runs bf16 on any AVX-512 CPU by emulating it (slower than fp32): only these flags say the
    arithmetic is in hardware.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_CPU_FLAGS if f in flags]


def resolve_precision(requested: str, device: torch.device, units: list[str] | None = None) -> str:
    """The precision scoring runs at: `requested` ("fp32" or "bf16"), or "fp32" when the
    device has no bf16 units (one log line says so). `units`: the CPU's, for tests."""
    if requested != "bf16":
        return "fp32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        why = "this CUDA device does not support bfloat16"
    elif device.type == "cpu":
        found = cpu_bf16_units() if units is None else units
        if found:
            return "bf16"
        why = f"this CPU has no bf16 matrix units (none of {', '.join(BF16_CPU_FLAGS)} in its flags)"
    else:
        why = f"bf16 scoring is only set up for CPU and CUDA devices, not {device.type}"
    log.info("score.precision bf16 requested, scoring in fp32: %s", why)
    return "fp32"


def model_forward(model, x: torch.Tensor, precision: str) -> AGCNNOutput:
    """The AG-CNN forward; under "bf16" with the branches and the fusion head under bfloat16
    autocast on channels-last input (the attention step inside runs in float32 regardless:
    `models.agcnn.attention_crops`), its floating outputs returned as float32."""
    if precision != "bf16":
        return model(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last))
    return AGCNNOutput(*(t.float() if t.is_floating_point() else t for t in out))


def prepare_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model laid out for `precision`: channels-last weights under bf16 (what oneDNN's
    bf16 convolutions read without reordering), as it is under fp32."""
    return model.to(memory_format=torch.channels_last) if precision == "bf16" else model


def batch_outputs(model, pixels: torch.Tensor, device, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """One forward of (B, S, S) uint8 inputs -> what the rows and pictures need, on the CPU,
    every tensor float32 (or uint8 crops, int64 boxes) whatever the precision.

    probabilities of each branch (B, 14); boxes (B, 4) in input pixels; cams (B, 14, h, w)
    on the feature grid; pooled (B, C) global-branch features (the OOD gate's input);
    crops (B, L, L) uint8, the input pixels the local branch saw.
    """
    with torch.inference_mode():
        out = model_forward(model, to_input(pixels, device), precision)
        features = out.global_features.float()  # outside autocast: the maps and the gate in float32
        weights = model.global_branch.classifier.weight
        every = torch.arange(weights.shape[0], device=weights.device).expand(pixels.shape[0], -1)
        crops = crop_boxes(pixels.to(device).unsqueeze(1).float(), out.boxes, model.local_size)[:, 0]
        result = {"global": torch.sigmoid(out.global_logits.float()), "local": torch.sigmoid(out.local_logits.float()),
                  "fusion": torch.sigmoid(out.fusion_logits.float()), "boxes": out.boxes,
                  "cams": class_activation_maps(features, weights, every),
                  "pooled": features.amax((2, 3)),
                  "crops": crops.round_().clamp_(0, 255).to(torch.uint8)}
    return {k: v.cpu() for k, v in result.items()}


# Batches the CPU forward of a batch run keeps in flight at once (`forward_pool`).
MAX_FORWARD_STREAMS = 2


def forward_streams(device: torch.device) -> tuple[int, int]:
    """(batches in flight, intra-op threads per batch) for a batch run's forward passes.

    On a CPU, two batches at a time, each on its own thread with half the intra-op threads
    (one each on 2 cores), rather than one batch on all of them. The run's decoders and
    writers take a core now and then: a forward spread over every core then stalls at each
    operator's barrier until the preempted thread comes back, while its sibling spins. Two
    single-thread forwards have no barrier between them and lose only the time taken.
    On an accelerator, one batch at a time: the device queues the work.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return 1, threads
    streams = min(MAX_FORWARD_STREAMS, threads)
    return streams, threads // streams


def forward_pool(device: torch.device) -> tuple[ThreadPoolExecutor, int]:
    """A thread pool for `forward_streams(device)` forwards at once (each thread set to its
    share of intra-op threads: the setting is per thread) and how many to keep in flight."""
    streams, per_stream = forward_streams(device)
    return ThreadPoolExecutor(streams, thread_name_prefix="cxr-forward",
                              initializer=torch.set_num_threads, initargs=(per_stream,)), streams


_LOADED: dict[tuple, "Scorer"] = {}  # this process's Scorer (one model per process)

_RULES = {"youden": "Youden's J (the cut-off with the largest sensitivity + specificity - 1)",
          "sensitivity": "the highest cut-off that still finds {target:.0%} of the validation split's positives"}


def operating_point_sentence(entry: dict, score) -> str:
    """In one sentence: when a finding is flagged, from a bundle's threshold entry."""
    rule = _RULES.get(score.threshold_rule, score.threshold_rule).format(target=score.target_sensitivity)
    fallback = [p for p, c in entry.get("classes", {}).items() if str(c.get("source", "")).startswith("fallback")]
    extra = (f" {len(fallback)} finding(s) the validation split could not judge use {score.fallback_threshold:g}."
             if fallback else "")
    return (f"A finding is flagged when its probability reaches its own operating threshold, chosen on the "
            f"validation split ({entry.get('valid_images', '?')} images) by {rule}.{extra}")


class Scorer:
    """Loaded once per process from one bundle: weights, geometry, thresholds, gate, device.

    `score(items, run_id)` scores files (nothing written); `write(out_dir, study)` writes a
    study's JSON and pictures. The batch pipeline uses the two halves of `score` separately:
    `prepare` (decode one file, thread-safe) and `infer` (one batched forward).
    """

    def __init__(self, params: Params, bundle: Bundle):
        self.params = params
        self.bundle = bundle
        self.digest: str = bundle.digest
        self.geometry = bundle.model  # the input geometry the weights were trained with
        self.threshold_entry = bundle.thresholds(params.score)
        self.thresholds = np.asarray(bundle.threshold_values(params.score), dtype=np.float32)
        self.device = pick_device(params.train.device)
        s = params.score
        self.precision = resolve_precision(s.precision, self.device)
        self.model = prepare_model(bundle.agcnn().to(self.device), self.precision)
        self.limits = LoaderLimits(max_pixels=s.max_pixels, min_side=s.min_side)
        self.ood_mode: str = s.ood
        self.gate = bundle.gate()  # None for a bundle registered without a gate
        self.calibration = bundle.calibration()  # the identity for a bundle registered without one
        self.ood_statement: str = bundle.ood_statement()
        self.meaning = {"probability_meaning": self.calibration.meaning(),
                        "operating_point": operating_point_sentence(self.threshold_entry, s),
                        "thresholds": dict(zip(PATHOLOGIES, (round(float(v), 6) for v in self.thresholds)))}

    def calibrated(self, outs: dict) -> dict:
        """`batch_outputs` with each branch's probabilities on the bundle's calibrated scale."""
        return {**outs, **{b: torch.from_numpy(self.calibration.apply(b, outs[b])) for b in BRANCHES}}

    def gate_parts(self, pooled, pixels) -> dict[str, np.ndarray] | None:
        """The gate's distances per part for a batch (None without a gate)."""
        if self.gate is None:
            return None
        return self.gate.components(pooled, pixels if self.gate.two_part else None)

    @property
    def entry(self) -> dict:
        """The bundle's manifest (backbone, training data version, ...)."""
        return self.bundle.manifest

    @classmethod
    def load(cls, params: Params, *, models_dir: Path | None = None, digest: str | None = None) -> "Scorer":
        """This process's Scorer of the bundle `digest` (default: the registry's current one)
        under `params`; loaded and verified once, then reused (the shards of a run, the app).

        DataError when there is no such bundle or it is incomplete or changed.
        """
        models_dir = Path(models_dir or params.paths.models)
        digest = resolve_digest(models_dir, digest)
        key = (str(models_dir.resolve()), digest, params.score.model_dump_json(), params.train.device)
        if key not in _LOADED:
            scorer = cls(params, load_bundle(models_dir, digest))
            _LOADED.clear()  # one model per process: a new digest replaces the old one
            _LOADED[key] = scorer
            log.info("loaded model %s (%s) on %s, %s", digest[:12], scorer.entry["backbone"], scorer.device,
                     scorer.precision)
        return _LOADED[key]

    # ------------------------------------------------------------------ scoring

    def score(self, items: list[tuple[str, Path]], run_id: str) -> list[ScoredStudy]:
        """Score (study_id, path) items in one batched forward; nothing is written.

        A file the loader, the precheck or the gate refuses is a rejected ScoredStudy.
        """
        studies = [Study(study_id, Path(path), *sha_or_reason(Path(path))) for study_id, path in items]
        return self.infer([self.prepare(s) for s in studies], run_id)

    def prepare(self, study: Study) -> Study:
        """Decode one file (the one loader) into network pixels and a display picture, or a reason."""
        if study.reason is not None:
            return study
        facts: dict = {}
        try:
            image = load_image(study.path, self.limits, facts=facts)
        except DataError as exc:
            study.reason = reason_of(exc)
            return study
        study.shape = image.shape
        if self.ood_mode != "off":
            # Model-free: is this a chest radiograph at all? Not one is refused under "flag" too:
            # "flag" is for radiographs unlike the training data (the gate), not for a photo.
            study.precheck = precheck(image, facts)
            if study.precheck:
                study.reason = study.precheck
                return study
        study.pixels = network_pixels_from_image(image, self.geometry)
        study.display = resize_gray(image, display_shape(*image.shape, self.params.score.overlay_size))
        return study

    def forward(self, pixels: np.ndarray) -> dict[str, torch.Tensor]:
        """(B, S, S) uint8 network inputs -> `batch_outputs` on the calibrated scale."""
        return self.calibrated(batch_outputs(self.model, torch.from_numpy(pixels), self.device, self.precision))

    def infer(self, studies: list[Study], run_id: str) -> list[ScoredStudy]:
        """Prepared studies -> ScoredStudies in the same order: one forward for the decodable ones."""
        good = [s for s in studies if s.reason is None]
        pixels = np.stack([s.pixels for s in good]) if good else None
        return self.assemble(studies, run_id, pixels, self.forward(pixels) if good else None)

    def assemble(self, studies: list[Study], run_id: str, pixels: np.ndarray | None, outs: dict | None) -> list[ScoredStudy]:
        """The batch's rows and results from its forward `outs` (over the pixels of the
        decodable studies, in order): the gate's verdict per study, then scored or rejected."""
        good = [s for s in studies if s.reason is None]
        results = {}
        if good:
            parts = self.gate_parts(outs["pooled"], pixels)
            distances = self.gate.combine(parts) if parts is not None else None
            rounded = None if parts is None else {k: [round(x, 4) for x in np.asarray(v, np.float64).tolist()]
                                                  for k, v in parts.items()}
            batch = self._batch_facts(outs)
            for i, study in enumerate(good):
                verdict = ood_verdict(self.ood_mode, gate=self.gate,
                                      score=None if distances is None else float(distances[i]))
                part = None if rounded is None else {k: v[i] for k, v in rounded.items()}
                if verdict.refused_by:
                    study.reason = verdict.reason
                    results[id(study)] = self._rejected(study, run_id, verdict, part)
                else:
                    results[id(study)] = self._scored(study, run_id, outs, batch, i, verdict, part)
        return [results.get(id(s)) or self._rejected(s, run_id) for s in studies]

    def _batch_facts(self, outs: dict) -> dict:
        """Per-batch lists and arrays the rows are cut from: one numpy pass for the whole batch
        (flags, top findings, the highest flagged probability), not one per study."""
        prob = outs["fusion"].numpy()
        flag = prob >= self.thresholds
        top = np.argsort(-prob, axis=1, kind="stable")[:, : self.params.score.top_findings]
        flagged_max = np.where(flag, prob, -np.inf).max(axis=1)
        return {"prob_list": prob.tolist(), "flag_list": flag.tolist(), "top": top.tolist(),
                "flagged_max": flagged_max.tolist(), "boxes": outs["boxes"].numpy().tolist(),
                "branches": {b: outs[b].numpy() for b in BRANCHES}, "cams": outs["cams"].numpy(),
                "crops": outs["crops"].numpy()}

    def _ood_facts(self, verdict: OODVerdict, parts: dict | None = None) -> dict:
        gate = self.gate
        facts = {"mode": self.ood_mode, "score": verdict.score, "threshold": None if gate is None else float(gate.threshold),
                 "method": None if gate is None else gate.method, "statement": self.statement(verdict)}
        if parts is not None and gate is not None and gate.two_part:
            facts["components"] = {
                "features": {"distance": parts["features"], "threshold": round(gate.feature_threshold, 4)},
                "image_statistics": {"distance": parts["image_statistics"], "threshold": round(gate.stats_threshold, 4)}}
        return facts

    def statement(self, verdict: OODVerdict | None) -> str | None:
        """The plain-words sentence above a study's probabilities (None when nothing is to be said)."""
        if verdict is None or not verdict.flag:
            return None
        if verdict.refused_by == "precheck":
            return "This file does not look like a chest radiograph; it was not scored."
        if verdict.refused_by == "gate":
            return f"{self.ood_statement} It was not scored."
        return self.ood_statement

    def _rejected(self, study: Study, run_id: str, verdict: OODVerdict | None = None,
                  parts: dict | None = None) -> ScoredStudy:
        row = base_row(study, self.digest, run_id, "rejected")
        if verdict is None and study.shape is not None:  # decoded, then refused by the precheck
            verdict = ood_verdict(self.ood_mode, precheck=study.precheck)
        if study.shape is not None:
            row.update(image_height=study.shape[0], image_width=study.shape[1])
        if verdict is not None:
            row.update(ood_score=verdict.score, ood_flag=verdict.flag, ood_statement=self.statement(verdict))
        return ScoredStudy(row, ood=self._ood_facts(verdict, parts) if verdict is not None else None, verdict=verdict,
                           meaning=self.meaning)

    def _scored(self, study: Study, run_id: str, outs: dict, batch: dict, i: int, verdict: OODVerdict,
                parts: dict | None = None) -> ScoredStudy:
        m = self.geometry
        flag = batch["flag_list"][i]
        box = tuple(int(v) for v in batch["boxes"][i])
        dh, dw = study.display.shape
        flagged = [p for p, f in zip(PATHOLOGIES, flag) if f]
        name = output_name(study.study_id)
        row = base_row(study, self.digest, run_id, "scored")
        row.update(zip(LABEL_COLUMNS, batch["prob_list"][i]))
        row.update(zip(FLAG_COLUMNS, flag))
        row.update(zip(BOX_COLUMNS, input_box_to_image(box, m, study.shape)))
        row.update(image_height=study.shape[0], image_width=study.shape[1], reason=verdict.reason,
                   flagged=", ".join(flagged), max_flagged_probability=batch["flagged_max"][i] if flagged else None,
                   top_findings=", ".join(PATHOLOGIES[k] for k in batch["top"][i]),
                   ood_score=verdict.score, ood_flag=verdict.flag, ood_statement=self.statement(verdict),
                   overlay=f"overlays/{name}{OVERLAY_SUFFIX}", thumbnail=f"thumbs/{name}.png")
        whole_input = (0, 0, m.image_size - 1, m.image_size - 1)
        return ScoredStudy(row, {b: v[i] for b, v in batch["branches"].items()}, study.display,
                           input_box_to_image(box, m, (dh, dw)), batch["crops"][i],
                           cam_grid=batch["cams"][i],
                           # The maps cover the network input, i.e. the centre crop of the resized
                           # image: that region of the picture (all of it when model.resize is unset).
                           cam_region=input_box_to_image(whole_input, m, (dh, dw)), ood=self._ood_facts(verdict, parts),
                           verdict=verdict, meaning=self.meaning)

    # ------------------------------------------------------------------ outputs

    def write(self, out_dir: Path, study: ScoredStudy, *, pictures: bool = True, durable: bool = True) -> None:
        """The per-study JSON (out_dir/<row json>) and, with pictures, the overlay (JPEG) and thumbnail (PNG).

        Each file is written atomically; the JSON comes last, so a study whose JSON exists
        has all its files. `durable=False` leaves their flush to disk to the caller (the batch
        pipeline flushes a batch's files once, before its part file commits them).
        """
        if pictures and study.row["overlay"] and study.display is not None:
            grey = levels(study.display)  # once for both pictures
            self.write_overlay(out_dir, study, grey=grey, durable=durable)
            self.write_thumbnail(out_dir, study, grey=grey, durable=durable)
        self.write_json(out_dir, study, durable=durable)

    def write_overlay(self, out_dir: Path, study: ScoredStudy, *, grey: np.ndarray | None = None,
                      durable: bool = True) -> None:
        """out_dir/<row overlay>: the radiograph with its box and a panel per top finding (JPEG)."""
        atomic_write_bytes(Path(out_dir) / study.row["overlay"], overlay_jpeg(*self.overlay_parts(study, grey)),
                           durable=durable)

    @staticmethod
    def overlay_parts(study: ScoredStudy, grey: np.ndarray | None = None) -> tuple:
        """(grey levels, box, map levels, titles): what `tasks.scoring.overlay` draws a study's overlay from."""
        row = study.row
        top = [PATHOLOGIES.index(p) for p in row["top_findings"].split(", ")]
        prob = study.probabilities["fusion"]
        titles = [f"{row['study_id']} (attention box)"] + [
            f"{PATHOLOGIES[k]} {prob[k]:.2f}" + (" FLAGGED" if row[FLAG_COLUMNS[k]] else "") for k in top]
        grey = levels(study.display) if grey is None else grey
        return grey, study.display_box, study.cams_for(top, levels=True), titles

    def write_thumbnail(self, out_dir: Path, study: ScoredStudy, *, grey: np.ndarray | None = None,
                        durable: bool = True) -> None:
        """out_dir/<row thumbnail>: the small picture of the radiograph and its box for the report."""
        save_png(thumbnail(study.display if grey is None else grey, study.display_box),
                 Path(out_dir) / study.row["thumbnail"], durable=durable)

    def write_json(self, out_dir: Path, study: ScoredStudy, *, durable: bool = True) -> None:
        """out_dir/<row json>: the study's facts (`tasks.scoring.rows.study_json`)."""
        atomic_write_bytes(Path(out_dir) / study.row["json"], study_json_bytes(study), durable=durable)

"""Scoring from a PACS against scoring a folder, on the same images in one run.

    .venv/bin/python benchmarks/bench_pacs.py [--studies 500] [--side 256]

`--studies` radiographs of the shared NIH sample (../shared/data/nih-sample-64, 64 px, resized
to `--side` px) become one-instance chest CR studies (pydicom, unique UIDs, uncompressed) in a
folder, and are stored into a loopback Orthanc that this script starts with the project's
scripts/pacs.sh (authentication on; credentials generated here, never printed). With the demo's
registered model (data/models, from `make demo`; without one, a bundle of the same architecture
trained here for one epoch per stage, kept in data/bench-pacs-model) and a Prefect server of
its own:
  * folder: the `score` flow (`cxr score --input`) over the folder of those DICOM files;
  * PACS: the `pacs-scoring` flow (`cxr score --dicomweb`) over the Orthanc: QIDO-RS, WADO-RS,
    the same Scorer, then the results stored back by STOW-RS (per instance a Structured Report,
    a Secondary Capture and a presentation state), its phases timed, and the CPU seconds the
    Orthanc spent meanwhile (it runs on the same cores).
The folder path runs first after a short warm-up; studies/s is the number of studies over the
flow's wall time. Writes benchmarks/results/pacs.json (target: PACS >= 0.7 x folder).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import prefect_server, publish  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "nih-sample-64" / "images"
CR = "1.2.840.10008.5.1.4.1.1.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cr_files(n: int, side: int, folder: Path) -> list[Path]:
    """n NIH radiographs as chest CR DICOM files, one study each, dated today."""
    import datetime as dt

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pngs = sorted(SHARED.glob("*.png"))
    if len(pngs) < n:
        raise SystemExit(f"only {len(pngs)} images in {SHARED}; ask for --studies {len(pngs)} or fewer")
    folder.mkdir(parents=True)
    today = dt.date.today().strftime("%Y%m%d")
    out = []
    for k, png in enumerate(pngs[:n]):
        pixels = np.asarray(Image.open(png).convert("L").resize((side, side), Image.BILINEAR))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CR
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CR, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = png.stem.split("_")[0], "Bench^Patient", "", "O"
        ds.StudyDate = ds.SeriesDate = today
        ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "120000", str(k), f"B{k}", ""
        ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CR", "CHEST", 1, 1
        ds.ViewPosition, ds.PatientOrientation = "PA", ["L", "F"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = pixels.tobytes()
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def bench_model(params, work: Path):
    """`params` scoring with data/models when a bundle is registered there (`make demo`), else
    with a bundle of the same architecture trained here one epoch per stage on the NIH sample
    (kept in data/bench-pacs-model between runs). Its weights do not change how long scoring
    or the write-back takes; only which images the gates flag."""
    from tasks.metadata.ingest import run_ingest
    from tasks.metadata.split import run_split
    from tasks.training.registration import register
    from tasks.training.stages import train_stage

    if (Path(params.paths.models) / "registry.json").is_file():
        return params, f"demo bundle {params.model.backbone} {params.model.image_size} px (data/models)"
    root = work
    stage = {"epochs": 1, "batch_size": 32}
    paths = params.paths.model_copy(update={
        "raw": root / "raw", "images": SHARED, "interim": root / "interim", "processed": root / "processed",
        "models": root / "models", "metrics": root / "metrics", "cache": root / "cache",
        "roots": [*params.paths.roots, root, SHARED.parent]})
    train = params.train.model_copy(update={field: params.train.stage(name).model_copy(update=stage) for field, name
                                            in (("global_", "global"), ("local", "local"), ("fusion", "fusion"))})
    params = params.model_copy(update={"paths": paths, "train": train})
    if not (root / "models" / "registry.json").is_file():
        run_ingest(SHARED.parent / "Data_Entry_sample.csv", paths.interim)
        run_split(paths.interim / "metadata.parquet", paths.processed, ratios=params.split.ratios(),
                  tolerance=params.split.tolerance, seed=params.seed)
        for name in ("global", "local", "fusion"):
            train_stage(params, name, progress=False)
        register(params)
        for scratch in (root / "models" / "checkpoints", root / "cache"):  # training's resume state, image cache
            shutil.rmtree(scratch, ignore_errors=True)
    return params, (f"{params.model.backbone} {params.model.image_size} px, one epoch per stage on the NIH "
                    "sample (data/bench-pacs-model; no data/models)")


def start_orthanc(state: Path, user: str, password: str) -> dict:
    env = dict(os.environ, CXR_PACS_DIR=str(state), CXR_DICOMWEB_USER=user, CXR_DICOMWEB_PASSWORD=password,
               CXR_PACS_HTTP_PORT=str(_free_port()), CXR_PACS_DICOM_PORT=str(_free_port()))
    started = subprocess.run([str(ROOT / "scripts" / "pacs.sh"), "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        raise SystemExit(f"scripts/pacs.sh start failed: {started.stderr[-800:]}")
    url = started.stdout.strip().splitlines()[-1]
    return {"url": url, "http": url.rsplit("/dicom-web", 1)[0], "env": env}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def store_all(pacs: dict, files: list[Path], auth) -> float:
    session = requests.Session()
    session.trust_env = False

    def one(path: Path) -> None:
        r = session.post(f"{pacs['http']}/instances", data=path.read_bytes(), auth=auth, timeout=60)
        r.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, files))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--side", type=int, default=256, help="the CR images' side in pixels")
    args = parser.parse_args()

    os.chdir(ROOT)
    from cxr.core.config import load_params

    params = load_params(ROOT / "params.yaml")
    params, model = bench_model(params, ROOT / "data" / "bench-pacs-model")
    work = ROOT / "data" / "bench-pacs"  # inside the data roots
    shutil.rmtree(work, ignore_errors=True)
    user, password = "bench", secrets.token_urlsafe(18)
    pacs = None
    try:
        files = cr_files(args.studies, args.side, work / "dicom")
        warm = work / "warm"
        warm.mkdir()
        for path in files[:16]:
            shutil.copy(path, warm / path.name)
        pacs = start_orthanc(work / "orthanc", user, password)
        auth = (user, password)
        store_s = store_all(pacs, files, auth)
        os.environ.update(CXR_DICOMWEB_USER=user, CXR_DICOMWEB_PASSWORD=password)
        os.environ.pop("CXR_DICOMWEB_TOKEN", None)
        with prefect_server(work):
            from flows.pacs import pacs_scoring_flow
            from flows.score import score
            from tasks.scoring.dicomweb import FETCH_THREADS

            score(params, warm, work / "out-warm")  # imports, model load, first forward
            load_start = os.getloadavg()[0]
            t0 = time.perf_counter()
            folder = score(params, work / "dicom", work / "out-folder")
            folder_s = time.perf_counter() - t0
            orthanc_cpu = _cpu_seconds(int((work / "orthanc" / "orthanc.pid").read_text()))
            t0 = time.perf_counter()
            from_pacs = pacs_scoring_flow(params, pacs["url"], work / "out-pacs")
            pacs_s = time.perf_counter() - t0
            orthanc_cpu = _cpu_seconds(int((work / "orthanc" / "orthanc.pid").read_text())) - orthanc_cpu
            load_end = os.getloadavg()[0]
        count = requests.get(f"{pacs['http']}/statistics", auth=auth, timeout=60).json()["CountInstances"]
        n = args.studies
        scored, rejected = folder["scored"], folder["rejected"]  # the same gates refuse the same images
        assert scored + rejected == n and scored >= 0.9 * n, folder
        assert (from_pacs["scored"], from_pacs["rejected"]) == (scored, rejected), from_pacs
        assert from_pacs["stored_back"] == 3 * scored + rejected, from_pacs
        assert count == n + 3 * scored + rejected, count  # scored: an SR, an SC and a presentation state
        result = {
            "studies": n, "scored": scored, "rejected": rejected, "image_px": args.side, "source": "NIH sample radiographs as uncompressed chest CR",
            "model": model,
            "folder_studies_per_s": round(n / folder_s, 2), "pacs_studies_per_s": round(n / pacs_s, 2),
            "pacs_over_folder": round(folder_s / pacs_s, 3), "target_pacs_over_folder": 0.7,
            "folder_seconds": round(folder_s, 2), "pacs_seconds": round(pacs_s, 2),
            "pacs_phase_seconds": from_pacs["seconds"], "stored_back_objects": from_pacs["stored_back"],
            "orthanc_instances_after": count, "store_sources_seconds": round(store_s, 2),
            "fetch_and_stow_threads": FETCH_THREADS, "cpu_cores": os.cpu_count(),
            "orthanc_cpu_seconds_during_pacs_path": round(orthanc_cpu, 2),
            "load_average_at_start": round(load_start, 2), "load_average_at_end": round(load_end, 2),
        }
        for text in map(str, result.values()):
            assert password not in text
        publish("pacs", result)
    finally:
        if pacs is not None:
            subprocess.run([str(ROOT / "scripts" / "pacs.sh"), "stop"], env=pacs["env"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

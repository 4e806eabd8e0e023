"""What a study page and the API show, built the same way for an upload and a batch study.

Everything that leaves the app passes `public_facts`: rows carry the server's file paths
(`source_path` of a batch study, a temporary file's name in a reason), answers never do.
"""

from __future__ import annotations

import io
import json
import mimetypes
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cxr.core.labels import BRANCHES, LABEL_COLUMNS, PATHOLOGIES
from tasks.scoring.overlay import BOX_COLOUR, colormap
from tasks.scoring.rows import ScoredStudy
from app.record import PICTURES
from app.runs import Run, study_name

_ABSOLUTE = re.compile(r"(?<![\w.:/-])/(?:[^\s/'\"(),;]+/)*[^\s/'\"(),;]+")
# "overlay" and "thumbnail": a batch run's pictures, whatever their format (the overlay is a
# JPEG since the overlays went lossy, a PNG in earlier runs); served with their file's type.
PICTURE_NAMES = ("radiograph.png", "crop.png", "overlay", "thumbnail")
CAM_PICTURE = re.compile(r"^cam-(\d{1,2})\.png$")


def scrub(text):
    """`text` with anything that looks like an absolute path on this machine replaced by <path>."""
    return _ABSOLUTE.sub("<path>", text) if isinstance(text, str) else text


def page_path(run_id: str, name: str) -> str:
    return f"/runs/{run_id}/studies/{name}"


def public_facts(facts: dict, run_id: str) -> dict:
    """Per-study facts for a client: no server path, plus the study page's path."""
    out = dict(facts)
    source = out.get("source_path")
    if isinstance(source, str) and (source.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", source)):
        out["source_path"] = out.get("study_id")  # a batch study: its path below the input folder
    out["reason"] = scrub(out.get("reason"))
    if out.get("json"):
        out["page"] = page_path(run_id, study_name(out))
    return out


def study_facts(run: Run, row: dict) -> dict:
    """The per-study JSON of a row (the row itself, reshaped alike, when its JSON is missing)."""
    path = run.folder / row["json"] if row.get("json") else None
    if path is not None and path.resolve().is_relative_to(run.folder) and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    facts = {k: v for k, v in row.items() if k not in LABEL_COLUMNS and not k.endswith("_flag")}
    facts["probabilities"] = {p: row.get(c) for p, c in zip(PATHOLOGIES, LABEL_COLUMNS)}
    facts["flags"] = {p: row.get(f"{c}_flag") for p, c in zip(PATHOLOGIES, LABEL_COLUMNS)}
    facts["ood"] = {"score": row.get("ood_score"), "flag": row.get("ood_flag")}
    return facts


def pictures_folder(run: Run, name: str) -> Path:
    return run.folder / PICTURES / name


def picture_file(run: Run, name: str, facts: dict, picture: str) -> Path | None:
    """The file behind a picture name, only when it lies inside the run's folder."""
    if picture in ("overlay", "thumbnail"):
        rel = facts.get(picture)
        path = run.folder / rel if rel else None
    elif picture in PICTURE_NAMES:
        path = pictures_folder(run, name) / picture
    else:
        return None
    if path is None:
        return None
    resolved = path.resolve()
    return resolved if resolved.is_relative_to(run.folder) and resolved.is_file() else None


def picture_type(path: Path) -> str:
    """The media type of a picture file the app serves, from its suffix (.png, .jpg)."""
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def cam_png(run: Run, name: str, k: int) -> bytes | None:
    """Class k's activation map coloured over the radiograph, with the attention box (PNG bytes)."""
    folder = pictures_folder(run, name)
    files = [folder / n for n in ("radiograph.png", "maps.json")]
    if not all(f.resolve().is_relative_to(run.folder) and f.is_file() for f in files):
        return None
    meta = json.loads(files[1].read_text())
    grid = np.asarray(meta["cam_grid"], dtype=np.float32)
    if grid.ndim != 3 or not 0 <= k < grid.shape[0]:
        return None
    gray = np.asarray(Image.open(files[0]).convert("L"), dtype=np.float32) / 255.0
    study = ScoredStudy({}, display=gray, cam_grid=grid, cam_region=tuple(meta["cam_region"]))
    cam = study.cams_for([k])[0]
    base = np.repeat(gray[..., None].astype(np.float64) * 255.0, 3, axis=-1)
    blended = Image.fromarray(np.rint(0.55 * base + 0.45 * colormap(cam)).astype(np.uint8))
    y0, x0, y1, x1 = meta["box"]
    ImageDraw.Draw(blended).rectangle((x0, y0, x1, y1), outline=BOX_COLOUR, width=max(1, gray.shape[1] // 192))
    buf = io.BytesIO()
    blended.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def findings(facts: dict, thresholds) -> list[dict]:
    """The 14 findings for the page: fusion probability, threshold, flag, and each branch's probability."""
    probs = facts.get("probabilities") or {}
    flags = facts.get("flags") or {}
    branches = facts.get("branch_probabilities") or {}
    out = []
    for k, name in enumerate(PATHOLOGIES):
        p = probs.get(name)
        out.append({"index": k, "name": name, "probability": p, "flag": bool(flags.get(name)),
                    "threshold": None if thresholds is None else float(thresholds[k]),
                    "branches": {b: (branches.get(b) or {}).get(name) for b in BRANCHES}})
    return out

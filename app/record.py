"""The app run: every upload's row, per-study JSON and (unless app.store_pixels is off) pictures.

Laid out like a `cxr score` output folder, so the runs browser and the study page read both the
same way: `parts/part-<run>-<n>.parquet` (one per forward pass, written after the batch's JSON
files), `scores.parquet` (the parts folded in when the app stops), `studies/<sha256>.json`.
A study is keyed by (sha256 of the upload, model digest): a repeated upload answers from here.
With pictures, `pictures/<sha256>/` holds what the study page shows: the radiograph at display
size, the local branch's crop and every class's activation map on the feature grid (the page
colours the one asked for); the batch overlay and thumbnail are not drawn for uploads.
"""

from __future__ import annotations

import json
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cxr.core.atomic import atomic_path, atomic_write_json
from tasks.scoring.overlay import save_png
from tasks.scoring.rows import SCHEMA, ScoredStudy, consolidate, read_scores
from tasks.scoring.scorer import Scorer
from tasks.scoring.studies import output_name

PICTURES = "pictures"


def new_run_id() -> str:
    return "app-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)


class AppRecord:
    """The app's run record in `folder`, for the model `digest` (rows of other models are kept, not served)."""

    def __init__(self, folder: Path, digest: str, *, pictures: bool):
        self.folder = Path(folder)
        self.digest = digest
        self.pictures = pictures
        self.run_id = new_run_id()
        self._lock = threading.Lock()
        self._parts = 0
        (self.folder / "studies").mkdir(parents=True, exist_ok=True)
        known = read_scores(self.folder)
        known = known[(known["model_digest"] == digest) & known["sha256"].notna()]
        # sha256 -> per-study JSON path (relative); the first row of a key wins, as in consolidate().
        self._index: dict[str, str] = {}
        for sha, rel in zip(known["sha256"], known["json"]):
            self._index.setdefault(sha, rel)

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, sha256: str) -> dict | None:
        """The recorded per-study JSON of an upload with this content, or None."""
        rel = self._index.get(sha256)
        if rel is None:
            return None
        try:
            return json.loads((self.folder / rel).read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged record entry is scored again rather than served

    def add(self, scorer: Scorer, studies: list[ScoredStudy]) -> list[dict]:
        """Write each study's files, then the batch's part; return their per-study JSON facts."""
        for study in studies:
            if self.pictures and study.display is not None:
                self._write_pictures(study)
            # The app's pictures replace the batch overlay and thumbnail: the study page colours
            # any finding's map on request, so an upload pays for no rendering it may never show.
            study.row["overlay"] = study.row["thumbnail"] = None
            scorer.write(self.folder, study, pictures=False)
        with self._lock:
            index = self._parts
            self._parts += 1
        with atomic_path(self.folder / "parts" / f"part-{self.run_id}-{index:06d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist([s.row for s in studies], schema=SCHEMA), tmp)
        facts = []
        for study in studies:
            self._index.setdefault(study.row["sha256"], study.row["json"])
            facts.append(json.loads((self.folder / study.row["json"]).read_text()))
        return facts

    def _write_pictures(self, study: ScoredStudy) -> None:
        """The radiograph at display size, the local branch's crop, and the maps on the feature grid."""
        folder = self.folder / PICTURES / output_name(study.row["study_id"])
        save_png(Image.fromarray(np.rint(np.clip(study.display, 0, 1) * 255).astype(np.uint8)), folder / "radiograph.png")
        save_png(Image.fromarray(study.crop), folder / "crop.png")
        # Every class's map at the feature grid's resolution (14 x h/32 x w/32 numbers): the page
        # upsamples one with ScoredStudy.cams_for, the scoring code's own placement on the picture.
        atomic_write_json(folder / "maps.json", {
            "box": [int(v) for v in study.display_box], "cam_region": [int(v) for v in study.cam_region],
            "cam_grid": np.round(study.cam_grid.astype(np.float64), 5).tolist()})

    def close(self) -> None:
        """Fold this and earlier app runs' parts into scores.parquet (the app is stopping)."""
        if any((self.folder / "parts").glob("part-*.parquet")):
            consolidate(self.folder)

"""The studies of a scoring run: the input manifest of a folder, and one study on its way
through the pipeline.

A study is keyed by (content sha256, model digest): `row_key` is that key, the one place it
is built, for the plan (what is new), the fold (first row per key wins), the report and the
app's runs browser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.core.digest import file_sha256
from cxr.core.errors import DataError


@dataclass
class Study:
    """A study on its way through the pipeline (small and picklable until it is prepared)."""

    study_id: str
    path: Path
    sha256: str | None
    reason: str | None = None  # set when the manifest, the loader or the precheck refused the file
    precheck: str | None = None  # the precheck's reason when it found the file not a chest radiograph
    pixels: np.ndarray | None = None  # (S, S) uint8 network input
    display: np.ndarray | None = None  # (h, w) float32 [0, 1] for the pictures
    shape: tuple[int, int] | None = None  # (H, W) of the original image

    def fresh(self) -> "Study":
        """A copy without decoded pixels: a shard's studies may be reused by the caller."""
        return Study(self.study_id, self.path, self.sha256, self.reason)


def row_key(sha256: str | None, source_path: str | Path, digest: str) -> str:
    """The identity of a row: (content sha256, model digest). A file that could not even be
    read has no content hash: it is keyed by its path instead."""
    return (sha256 if isinstance(sha256, str) else f"path:{source_path}") + "|" + digest


def row_keys(df: pd.DataFrame) -> pd.Series:
    """`row_key` of every row of a scores table (columns sha256, source_path, model_digest)."""
    return pd.Series([row_key(s, p, d) for s, p, d in zip(df["sha256"], df["source_path"], df["model_digest"])],
                     index=df.index, dtype=object)


def reason_of(exc: DataError) -> str:
    """What was wrong, without the file name: the row already names the file."""
    text = str(exc)
    return text[len(exc.where) + 2 :] if exc.where and text.startswith(f"{exc.where}: ") else text


def sha_or_reason(path: Path) -> tuple[str | None, str | None]:
    """(sha256, None) for a readable file, (None, why not) otherwise."""
    try:
        return file_sha256(path), None
    except DataError as exc:
        return None, reason_of(exc)


def output_name(study_id: str) -> str:
    """A file-name-safe stem for a study's outputs ('a/b c.png' -> 'a__b_c.png')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", study_id.replace("/", "__"))


def list_studies(input_dir: Path, max_bytes: int | None = None) -> pd.DataFrame:
    """The input manifest: one row per non-hidden file (or link) under `input_dir`, sorted.

    Columns: study_id (path relative to the folder), path, size_bytes (None when not present
    or not looked at), output_name, inside (resolves inside the folder), reason (why the file
    will not be read, else None). A file or link resolving outside the folder is never opened
    (not even its size is taken). DataError when the folder is missing or holds no files.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError("input folder not found (or not a folder)", where=str(input_dir))
    root = input_dir.resolve()
    rows = []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        # Folders (and links to them: rglob does not descend those) are walked, not scored;
        # a dangling link is kept so that it shows up as a missing file.
        if any(part.startswith(".") for part in rel.parts) or not (path.is_file() or (path.is_symlink() and not path.exists())):
            continue
        target = path.resolve()
        inside = target == root or root in target.parents
        size = reason = None
        if not inside:
            reason = "resolves outside the input folder"
        else:
            try:
                size = path.stat().st_size
            except OSError:
                reason = "file not found (a dangling link, or removed while listing)"
        if size == 0:
            reason = "empty file"
        elif size is not None and max_bytes is not None and size > max_bytes:
            reason = f"file of {size} bytes is over the limit of {max_bytes} bytes (score.max_bytes)"
        rows.append({"study_id": rel.as_posix(), "path": path, "size_bytes": size,
                     "output_name": output_name(rel.as_posix()), "inside": inside, "reason": reason})
    if not rows:
        raise DataError("input folder holds no files to score", where=str(input_dir))
    return pd.DataFrame(rows).astype({"size_bytes": "Int64"})

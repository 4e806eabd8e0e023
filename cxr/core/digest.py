"""The one content digest (SHA-256) of files: weights, sources, studies and bundles are keyed by it."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cxr.core.errors import DataError


@contextlib.contextmanager
def reading(path: str | os.PathLike):
    """Turn the OS's reasons for not reading a file into a DataError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError("file not found", where=str(path)) from None
    except IsADirectoryError:
        raise DataError("is a directory, not an image file", where=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})", where=str(path)) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks; DataError naming the file when unreadable."""
    path = Path(path)
    digest = hashlib.sha256()
    with reading(path):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def text_sha256(*parts: str) -> str:
    """Hex SHA-256 of strings joined (a digest of digests: a model, a data version)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()

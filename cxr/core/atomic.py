"""The one atomic writer: write to a temporary file beside the target, fsync, rename.

Readers see either the previous complete file or the new complete one, never a half-written
output, even when the process is killed or the disk fills up mid-write.

Many small files that become valid together (a scoring batch's JSON and pictures, made
valid by the batch's part file) can defer the flush to disk: `atomic_path(..., durable=False)`
still renames a complete file into place (a killed process never leaves a half-written one),
and `make_durable(paths)` then flushes them and their folders once, before the file that
commits them is written. One fsync per folder per batch, not one per file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterator


# Temporary names: `.<target name>.<pid>-<n>.tmp`, unique within a process without a random draw.
_SERIAL = itertools.count()


def _open_temp(target: Path) -> tuple[int, Path]:
    """A new empty temporary file beside `target`: its descriptor (open for writing) and path.

    Created exclusively (a leftover of an earlier process with the same pid is stepped over),
    with the mode a plain open() gives under the umask (0644 usually, not mkstemp's 0600), so
    a colleague, the web server's user or a DVC share can read the output. The folder is made
    when the create finds none, not checked before every write: scoring writes three files a
    study.
    """
    for _ in range(1000):
        tmp = target.parent / f".{target.name}.{os.getpid()}-{next(_SERIAL)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def _fsync(path: Path) -> None:
    """Flush one file or folder to disk (errors raised)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry itself is on disk. Some file
    # systems cannot open or fsync a folder: the file itself is already flushed then.
    with contextlib.suppress(OSError):
        _fsync(directory)


def make_durable(paths) -> None:
    """Flush files written with `atomic_path(..., durable=False)` and their folders to disk
    (each folder once): after this returns they survive a power cut, like a durable write.
    A path that does not exist is skipped (nothing was written there)."""
    folders = {}
    for path in map(Path, paths):
        try:
            _fsync(path)
        except FileNotFoundError:
            continue
        folders.setdefault(path.parent, None)
    for folder in folders:
        _fsync_dir(folder)


@contextlib.contextmanager
def _replacing(target: Path, durable: bool) -> Iterator[tuple[int, Path]]:
    """A new temporary file beside `target`, open for writing: (descriptor, path). On success
    the descriptor is closed, the file flushed (unless `durable=False`) and renamed over
    `target`, and the folder flushed; on any exception the temporary file is removed and the
    previous `target` is left untouched."""
    fd, tmp = _open_temp(target)
    try:
        try:
            yield fd, tmp
        finally:
            os.close(fd)
        if durable:
            _fsync(tmp)
        os.replace(tmp, target)
        if durable:
            _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `target`.

    Writers that need a path (pyarrow, PIL, safetensors) write there; on any exception the
    temporary file is removed and the previous `target` is left untouched. `durable=False`
    leaves the flush to a later `make_durable` (the rename is atomic either way).
    """
    with _replacing(Path(target), durable) as (_, tmp):
        yield tmp


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """`data` as `target`, atomically: written through the temporary file's own descriptor
    (no second open), flushed before the rename unless `durable=False`."""
    with _replacing(Path(target), durable) as (fd, _):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def atomic_write_text(target: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), durable=durable)


def atomic_write_json(target: str | os.PathLike, obj, *, durable: bool = True) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable=durable)

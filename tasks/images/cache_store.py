"""A versioned, Parquet-indexed store of fixed-shape arrays: the format of the image and crop caches.

Layout under a cache root (e.g. data/cache/crops):

    index.parquet            the published index: one row per cached item (item_id, shard,
                             offset, ...); its schema metadata ("cxr_cache", JSON) holds the
                             cache key, the build params, the array specs and the version folder
    v-<key16>/               one build; every chunk i of it is
        shard-<i>.<array>    raw C-order bytes, (n_i, *shape) of the array's dtype
        chunk-<i>.parquet    the chunk's rows, cached and rejected; written last = chunk done
    v-<key16>/rejects.parquet  items that could not be cached, with the reason

Builds are resumable (a chunk whose chunk-<i>.parquet exists is not redone) and are
published by atomically replacing `index.parquet`, so a reader sees the previous complete
cache or the new one, never a half-written one. Old versions are removed only after
publishing; a `CacheReader` opens every shard file of its version when it is created, so
a reader opened before a rebuild keeps reading its (unlinked, still open) files.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr.core.atomic import atomic_path
from cxr.core.errors import DataError

INDEX = "index.parquet"
META_KEY = b"cxr_cache"


@dataclass(frozen=True)
class ArraySpec:
    """One array stored per item: dtype name and per-item shape."""

    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


def version_dir(root: Path, key: str) -> Path:
    return Path(root) / f"v-{key[:16]}"


def _chunk_name(i: int) -> str:
    return f"chunk-{i:05d}.parquet"


def _shard_name(i: int, array: str) -> str:
    return f"shard-{i:05d}.{array}"


def chunk_done(root: Path, key: str, i: int) -> bool:
    return (version_dir(root, key) / _chunk_name(i)).exists()


def write_chunk(root: Path, key: str, i: int, rows: dict, arrays: dict[str, np.ndarray], reasons: list[str | None]) -> None:
    """Write chunk `i`: the arrays of its cached items, then its rows (the commit marker).

    rows: column name -> list, one entry per item of the chunk (cached or not), must hold
    "item_id"; reasons: None for a cached item, else why it was rejected. arrays: name ->
    (n_cached, *shape), in the order of the cached items.
    """
    vdir = version_dir(root, key)
    vdir.mkdir(parents=True, exist_ok=True)
    for name, values in arrays.items():
        with atomic_path(vdir / _shard_name(i, name)) as tmp:
            np.ascontiguousarray(values).tofile(tmp)
    cached = np.array([r is None for r in reasons], dtype=bool)
    offset = np.full(len(reasons), -1, dtype=np.int32)
    offset[cached] = np.arange(int(cached.sum()), dtype=np.int32)
    table = pa.table({**rows, "shard": pa.array(np.full(len(reasons), i, dtype=np.int32)),
                      "offset": pa.array(offset), "reject_reason": pa.array(reasons, type=pa.string())})
    with atomic_path(vdir / _chunk_name(i)) as tmp:
        pq.write_table(table, tmp)


def publish(root: Path, key: str, n_chunks: int, meta: dict, arrays: dict[str, ArraySpec]) -> dict:
    """Join the chunks of a finished build into the index and publish it atomically.

    Returns the published metadata. Raises DataError when a chunk is missing (build not done).
    """
    root, vdir = Path(root), version_dir(root, key)
    missing = [i for i in range(n_chunks) if not chunk_done(root, key, i)]
    if missing:
        raise DataError(f"cannot publish: {len(missing)} of {n_chunks} chunks are not built", where=str(vdir))
    # Every chunk is done, so a temporary file left here can only be from a writer that was
    # killed mid-chunk (its chunk was then built again): sweep it before publishing.
    for stale in vdir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    table = pa.concat_tables([pq.read_table(vdir / _chunk_name(i)) for i in range(n_chunks)])
    rejected = pc.invert(pc.is_null(table["reject_reason"]))
    rejects = table.filter(rejected).select(["item_id", "reject_reason"])
    index = table.filter(pc.invert(rejected)).drop_columns(["reject_reason"])
    full = {**meta, "key": key, "version": vdir.name, "arrays": {n: s.to_json() for n, s in arrays.items()},
            "items": index.num_rows, "rejected": rejects.num_rows, "rejects": f"{vdir.name}/rejects.parquet"}
    with atomic_path(vdir / "rejects.parquet") as tmp:
        pq.write_table(rejects, tmp)
    index = index.replace_schema_metadata({META_KEY: json.dumps(full, sort_keys=True).encode()})
    with atomic_path(vdir / INDEX) as tmp:  # the version's own copy, for inspection
        pq.write_table(index, tmp)
    with atomic_path(root / INDEX) as tmp:  # the switch readers see
        pq.write_table(index, tmp)
    # Only now is it safe to drop other versions: open readers keep their files' handles.
    for other in root.glob("v-*"):
        if other.is_dir() and other.name != vdir.name:
            shutil.rmtree(other, ignore_errors=True)
    return full


def published_meta(root: Path) -> dict | None:
    """The published index's metadata (key, params, counts), or None when nothing is published."""
    path = Path(root) / INDEX
    if not path.exists():
        return None
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw[META_KEY]) if META_KEY in raw else None


def read_rejects(root: Path) -> "pa.Table":
    meta = published_meta(root)
    if meta is None:
        raise DataError("no cache is published here", where=str(root))
    return pq.read_table(Path(root) / meta["rejects"])


class CacheReader:
    """Random access by item id to one published version, safe to share with DataLoader workers.

    The index is read once; every shard file is opened (a file descriptor) at construction.
    `get` reads items by absolute offset (pread), so forked workers share the descriptors and
    a reader's resident memory is what it returns; `item` is a view into a shard memory-mapped
    lazily on first use.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / INDEX
        if not path.exists():
            raise DataError("no cache is published here; build it first (`cxr cache ...`)", where=str(self.root))
        self.index = pq.read_table(path)
        self.meta = json.loads(self.index.schema.metadata[META_KEY])
        self.key = self.meta["key"]
        self.arrays = {n: ArraySpec(s["dtype"], tuple(s["shape"])) for n, s in self.meta["arrays"].items()}
        self.ids = self.index["item_id"].to_pylist()
        self.position = {item: i for i, item in enumerate(self.ids)}
        self._shard = self.index["shard"].to_numpy()
        self._offset = self.index["offset"].to_numpy()
        self._open()

    def _open(self) -> None:
        vdir = self.root / self.meta["version"]
        self._fds, self._maps = {}, {}
        for shard in np.unique(self._shard).tolist():
            for name in self.arrays:
                self._fds[(shard, name)] = os.open(vdir / _shard_name(shard, name), os.O_RDONLY)

    def __getstate__(self):  # spawned workers reopen by path; fds and maps do not pickle
        state = self.__dict__.copy()
        state["_fds"], state["_maps"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __del__(self):
        for fd in (getattr(self, "_fds", None) or {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.position

    def _array(self, shard: int, name: str) -> np.ndarray:
        got = self._maps.get((shard, name))
        if got is None:
            spec = self.arrays[name]
            fd = self._fds[(shard, name)]
            item = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
            size = os.fstat(fd).st_size
            if size == 0:
                got = np.empty((0, *spec.shape), dtype=spec.dtype)
            else:
                # mmap reads by absolute offset: safe with descriptors shared across fork.
                buf = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
                got = np.frombuffer(buf, dtype=spec.dtype, count=size // item * int(np.prod(spec.shape))).reshape(-1, *spec.shape)
            self._maps[(shard, name)] = got
        return got

    def rows(self, ids) -> np.ndarray:
        """Index positions of `ids`; DataError naming the first few that are not cached."""
        try:
            return np.fromiter((self.position[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError:
            missing = [i for i in ids if i not in self.position]
            raise DataError(f"{len(missing)} items are not in the cache (e.g. {missing[:3]})", where=str(self.root)) from None

    def get(self, name: str, rows) -> np.ndarray:
        """(len(rows), *shape) copy of array `name` for index positions `rows`, in order.

        Read with pread into the result, not through the memory map: the pages stay in the
        kernel's page cache (shared, reclaimable) but never enter this process's resident set,
        so reading a whole split batch by batch keeps RSS at one batch, whatever the split's
        size. A run of consecutive items in one shard is one read (a sequential scan reads
        each shard once, a shuffled batch one read per item).
        """
        rows = np.asarray(rows, dtype=np.int64)
        spec = self.arrays[name]
        out = np.empty((len(rows), *spec.shape), dtype=spec.dtype)
        if not len(rows):
            return out
        nbytes = out.itemsize * int(np.prod(spec.shape, dtype=np.int64))
        raw = out.reshape(len(rows), -1).view(np.uint8)  # (n, nbytes) bytes of the result
        shard, offset = self._shard[rows], self._offset[rows].astype(np.int64)
        cut = (np.flatnonzero((shard[1:] != shard[:-1]) | (offset[1:] != offset[:-1] + 1)) + 1).tolist()
        for a, b in zip([0, *cut], [*cut, len(rows)]):
            self._read(int(shard[a]), name, raw[a:b], int(offset[a]) * nbytes)
        return out

    def _read(self, shard: int, name: str, into: np.ndarray, at: int) -> None:
        """Fill `into` (contiguous bytes) from shard file `shard` of `name` at byte `at`; a
        shard shorter than its index says is a DataError (a damaged cache), never garbage."""
        view, done = memoryview(into).cast("B"), 0
        fd = self._fds[(shard, name)]
        while done < len(view):
            got = os.preadv(fd, [view[done:]], at + done)  # by absolute offset: safe across fork
            if got == 0:
                raise DataError(f"shard {_shard_name(shard, name)} is shorter than the index says; rebuild the cache",
                                where=str(self.root / self.meta["version"]))
            done += got

    def item(self, name: str, row: int) -> np.ndarray:
        """One item's array (a read-only view into the map)."""
        return self._array(int(self._shard[row]), name)[int(self._offset[row])]

    def column(self, name: str) -> np.ndarray:
        return self.index[name].to_numpy(zero_copy_only=False)

"""Benchmark: images per second from 1024x1024 source PNGs (the one loader) vs from the image cache.

Run from the repository root:  .venv/bin/python benchmarks/bench_image_cache.py
Writes benchmarks/results/image_cache.json. Both paths deliver the same (224, 224) uint8
pixels, read in a shuffled order one image at a time, as a DataLoader's dataset does; the
two are timed in alternating rounds so background load hits both alike.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import publish  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tasks.images.cache_store import CacheReader  # noqa: E402
from tasks.images.image_cache import build_image_cache  # noqa: E402
from tasks.images.loader import load_image_uint8  # noqa: E402
from tasks.metadata.synth import anatomy  # noqa: E402

N, SOURCE, SIZE, ROUNDS = 200, 1024, 224, 3


def make_sources(folder: Path) -> list[str]:
    """NIH-sized 8-bit PNGs: a chest-like background plus per-image noise (so PNG cannot
    compress them to nothing, as with real films)."""
    rng = np.random.default_rng(0)
    bases = [anatomy(SOURCE, rng) for _ in range(4)]
    ids = []
    for i in range(N):
        image = bases[i % 4] + rng.normal(0, 0.03, (SOURCE, SOURCE))
        name = f"{i:08d}_000.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        ids.append(name)
    return ids


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        ids = make_sources(tmp / "images")
        t0 = time.perf_counter()
        build_image_cache(tmp / "images", ids, tmp / "cache", SIZE, shard_images=64)
        build_s = time.perf_counter() - t0
        order = np.random.default_rng(1).permutation(N)
        source_s, cache_s = [], []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for i in order:
                load_image_uint8(tmp / "images" / ids[i], SIZE)
            source_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reader = CacheReader(tmp / "cache")  # opened per round, as a fresh worker would
            for i in order:
                np.array(reader.item("pixels", reader.position[ids[i]]))
            cache_s.append(time.perf_counter() - t0)
            check = reader.get("pixels", reader.rows(ids[:3]))
        assert all(np.array_equal(check[k], load_image_uint8(tmp / "images" / ids[k], SIZE)) for k in range(3))
    source_ips, cache_ips = N / min(source_s), N / min(cache_s)
    result = {
        "benchmark": "image_cache", "images": N, "source": f"{SOURCE}x{SOURCE} 8-bit PNG", "cache_size": SIZE,
        "source_images_per_s": round(source_ips, 1), "cache_images_per_s": round(cache_ips, 1),
        "ratio": round(cache_ips / source_ips, 1), "target_ratio": 20, "build_s": round(build_s, 2),
        "python": platform.python_version(), "machine": platform.machine(),
    }
    publish("image_cache", result)
    print(f"image cache: {result['ratio']}x more images per second than decoding the PNGs (target >= 20x)")


if __name__ == "__main__":
    main()

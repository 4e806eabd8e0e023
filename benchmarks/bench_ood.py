"""The model-free out-of-distribution precheck: what it catches and what it costs.

Detection on the generated non-chest corpus (tasks/evaluation/ood_corpus.py; near cases apart) and on gray
pictures outside it (scikit-image's colour samples as gray, patterns), the pass
rate of real radiographs (the 800-image NIH sample the reference was fitted on, plus the
reference's own out-of-fold pass rates, which are the honest held-out figure) and of fresh
synthetic renderings (another seed than the reference's), and the cost: decoding with facts
plus the precheck against the baseline of decoding alone (what every scored file pays anyway).

    python benchmarks/bench_ood.py      # needs ../shared/data; writes benchmarks/results/ood.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import publish  # noqa: E402
from cxr.core.labels import PATHOLOGIES  # noqa: E402
from tasks.scoring import precheck as ood  # noqa: E402
from tasks.images.loader import load_image  # noqa: E402
from tasks.evaluation.ood_corpus import FAR, NEAR, SHARED_STUDIES, make_ood_corpus  # noqa: E402
from tasks.metadata.synth import anatomy, render_image  # noqa: E402

NIH = SHARED_STUDIES.parent / "nih-sample-64" / "images"


def _check(path: Path) -> str | None:
    facts: dict = {}
    return ood.precheck(load_image(path, facts=facts), facts)


def _gray_photos() -> dict[str, np.ndarray]:
    """Pictures the corpus holds only in colour (or not at all), as gray: the statistics, not the
    colour check, must refuse them."""
    import skimage.color
    import skimage.data

    out = {f"{n} (gray)": skimage.color.rgb2gray(getattr(skimage.data, n)()[..., :3])
           for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                     "colorwheel", "logo")}
    out["stereo_motorcycle (gray)"] = skimage.color.rgb2gray(skimage.data.stereo_motorcycle()[0])
    out["microaneurysms"] = skimage.data.microaneurysms() / 255.0
    out["checkerboard"] = skimage.data.checkerboard() / 255.0
    out["binary_blobs"] = skimage.data.binary_blobs().astype(np.float64)
    return out


def _timed(paths: list[Path], fn, rounds: int = 3) -> float:
    """Best-of-rounds seconds per file."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best


def main() -> int:
    if not NIH.is_dir():
        print(f"the shared NIH sample is absent ({NIH}); nothing to measure", file=sys.stderr)
        return 1
    reference = json.loads(ood.REFERENCE_FILE.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_ood_corpus(tmp, SHARED_STUDIES)
        items = {name: _check(Path(tmp) / name) for name in sorted(manifest)}
        corpus = {kind: {"items": sum(k == kind for k in manifest.values()),
                         "refused": sum(items[n] is not None for n, k in manifest.items() if k == kind),
                         "passed": sorted(n for n, k in manifest.items() if k == kind and items[n] is None)}
                  for kind in (FAR, NEAR)}
        big = [Path(tmp) / n for n in ("photo_colour_astronaut.png", "photo_gray_camera.png", "text_page.png")]
        big_decode = _timed(big, load_image)
        big_checked = _timed(big, _check)
    gray = {name: ood.precheck(np.asarray(img, dtype=np.float32), {}) for name, img in _gray_photos().items()}
    nih = sorted(NIH.glob("*.png"))
    nih_refused = [p.name for p in nih if _check(p) is not None]
    studies = [SHARED_STUDIES / "00000001_000.png", SHARED_STUDIES / "Fake_MONOHR1.dcm"]
    rng = np.random.default_rng(7)
    synth_refused = 0
    for i in range(300):
        size = (128, 96, 192)[i % 3]
        pixels, _ = render_image(size, anatomy(size, rng), list(rng.choice(PATHOLOGIES, size=int(rng.integers(0, 4)), replace=False)), rng)
        synth_refused += ood.precheck(pixels / 255.0, {}) is not None
    decode = _timed(nih[:200], load_image)
    checked = _timed(nih[:200], _check)
    big_studies_decode = _timed(studies, load_image)
    big_studies_checked = _timed(studies, _check)
    publish("ood", {
        "precheck_limit": round(reference["limit"], 3),
        "far_detection": round(corpus[FAR]["refused"] / corpus[FAR]["items"], 4), "far": corpus[FAR],
        "near_detection": round(corpus[NEAR]["refused"] / corpus[NEAR]["items"], 4), "near": corpus[NEAR],
        "gray_pictures_outside_corpus": {"items": len(gray), "refused": sum(v is not None for v in gray.values()),
                                         "passed": sorted(n for n, v in gray.items() if v is None)},
        "nih_sample_pass_rate_in_fit": round(1 - len(nih_refused) / len(nih), 4), "nih_sample_refused": nih_refused,
        "nih_sample_pass_rate_out_of_fold": reference["heldout_pass_rate"],
        "real_studies_passed": {p.name: _check(p) is None for p in studies},
        "synthetic_fresh_pass_rate": round(1 - synth_refused / 300, 4),
        "cost_64px_ms": {"decode": round(decode * 1e3, 3), "decode_facts_precheck": round(checked * 1e3, 3),
                         "ratio": round(checked / decode, 2)},
        "cost_photos_ms": {"decode": round(big_decode * 1e3, 3), "decode_facts_precheck": round(big_checked * 1e3, 3),
                           "ratio": round(big_checked / big_decode, 2)},
        "cost_full_size_films_ms": {"decode": round(big_studies_decode * 1e3, 3),
                                    "decode_facts_precheck": round(big_studies_checked * 1e3, 3),
                                    "ratio": round(big_studies_checked / big_studies_decode, 2)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

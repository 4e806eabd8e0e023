"""The prepared GPU check keeps working: its CPU dry run (`--device cpu --tiny`) in a subprocess
that refuses the packages the GPU machine lacks, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "gpu_check.py"

# Import the check as the GPU machine would: any of these is missing there, so importing one fails.
_RUN = """
import importlib.abc, runpy, sys
MISSING = ("prefect", "great_expectations", "dvc", "pydicom", "highdicom", "dicomweb_client", "dask", "distributed")
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ImportError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, Missing())
script, out = sys.argv[1:]
sys.argv = [script, "--device", "cpu", "--tiny", "--out", out]
runpy.run_path(script, run_name="__main__")
"""


def _positive_numbers(node, path=""):
    """(path, value) of every number in the JSON that is not > 0 (bools and counts of errors aside)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _positive_numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _positive_numbers(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and not node > 0:
        yield path, node


def test_gpu_check_dry_run(tmp_path):
    done = subprocess.run([sys.executable, "-c", _RUN, str(SCRIPT), str(tmp_path)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["errors"] == {} and result["forbidden_imports"] == []
    for key in ("stage_i", "stage_ii", "stage_iii_local_forward", "loader", "crop_cache", "attention", "scoring",
                "archive_extrapolated", "section_seconds", "total_seconds"):
        assert key in result, key
    assert result["stage_i"]["fp32"]["images_per_s"] > 0 and result["stage_i"]["fp32"]["finite_loss"]
    assert result["loader"]["images_per_s"] > 0 and result["loader"]["over_stage_i"] > 0 and result["loader"]["finite"]
    assert result["crop_cache"]["fp32"]["boxes_inside_input"]
    assert result["attention"]["same_boxes"], "batched attention boxes differ from the per-image loop"
    scoring = result["scoring"]
    assert scoring["end_to_end_studies_per_s"] > 0 and 0 < scoring["ratio"]
    assert scoring["pictures_written"] == 2 * scoring["studies"]  # an overlay and a thumbnail per study
    archive = result["archive_extrapolated"]
    assert archive["train_images"] + archive["test_images"] < 112_120
    for key in ("stage_i_epoch_s", "stage_ii_epoch_s", "stage_iii_epoch_s", "crop_cache_build_s", "score_test_split_s"):
        assert archive[key] > 0, key
    # Every number the check measures is a rate, a size or a duration: none may be zero or negative
    # (a count of refused studies and the rounded time of a section that only computes may be 0).
    bad = [(p, v) for p, v in _positive_numbers({k: v for k, v in result.items() if k not in ("errors", "section_seconds")})
           if not p.endswith("_refused")]
    assert not bad, bad

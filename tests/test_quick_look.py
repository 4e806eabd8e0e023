"""The quick look (`cxr.core.expectations.quick_check`) reads the same suite definitions as the
Great Expectations gate: on every faulty metadata file it refuses what the gate refuses, in the
gate's words, and passes what the gate passes; and a command's check of its input loads neither
Great Expectations nor Prefect."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest

from cxr.core.errors import DataError
from tasks.metadata.ingest import read_metadata_csv, run_ingest
from tasks.metadata.split import patient_split
from tasks.metadata.suites import validate_metadata, validate_split
from tests.data.make_bad_metadata import make_bad_metadata

RATIOS = {"train": 0.7, "valid": 0.1, "test": 0.2}


def _verdict(call) -> str | None:
    try:
        call()
    except DataError as exc:
        return str(exc)
    return None


def test_quick_look_and_gate_agree_on_every_faulty_metadata_file(sample_csv, tmp_path):
    manifest = make_bad_metadata(sample_csv, tmp_path / "bad")
    for name, pattern in sorted(manifest.items()):
        path = tmp_path / "bad" / name
        try:
            df = read_metadata_csv(path)
        except DataError as exc:  # refused while reading: before either look
            assert re.search(pattern, str(exc)), (name, str(exc))
            continue
        quick = _verdict(lambda: validate_metadata(df, tmp_path / "v", source=name, quick=True))
        gate = _verdict(lambda: validate_metadata(df, tmp_path / "v", source=name))
        assert gate is not None and re.search(pattern, gate), (name, gate)
        assert quick is not None, f"{name}: the gate refuses it ({gate}) but the quick look passes it"
        assert re.search(pattern, quick), (name, quick)
    good = read_metadata_csv(sample_csv)
    assert validate_metadata(good, tmp_path / "v", quick=True) is None
    assert validate_metadata(good, tmp_path / "v")["success"]


def test_quick_look_refuses_a_leaking_split_like_the_gate(sample_csv, tmp_path):
    meta = read_metadata_csv(sample_csv)
    splits = patient_split(meta, RATIOS, seed=0)
    assert validate_split(splits, RATIOS, 0.05, tmp_path / "v", quick=True) is None
    leaky = splits.copy()
    one = leaky.index[leaky["patient_id"] == leaky["patient_id"].value_counts().index[0]]
    leaky.loc[one[:1], "split"] = "test"
    leaky.loc[one[1:2], "split"] = "train"
    messages = [_verdict(lambda: validate_split(leaky, RATIOS, 0.05, tmp_path / "v", quick=q)) for q in (True, False)]
    assert all(m and "patient leakage" in m for m in messages), messages


def test_checking_an_input_loads_neither_great_expectations_nor_prefect(sample_csv, tmp_path):
    bad = tmp_path / "bad.csv"
    frame = pd.read_csv(sample_csv)
    frame.loc[3, "Patient Age"] = 4000
    frame.to_csv(bad, index=False)
    code = (
        "import sys\n"
        "from cxr.core.errors import DataError\n"
        "from tasks.metadata.ingest import run_ingest\n"
        f"try:\n    run_ingest({str(bad)!r}, {str(tmp_path / 'out')!r}, check_only=True)\n"
        "except DataError as exc:\n    print(exc)\n"
        "print(sorted(m for m in ('great_expectations', 'prefect') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "age outside 0–120: 4000" in out and out.strip().endswith("[]"), out
    assert not (tmp_path / "out").exists()  # nothing written by the check
    with pytest.raises(DataError, match="age outside"):
        run_ingest(bad, tmp_path / "out")

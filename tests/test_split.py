"""Patient-level split, stratification of rare classes and the class-weight formula."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS
from tasks.metadata.ingest import packaged_metadata_path, read_metadata_csv, write_metadata
from tasks.metadata.split import class_weights, patient_split, read_assignments, run_split

RATIOS = {"train": 0.7, "valid": 0.1, "test": 0.2}


@pytest.fixture(scope="module")
def full():
    return read_metadata_csv(packaged_metadata_path())


def test_full_split_is_patient_level_stratified_and_deterministic(full):
    splits = patient_split(full, RATIOS, seed=42)
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    fractions = splits["split"].value_counts(normalize=True)
    for name, ratio in RATIOS.items():
        assert abs(fractions[name] - ratio) < 0.01
    merged = full.assign(split=splits["split"].to_numpy())
    hernia = merged.groupby("split")["hernia"].sum()
    assert (hernia > 0).all() and set(hernia.index) == set(RATIOS)
    # Every class is within 3 points of its ratio in every split.
    share = merged.groupby("split")[list(LABEL_COLUMNS)].sum() / merged[list(LABEL_COLUMNS)].sum()
    for name, ratio in RATIOS.items():
        assert (share.loc[name] - ratio).abs().max() < 0.03
    again = patient_split(full, RATIOS, seed=42)
    assert again.equals(splits)
    other = patient_split(full, RATIOS, seed=7)
    assert not other["split"].equals(splits["split"])


def test_class_weight_formula_balances_each_class(sample_csv):
    meta = read_metadata_csv(sample_csv)
    splits = patient_split(meta, RATIOS, seed=42)
    w = class_weights(meta, splits)
    train = meta[splits["split"].eq("train").to_numpy()]
    pos = train[list(LABEL_COLUMNS)].mean().to_numpy()
    np.testing.assert_allclose(w["pos_freq"], pos, atol=1e-8)
    np.testing.assert_allclose(w["neg_freq"], 1 - pos, atol=1e-8)
    np.testing.assert_allclose(w["pos_weight"], w["neg_freq"])
    np.testing.assert_allclose(w["neg_weight"], w["pos_freq"])
    # Positive and negative contributions to the loss are equal per class.
    np.testing.assert_allclose(np.multiply(w["pos_freq"], w["pos_weight"]), np.multiply(w["neg_freq"], w["neg_weight"]), atol=1e-7)
    assert w["labels"][-1] == "Hernia" and w["n_train_images"] == len(train)


def test_run_split_writes_splits_and_weights(sample_csv, tmp_path):
    meta = read_metadata_csv(sample_csv)
    write_metadata(meta, tmp_path / "interim")
    report = run_split(tmp_path / "interim" / "metadata.parquet", tmp_path / "out", ratios=RATIOS, tolerance=0.05, seed=42)
    splits = pd.read_parquet(tmp_path / "out" / "splits.parquet")
    assert set(splits.columns) >= {"image_id", "split"} and len(splits) == 800
    weights = json.loads((tmp_path / "out" / "class_weights.json").read_text())
    assert set(weights) >= {"labels", "pos_freq", "neg_freq", "pos_weight", "neg_weight"}
    assert sum(report["images"].values()) == 800


def test_real_leaking_third_party_split_is_refused(sample_csv, tmp_path):
    meta = read_metadata_csv(sample_csv)
    write_metadata(meta, tmp_path / "interim")
    (tmp_path / "out").mkdir()
    sentinel = tmp_path / "out" / "splits.parquet"
    sentinel.write_bytes(b"previous good output")
    with pytest.raises(DataError) as info:
        run_split(
            tmp_path / "interim" / "metadata.parquet", tmp_path / "out", ratios=RATIOS, tolerance=0.05, seed=42,
            assignments=sample_csv.parent / "original_split.csv",
        )
    message = str(info.value)
    assert "21" in message and "leak" in message.lower()
    assignments = read_assignments(sample_csv.parent / "original_split.csv", meta)
    straddling = assignments.groupby("patient_id")["split"].nunique()
    leaked = straddling[straddling > 1].index
    assert len(leaked) == 21
    assert str(leaked[0]) in message
    assert sentinel.read_bytes() == b"previous good output"

"""DistributedDataParallel with 2 CPU processes (gloo): equal to one process where the maths
allows it, rank 0 alone writes, and resume works as in one process."""

from __future__ import annotations

import json
import shutil

import torch

from tasks.training.distributed import train_distributed
from tasks.training.stages import train_stage
from tasks.bundle.weights import load_weights
from tests.conftest import sliced_params


def _with(params, tmp_path, name):
    models = tmp_path / name
    shutil.copytree(params.paths.models, models, ignore=shutil.ignore_patterns("checkpoints", "fusion.safetensors", "registry.json"))
    return params.model_copy(update={"paths": params.paths.model_copy(update={"models": models, "metrics": tmp_path / f"{name}-metrics"})})


def test_fusion_stage_ddp_matches_single_process(trained, tmp_path):
    # The fusion head is a linear layer on frozen features: with the global batch split in
    # two halves whose gradients DDP averages, the arithmetic is the single-process one.
    single = _with(trained, tmp_path, "single")
    ddp = _with(trained, tmp_path, "ddp")
    train_stage(single, "fusion", progress=False)
    summary = train_distributed(ddp, "fusion", 2, progress=False)
    assert summary["processes"] == 2
    a, _ = load_weights(single.paths.models / "fusion.safetensors")
    b, _ = load_weights(ddp.paths.models / "fusion.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    one = json.loads((single.paths.metrics / "train_fusion.json").read_text())
    two = json.loads((ddp.paths.metrics / "train_fusion.json").read_text())
    assert abs(one["best_valid_mean_auroc"] - two["best_valid_mean_auroc"]) < 1e-3


def test_ddp_global_stage_resumes_and_only_rank0_writes(workspace, sliced, tmp_path):
    # On the 160-image slice of the split: resume and who writes do not depend on the epoch's size.
    params = sliced_params(workspace, sliced, tmp_path / "g", epochs=2)
    stopped = train_distributed(params, "global", 2, progress=False, stop_after_epoch=0)
    assert stopped["stopped_after_epoch"] == 0
    ckpt = torch.load(params.paths.models / "checkpoints" / "global.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and not any(k.startswith("module.") for k in ckpt["model"])
    summary = train_distributed(params, "global", 2, progress=False)
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    # Epoch 0 was not redone: the final checkpoint keeps the record (with its wall time) of before.
    final = torch.load(params.paths.models / "checkpoints" / "global.pt", weights_only=True)
    assert json.loads(final["history"])[0] == json.loads(ckpt["history"])[0]
    assert [h["epoch"] for h in json.loads(final["history"])] == [0, 1]
    assert sorted(p.name for p in params.paths.models.iterdir()) == ["checkpoints", "global.safetensors"]
    assert [p.name for p in (params.paths.models / "checkpoints").iterdir()] == ["global.pt"]

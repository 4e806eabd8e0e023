"""score.precision: bf16 only where the hardware has bf16 units, and float32 outputs either way."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tasks.scoring.scorer import batch_outputs, cpu_bf16_units, prepare_model, resolve_precision

CPU = torch.device("cpu")


def test_cpu_bf16_units_are_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_bf16_units(info) == ["avx512_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile avx512_bf16\n")
    assert cpu_bf16_units(info) == ["amx_bf16", "avx512_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")  # AVX-512 without bf16 units
    assert cpu_bf16_units(info) == []
    assert cpu_bf16_units(tmp_path / "missing") == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_bf16_falls_back_to_fp32_without_bf16_units(monkeypatch):
    # A handler on the scorer's own logger, enabled at INFO: what other tests in this worker did
    # to the logging tree (Prefect's and the CLI's set-up: levels, propagation, disabled
    # loggers) must not decide what this test sees. pytest's caplog listens on the root only.
    logger = logging.getLogger("cxr.score")
    handler = _Records()
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    try:
        assert resolve_precision("bf16", CPU, units=[]) == "fp32"
        lines = [r.getMessage() for r in handler.records if "score.precision" in r.getMessage()]
        assert len(lines) == 1 and "scoring in fp32" in lines[0] and "avx512_bf16" in lines[0]
        handler.records.clear()
        assert resolve_precision("bf16", CPU, units=["avx512_bf16"]) == "bf16"
        assert resolve_precision("fp32", CPU, units=["amx_bf16"]) == "fp32"  # never bf16 unless asked
        assert not [r for r in handler.records if "score.precision" in r.getMessage()]
    finally:
        logger.removeHandler(handler)


def _model_and_pixels(size: int = 64, n: int = 6):
    from models.agcnn import AGCNN
    from models.branch import build_branch
    from models.fusion import FusionHead
    from tasks.metadata.synth import FINDING_STYLE, anatomy, render_image

    torch.manual_seed(0)
    model = AGCNN(build_branch("resnet18"), build_branch("resnet18"), FusionHead(512, 512), local_size=size).eval()
    rng = np.random.default_rng(0)
    names = sorted(FINDING_STYLE)
    pixels = [render_image(size, anatomy(size, rng), list(rng.choice(names, size=2, replace=False)), rng)[0] for _ in range(n)]
    return model, torch.from_numpy(np.stack(pixels))


@pytest.mark.skipif(not cpu_bf16_units(), reason="this CPU has no bf16 units: bf16 scoring falls back to fp32 here")
def test_bf16_outputs_are_float32_and_close_to_fp32():
    model, pixels = _model_and_pixels()
    fp32 = batch_outputs(model, pixels, CPU, "fp32")
    bf16 = batch_outputs(prepare_model(model, "bf16"), pixels, CPU, "bf16")
    for key in ("global", "local", "fusion", "cams", "pooled"):
        assert bf16[key].dtype == torch.float32, key  # cast before any numpy, gate or threshold work
    assert bf16["boxes"].dtype == fp32["boxes"].dtype and bf16["crops"].dtype == torch.uint8
    # The forward really ran in bf16 (its figures differ from fp32's), and stays close to them.
    assert not torch.equal(bf16["pooled"], fp32["pooled"])
    np.testing.assert_allclose(bf16["fusion"], fp32["fusion"], atol=0.03)
    np.testing.assert_allclose(bf16["cams"], fp32["cams"], atol=0.08)
    # Boxes come from a threshold on float32 features: a bf16 forward moves them by a few pixels at most.
    moved = (bf16["boxes"] - fp32["boxes"]).abs()
    assert int(moved.max()) <= 6, (bf16["boxes"], fp32["boxes"])

"""Fault injection with real processes: SIGKILL mid-epoch and mid-DVC-stage, a full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from cxr.core.digest import file_sha256
from tests.conftest import ROOT, VENV_BIN, clean_env, make_params, run_cxr, sliced_params
from tests.test_orchestration import _fresh_copy


def _params_file(params, path: Path) -> Path:
    data = params.model_dump(mode="json", by_alias=True)
    # The test's own folders, and the split slice's.
    data["paths"]["roots"] = list(data["paths"]["roots"]) + [str(path.parent), str(Path(data["paths"]["processed"]).parent)]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _spawn(args, env, cwd=ROOT):
    full = clean_env({**env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    # Own process group, so SIGKILL reaches every child (DVC runs `cxr` in a shell).
    return subprocess.Popen(args, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill point: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("kill point not reached")


def _checkpoint_epoch(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except Exception:
        return -1


def test_sigkill_mid_epoch_resumes_to_the_uninterrupted_result(workspace, sliced, tmp_path, prefect_server):
    # On the 160-image slice of the split: what a kill and a resume keep does not depend on the
    # epoch's size, and three epochs of it cost a fifth of the full sample's.
    clean = sliced_params(workspace, sliced, tmp_path / "c", epochs=3)
    killed = sliced_params(workspace, sliced, tmp_path / "k", epochs=3)
    killed = killed.model_copy(update={"paths": killed.paths.model_copy(update={
        "models": tmp_path / "killed", "metrics": tmp_path / "mk"})})
    clean = clean.model_copy(update={"paths": clean.paths.model_copy(update={
        "models": tmp_path / "clean", "metrics": tmp_path / "mc"})})
    params_file = _params_file(killed, tmp_path / "params.yaml")
    ckpt = tmp_path / "killed" / "checkpoints" / "global.pt"

    proc = _spawn([str(VENV_BIN / "cxr"), "--params", str(params_file), "train", "--stage", "global"], {"PREFECT_API_URL": prefect_server})
    # Kill inside epoch 2: epoch 1 (index 0) is checkpointed, epoch 2 is running.
    _wait_for(lambda: _checkpoint_epoch(ckpt) == 0, proc)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "global.safetensors").exists()
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert before["epoch"] == 0

    resumed = run_cxr("--params", str(params_file), "train", "--stage", "global")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    import json

    history = json.loads((tmp_path / "mk" / "train_global.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # Epoch 0 was not redone: its record in the checkpoint, with its wall time (kept out of the
    # metrics file, a DVC output), is the one from before the kill.
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert json.loads(after["history"])[0] == json.loads(before["history"])[0]

    # The reference runs the same way, as a command: same process setup, same float arithmetic.
    reference = run_cxr("--params", str(_params_file(clean, tmp_path / "clean.yaml")), "train", "--stage", "global")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert file_sha256(tmp_path / "clean" / "global.safetensors") == file_sha256(tmp_path / "killed" / "global.safetensors")


def test_sigkill_during_a_dvc_stage_then_repro_completes_bitwise(tmp_path, prefect_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    _fresh_copy(repo)
    env = {"PREFECT_API_URL": prefect_server}
    proc = _spawn([str(VENV_BIN / "dvc"), "repro", "synth"], env, cwd=repo)
    images = repo / "data" / "raw" / "images"
    _wait_for(lambda: images.exists() and len(os.listdir(images)) > 50, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # DVC's own lock is stale after a SIGKILL; rerunning must still work.
    full = clean_env({**env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    done = subprocess.run([str(VENV_BIN / "dvc"), "repro", "synth"], cwd=repo, env=full, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # The committed dvc.lock holds the hashes of an uninterrupted run with these params.
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["synth"]["outs"]
    rerun = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["synth"]["outs"]
    assert {o["path"]: o["md5"] for o in rerun} == {o["path"]: o["md5"] for o in committed}


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_keeps_previous_output_and_says_so(workspace, tiny_disk, prefect_server):
    params = make_params(workspace)
    out = tiny_disk / "processed"
    out.mkdir()
    previous = b"previous complete splits"
    (out / "splits.parquet").write_bytes(previous)
    # Leave a few kilobytes: enough to start writing, not enough to finish.
    filler = tiny_disk / "filler"
    free = shutil.disk_usage(tiny_disk).free
    filler.write_bytes(b"\0" * max(0, free - 8 * 1024))
    result = run_cxr("split", "--metadata", str(params.paths.interim / "metadata.parquet"), "--out", str(out))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "disk is full" in result.stderr and "previous outputs are intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "splits.parquet").read_bytes() == previous
    assert not [p for p in out.rglob("*.tmp")]


def test_atomic_outputs_get_the_mode_of_any_other_file(tmp_path):
    """Not mkstemp's owner-only 0600: what the umask gives a plain open(), for colleagues and servers."""
    from cxr.core.atomic import atomic_path, atomic_write_bytes

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_path(tmp_path / "b.parquet") as tmp:
        tmp.write_bytes(b"y")
    for name in ("a.bin", "b.parquet"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_deferred_flush_writes_whole_files_and_flushes_each_file_and_folder_once(tmp_path, monkeypatch):
    """A scoring batch's files: renamed into place whole at once, flushed to disk together later
    (`make_durable`), one fsync per file and one per folder; a failed write leaves the old file."""
    import cxr.core.atomic as atomic

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    targets = [tmp_path / "studies" / "a.json", tmp_path / "studies" / "b.json", tmp_path / "overlays" / "a.png"]
    for i, target in enumerate(targets):
        atomic.atomic_write_bytes(target, b"x" * (i + 1), durable=False)
    assert synced == [] and [t.read_bytes() for t in targets] == [b"x", b"xx", b"xxx"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(targets[0], durable=False) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert targets[0].read_bytes() == b"x" and not list(tmp_path.rglob("*.tmp"))

    atomic.make_durable([*map(str, targets), tmp_path / "studies" / "never-written.json"])
    assert sorted(synced) == sorted([*map(str, targets), str(tmp_path / "studies"), str(tmp_path / "overlays")])
    synced.clear()
    atomic.atomic_write_bytes(tmp_path / "c.bin", b"c")  # the default: the file before its rename, then the folder
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".c.bin.") and synced[1] == str(tmp_path)

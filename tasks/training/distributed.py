"""Data-parallel training with PyTorch's DistributedDataParallel.

Two ways in, one code path (`tasks.training.stages.train_stage` reads the process group):
  * `cxr train --stage S --nproc N` spawns N local processes (gloo on the CPU, NCCL on GPUs);
  * `torchrun --nproc_per_node N -m tasks.training.distributed --stage S [--params FILE]` for clusters.
Only rank 0 writes checkpoints, weights and metrics; resume works as in one process.

Under `--nproc`, rank 0's `cxr.*` log records (the epoch lines among them) and progress reports
travel over a queue to the parent, which hands them to its own loggers and progress listeners
in the thread that called `train_distributed`: inside a Prefect task run they land in that
run's logs and progress artifact, as they do for one process. (A spawned worker knows no
Prefect run; the other ranks would only say the same lines again.)
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import queue as queue_errors
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cxr.core.config import Params, load_params
from cxr.core.labels import STAGES
from cxr.core.progress import Progress, add_listener, report


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(params: Params, stage: str, progress: bool, stop_after_epoch: int | None) -> dict:
    from tasks.training.stages import train_stage

    world = dist.get_world_size()
    # Share the cores instead of oversubscribing them: N processes x all threads thrash.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        return train_stage(params, stage, progress=progress, stop_after_epoch=stop_after_epoch)
    finally:
        dist.barrier()


def _forward_to_parent(channel, level: int) -> None:
    """In rank 0 of a spawned group: `cxr.*` records at `level` and above, and progress
    reports, go onto `channel` for the parent to replay."""
    logger = logging.getLogger("cxr")
    logger.setLevel(level)
    logger.addHandler(logging.handlers.QueueHandler(channel))
    add_listener(channel.put)


def _spawned(rank: int, world: int, port: int, params: Params, stage: str, progress: bool, stop_after_epoch: int | None,
             channel=None, level: int = logging.INFO) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if rank == 0 and channel is not None:
        _forward_to_parent(channel, level)
    dist.init_process_group(_backend(), rank=rank, world_size=world)
    try:
        _run_rank(params, stage, progress and rank == 0, stop_after_epoch)
    finally:
        dist.destroy_process_group()


def _replay(channel) -> None:
    """Hand what rank 0 sent so far to this process's loggers and progress listeners."""
    while True:
        try:
            item = channel.get_nowait()
        except queue_errors.Empty:
            return
        if isinstance(item, Progress):
            report(item.key, item.done, item.total, unit=item.unit, note=item.note)
        else:
            logging.getLogger(item.name).handle(item)


def train_distributed(params: Params, stage: str, nproc: int, *, progress: bool = True, stop_after_epoch: int | None = None) -> dict:
    """Train one stage on `nproc` local processes; return rank 0's summary."""
    if nproc == 1:
        from tasks.training.stages import train_stage

        return train_stage(params, stage, progress=progress, stop_after_epoch=stop_after_epoch)
    channel = mp.get_context("spawn").Queue()
    level = logging.getLogger("cxr").getEffectiveLevel()
    group = mp.start_processes(_spawned, args=(nproc, _free_port(), params, stage, progress, stop_after_epoch, channel, level),
                               nprocs=nproc, join=False, start_method="spawn")
    try:
        # Replay while the group runs, so an epoch's line reaches the run when it is said.
        while not group.join(timeout=0.5):
            _replay(channel)
    finally:
        _replay(channel)
    if stop_after_epoch is not None:
        return {"stage": stage, "stopped_after_epoch": stop_after_epoch, "processes": nproc}
    return json.loads((Path(params.paths.metrics) / f"train_{stage}.json").read_text())


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    parser = argparse.ArgumentParser(prog="python -m tasks.training.distributed")
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    dist.init_process_group(_backend())
    try:
        summary = _run_rank(params, args.stage, dist.get_rank() == 0, None)
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

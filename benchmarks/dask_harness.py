"""What the Dask benchmarks share: a 1-worker and a 2-worker local cluster, alternating timed
rounds on both (the best round of each counts) and the throughput they report. The Prefect
server is `benchmarks.harness.prefect_server`."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager


@contextmanager
def local_clusters(imports: str):
    """{1: cluster, 2: cluster} of one-thread worker processes and their (non-default) clients;
    `imports` runs on every worker first, so that no timed round pays for them."""
    from distributed import Client, LocalCluster

    from flows.runner import use_default_malloc_in_local_workers

    use_default_malloc_in_local_workers()  # as the flows' own local clusters do
    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") for n in (1, 2)}
    # Not the default client: DaskTaskRunner prefers a default client's cluster over its address.
    clients = {n: Client(c, set_as_default=False) for n, c in clusters.items()}
    try:
        for client in clients.values():
            client.run(exec, imports, {})
        yield clusters, clients
    finally:
        for n in (1, 2):
            clients[n].close()
            clusters[n].close()


def alternating_rounds(clients: dict, rounds: int, run) -> dict:
    """run(n, r) on the n-worker cluster, rounds x (1, 2) in alternating order.

    Returns {"wall": {n: [s]}, "phase": {n: [s]}, "results": {n: [run's value]}}: wall is the
    whole call, phase the first task start to the last task end on the workers. Asserts that
    each round used all n workers.
    """
    from distributed import get_task_stream

    out = {"wall": {1: [], 2: []}, "phase": {1: [], 2: []}, "results": {1: [], 2: []}}
    for r in range(rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            with get_task_stream(clients[n]) as stream:
                t0 = time.perf_counter()
                value = run(n, r)
                out["wall"][n].append(time.perf_counter() - t0)
            spans = [s for t in stream.data for s in t["startstops"] if s["action"] == "compute"]
            out["phase"][n].append(max(s["stop"] for s in spans) - min(s["start"] for s in spans))
            workers = {t["worker"] for t in stream.data}
            assert len(workers) == n, f"{n} workers asked, {len(workers)} used"
            out["results"][n].append(value)
    return out


def throughput(rounds: dict, items: int, unit: str, task: str) -> dict:
    """The fields both Dask benchmarks report from `alternating_rounds`: `unit` (images,
    studies) per second of the best round with 1 and 2 workers, their ratio for the whole run,
    and for the phase of the `task`s (chunk, shard) alone."""
    wall, phase = rounds["wall"], rounds["phase"]
    rate = {n: items / min(w) for n, w in wall.items()}
    phase_rate = {n: items / min(p) for n, p in phase.items()}
    return {
        "rounds": len(wall[1]), "threads_per_worker": 1, "cores": os.cpu_count(),
        f"workers_1_{unit}_per_s": round(rate[1], 2), f"workers_2_{unit}_per_s": round(rate[2], 2),
        "ratio": round(rate[2] / rate[1], 2), "target_ratio": 2.0,
        "workers_1_wall_s": [round(w, 2) for w in wall[1]], "workers_2_wall_s": [round(w, 2) for w in wall[2]],
        f"{task}_phase_ratio": round(phase_rate[2] / phase_rate[1], 2),
    }

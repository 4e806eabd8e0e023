"""The task runner a flow's mapped tasks fan out on, chosen by params (`dask:`), not by code.

    some_flow.with_options(task_runner=task_runner(params))(params)

dask.enabled false: None, i.e. the flow keeps the runner it declares (threads in-process).
dask.enabled true: Prefect's DaskTaskRunner on a local cluster of `workers` processes with
`threads_per_worker` threads each, started and torn down by the flow run, or on the running
cluster at `dask.address`. Tasks and their arguments (Params, plans, paths) are pickled to
the worker processes; each worker process reports its task runs to the same Prefect API.
Note: DaskTaskRunner uses a default `distributed.Client` of the calling process, when there
is one, in preference to `address` (create your own clients with set_as_default=False).
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner

from cxr.core.config import Params

# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which also switches off glibc's
# adaptive mmap threshold: every multi-MB image array is then mmap'd and page-faulted anew,
# doubling the decode cost of a 1024 px PNG (11 -> 22 ms measured). Chunk builds make many
# large short-lived arrays, and a per-run cluster holds no long-lived memory worth trimming.
WORKER_MALLOC_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def use_default_malloc_in_local_workers() -> None:
    """Dask config for local clusters started after this call in this process (see above)."""
    import dask

    dask.config.set(WORKER_MALLOC_CONFIG)


def task_runner(params: Params) -> TaskRunner | None:
    d = params.dask
    if not d.enabled:
        return None
    from prefect_dask import DaskTaskRunner

    if d.address:
        return DaskTaskRunner(address=d.address)
    use_default_malloc_in_local_workers()
    # processes: chunk work is Python-heavy (PNG decode, index building), threads would share the GIL.
    return DaskTaskRunner(cluster_kwargs={"n_workers": d.workers, "threads_per_worker": d.threads_per_worker,
                                          "processes": True, "dashboard_address": ":0"})

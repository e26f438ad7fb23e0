"""One place that turns a rule's ``threads`` and a configured dask scheduler into a compute context.

Used by the CPM de-trending (``cpm.dask_scheduler``) and the LFD flux solve
(``lfd.solve.dask_scheduler``).  The ``scheduler`` value (a config string) means:

``None`` / ``""``                  dask's threaded scheduler with ``num_workers=threads`` (the rule's
                                   ``threads``; synchronous for one thread).  BLAS is limited to one
                                   thread per worker while it runs, so there is no oversubscription.
``"threads"``, ``"synchronous"``,  that local dask scheduler with ``num_workers=threads``.
``"processes"``
``"local:N"``                      a ``dask.distributed.LocalCluster`` of N single-threaded worker
                                   processes started for this call (testing, or one big node without
                                   the GIL contention of threads); ``"local-threads:N"``: N worker
                                   threads in this process.
``"slurm:N"``                      a dask-jobqueue ``SLURMCluster`` scaled to N workers for this call.
                                   Cores, memory, account, partition and walltime of the worker jobs
                                   come from dask's config (``~/.config/dask/jobqueue.yaml``, section
                                   ``jobqueue.slurm``; see docs/CLUSTER.md).
``"scheduler-file:PATH"``          an already running scheduler that wrote PATH (``dask scheduler
                                   --scheduler-file``, dask-jobqueue's ``SLURMRunner``, dask-mpi).
anything else                      the address of a running scheduler (``tcp://host:8786``, e.g.
                                   ``SLURMCluster().scheduler_address``).

With a distributed scheduler the arguments every task shares (large arrays, the factorised system)
are sent to the cluster once (``Client.scatter``), and every task gets only its own small arguments.
Results come back in task order, so a reduction over them is the same whatever the scheduler:
chunking is fixed by the caller, never by the number of workers.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

from workflow_lib.core.logs import get_logger

log = get_logger("parallel")

LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "processes")


class SchedulerError(ValueError):
    """A ``dask_scheduler`` value that cannot be used (bad syntax, missing package, unreachable)."""


def prefer_threaded_scheduler() -> None:
    """Configure dask's threaded scheduler, as the function ``dask.threaded.get``, as this process's default
    unless a scheduler is configured already (a ``dask.distributed`` client sets one when it starts).

    Used by every step process (``python -m workflow_lib.steps``). Without it, each ``compute`` (every cube
    read, every zarr write) imports ``dask.distributed`` to look for a running client: ~0.5 CPU-s per job, a
    few of a survey tile's (docs/SURVEY.md). A scheduler *name* does not avoid that in dask >= 2025 (it
    still checks for a client); a callable does. The threaded scheduler is what dask arrays use when there
    is no client, so results do not change; a step's ``dask_scheduler`` setting still selects a cluster
    explicitly (:func:`compute_context`). Likewise every rechunk (xarray's ``stack`` of a cube into its pixel
    table, for one) imports ``distributed`` to choose between its task and peer-to-peer methods; without a
    client it is the task method, which is set here.
    """
    import dask
    import dask.threaded

    if dask.config.get("scheduler", None) is None:
        dask.config.set(scheduler=dask.threaded.get)
        if dask.config.get("array.rechunk.method", None) is None:
            dask.config.set({"array.rechunk.method": "tasks"})


def describe(threads: int = 1, scheduler: str | None = None) -> str:
    """Short human-readable description of the compute context, for logs."""
    threads = max(1, int(threads or 1))
    if not scheduler:
        return f"dask threaded scheduler, {threads} worker(s)" if threads > 1 else "dask synchronous scheduler"
    return f"dask scheduler {scheduler!r}"


def _count(value: str, scheduler: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise SchedulerError(f"dask_scheduler={scheduler!r}: expected an integer worker count after ':'") from None
    if n < 1:
        raise SchedulerError(f"dask_scheduler={scheduler!r}: the worker count must be >= 1")
    return n


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise SchedulerError(
            "a dask.distributed scheduler needs the 'distributed' package "
            "(pip install distributed; dask-jobqueue for SLURM)"
        ) from exc
    return distributed


@contextlib.contextmanager
def distributed_client(scheduler: str, *, timeout: float = 60.0):
    """``distributed.Client`` for a scheduler value that is not a local dask scheduler.

    Clusters started here (``local:N``, ``local-threads:N``, ``slurm:N``) are closed on exit;
    a running scheduler given by address or scheduler file is only disconnected from.
    """
    distributed = _distributed()
    kind, _, arg = scheduler.partition(":")
    cluster = None
    try:
        if kind in ("local", "local-threads") and arg and not arg.startswith("//"):
            n = _count(arg, scheduler)
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=(kind == "local"), dashboard_address=None
            )
            client = distributed.Client(cluster)
        elif kind == "slurm" and arg and not arg.startswith("//"):
            n = _count(arg, scheduler)
            try:
                from dask_jobqueue import SLURMCluster
            except ImportError as exc:
                raise SchedulerError(f"dask_scheduler={scheduler!r} needs the 'dask-jobqueue' package") from exc
            cluster = SLURMCluster()
            cluster.scale(n)
            client = distributed.Client(cluster)
            log.info("waiting for the first of %d SLURM dask workers", n)
            client.wait_for_workers(1, timeout=None)
        elif kind == "scheduler-file":
            client = distributed.Client(scheduler_file=arg, timeout=timeout)
        else:
            client = distributed.Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise SchedulerError(f"dask_scheduler={scheduler!r}: cannot connect ({exc})") from exc
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _is_collection(x) -> bool:
    import dask

    return dask.is_dask_collection(x)


def dask_map(
    func: Callable, tasks: Iterable, *, threads: int = 1, scheduler: str | None = None, shared: dict | None = None
) -> list:
    """``[func(*task, **shared) for task in tasks]`` (a dict task: ``func(**task, **shared)``), run in
    parallel with the compute context of ``(threads, scheduler)``; results in task order.

    ``shared`` holds the keyword arguments common to every task: with a distributed scheduler they
    are scattered to the cluster once (dask collections among them are computed on the cluster
    once); with the local schedulers they are passed by reference.
    """
    import dask

    tasks = list(tasks)
    shared = dict(shared or {})
    threads = max(1, int(threads or 1))

    def call_args(task):
        return (task, {}) if not isinstance(task, dict) else ((), task)

    if not scheduler or scheduler in LOCAL_SCHEDULERS:
        kind = scheduler or ("threads" if threads > 1 else "synchronous")
        kind = "synchronous" if kind == "sync" else kind
        delayed = [dask.delayed(func)(*a, **kw, **shared) for a, kw in map(call_args, tasks)]
        from threadpoolctl import threadpool_limits

        # one BLAS thread per dask worker when several workers run (no oversubscription)
        limit = 1 if (kind in ("threads", "processes") and threads > 1) else None
        with threadpool_limits(limits=limit, user_api="blas"):
            return list(dask.compute(*delayed, scheduler=kind, num_workers=threads))

    with distributed_client(scheduler) as client:
        return _map_on_client(client, func, tasks, shared)


def _map_on_client(client, func, tasks, shared):
    remote = {}
    for key, value in shared.items():
        # send what every task needs once ([value]: scatter would split a list/dict into futures);
        # dask collections are computed on the cluster once
        remote[key] = client.compute(value) if _is_collection(value) else client.scatter([value], hash=False)[0]
    futures = [
        client.submit(func, *a, **kw, **remote, pure=False)
        for a, kw in ((t, {}) if not isinstance(t, dict) else ((), t) for t in tasks)
    ]
    return client.gather(futures)


def compute_context(threads: int = 1, scheduler: str | None = None):
    """Context manager yielding ``map(func, tasks, **shared) -> list`` bound to one compute context;
    a cluster started for it (``local:N``, ``slurm:N``) serves every call inside the ``with``."""

    @contextlib.contextmanager
    def _cm():
        if not scheduler or scheduler in LOCAL_SCHEDULERS:
            yield lambda func, tasks, **shared: dask_map(
                func, tasks, threads=threads, scheduler=scheduler, shared=shared
            )
            return
        with distributed_client(scheduler) as client:
            yield lambda func, tasks, **shared: _map_on_client(client, func, list(tasks), shared)

    return _cm()

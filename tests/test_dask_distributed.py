"""Dask beyond one node (workflow_lib.parallel): CPM de-trending and the LFD flux solve on a
dask.distributed cluster give the same numbers as the threaded scheduler.

A LocalCluster of 2 single-threaded worker *processes* stands in for a multi-node cluster: every
shared array and the factorised flux system are pickled and shipped to the workers, as they would be
to SLURM nodes.  ``test_slurm_cluster`` runs the same on dask-jobqueue SLURMCluster workers when a
SLURM cluster answers (.ci/slurm_setup.sh).
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import erf

distributed = pytest.importorskip("distributed")

from workflow_lib.core import parallel  # noqa: E402
from workflow_lib.cpm.model import CPMParams, cpm_detrend_pixels  # noqa: E402
from workflow_lib.lfd import (
    geometry,  # noqa: E402
    linsys,  # noqa: E402
    solve,  # noqa: E402
)


@pytest.fixture(scope="module")
def cluster():
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    yield lc
    lc.close()


# ----------------------------------------------------------------------------- data


def cpm_cube(nrow=12, ncol=12, ntime=240, seed=1):
    """(time, pixel) flux with two shared systematics modes, pixel-dependent loadings, noise."""
    rng = np.random.default_rng(seed)
    time = 1325.0 + np.arange(ntime) * (30.0 / 1440.0)
    tt = np.linspace(0, 1, ntime)
    modes = np.stack([np.sin(2 * np.pi * 3 * tt) + 0.5 * tt, np.exp(-(((tt - 0.3) / 0.05) ** 2))])
    base = rng.uniform(200, 2000, size=nrow * ncol)
    load = rng.normal(0.05, 0.02, size=(2, nrow * ncol))
    flux = base + (modes.T @ load) * base + rng.normal(0, 1, size=(ntime, nrow * ncol)) * np.sqrt(base / 200)
    flux[17, 5] = np.nan  # an isolated NaN: filled for fitting, NaN in the output
    rows, cols = np.divmod(np.arange(nrow * ncol), ncol)
    quality = np.zeros(ntime, np.int32)
    quality[100] = 32  # a momentum dump (dropped)
    return flux, quality, time, rows + 50, cols + 80


def solve_field(seed=0, n=18, nsrc=35, ntime=40):
    """Gaussian-PRF scene, linear background, per-cadence motion factors (low-rank, eq. 24)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:n, 0:n]
    pc, pr = cols.ravel().astype(float), rows.ravel().astype(float)
    sc, sr = rng.uniform(-1, n, nsrc), rng.uniform(-1, n, nsrc)
    d2 = (pc[:, None] - sc[None, :]) ** 2 + (pr[:, None] - sr[None, :]) ** 2
    p, s = np.nonzero(d2 <= 3.5**2)
    s2 = np.sqrt(2) * 0.8

    def frac(c, x):
        return 0.5 * (erf((x + 0.5 - c) / s2) - erf((x - 0.5 - c) / s2))

    S = sp.csr_matrix((frac(sc[s], pc[p]) * frac(sr[s], pr[p]), (p, s)), shape=(pc.size, nsrc))
    S.sum_duplicates()
    B = geometry.background_design(pc, pr, 1)
    f0 = 10 ** rng.uniform(2.5, 4.5, nsrc)
    truth = f0[:, None] * (1 + 0.01 * rng.standard_normal((nsrc, ntime)))
    model = (S @ truth + B @ np.array([30.0, 3.0, -2.0])[:, None]).T
    err = np.sqrt(25 + np.abs(model))
    data = model + err * rng.standard_normal(model.shape)
    data[7, :] = np.nan  # an empty cadence
    basis = np.column_stack([np.ones(S.nnz), 0.02 * rng.standard_normal(S.nnz)])
    mtime = np.column_stack([np.ones(ntime), np.sin(np.linspace(0, 3, ntime))])
    mu = np.concatenate([f0, np.zeros(B.shape[1])])
    sig = np.concatenate([10 * f0, np.full(B.shape[1], 1e6)])
    return dict(data=data, err=err, S=S, B=B, mu=mu, sig=sig, basis=basis, mtime=mtime)


def _same(a, b, rtol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = np.isfinite(b)
    scale = np.max(np.abs(b[ok])) if ok.any() else 1.0
    assert np.max(np.abs(a[ok] - b[ok]), initial=0.0) <= rtol * scale


# ----------------------------------------------------------------------------- CPM


def test_cpm_distributed_equals_threaded(cluster):
    flux, quality, time, rows, cols = cpm_cube()
    base = dict(n_predictors=40, exclusion_size=3, k=10, chunk_pixels=16)  # 9 chunks over 2 workers
    ref = cpm_detrend_pixels(flux, quality, time, rows, cols, CPMParams(**base), threads=2)
    dist = cpm_detrend_pixels(
        flux, quality, time, rows, cols, CPMParams(**base, dask_scheduler=cluster.scheduler_address), threads=2
    )
    for key in ("flux", "systematics", "polynomial"):
        _same(dist[key], ref[key])
    assert np.array_equal(dist["n_predictors"], ref["n_predictors"])
    # the model did something: the de-trended pixels scatter much less than the raw ones
    assert np.nanmedian(np.nanstd(ref["flux"], axis=0)) < 0.3 * np.nanmedian(np.nanstd(flux, axis=0))
    assert np.isnan(ref["flux"][17, 5]) and np.isnan(ref["flux"][100]).all()
    # the per-pixel Gram path (no shared Gram matrix) through the same cluster
    ref2 = cpm_detrend_pixels(flux, quality, time, rows, cols, CPMParams(**base, gram_max_pixels=1), threads=1)
    dist2 = cpm_detrend_pixels(
        flux, quality, time, rows, cols, CPMParams(**base, gram_max_pixels=1, dask_scheduler=cluster.scheduler_address)
    )
    _same(dist2["flux"], ref2["flux"])


# ----------------------------------------------------------------------------- LFD flux solve


def test_pcg_system_pickles_and_refactorises():
    """The pcg system holds a SuperLU factor (not picklable): FluxSystem ships the normal matrix instead
    and refactorises it on the worker, giving the same solves."""
    import pickle

    f = solve_field(ntime=10)
    sysm = linsys.build_system(f["S"], f["B"], f["mu"], f["sig"], np.nanmean(f["err"], axis=0), direct=False, pcg=True)
    clone = pickle.loads(pickle.dumps(sysm))
    rhs = np.arange(sysm.nvar, dtype=float)
    np.testing.assert_allclose(clone.mean_lu.solve(rhs), sysm.mean_lu.solve(rhs), rtol=1e-12)


@pytest.mark.parametrize("method", ["direct", "pcg"])
def test_flux_solve_distributed_equals_threaded(cluster, method):
    f = solve_field()
    kw = dict(motion_basis=f["basis"], motion_time=f["mtime"], method=method, time_chunk=8)
    ref = solve.source_flux(f["data"], f["err"], f["S"], f["B"], f["mu"], f["sig"], threads=2, **kw)
    dist = solve.source_flux(
        f["data"],
        f["err"],
        f["S"],
        f["B"],
        f["mu"],
        f["sig"],
        threads=2,
        dask_scheduler=cluster.scheduler_address,
        **kw,
    )
    for key in ("flux", "flux_err", "background", "background_err"):
        _same(dist[key], ref[key])
    assert np.isnan(ref["flux"][:, 7]).all() and np.isfinite(ref["flux"][:, 8]).all()


def test_solve_chunks_through_parallel_map(cluster):
    """What solve.source_flux does after the parallel.py change: the factorised system is scattered
    once, each task gets its time range; same as the threaded map."""
    f = solve_field(seed=2, ntime=24)
    ntime = f["data"].shape[0]
    mean_err = np.sqrt(np.nanmean(f["err"] ** 2, axis=0))
    sysm = linsys.build_system(f["S"], f["B"], f["mu"], f["sig"], mean_err, direct=True)
    tasks = [dict(i0=i, i1=min(ntime, i + 5)) for i in range(0, ntime, 5)]
    shared = dict(
        sys=sysm,
        method="direct",
        flux=f["data"],
        flux_err=f["err"],
        motion_basis=f["basis"],
        motion_time=f["mtime"],
        rtol=1e-10,
    )
    ref = parallel.dask_map(solve._solve_chunk, tasks, threads=2, shared=shared)
    dist = parallel.dask_map(solve._solve_chunk, tasks, scheduler=cluster.scheduler_address, shared=shared)
    assert len(dist) == len(tasks)
    for (a, ae, _), (b, be, _) in zip(dist, ref):
        _same(a, b)
        _same(ae, be)


# ----------------------------------------------------------------------------- parallel.py itself


def _pow(i, base, exponent):
    return float(np.sum(base[i] ** exponent))


def test_scheduler_values(cluster, tmp_path):
    base = np.arange(12.0).reshape(4, 3)
    want = [float(np.sum(base[i] ** 2)) for i in range(4)]
    tasks = [(i,) for i in range(4)]
    shared = dict(base=base, exponent=2)
    for sched in (None, "threads", "synchronous", cluster.scheduler_address):
        assert parallel.dask_map(_pow, tasks, threads=2, scheduler=sched, shared=shared) == want, sched
    # a scheduler file, as written by `dask scheduler --scheduler-file` or dask-jobqueue's SLURMRunner
    (tmp_path / "sched.json").write_text(json.dumps({"type": "Scheduler", "address": cluster.scheduler_address}))
    assert parallel.dask_map(_pow, tasks, scheduler=f"scheduler-file:{tmp_path / 'sched.json'}", shared=shared) == want
    # local-threads:N starts (and stops) its own in-process cluster; a list in `shared` stays one object
    got = parallel.dask_map(
        lambda i, lst: lst[i] * 2, [(i,) for i in range(3)], scheduler="local-threads:2", shared=dict(lst=[1, 2, 3])
    )
    assert got == [2, 4, 6]
    with parallel.compute_context(2, "local-threads:2") as run:
        assert run(_pow, tasks, **shared) == want and run(_pow, tasks, base=base, exponent=1) == [
            float(b.sum()) for b in base
        ]
    for bad in ("local:x", "local:0", "slurm:-1"):
        with pytest.raises(parallel.SchedulerError, match="worker count"):
            parallel.dask_map(_pow, tasks, scheduler=bad, shared=shared)


# ----------------------------------------------------------------------------- SLURM (dask-jobqueue)


def _slurm_problem():
    for tool in ("sbatch", "sinfo", "squeue"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if res.returncode or "idle" not in res.stdout and "mix" not in res.stdout:
        return f"no idle SLURM partition ({res.stdout.strip() or res.stderr.strip()})"
    return None


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_cluster(tmp_path):
    """`slurm:1`: a dask-jobqueue SLURMCluster worker job runs the CPM chunks (config from dask's
    jobqueue settings, here set in the test)."""
    pytest.importorskip("dask_jobqueue")
    problem = _slurm_problem()
    if problem:
        if os.environ.get("PIPELINE_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    import dask

    partition = os.environ.get("PIPELINE_SLURM_PARTITION", "ci")
    flux, quality, time, rows, cols = cpm_cube(nrow=8, ncol=8, ntime=120)
    base = dict(n_predictors=20, exclusion_size=3, k=6, chunk_pixels=16)
    ref = cpm_detrend_pixels(flux, quality, time, rows, cols, CPMParams(**base), threads=1)
    cfg = {
        "jobqueue.slurm.cores": 1,
        "jobqueue.slurm.processes": 1,
        "jobqueue.slurm.memory": "1GB",
        "jobqueue.slurm.queue": partition,
        "jobqueue.slurm.walltime": "00:10:00",
        "jobqueue.slurm.log-directory": str(tmp_path),
        "jobqueue.slurm.local-directory": str(tmp_path),
        "jobqueue.slurm.account": os.environ.get("PIPELINE_SLURM_ACCOUNT", "tess"),
    }
    with dask.config.set(cfg):
        out = cpm_detrend_pixels(flux, quality, time, rows, cols, CPMParams(**base, dask_scheduler="slurm:1"))
    _same(out["flux"], ref["flux"])

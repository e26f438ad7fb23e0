"""FFI ingestion (workflow_lib.data.ffi) against synthetic SPOC-format FFIs (workflow_lib.data.synthetic_ffi)
and against what astropy reads from the same files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from conftest import REPO

from workflow_lib.data import ffi
from workflow_lib.data.cube import CubeError, cube_wcs, open_cube
from workflow_lib.data.synthetic_ffi import write_ffi_file, write_synthetic_ffis

NR, NC, NT = 40, 48, 12
KW = dict(frames_per_block=4, tile=(16, 16), tiles_per_task=2)
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("ffi") / "in"
    return write_synthetic_ffis(d, n_rows=NR, n_cols=NC, n_cadences=NT, seed=3, n_flagged=2)


@pytest.fixture(scope="module")
def full_cube(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("cube") / "cube.zarr"
    r = ffi.ingest_ffis(synth.files[0].parent, out, **KW)
    assert r["read"] == NT and r["skipped"] == 0
    return open_cube(out).load()


def _copy(files, d: Path):
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, d / Path(f).name)
    return d


def _equal(a, b):
    assert np.array_equal(a["flux"].values, b["flux"].values)
    assert np.array_equal(a["flux_err"].values, b["flux_err"].values)
    assert np.array_equal(a["time"].values, b["time"].values)
    assert np.array_equal(a["quality"].values, b["quality"].values)


def test_ingest_equals_frames_and_astropy(synth, full_cube):
    ds = full_cube
    assert ds.sizes == {"time": NT, "row": NR, "column": NC}
    assert np.array_equal(ds["flux"].values, synth.flux)
    assert np.array_equal(ds["flux_err"].values, synth.flux_err)
    assert np.array_equal(ds["quality"].values, synth.quality) and (synth.quality != 0).sum() == 2
    # what astropy reads directly: science area rows 0..NR-1, columns 44..44+NC-1; mid-time; DQUALITY
    for k, f in enumerate(sorted(synth.files)):
        with fits.open(f) as h:
            assert np.array_equal(ds["flux"].values[k], h[1].data[:NR, 44 : 44 + NC])
            assert np.array_equal(ds["flux_err"].values[k], h[2].data[:NR, 44 : 44 + NC])
            assert ds["time"].values[k] == 0.5 * (h[1].header["TSTART"] + h[1].header["TSTOP"])
            assert ds["quality"].values[k] == h[1].header["DQUALITY"]
            assert ds["cadenceno"].values[k] == h[0].header["FFIINDEX"]
    assert np.all(np.diff(ds["time"].values) > 0)
    assert list(ds["row"].values) == list(range(1, NR + 1))
    assert list(ds["column"].values) == list(range(45, 45 + NC))
    a = ds.attrs
    assert (a["mission"], a["sector"], a["camera"], a["ccd"]) == ("TESS", 1, 4, 2)
    assert (a["time_system"], a["time_offset"], a["timeref"], a["product"]) == (
        "BTJD",
        2457000.0,
        "SOLARSYSTEM",
        "spoc_ffi",
    )
    prov = json.loads(a["provenance"])
    assert prov["step"] == "ingest_ffi" and len(prov["inputs"]) == NT
    # WCS: from a good frame, equal to astropy's full-frame WCS shifted by the 44 collateral columns
    src = synth.files[0].parent / a["wcs_source_file"]
    assert fits.getheader(src, 1)["DQUALITY"] == 0
    w, wf = cube_wcs(ds), WCS(fits.getheader(src, 1))
    assert w.sip is not None
    x, y = np.meshgrid(np.arange(0, NC, 5.0), np.arange(0, NR, 3.0))
    np.testing.assert_allclose(w.all_pix2world(x, y, 0), wf.all_pix2world(x + 44, y, 0), rtol=0, atol=1e-10)


def test_chunks_and_in_memory_reader(synth, full_cube, tmp_path):
    ds = ffi.read_ffi_cube(synth.files[0].parent)
    _equal(ds, full_cube)
    out = tmp_path / "c.zarr"
    ffi.ingest_ffis(synth.files[0].parent, out, time_chunk=5, **KW)
    c = open_cube(out)
    assert c["flux"].encoding["chunks"] == (5, 16, 16)
    assert not (tmp_path / "c.frames").exists()  # frame store removed after success


def test_resume_subset_then_all(synth, full_cube, tmp_path):
    d = _copy(synth.files, tmp_path / "in")
    files = sorted(d.glob("*_ffic.fits"))
    store = tmp_path / "frames"
    # out of time order on purpose: odd frames first, then all
    first = ffi.stage_frames(ffi.scan_ffis(files[1::2]), store, frames_per_block=4, tile=(16, 16), tiles_per_task=2)
    assert first["read"] == NT // 2
    r = ffi.ingest_ffis(d, tmp_path / "c.zarr", frame_store=store, keep_frames=True, **KW)
    assert (r["read"], r["skipped"]) == (NT - NT // 2, NT // 2)
    _equal(open_cube(tmp_path / "c.zarr").load(), full_cube)
    # a cube of a subset, then more frames arrive: only the new ones are read
    sub = _copy(files[:5], tmp_path / "in2")
    r1 = ffi.ingest_ffis(sub, tmp_path / "d.zarr", keep_frames=True, **KW)
    assert open_cube(tmp_path / "d.zarr").sizes["time"] == 5 and r1["read"] == 5
    _copy(files[5:], sub)
    r2 = ffi.ingest_ffis(sub, tmp_path / "d.zarr", keep_frames=True, **KW)
    assert (r2["read"], r2["skipped"]) == (NT - 5, 5)
    _equal(open_cube(tmp_path / "d.zarr").load(), full_cube)


def test_resume_after_exception(synth, full_cube, tmp_path):
    calls = []

    def failing(fr, lay):
        if len(calls) == 6:
            raise RuntimeError("disk went away")
        calls.append(fr.name)
        return ffi.read_ffi(fr, lay)

    out = tmp_path / "c.zarr"
    with pytest.raises(RuntimeError, match="disk went away"):
        ffi.ingest_ffis(synth.files[0].parent, out, reader=failing, **KW)
    assert not out.exists()
    done = ffi.frame_store_done(ffi.frame_store_path(out))
    assert done.sum() == 4  # the first block of 4 was written; the second failed half-way
    r = ffi.ingest_ffis(synth.files[0].parent, out, **KW)
    assert (r["read"], r["skipped"]) == (NT - 4, 4)
    _equal(open_cube(out).load(), full_cube)


def test_resume_after_kill(synth, full_cube, tmp_path):
    out = tmp_path / "c.zarr"
    script = textwrap.dedent(
        f"""
        import os, signal
        from workflow_lib.data import ffi
        n = []
        def killer(fr, lay):
            if len(n) == 9:
                os.kill(os.getpid(), signal.SIGKILL)
            n.append(1)
            return ffi.read_ffi(fr, lay)
        ffi.ingest_ffis({str(synth.files[0].parent)!r}, {str(out)!r}, reader=killer, **{KW!r})
        """
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()
    assert ffi.frame_store_done(ffi.frame_store_path(out)).sum() == 8
    r = ffi.ingest_ffis(synth.files[0].parent, out, **KW)
    assert (r["read"], r["skipped"]) == (NT - 8, 8)
    _equal(open_cube(out).load(), full_cube)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_duplicate_times_refused(synth, tmp_path):
    d = _copy(synth.files[:3], tmp_path / "in")
    f = sorted(d.glob("*_ffic.fits"))[1]
    shutil.copy(f, d / f.name.replace("-0120-", "-0121-"))
    with pytest.raises(CubeError, match="duplicate") as e:
        ffi.scan_ffis(d)
    assert f.name.replace("-0120-", "-0121-") in str(e.value) or f.name in str(e.value)
    ffi.scan_ffis([f, f])  # the same path twice is one frame


def test_mixed_ccd_and_sector_refused(synth, tmp_path):
    d = _copy(synth.files[:2], tmp_path / "in")
    other = write_synthetic_ffis(tmp_path / "other", n_rows=NR, n_cols=NC, n_cadences=1, ccd=3, seed=5)
    bad = d / other.files[0].name.replace("-4-3-", "-4-3-")
    shutil.copy(other.files[0], bad)
    with pytest.raises(CubeError, match=r"CCD 3.*one CCD of one sector") as e:
        ffi.scan_ffis(d)
    assert bad.name in str(e.value)


def test_wrong_shapes_and_missing_hdus(synth, tmp_path):
    d = _copy(synth.files[:2], tmp_path / "in")
    f0 = sorted(d.glob("*_ffic.fits"))[0]
    with fits.open(f0) as h:
        p, cal, unc = h[0].copy(), h[1].copy(), h[2].copy()
    # a frame of another size
    small = d / "tess2018300000000-s0001-4-2-0120-s_ffic.fits"
    c2 = fits.ImageHDU(cal.data[:, :-2], header=cal.header)
    u2 = fits.ImageHDU(unc.data[:, :-2], header=unc.header, name=unc.name)
    fits.HDUList([p, c2, u2]).writeto(small)
    with pytest.raises(CubeError, match="shape") as e:
        ffi.scan_ffis(d)
    assert small.name in str(e.value)
    # no uncertainty HDU
    nou = tmp_path / "nou_ffic.fits"
    fits.HDUList([p, cal]).writeto(nou)
    with pytest.raises(CubeError, match=r"nou_ffic.fits: has 2 HDU\(s\).*uncertainty"):
        ffi.read_ffi_header(nou)
    # uncertainty image of another shape
    bad = tmp_path / "bad_ffic.fits"
    fits.HDUList([p, cal, fits.ImageHDU(unc.data[:-1], name=unc.name)]).writeto(bad)
    with pytest.raises(CubeError, match="bad_ffic.fits: uncertainty image shape"):
        ffi.read_ffi_header(bad)
    # too small for the collateral margins
    tiny = tmp_path / "tiny_ffic.fits"
    fits.HDUList(
        [
            p,
            fits.ImageHDU(np.zeros((20, 80), ">f4"), header=cal.header, name=cal.name),
            fits.ImageHDU(np.zeros((20, 80), ">f4"), name=unc.name),
        ]
    ).writeto(tiny)
    with pytest.raises(CubeError, match="tiny_ffic.fits: .*collateral"):
        ffi.read_ffi_header(tiny)
    # not FITS at all
    junk = tmp_path / "junk_ffic.fits"
    junk.write_text("hello")
    with pytest.raises(CubeError, match="junk_ffic.fits"):
        ffi.read_ffi_header(junk)


def test_layout_of_a_whole_ffi():
    """2078 x 2136: science rows 0-2047, columns 44-2091 = CCD rows 1-2048, columns 45-2092."""
    for hdr in ({}, {"CRVAL1P": 0, "CRVAL2P": 0, "CRPIX1P": 1, "CRPIX2P": 1}):
        lay = ffi.FFILayout.for_shape((2078, 2136), hdr)
        assert (lay.row_start, lay.col_start, lay.n_rows, lay.n_cols) == (0, 44, 2048, 2048)
        assert (lay.ccd_row0, lay.ccd_col0) == (1, 45)


def test_cropped_ffi_by_physical_wcs(synth, tmp_path):
    """A crop of an FFI (physical WCS CRVAL1P/CRVAL2P gives its place on the CCD) keeps only science pixels."""
    f = sorted(synth.files)[0]
    with fits.open(f) as h:
        p, cal, unc = h[0].copy(), h[1].copy(), h[2].copy()
    # array rows 5..34, columns 30..69 (overlapping the left collateral)
    r0, c0, nr = 5, 30, 30
    hc = cal.header.copy()
    hc["CRVAL1P"], hc["CRVAL2P"] = c0 + 1, r0 + 1
    hc["CRPIX1"] -= c0
    hc["CRPIX2"] -= r0
    path = tmp_path / "tess2018206190000-s0001-4-2-0120-s_ffic.fits"
    fits.HDUList(
        [
            p,
            fits.ImageHDU(cal.data[r0 : r0 + nr, c0:70], header=hc, name=cal.name),
            fits.ImageHDU(unc.data[r0 : r0 + nr, c0:70], name=unc.name),
        ]
    ).writeto(path)
    ds = ffi.read_ffi_cube([path])
    # science columns start at CCD column 45; the crop starts at CCD row 6, column 31
    assert list(ds["row"].values) == list(range(6, 6 + nr))
    assert list(ds["column"].values) == list(range(45, 71))
    np.testing.assert_array_equal(ds["flux"].values[0], cal.data[r0 : r0 + nr, 44:70])
    w, wf = cube_wcs(ds), WCS(cal.header)
    np.testing.assert_allclose(w.all_pix2world([0, 10], [0, 7], 0), wf.all_pix2world([44, 54], [5, 12], 0), atol=1e-10)


def test_synthetic_catalog_and_truth(synth):
    from astropy.table import Table

    from workflow_lib.data.cube import cube_wcs as _w

    cat = Table.read(synth.catalog, format="ascii.ecsv")
    for col in (
        "source_id",
        "ra",
        "dec",
        "pmra",
        "pmdec",
        "parallax",
        "phot_g_mean_flux",
        "phot_g_mean_mag",
        "bp_rp",
        "ref_epoch",
    ):
        assert col in cat.colnames
    import xarray as xr

    truth = xr.open_zarr(synth.truth)
    assert truth["flux"].shape == (len(cat), NT)
    # catalog positions land where the truth puts the stars (WCS of the FFIs, science-array indices)
    ds = ffi.read_ffi_cube(synth.files[0].parent)
    x, y = _w(ds).all_world2pix(truth["ra"].values, truth["dec"].values, 0)
    np.testing.assert_allclose(y + 1, truth["row"].values, atol=1e-6)
    np.testing.assert_allclose(x + 45, truth["column"].values, atol=1e-6)
    # the total flux of the scene is in the pixels (stars well inside, background removed)
    inside = (truth["row"] > 8) & (truth["row"] < NR - 8) & (truth["column"] > 45 + 8) & (truth["column"] < 45 + NC - 8)
    assert int(inside.sum()) >= 1


REAL_FFIS = sorted(SHARED.rglob("*ffic.fits")) if SHARED.exists() else []


@pytest.mark.skipif(not REAL_FFIS, reason=f"no real SPOC FFI (*ffic.fits) under {SHARED}")
@pytest.mark.parametrize("path", REAL_FFIS, ids=[p.name for p in REAL_FFIS])
def test_real_spoc_ffi(path):
    fr = ffi.read_ffi_header(path)
    ds = ffi.read_ffi_cube([path])
    lay = fr.layout
    with fits.open(path) as h:
        sci = (slice(lay.row_start, lay.row_start + lay.n_rows), slice(lay.col_start, lay.col_start + lay.n_cols))
        np.testing.assert_array_equal(ds["flux"].values[0], h[1].data[sci])
        np.testing.assert_array_equal(ds["flux_err"].values[0], h[2].data[sci])
        assert ds["time"].values[0] == 0.5 * (h[1].header["TSTART"] + h[1].header["TSTOP"])
        assert ds["quality"].values[0] == h[1].header.get("DQUALITY", 0)
        wf = WCS(h[1].header)
    w = cube_wcs(ds)
    np.testing.assert_allclose(
        w.all_pix2world([0, 3], [0, 2], 0),
        wf.all_pix2world(np.add([0, 3], lay.col_start), np.add([0, 2], lay.row_start), 0),
        atol=1e-9,
    )


def _write_noise_ffis(d: Path, n: int, size: int):
    """``n`` FFIs of ``size``^2 science pixels, fast: one file written by astropy, the others are its
    bytes with TSTART/TSTOP/FFIINDEX cards and the pixel data patched in."""
    d.mkdir(parents=True)
    shape = (size + 30, size + 88)
    img = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    tmpl = d / "template.fits"
    write_ffi_file(
        tmpl, img, np.full(shape, 10, np.float32), sector=10, camera=1, ccd=1, tstart=0.0, tstop=0.5, ffiindex=0
    )
    raw = bytearray(tmpl.read_bytes())
    tmpl.unlink()
    data_off = raw.index(b"XTENSION", 2880)  # the cal header
    data_off = bytes(raw).index(b"END" + b" " * 77, data_off)
    data_off = (data_off // 2880 + 1) * 2880
    for k in range(n):
        t0 = 1400.0 + k / 48
        for key, val in (("TSTART", t0), ("TSTOP", t0 + 1 / 48), ("FFIINDEX", k)):
            card = fits.Card(key, val).image.encode()
            pos = 0
            while (pos := bytes(raw).find(key.ljust(8).encode() + b"=", pos)) >= 0:
                raw[pos : pos + 80] = card
                pos += 80
        raw[data_off : data_off + img.nbytes] = (img + k).astype(">f4").tobytes()
        (d / f"tess{2019000000000 + k:013d}-s0010-1-1-0120-s_ffic.fits").write_bytes(raw)


def test_peak_memory_does_not_grow_with_frames(tmp_path):
    """Peak RSS of ingesting 160 frames vs 32 (one fresh process after a warm-up run, VmHWM reset
    before each run): the cube grows by ~67 MB, the ingest's peak only by the (time, 32, 32) chunk
    buffers."""
    size, ns = 256, (32, 160)
    for n in ns:
        _write_noise_ffis(tmp_path / f"n{n}", n, size)
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO / "benchmarks")!r})
        import ffi_ingest
        import dask.array, xarray.backends.zarr, zarr.codecs
        from workflow_lib.data.ffi import ingest_ffis
        out = []
        for n in {(ns[0], ns[1], ns[0])!r}:  # the first run warms up (thread pools, codecs, caches)
            open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
            base = ffi_ingest.peak_rss_bytes()
            ingest_ffis({str(tmp_path)!r} + f"/n{{n}}", {str(tmp_path)!r} + f"/c{{n}}.zarr", frames_per_block=8, tile=(32, 32), tiles_per_task=1)
            out.append(ffi_ingest.peak_rss_bytes() - base)
        print(json.dumps(out))
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if p.returncode and "clear_refs" in p.stderr:
        pytest.skip("cannot reset VmHWM (/proc/self/clear_refs)")
    assert p.returncode == 0, p.stderr
    _, large, small = json.loads(p.stdout.strip().splitlines()[-1])
    assert open_cube(tmp_path / f"c{ns[1]}.zarr").sizes["time"] == ns[1]
    cube_growth = (ns[1] - ns[0]) * size * size * 8
    print(
        f"peak RSS above start: {small / 1e6:.1f} MB ({ns[0]} frames), {large / 1e6:.1f} MB ({ns[1]} frames); cube +{cube_growth / 1e6:.0f} MB"
    )
    # whole-cube buffering would add ~67 MB; the design adds ~(128 frames x 32 x 32 x 4 B) x a few
    assert large - small < 0.25 * cube_growth, (small, large, cube_growth)

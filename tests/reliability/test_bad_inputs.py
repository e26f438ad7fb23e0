"""A corpus of bad inputs, each given to the step command line (``python -m workflow_lib.steps``, run
in-process through ``main``): broken, truncated and fuzzed FITS files, bad catalogs, cubes the models
cannot use, bad settings. Every case must

* exit with status 1 and print exactly **one** line on stderr, ``error: <step>: ...``, naming the culprit
  (the file, the key or the value) -- the traceback goes to the step's log only;
* write nothing: no output and no ``.tmp-*`` debris next to where the output would have been.

The cases are counted in the reliability tally printed at the end of the test run (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from helpers.tally import TALLY

from workflow_lib.steps.__main__ import main

PIMEN = "tesscut/tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"
ONE_BY_ONE = "tesscut/test-tpf-tesscut_1x1.fits"
ONE_CADENCE = "tesscut/tess-s0018-2-4_asteroid_11x10_1cadence_astrocut.fits"
TINY = {"seed": 7, "n_rows": 24, "n_cols": 24, "n_cadences": 240, "stars_per_sq_pixel": 0.12}


# ----------------------------------------------------------------------------- good inputs to spoil


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A tiny synthetic field (cube, Gaia-like catalog, crossmatched catalog) made by the steps themselves."""
    d = tmp_path_factory.mktemp("good")
    cube, incat, cat = d / "cube.zarr", d / "input_catalog.ecsv", d / "catalog.ecsv"
    argv = ["download-synthetic", "--params", json.dumps(TINY), "--cube", str(cube), "--truth", str(d / "truth.zarr")]
    assert main([*argv, "--catalog", str(incat), "--log", str(d / "dl.log")]) == 0
    argv = ["gaia-crossmatch", "--cube", str(cube), "--local-catalog", str(incat), "--out", str(cat)]
    assert main([*argv, "--log", str(d / "gaia.log")]) == 0
    return {"dir": d, "cube": cube, "input_catalog": incat, "catalog": cat}


def _fits_copy(shared_data: Path, name: str, dest: Path, edit=None) -> Path:
    """A copy of a real file, optionally edited in place (``edit(hdul)``)."""
    out = dest / Path(name).name
    shutil.copy(shared_data / name, out)
    if edit is not None:
        with fits.open(out, mode="update") as hdul:
            edit(hdul)
    return out


def _truncate(path: Path, nbytes: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:nbytes])
    return path


def _edited_cube(good: dict, dest: Path, how: str) -> Path:
    """The good cube with its flux spoiled: ``zero``, ``constant``, ``nan``, ``one_pixel``, ``one_cadence``."""
    ds = xr.open_zarr(good["cube"]).load()
    if how == "one_pixel":
        ds = ds.isel(row=slice(0, 1), column=slice(0, 1))
    elif how == "one_cadence":
        ds = ds.isel(time=slice(0, 1))
    else:
        value = {"zero": 0.0, "constant": 123.0, "nan": np.nan}[how]
        ds["flux"] = xr.full_like(ds["flux"], value)
    out = dest / f"cube_{how}.zarr"
    for var in ds.variables.values():
        var.encoding.clear()
    ds.to_zarr(out, mode="w", consolidated=True)
    return out


# ----------------------------------------------------------------------------- the corpus


def _download_local(files):
    return lambda t, g, s: _local_argv({"files": [str(f) for f in files(t, g, s)]})


def _local_argv(params: dict) -> list[str]:
    return ["download-local", "--field", "bad", "--params", json.dumps(params)]


def _spoiled_fits(edit=None, truncate=None, name=PIMEN):
    def make(t, g, s):
        f = _fits_copy(s, name, t, edit)
        return [_truncate(f, truncate(f)) if truncate else f]

    return make


def _set(hdu, key, value):
    def edit(hdul):
        hdul[hdu].header[key] = value

    return edit


def _column(name, value):
    def edit(hdul):
        hdul[1].data[name][:] = value

    return edit


def _drop_flux_column(hdul):
    cols = [c for c in hdul[1].columns if c.name != "FLUX"]
    hdul[1] = fits.BinTableHDU.from_columns(cols, header=hdul[1].header, name=hdul[1].name)


def _primary_only(t, g, s):
    out = t / "primary_only.fits"
    fits.HDUList([fits.PrimaryHDU(header=fits.getheader(s / PIMEN, 0))]).writeto(out)
    return [out]


def _text_file(text, suffix=".fits"):
    def make(t, g, s):
        f = t / f"not_fits{suffix}"
        f.write_bytes(text)
        return [f]

    return make


def _edge(cube=None, catalog=None, params=None):
    def argv(t, g, s):
        c = cube(t, g) if cube else g["cube"]
        k = catalog(t, g) if catalog else g["catalog"]
        out = ["edge-model", "--cube", str(c), "--catalog", str(k)]
        return out + (["--params", json.dumps(params)] if params is not None else [])

    return argv


#: CPM settings that refuse a cube the CPM cannot model instead of skipping it
REFUSE = {"on_unmodellable": "error"}


def _cpm(cube=None, catalog=None, params=None):
    def argv(t, g, s):
        c = cube(t, g) if cube else g["cube"]
        k = catalog(t, g) if catalog else g["catalog"]
        out = ["cpm-detrend", "--cube", str(c), "--catalog", str(k), "--raw-lightcurves", str(t / "out" / "raw.zarr")]
        out += ["--detrended", str(t / "out" / "detrended.zarr"), "--fits-dir", str(t / "out" / "fits")]
        return out + (["--params", json.dumps(params)] if params is not None else [])

    return argv


def _gaia(catalog):
    def argv(t, g, s):
        return ["gaia-crossmatch", "--cube", str(g["cube"]), "--local-catalog", str(catalog(t, g))]

    return argv


def _catalog_text(edit):
    """The good input catalog (ECSV) with its text edited by ``edit(lines) -> lines``."""

    def make(t, g):
        lines = g["input_catalog"].read_text().splitlines()
        out = t / "bad_catalog.ecsv"
        out.write_text("\n".join(edit(lines)) + "\n")
        return out

    return make


def _drop_column(name):
    def edit(lines):
        header = [ln for ln in lines if ln.startswith("#")]
        body = [ln.split(" ") for ln in lines if not ln.startswith("#")]
        i = body[0].index(name)
        header = [ln for ln in header if f"name: {name}" not in ln]
        return header + [" ".join(row[:i] + row[i + 1 :]) for row in body]

    return edit


def _replace_column(name, value):
    def edit(lines):
        body_start = next(i for i, ln in enumerate(lines) if not ln.startswith("#"))
        cols = lines[body_start].split(" ")
        i = cols.index(name)
        rows = [ln.split(" ") for ln in lines[body_start + 1 :]]
        for row in rows:
            row[i] = value
        return lines[: body_start + 1] + [" ".join(r) for r in rows]

    return edit


def _duplicate_first_row(lines):
    body_start = next(i for i, ln in enumerate(lines) if not ln.startswith("#"))
    return lines + [lines[body_start + 1]]


def _header_only(lines):
    body_start = next(i for i, ln in enumerate(lines) if not ln.startswith("#"))
    return lines[: body_start + 1]


def _junk_file(name, data):
    def make(t, g):
        f = t / name
        f.write_bytes(data)
        return f

    return make


def _missing(name):
    return lambda t, g: t / name


def _corrupt_store(t, g):
    store = t / "corrupt.zarr"
    shutil.copytree(g["cube"], store)
    (store / "zarr.json").write_text("{ not json")
    return store


def _store_without_flux(t, g):
    store = t / "noflux.zarr"
    ds = xr.open_zarr(g["cube"]).load().drop_vars("flux")
    for var in ds.variables.values():
        var.encoding.clear()
    ds.to_zarr(store, mode="w", consolidated=True)
    return store


def _cube(how):
    return lambda t, g: _edited_cube(g, t, how)


def _local_cube(name):
    """The cube of a real file (written by download-local), for the LFD / CPM refusals."""

    def make(t, g):
        shared = g["shared"]
        out = t / "real.zarr"
        argv = [*_local_argv({"files": [str(shared / name)]}), "--cube", str(out)]
        assert main([*argv, "--log", str(t / "real_dl.log")]) == 0
        return out

    return make


#: id -> (argv builder (tmp, good, shared data) -> argv without --log/--cube-out, culprit text of the line)
CASES = {
    # FITS files given to download-local
    "fits-empty-file": (_download_local(_text_file(b"")), "not_fits.fits"),
    "fits-text-file": (_download_local(_text_file(b"SIMPLE  = nonsense\n" * 40)), "not_fits.fits"),
    "fits-gzip-junk": (_download_local(_text_file(b"\x1f\x8b junk", ".fits.gz")), "not_fits.fits.gz"),
    "fits-truncated-half": (_download_local(_spoiled_fits(truncate=lambda f: f.stat().st_size // 2)), "6x6_astrocut"),
    "fits-truncated-header": (_download_local(_spoiled_fits(truncate=lambda f: 2880)), "6x6_astrocut"),
    "fits-truncated-last-block": (
        _download_local(_spoiled_fits(truncate=lambda f: f.stat().st_size - 2880)),
        "6x6_astrocut",
    ),
    "fits-no-pixel-table": (_download_local(_primary_only), "primary_only.fits"),
    "fits-no-flux-column": (_download_local(_spoiled_fits(edit=_drop_flux_column)), "6x6_astrocut"),
    "fits-time-all-nan": (_download_local(_spoiled_fits(edit=_column("TIME", np.nan))), "6x6_astrocut"),
    "fits-timesys-utc": (_download_local(_spoiled_fits(edit=_set(1, "TIMESYS", "UTC"))), "6x6_astrocut"),
    "fits-bjdref-not-tess": (_download_local(_spoiled_fits(edit=_set(1, "BJDREFI", 2400000))), "6x6_astrocut"),
    "fits-telescope-unknown": (
        _download_local(_spoiled_fits(edit=lambda h: [_set(i, "TELESCOP", "HUBBLE")(h) for i in (0, 1)])),
        "6x6_astrocut",
    ),
    # position keywords that contradict themselves (the S1 file: WCS 5.4 deg off, first row -856)
    "fits-wcs-far-from-target": (
        _download_local(_spoiled_fits(edit=lambda h: _set(2, "CRVAL2", h[2].header["CRVAL2"] + 5.4)(h))),
        "6x6_astrocut",
    ),
    "fits-negative-ccd-row": (  # the row of every column (FLUX is column 5 of this astrocut table)
        _download_local(_spoiled_fits(edit=lambda h: [_set(1, f"2CRV{i}P", -856)(h) for i in range(4, 10)])),
        "6x6_astrocut",
    ),
    "fits-missing-file": (
        lambda t, g, s: _local_argv({"files": [str(t / "nowhere.fits")]}),
        "nowhere.fits",
    ),
    "fits-empty-directory": (
        lambda t, g, s: _local_argv({"directory": str(t)}),
        "local.directory",
    ),
    "fits-glob-no-match": (
        lambda t, g, s: _local_argv({"glob": str(t / "*.fits")}),
        "local.glob",
    ),
    # catalogs given to the Gaia crossmatch
    "catalog-missing-ra": (_gaia(_catalog_text(_drop_column("ra"))), "ra"),
    "catalog-text-ra": (_gaia(_catalog_text(_replace_column("ra", "north"))), "bad_catalog.ecsv"),
    "catalog-nan-positions": (_gaia(_catalog_text(_replace_column("dec", "nan"))), "bad_catalog.ecsv"),
    "catalog-duplicate-ids": (_gaia(_catalog_text(_duplicate_first_row)), "source_id"),
    "catalog-no-rows": (_gaia(_catalog_text(_header_only)), "bad_catalog.ecsv"),
    "catalog-binary-junk": (_gaia(_junk_file("junk.ecsv", bytes(range(256)) * 8)), "junk.ecsv"),
    "catalog-missing-file": (_gaia(_missing("nowhere.ecsv")), "nowhere.ecsv"),
    # cubes and catalogs the LFD edge model cannot use
    "edge-cube-missing": (_edge(cube=_missing("nowhere.zarr")), "nowhere.zarr"),
    "edge-cube-corrupt": (_edge(cube=_corrupt_store), "corrupt.zarr"),
    "edge-cube-without-flux": (_edge(cube=_store_without_flux), "flux"),
    "edge-cube-all-nan": (_edge(cube=_cube("nan")), "cube_nan.zarr"),
    "edge-cube-one-pixel": (_edge(cube=_cube("one_pixel")), "cube_one_pixel.zarr"),
    "edge-real-1x1-file": (_edge(cube=_local_cube(ONE_BY_ONE)), "real.zarr"),
    "edge-catalog-missing": (_edge(catalog=_missing("nowhere.ecsv")), "nowhere.ecsv"),
    "edge-catalog-is-a-cube": (_edge(catalog=lambda t, g: g["cube"] / "zarr.json"), "zarr.json"),
    "edge-params-unknown-key": (_edge(params={"dominanse": 0.9}), "lfd.edge.dominanse"),
    "edge-params-out-of-range": (_edge(params={"dominance": 2}), "lfd.edge.dominance"),
    # cubes and settings the CPM cannot use
    "cpm-cube-all-zero": (_cpm(cube=_cube("zero")), "cube_zero.zarr"),
    "cpm-cube-constant": (_cpm(cube=_cube("constant")), "cube_constant.zarr"),
    "cpm-cube-all-nan": (_cpm(cube=_cube("nan")), "cube_nan.zarr"),
    # cubes the CPM cannot model: refused when cpm.on_unmodellable is 'error' (the default 'skip' writes NaN
    # CPM light curves with the reason instead: tests/test_cpm.py)
    "cpm-cube-one-pixel": (_cpm(cube=_cube("one_pixel"), params=REFUSE), "cube_one_pixel.zarr"),
    "cpm-cube-one-cadence": (_cpm(cube=_cube("one_cadence"), params=REFUSE), "cube_one_cadence.zarr"),
    "cpm-real-1x1-file": (_cpm(cube=_local_cube(ONE_BY_ONE), params=REFUSE), "real.zarr"),
    "cpm-real-6x6-file": (_cpm(cube=_local_cube(PIMEN), params=REFUSE), "real.zarr"),
    "cpm-k-exceeds-cadences": (_cpm(params={**REFUSE, "k": 500, "scale_k_with_cadence": False}), "cpm.k"),
    "cpm-exclusion-covers-cube": (_cpm(params={**REFUSE, "exclusion_size": 47}), "exclusion"),
    "cpm-params-unknown-key": (_cpm(params={"n_predictorz": 16}), "cpm.n_predictorz"),
    "cpm-params-wrong-type": (_cpm(params={"k": "many"}), "cpm.k"),
    "cpm-params-negative-lambda": (_cpm(params={"lambda_L": -1}), "cpm.lambda_L"),
    "cpm-params-bad-method": (_cpm(params={"predictor_method": "psychic"}), "cpm.predictor_method"),
    "cpm-params-not-json": (lambda t, g, s: _cpm()(t, g, s) + ["--params", "{k: 1"], "--params"),
    "cpm-params-file-missing": (
        lambda t, g, s: _cpm()(t, g, s) + ["--params-file", str(t / "nowhere.json")],
        "nowhere.json",
    ),
}

# cases whose step writes a product: where it would be (must not exist afterwards)
OUTPUT_OPTION = {"download-local": "--cube", "gaia-crossmatch": "--out", "edge-model": "--out"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_refused_in_one_line(case, good, shared_data, tmp_path, capsys):
    good = {**good, "shared": shared_data}
    build, culprit = CASES[case]
    argv = build(tmp_path, good, shared_data)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    step = argv[0]
    if step in OUTPUT_OPTION:
        argv += [OUTPUT_OPTION[step], str(out_dir / ("cube.zarr" if step == "download-local" else "product"))]
    if step == "cpm-detrend":
        argv += ["--lightcurves", str(out_dir / "lightcurves.zarr")]
    log = tmp_path / "step.log"
    capsys.readouterr()
    rc = main([*argv, "--log", str(log)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    TALLY["bad inputs tried"] += 1
    assert rc == 1, f"{case}: exit status {rc}, stderr {err}"
    assert len(err) == 1, f"{case}: {len(err)} lines on stderr:\n" + "\n".join(err)
    line = err[0]
    assert line.startswith(f"error: {step}: "), line
    assert culprit in line, f"{case}: the line does not name {culprit!r}: {line}"
    assert "Traceback" in log.read_text(), f"{case}: no traceback in the log"
    left = sorted(p.name for p in out_dir.iterdir())
    assert left == [], f"{case}: left {left} behind"
    TALLY["bad inputs refused in one line"] += 1


def test_corpus_is_large_enough():
    assert len(CASES) >= 40

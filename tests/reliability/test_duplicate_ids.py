"""Duplicate source_ids are refused instead of silently losing light curves."""

import pytest
from astropy.table import vstack
from helpers.lightcurves import tiny_lightcurve_set

from workflow_lib.data import gaia
from workflow_lib.data.cube import write_zarr_atomic
from workflow_lib.data.lightcurves import write_lightcurve_fits


@pytest.fixture(scope="module")
def sector(tmp_path_factory):
    from workflow_lib.data import synthetic

    d = tmp_path_factory.mktemp("dup")
    cube, _, catalog = synthetic.simulate_sector({"seed": 5, "n_rows": 12, "n_cols": 12, "n_cadences": 20}, "dup")
    write_zarr_atomic(cube, d / "cube.zarr")
    return d, cube, catalog


def _with_duplicates(catalog, n=3):
    dup = catalog[:n].copy()
    dup["ra"] = dup["ra"] + 1e-4  # a different star under the same id
    return vstack([catalog, dup])


def test_local_catalog_with_duplicate_ids_refused(sector):
    d, _, catalog = sector
    bad = _with_duplicates(catalog)
    path = d / "input_catalog_dup.ecsv"
    bad.write(path, format="ascii.ecsv", overwrite=True)
    with pytest.raises(gaia.GaiaError) as exc:
        gaia.crossmatch_field(d / "cube.zarr", d / "catalog.ecsv", {}, local_catalog=str(path))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert "3 id(s) repeated" in msg
    for sid in sorted(int(s) for s in catalog["source_id"][:3]):
        assert str(sid) in msg
    assert not (d / "catalog.ecsv").exists()


def test_read_catalog_refuses_duplicates(sector, tmp_path):
    _, _, catalog = sector
    path = tmp_path / "dups.csv"
    _with_duplicates(catalog, 8).write(path, format="ascii.csv")
    with pytest.raises(
        gaia.GaiaError, match=r"dups\.csv: catalog has duplicate source_id values, 8 id\(s\).* and 3 more"
    ):
        gaia.read_catalog(path)


def test_crossmatch_of_normalised_table_refuses_duplicates(sector):
    _, cube, catalog = sector
    norm = gaia.normalize_catalog(catalog, "cat")
    bad = vstack([norm, norm[:1]])
    with pytest.raises(
        gaia.GaiaError, match=f"mine: catalog has duplicate source_id values.*{int(norm['source_id'][0])}"
    ):
        gaia.crossmatch(cube, bad, name="mine")


def test_unique_catalog_still_crossmatches(sector, tmp_path):
    d, _, catalog = sector
    path = tmp_path / "ok.ecsv"
    catalog.write(path, format="ascii.ecsv")
    cat = gaia.crossmatch_field(d / "cube.zarr", tmp_path / "catalog.ecsv", {}, local_catalog=str(path))
    assert len(cat) > 0 and len(set(cat["source_id"])) == len(cat)


def _lcs(ids):
    return tiny_lightcurve_set(ids, "LFD")


def test_write_lightcurve_fits_refuses_two_files_with_one_name(tmp_path):
    with pytest.raises(ValueError, match=r"would write the same FITS file twice \(first: lfd_7\.fits, lfd_9\.fits\)"):
        write_lightcurve_fits(_lcs([7, 8, 7, 9, 9]), tmp_path / "fits", "lfd")
    assert not (tmp_path / "fits").exists()  # refused before anything is written
    paths = write_lightcurve_fits(_lcs([7, 8, 9]), tmp_path / "fits", "lfd")
    assert sorted(p.name for p in paths) == ["lfd_7.fits", "lfd_8.fits", "lfd_9.fits"]

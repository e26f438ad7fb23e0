"""Pixels the mission pipeline already background-subtracted (TPF pixel tables with BACKAPP = T): the LFD
edge and PRF steps fit no sky terms there unless asked to (the LFD paper's assumption 1, Kepler's background is
zero). A free sky plane on a small stamp has no far-from-star pixels to pin it and trades off against the PRF's
wings: on the real Tabby's-star stamp it went to -170 e-/s/px and the star's modelled light on the pixels came
out above all the light the stamp holds. With no sky terms the edge step takes its noise floor from the
scatter of the same sky-candidate pixels."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from workflow_lib.data.cube import as_pixel_table, open_cube, write_zarr_atomic
from workflow_lib.data.fits_reader import read_field
from workflow_lib.data.gaia import crossmatch_field
from workflow_lib.data.synthetic import simulate_sector
from workflow_lib.lfd.prf import fraction_on_pixels
from workflow_lib.steps.lfd import edge_model_step, prf_model_step, sky_settings

TABBY = "kepler/test-tpf-kplr-tabby-100-cadences.fits"


@pytest.mark.parametrize(
    ("name", "subtracted"),
    [
        (TABBY, 1),
        ("kepler/ktwo210994964-c04_lpd-targ.fits", 1),
        ("tess_spoc/tess-s0015-2-3_tic273589987_tpf_100cad.fits", 1),
        ("tesscut/tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits", 0),  # FFI cutout: the sky is in it
    ],
)
def test_reader_records_whether_the_sky_was_subtracted(shared_data, name, subtracted):
    cube = read_field([shared_data / name])
    assert cube.attrs["background_subtracted"] == subtracted


def test_sky_settings_follow_the_pixels_unless_set():
    class Cube:
        def __init__(self, attrs):
            self.attrs = attrs

    p = {"background_order": 1, "x": 2}
    assert sky_settings(p, None, Cube({"background_subtracted": 1}), "prf") == {"background_order": -1, "x": 2}
    assert sky_settings(p, {"background_order": 1}, Cube({"background_subtracted": 1}), "prf") == p  # user's
    assert sky_settings(p, {}, Cube({"background_subtracted": 0}), "edge") == p
    assert sky_settings(p, {}, Cube({}), "edge") == p  # synthetic scenes, Kepler FFIs: the sky is in the pixels


def _light_check(d, params, shape=None):
    """(modelled light of the catalogued sources on the pixels, the stamp's total light, the PRF's sky terms);
    ``params`` for the edge and PRF steps, ``shape`` more settings of the PRF step only."""
    edge_model_step(d / "cube.zarr", d / "catalog.ecsv", d / "edge.json", params)
    m = prf_model_step(
        d / "cube.zarr", d / "catalog.ecsv", d / "edge.json", d / "prf.npz", d / "prf.png", {**params, **(shape or {})}
    )
    cat = Table.read(d / "catalog.ecsv")
    tab = as_pixel_table(open_cube(d / "cube.zarr").load())
    pc, pr = tab["column"].values, tab["row"].values
    frac = fraction_on_pixels(m, np.asarray(cat["column"], float), np.asarray(cat["row"], float), pc, pr)
    F = np.asarray(m.source_flux, float)
    stamp = float(np.nansum(np.nanmedian(tab["flux"].values, axis=tab["flux"].dims.index("time"))))
    return float(np.nansum(F * frac)), stamp, np.asarray(m.background)


def test_real_stamp_model_holds_no_more_light_than_the_pixels(shared_data, tmp_path):
    """Tabby's star (Kepler Q8, 11 x 10 px, header catalog only): with the free sky plane the star's modelled
    light on the pixels exceeded the stamp's total light (276,642 vs 270,923 e-/s, sky -170 e-/s/px); without
    sky terms it is 269,879 (the star's flux 298,092 -> 285,821 e-/s; its SAP is 245,589)."""
    cube = read_field([shared_data / TABBY])
    write_zarr_atomic(cube, tmp_path / "cube.zarr")
    crossmatch_field(tmp_path / "cube.zarr", tmp_path / "catalog.ecsv", {}, None)  # offline: header target
    light, stamp, sky = _light_check(tmp_path, {})
    assert sky.size == 0
    assert light <= stamp, (light, stamp)
    # the failure the default avoids, still reachable when asked for (with the free radial spline at r = 0 of
    # the paper; with regular_origin the free sky plane goes to -91 e-/s/px and the light stays within the stamp)
    free, _, sky1 = _light_check(tmp_path, {"background_order": 1}, {"regular_origin": False})
    assert sky1[0] < -50 and free > stamp
    tied, _, sky2 = _light_check(tmp_path, {"background_order": 1})
    assert sky1[0] < sky2[0] < 0 and tied <= stamp


def test_background_subtracted_field_fluxes_without_sky_terms(tmp_path):
    """A 30 x 30 px synthetic field with no sky (as a mission pipeline leaves it), marked background-subtracted:
    the PRF step's mean-frame fluxes of the eight brightest stars on the pixels are within 4 % of the truth
    without sky terms (measured median 0.98-1.03 on seeds 0-3, as the free plane: 0.99-1.02)."""
    cube, truth, cat = simulate_sector(
        {
            "seed": 1,
            "n_rows": 30,
            "n_cols": 30,
            "n_cadences": 100,
            "background_level": 0.0,
            "scattered_light_amplitude": 0.0,
        },
        field="bsub",
    )
    cube.attrs["background_subtracted"] = 1
    write_zarr_atomic(cube, tmp_path / "cube.zarr")
    cat.write(tmp_path / "in.ecsv", format="ascii.ecsv", overwrite=True)
    crossmatch_field(tmp_path / "cube.zarr", tmp_path / "catalog.ecsv", {}, str(tmp_path / "in.ecsv"))
    edge_model_step(tmp_path / "cube.zarr", tmp_path / "catalog.ecsv", tmp_path / "edge.json", {})
    m = prf_model_step(
        tmp_path / "cube.zarr",
        tmp_path / "catalog.ecsv",
        tmp_path / "edge.json",
        tmp_path / "p.npz",
        tmp_path / "p.png",
    )
    assert m.background_order == -1
    tid = {int(s): i for i, s in enumerate(truth["source_id"].values)}
    T = np.array([float(truth["flux0"].values[tid[int(s)]]) for s in m.source_id])
    on = np.asarray(Table.read(tmp_path / "catalog.ecsv")["on_cutout"], bool)
    top = np.argsort(-np.where(on, T, 0.0))[:8]
    ratio = np.asarray(m.source_flux)[top] / T[top]
    assert abs(np.median(ratio) - 1) < 0.04, ratio

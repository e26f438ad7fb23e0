"""Tests of workflow_lib.gaia: Gaia query (recorded responses), catalogs, astrometry, crossmatch."""

from __future__ import annotations

import gzip
import importlib.util
import json
import socket
import sys
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from workflow_lib.data import gaia
from workflow_lib.data.cube import CubeError, concat_stamps, make_cube, wcs_to_header_string, write_zarr_atomic

DATA = Path(__file__).parent / "data" / "gaia"
sys.path.insert(0, str(DATA))
import make_cone_response as design  # noqa: E402  (the designed field of cone_response.vot)

sys.path.pop(0)

COL0, ROW0 = 100, 200  # CCD coordinates of the test cutout's first pixel
BTJD_MID = 1650.0  # JD 2458650 TDB = 2019-06-19; 3.46 yr after J2016.0


# ------------------------------------------------------------------ fake Gaia archive (HTTP level)


class _Response:
    def __init__(self, status, reason, body=b"", headers=()):
        self.status, self.reason, self._body, self._headers = status, reason, body, list(headers)

    def read(self):
        return self._body

    def getheaders(self):
        return self._headers

    def __iter__(self):
        return iter(self._body.splitlines())


class FakeGaiaArchive:
    """Stands in for ``http.client.HTTPSConnection`` under astroquery's TapConn.

    Speaks the UWS async protocol of the Gaia TAP service: POST .../tap/async -> 303 + Location,
    GET .../async/<job>/phase -> COMPLETED, GET .../async/<job>/results/result -> gzip VOTable.
    """

    JOB = "1717171717171O"

    def __init__(self, response_file: Path | None, offline: bool = False):
        self.body = gzip.compress(response_file.read_bytes()) if response_file else b""
        self.offline = offline
        self.requests: list[tuple[str, str, str]] = []

    def connection(self, host, port=None, *args, **kwargs):
        archive = self

        class Conn:
            def __init__(self):
                self.host, self.port = host, port
                self._resp = None

            def request(self, method, url, body=None, headers=None):
                if archive.offline:
                    raise socket.gaierror(-3, "Temporary failure in name resolution")
                self._resp = archive.respond(method, url)
                if "/async" in url:  # (importing astroquery.gaia also GETs the archive's notices)
                    archive.requests.append((method, url, body.decode() if isinstance(body, bytes) else body))

            def getresponse(self):
                return self._resp

        assert host == "gea.esac.esa.int"
        return Conn()

    def respond(self, method, url):
        base = "/tap-server/tap/async"
        if method == "POST" and url == base:
            return _Response(303, "See Other", headers=[("Location", f"https://gea.esac.esa.int{base}/{self.JOB}")])
        if method == "GET" and url == f"{base}/{self.JOB}/phase":
            return _Response(200, "OK", b"COMPLETED")
        if method == "GET" and url == f"{base}/{self.JOB}/results/result":
            return _Response(
                200, "OK", self.body, [("Content-Type", "application/x-votable+xml"), ("Content-Encoding", "gzip")]
            )
        return _Response(404, "Not Found", b"")

    def queries(self):
        return [urllib.parse.parse_qs(b)["QUERY"][0] for m, _, b in self.requests if m == "POST"]


@pytest.fixture
def archive(monkeypatch, tmp_path):
    """Install a fake Gaia archive serving cone_response.vot; run in a scratch directory."""
    import astroquery.utils.tap.conn.tapconn as tapconn

    monkeypatch.chdir(tmp_path)
    fake = FakeGaiaArchive(DATA / "cone_response.vot")
    monkeypatch.setattr(tapconn.httplib, "HTTPSConnection", fake.connection)
    return fake


# ------------------------------------------------------------------ test cubes


def field_cube(mission="TESS", wcs=None, ncol=design.NCOL, nrow=design.NROW):
    w = design.field_wcs() if wcs is None else wcs
    nt = 4
    flux = np.ones((nt, nrow, ncol))
    t = BTJD_MID + np.array([-1.5, -0.5, 0.5, 1.5])
    if mission != "TESS":  # same epoch in BKJD
        t = t + 2457000.0 - 2454833.0
    return make_cube(
        flux,
        flux * 0.1,
        np.zeros(nt),
        t,
        np.arange(nt),
        ROW0 + np.arange(nrow),
        COL0 + np.arange(ncol),
        mission=mission,
        wcs_header=wcs_to_header_string(w) if w is not False else "",
    )


def design_table() -> Table:
    """cone_response.vot as a plain Gaia-column table."""
    return Table.read(DATA / "cone_response.vot", format="votable", use_names_over_ids=True)


# ------------------------------------------------------------------ Gaia archive


def test_query_gaia_runs_astroquery_on_recorded_response_and_caches(archive, tmp_path):
    centre = SkyCoord(150.0, 30.0, unit="deg")
    cache = tmp_path / "cache"
    t = gaia.query_gaia(centre, 5 * u.arcmin, 19.0, "gaiadr3.gaia_source", cache)
    assert [r[0] for r in archive.requests] == ["POST", "GET", "GET"]  # launch, phase, result
    (q,) = archive.queries()
    assert "FROM gaiadr3.gaia_source" in q and "phot_g_mean_mag <= 19.000" in q
    assert "CIRCLE('ICRS', 150.00000000, 30.00000000, 0.08333333)" in q
    assert len(t) == 10 and tuple(t.colnames) == gaia.GAIA_COLUMNS
    rows = {int(r["source_id"]): r for r in t}
    two_param = rows[1000000000000000009]  # masked pm/parallax/bp_rp in the VOTable
    assert two_param["pmra"] == 0 and two_param["pmdec"] == 0
    assert np.isnan(two_param["parallax"]) and np.isnan(two_param["bp_rp"])
    assert rows[1000000000000000001]["ra"] == pytest.approx(150.000402837617, abs=1e-12)
    # G flux and magnitude consistent with the DR3 zero point
    assert np.allclose(t["phot_g_mean_mag"], gaia.g_flux_to_mag(t["phot_g_mean_flux"]), atol=1e-6)
    files = list(cache.glob("gaia-*.ecsv"))
    assert len(files) == 1
    # the same query again: answered from the cache, no HTTP request
    t2 = gaia.query_gaia(centre, 5 * u.arcmin, 19.0, "gaiadr3.gaia_source", cache)
    assert len(archive.requests) == 3
    assert np.array_equal(t2["source_id"], t["source_id"]) and np.allclose(t2["ra"], t["ra"], rtol=0, atol=0)
    # a different query is a cache miss
    gaia.query_gaia(centre, 5 * u.arcmin, 18.0, "gaiadr3.gaia_source", cache)
    assert len(archive.requests) == 6 and len(list(cache.glob("gaia-*.ecsv"))) == 2


def test_query_gaia_parses_a_real_archive_response(monkeypatch, tmp_path):
    import astroquery.utils.tap.conn.tapconn as tapconn

    monkeypatch.chdir(tmp_path)
    fake = FakeGaiaArchive(DATA / "real_gaia_response.vot")  # all 152 gaia_source columns
    monkeypatch.setattr(tapconn.httplib, "HTTPSConnection", fake.connection)
    t = gaia.query_gaia(SkyCoord(268.07, 26.5, unit="deg"), 1 * u.deg, 19.0, cache_dir=None)
    assert tuple(t.colnames) == gaia.GAIA_COLUMNS
    assert list(t["source_id"]) == [4583627001381815936, 5348723816842275584]
    assert t["ra"][0] == pytest.approx(268.0676646661466, abs=1e-12)
    assert t["dec"][1] == pytest.approx(-51.3606309660715, abs=1e-12)
    assert np.all(t["ref_epoch"] == 2016.0)


def test_query_gaia_offline_gives_clear_error(monkeypatch, tmp_path):
    import astroquery.utils.tap.conn.tapconn as tapconn

    monkeypatch.chdir(tmp_path)
    fake = FakeGaiaArchive(None, offline=True)
    monkeypatch.setattr(tapconn.httplib, "HTTPSConnection", fake.connection)
    with pytest.raises(
        gaia.GaiaArchiveUnreachable, match=r"cannot reach the Gaia archive .*fields\.<name>\.gaia\.catalog"
    ):
        gaia.query_gaia(SkyCoord(1, 2, unit="deg"), 1 * u.arcmin, 19.0, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_build_adql_many_cones_and_bad_table():
    c = SkyCoord([10, 20], [30, 40], unit="deg")
    q = gaia.build_adql(c, [0.1, 0.2] * u.deg, 18.0)
    assert q.count("CONTAINS") == 2 and " OR " in q and "CIRCLE('ICRS', 20.00000000, 40.00000000, 0.20000000)" in q
    with pytest.raises(gaia.GaiaError, match="schema.table"):
        gaia.build_adql(c[0], 0.1 * u.deg, 18.0, table="gaia_source; DROP TABLE x")


# ------------------------------------------------------------------ astrometry


def _tangent_plane_propagation(ra0, dec0, pmra, pmdec, years):
    """Independent: linear motion in the tangent plane at (ra0, dec0), gnomonic deprojection."""
    xi = np.deg2rad(pmra * years / 3.6e6)
    eta = np.deg2rad(pmdec * years / 3.6e6)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    denom = np.cos(d0) - eta * np.sin(d0)
    ra = a0 + np.arctan2(xi, denom)
    dec = np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, denom))
    return np.rad2deg(ra) % 360, np.rad2deg(dec)


@pytest.mark.parametrize("parallax", [546.98, np.nan, 0.0, -1.5])
def test_proper_motion_matches_tangent_plane_computation(parallax):
    # Barnard's-star-like motion, high declination star as well, over ~3.46 yr
    t = Table(
        {
            "source_id": [1, 2],
            "ra": [269.4521, 84.29],
            "dec": [4.6934, -80.47],
            "pmra": [-801.55, 3000.0],
            "pmdec": [10362.39, -2500.0],
            "parallax": [parallax, parallax],
            "phot_g_mean_mag": [8.2, 10.0],
            "ref_epoch": [2016.0, 2016.0],
        }
    )
    t = gaia.normalize_catalog(t)
    obstime = Time(2457000.0 + BTJD_MID, format="jd", scale="tdb")
    out = gaia.propagate_to_epoch(t, obstime)
    years = (obstime - Time(2016.0, format="jyear", scale="tcb")).to_value(u.day) / 365.25
    ra_exp, dec_exp = _tangent_plane_propagation(
        np.asarray(t["ra"]), np.asarray(t["dec"]), np.asarray(t["pmra"]), np.asarray(t["pmdec"]), years
    )
    sep = SkyCoord(out["ra"], out["dec"], unit="deg").separation(SkyCoord(ra_exp, dec_exp, unit="deg"))
    assert np.all(sep.to_value(u.mas) < 1.0), sep.to_value(u.mas)
    # the star really moved ~36 arcsec, and the reference position is kept
    moved = SkyCoord(out["ra"], out["dec"], unit="deg").separation(SkyCoord(out["ra_ref"], out["dec_ref"], unit="deg"))
    assert moved[0].to_value(u.arcsec) == pytest.approx(10.393 * years, rel=1e-3)
    assert np.array_equal(np.asarray(out["ra_ref"]), np.asarray(t["ra"]))


def test_nan_or_missing_proper_motion_keeps_position():
    t = Table(
        {
            "source_id": [1],
            "ra": [10.0],
            "dec": [-20.0],
            "pmra": [np.nan],
            "pmdec": [np.nan],
            "phot_g_mean_mag": [12.0],
            "ref_epoch": [2016.0],
        }
    )
    out = gaia.propagate_to_epoch(gaia.normalize_catalog(t), Time(2030.0, format="jyear", scale="tdb"))
    assert out["ra"][0] == 10.0 and out["dec"][0] == -20.0


def test_sky_to_pixel_roundtrip_and_on_cutout():
    cube = field_cube()
    w = design.field_wcs()
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, design.NCOL + 2, 50)
    y = rng.uniform(-3, design.NROW + 2, 50)
    sky = w.pixel_to_world(x, y)
    t = Table({"ra": sky.ra.deg, "dec": sky.dec.deg})
    out = gaia.sky_to_pixel(t, cube)
    assert np.allclose(out["column"], COL0 + x, atol=1e-7) and np.allclose(out["row"], ROW0 + y, atol=1e-7)
    on = (x >= -0.5) & (x < design.NCOL - 0.5) & (y >= -0.5) & (y < design.NROW - 0.5)
    assert np.array_equal(np.asarray(out["on_cutout"]), on) and 0 < on.sum() < 50
    # distance to the cutout by hand
    dx = np.clip(np.maximum(-0.5 - x, x - (design.NCOL - 0.5)), 0, None)
    dy = np.clip(np.maximum(-0.5 - y, y - (design.NROW - 0.5)), 0, None)
    assert np.allclose(out["edge_distance"], np.hypot(dx, dy), atol=1e-7)


# ------------------------------------------------------------------ crossmatch


def test_crossmatch_keeps_cutout_and_margin_sources():
    cube = field_cube()
    cat = gaia.crossmatch(cube, design_table(), margin_pixels=4.0, mag_limit=None)
    ids = set(int(i) - 1000000000000000000 for i in cat["source_id"])
    assert ids == {1, 2, 3, 4, 7, 8, 9, 10}  # 5 (5.5 px off) and 6 (far) dropped
    assert list(cat["phot_g_mean_mag"]) == sorted(cat["phot_g_mean_mag"])
    assert tuple(cat.colnames) == gaia.OUTPUT_COLUMNS
    by = {int(r["source_id"]) - 1000000000000000000: r for r in cat}
    assert by[1]["on_cutout"] and by[2]["on_cutout"] and not by[3]["on_cutout"] and not by[8]["on_cutout"]
    # zero-pm sources sit exactly at their design pixel
    assert by[3]["column"] == pytest.approx(COL0 - 2.5, abs=1e-6) and by[3]["row"] == pytest.approx(
        ROW0 + 5.0, abs=1e-6
    )
    # the high-pm star moved +x by 9"/yr * 3.46 yr / 21" per px into the margin
    years = (Time(2457000.0 + BTJD_MID, format="jd", scale="tdb") - Time(2016.0, format="jyear", scale="tcb")).to_value(
        u.yr
    )
    assert by[8]["column"] - (COL0 - 4.6) == pytest.approx(9.0 * years / 21.0, abs=2e-3)
    # TESS a-priori flux: 15000 e-/s at T=10, T from G and BP-RP (Stassun et al. 2019 eq. 1)
    c = float(by[1]["bp_rp"])
    t1 = float(by[1]["phot_g_mean_mag"]) + 0.0324473 - 0.633923 * c + 0.0891337 * c**2 - 0.00522555 * c**3
    assert by[1]["expected_flux"] == pytest.approx(15000 * 10 ** (-0.4 * (t1 - 10)), rel=1e-12)
    assert np.all(cat["stamp"] == 0)
    assert cat.meta["mid_time_jd_tdb"] == pytest.approx(2457000.0 + BTJD_MID)
    # without proper motion the high-pm star would be 4.1 px off: dropped
    static = design_table()
    static["pmra"] = 0.0
    static["pmdec"] = 0.0
    ids_static = set(int(i) - 1000000000000000000 for i in gaia.crossmatch(cube, static, 4.0)["source_id"])
    assert 8 not in ids_static
    # a smaller margin drops the margin sources
    ids_small = set(int(i) - 1000000000000000000 for i in gaia.crossmatch(cube, design_table(), 1.0)["source_id"])
    assert ids_small == {1, 2, 7, 9, 10}


def test_band_mag_tess_colour_relation_and_fallbacks():
    g = np.array([12.0, 12.0, 12.0, 12.0, 12.0])
    c = np.array([0.0, 1.0, np.nan, 5.0, -1.0])
    t = gaia.band_mag(g, c, "TESS")
    assert t[0] == pytest.approx(12.0324473, abs=1e-9)
    assert t[1] == pytest.approx(12.0 + 0.0324473 - 0.633923 + 0.0891337 - 0.00522555, abs=1e-9)
    assert t[2] == pytest.approx(12.0 - 0.430)  # no colour: TIC-8's T = G - 0.430
    assert t[3] == pytest.approx(gaia.tess_mag_from_gaia(12.0, 3.0))  # clipped to the relation's range
    assert t[4] == pytest.approx(gaia.tess_mag_from_gaia(12.0, -0.2))
    np.testing.assert_array_equal(gaia.band_mag(g, c, "Kepler"), g)  # Kp = G


def test_expected_flux_matches_true_tess_flux_of_synthetic_scene():
    """The a-priori fluxes of a rendered scene's catalog against its true T-band fluxes: unbiased, with the
    scatter of the scene's G-vs-T colour term only (with T = G they were ~40 % low)."""
    from workflow_lib.data import random_scenes as rs

    cube, truth, catalog = rs.simulate_scene(rs.sample_scene(3), n_cadences=20)
    cat = gaia.crossmatch(cube, catalog, 4.0, None)
    tr = {int(s): i for i, s in enumerate(truth["source_id"].values)}
    idx = np.array([tr[int(s)] for s in cat["source_id"]])
    ratio = np.asarray(cat["expected_flux"], float) / truth["flux0"].values[idx]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    spread = np.percentile(np.log(ratio), [16, 84])
    assert (spread[1] - spread[0]) / 2 < 0.12  # ~ the colour scatter (<= 0.1 mag), not the 0.3 mag colour range


def test_crossmatch_kepler_defaults():
    cube = field_cube(mission="Kepler")
    cat = gaia.crossmatch(cube, design_table(), 4.0, None)
    assert 1000000000000000007 not in set(cat["source_id"])  # G 18.5 > 18
    r = cat[cat["source_id"] == 1000000000000000002][0]
    assert r["expected_flux"] == pytest.approx(1.74e5, rel=1e-12)  # Kp = G = 12


def test_crossmatch_field_from_archive_writes_catalog_deterministically(archive, tmp_path):
    cube_path = tmp_path / "results" / "run" / "fieldA" / "cube.zarr"
    write_zarr_atomic(field_cube(), cube_path)
    params = {
        "mag_limit": None,
        "margin_pixels": 4.0,
        "table": "gaiadr3.gaia_source",
        "cache_dir": str(tmp_path / "gc"),
    }
    out = tmp_path / "catalog.ecsv"
    gaia.crossmatch_field(cube_path, out, params, local_catalog=None)
    (q,) = archive.queries()
    assert "phot_g_mean_mag <= 19.000" in q  # TESS default limit
    cat = Table.read(out, format="ascii.ecsv")
    assert len(cat) == 8 and cat.meta["catalog_source"] == "gaia_archive"
    assert cat.meta["provenance"]["step"] == "gaia_crossmatch" and cat.meta["provenance"]["config"] == params
    assert cat["source_id"].dtype == np.int64 and cat["ra"].unit == u.deg
    first = out.read_bytes()
    gaia.crossmatch_field(cube_path, out, params, local_catalog=None)  # cache hit, same bytes
    assert len(archive.requests) == 3 and out.read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_crossmatch_field_offline_error_names_the_field(monkeypatch, tmp_path):
    import astroquery.utils.tap.conn.tapconn as tapconn

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tapconn.httplib, "HTTPSConnection", FakeGaiaArchive(None, offline=True).connection)
    cube_path = tmp_path / "myfield" / "cube.zarr"
    write_zarr_atomic(field_cube(), cube_path)  # no target attrs: no header fallback
    # the message says the headers were tried as a stand-in, and why they could not be
    with pytest.raises(
        gaia.GaiaArchiveUnreachable, match=r"fields\.myfield\.gaia\.catalog .*stamp headers cannot stand in.*target_id"
    ):
        gaia.crossmatch_field(cube_path, tmp_path / "c.ecsv", {"cache_dir": str(tmp_path / "gc")})
    assert not (tmp_path / "c.ecsv").exists()


def test_crossmatch_field_with_local_catalog(tmp_path):
    """The synthetic-sector path of the rule: a local input_catalog.ecsv, no archive access."""
    cube_path = tmp_path / "synth" / "cube.zarr"
    write_zarr_atomic(field_cube(), cube_path)
    local = tmp_path / "synth" / "input_catalog.ecsv"
    design_table().write(local, format="ascii.ecsv")
    out = tmp_path / "synth" / "catalog.ecsv"
    cat = gaia.crossmatch_field(cube_path, out, {"margin_pixels": 1.0, "mag_limit": 16.5}, local_catalog=str(local))
    assert set(int(i) - 1000000000000000000 for i in cat["source_id"]) == {1, 2, 9}
    back = Table.read(out, format="ascii.ecsv")
    assert back.meta["catalog_source"] == "local" and str(local) in back.meta["provenance"]["inputs"]
    assert np.array_equal(back["source_id"], cat["source_id"]) and np.allclose(
        back["column"], cat["column"], rtol=0, atol=0
    )


def test_cube_without_wcs_is_a_clear_error(tmp_path):
    cube_path = tmp_path / "f" / "cube.zarr"
    write_zarr_atomic(field_cube(wcs=False), cube_path)
    with pytest.raises(CubeError, match="no WCS"):
        gaia.crossmatch_field(cube_path, tmp_path / "c.ecsv", {}, local_catalog=str(DATA / "cone_response.vot"))


# ------------------------------------------------------------------ local catalogs


@pytest.mark.parametrize(
    "fmt,suffix", [("ascii.ecsv", ".ecsv"), ("ascii.csv", ".csv"), ("fits", ".fits"), ("votable", ".vot")]
)
def test_read_catalog_formats(tmp_path, fmt, suffix):
    ref = gaia.normalize_catalog(design_table())
    path = tmp_path / f"cat{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FITS cannot store the unit 'electron / s'
        ref.write(path, format=fmt)
    t = gaia.read_catalog(path)
    assert tuple(t.colnames) == gaia.GAIA_COLUMNS
    assert np.array_equal(t["source_id"], ref["source_id"])
    for c in gaia.GAIA_COLUMNS[1:]:
        assert np.allclose(t[c], ref[c], rtol=1e-12, equal_nan=True), c


def test_read_catalog_defaults_and_errors(tmp_path):
    t = Table(
        {"SOURCE_ID": [5, 6], "RA": [1.0, 2.0], "DEC": [3.0, 4.0], "phot_g_mean_flux": [gaia.g_mag_to_flux(12.0), 1e4]}
    )
    p = tmp_path / "upper.csv"
    t.write(p, format="ascii.csv")
    with pytest.warns(UserWarning, match="ref_epoch"):
        c = gaia.read_catalog(p)
    assert np.all(c["pmra"] == 0) and np.all(c["ref_epoch"] == 2016.0)
    assert c["phot_g_mean_mag"][0] == pytest.approx(12.0, abs=1e-12)
    bad = tmp_path / "nodec.ecsv"
    Table({"source_id": [1], "ra": [1.0], "phot_g_mean_mag": [10.0]}).write(bad, format="ascii.ecsv")
    with pytest.raises(gaia.GaiaError, match=r"nodec\.ecsv.*\['dec'\]"):
        gaia.read_catalog(bad)
    with pytest.raises(gaia.GaiaError, match="not found"):
        gaia.read_catalog(tmp_path / "missing.fits")
    junk = tmp_path / "junk.fits"
    junk.write_text("not fits")
    with pytest.raises(gaia.GaiaError, match=r"junk\.fits: cannot read catalog"):
        gaia.read_catalog(junk)


# ------------------------------------------------------------------ pixel tables (Kepler channel)


def _stamp(ra, dec, col0, row0, ncol, nrow, target):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(ncol + 1) / 2, (nrow + 1) / 2]
    w.wcs.cdelt = [-3.98 / 3600, 3.98 / 3600]
    nt = 3
    flux = np.ones((nt, nrow, ncol))
    flux[:, 0, 0] = np.nan  # uncollected corner, as in real TPFs
    ds = make_cube(
        flux,
        flux,
        np.zeros(nt),
        1200.0 + np.arange(nt) * 0.02,
        np.arange(nt),
        row0 + np.arange(nrow),
        col0 + np.arange(ncol),
        mission="Kepler",
        wcs_header=wcs_to_header_string(w),
        attrs=target,
    )
    return ds, w


def _kepler_channel():
    s0, w0 = _stamp(
        290.0, 45.0, 500, 300, 6, 5, {"target_id": 111, "ra_obj": 290.0, "dec_obj": 45.0, "target_mag": 12.5}
    )
    s1, w1 = _stamp(
        290.05, 45.02, 700, 480, 5, 5, {"target_id": 222, "ra_obj": 290.05, "dec_obj": 45.02, "target_mag": 14.0}
    )
    return concat_stamps([s0, s1]), (w0, w1)


def test_pixel_table_assigns_stamps():
    cube, (w0, w1) = _kepler_channel()
    pts = [(w0, 2.2, 1.7), (w1, 0.2, 4.1), (w0, -2.0, 2.0), (w1, 7.5, 2.0), (w0, 20.0, 2.0)]
    sky = SkyCoord([w.pixel_to_world(x, y) for w, x, y in pts])
    t = Table(
        {
            "source_id": np.arange(5) + 1,
            "ra": sky.ra.deg,
            "dec": sky.dec.deg,
            "pmra": np.zeros(5),
            "pmdec": np.zeros(5),
            "phot_g_mean_mag": np.full(5, 13.0),
            "ref_epoch": np.full(5, 2016.0),
        }
    )
    out = gaia.sky_to_pixel(t, cube)
    assert list(out["stamp"][:4]) == [0, 1, 0, 1]
    assert np.allclose(out["column"][:2], [502.2, 700.2], atol=1e-7) and np.allclose(
        out["row"][:2], [301.7, 484.1], atol=1e-7
    )
    assert list(out["on_cutout"]) == [True, True, False, False, False]
    assert np.allclose(out["edge_distance"][2:4], [1.5, 3.0], atol=1e-7)
    cat = gaia.crossmatch(cube, t, margin_pixels=4.0)
    assert sorted(cat["source_id"]) == [1, 2, 3, 4]  # source 5 is 14.5 px off stamp 0


def test_header_fallback_when_offline(monkeypatch, tmp_path):
    import astroquery.utils.tap.conn.tapconn as tapconn

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tapconn.httplib, "HTTPSConnection", FakeGaiaArchive(None, offline=True).connection)
    cube, _ = _kepler_channel()
    cube_path = tmp_path / "ch4" / "cube.zarr"
    write_zarr_atomic(cube, cube_path)
    with pytest.warns(UserWarning, match="only the 2 target"):
        cat = gaia.crossmatch_field(cube_path, tmp_path / "c.ecsv", {"cache_dir": str(tmp_path / "gc")})
    assert list(cat["source_id"]) == [111, 222] and list(cat["stamp"]) == [0, 1]
    assert cat.meta["catalog_source"] == "header_targets"
    assert np.all(cat["on_cutout"])
    assert cat["expected_flux"][0] == pytest.approx(1.74e5 * 10 ** (-0.2), rel=1e-12)


def test_tess_header_target_magnitude_is_taken_as_t():
    """A TESS stamp's header TESSMAG is already T: no G-to-T colour term on it (T = 11 -> 6,000 e-/s)."""
    cube, _ = _stamp(
        84.3, -80.5, 500, 300, 8, 8, {"target_id": 7, "ra_obj": 84.3, "dec_obj": -80.5, "target_mag": 11.0}
    )
    cube.attrs["mission"] = "TESS"
    hdr = gaia.header_catalog(cube)
    assert hdr.meta["magnitudes"] == "instrument"
    cat = gaia.crossmatch(cube, hdr, margin_pixels=4.0)
    assert cat["expected_flux"][0] == pytest.approx(15000 * 10 ** (-0.4), rel=1e-12)
    # the same magnitude as a Gaia G without colour gets TIC-8's T = G - 0.430
    plain = Table(hdr, copy=True)
    plain.meta.clear()
    assert gaia.crossmatch(cube, plain, 4.0)["expected_flux"][0] == pytest.approx(15000 * 10 ** (-0.4 * 0.57))


def test_real_kepler_stamps_header_catalog(shared_data):
    """The ten real Kepler Q12 ch4 stamps: each header target lands on its own stamp (or, where stamps
    overlap, on the stamp that keeps that CCD pixel)."""
    fitsio = pytest.importorskip("workflow_lib.data.fits_reader")
    files = sorted((shared_data / "kepler").glob("tpf_test_0*.fits"))
    cube = fitsio.read_field(files)
    cat = gaia.crossmatch(cube, gaia.header_catalog(cube), margin_pixels=4.0)
    stamps = json.loads(cube.attrs["stamps"])
    assert len(cat) == len(files) == 10
    for r in cat:
        k = [int(s["target_id"]) for s in stamps].index(int(r["source_id"]))
        assert r["on_cutout"]
        if r["stamp"] != k:  # a pixel two stamps read is kept once, under the first stamp
            near = np.argmin(np.hypot(cube["column"].values - r["column"], cube["row"].values - r["row"]))
            assert cube["stamp"].values[near] == r["stamp"] < k and cube.attrs["duplicate_pixels_dropped"] > 0


# ------------------------------------------------------------------ synthetic sector


def test_synthetic_sector_positions_match_truth():
    if importlib.util.find_spec("workflow_lib.data.synthetic") is None:
        pytest.skip("workflow_lib.synthetic not available yet")
    from workflow_lib.data import synthetic

    params = {
        "n_rows": 16,
        "n_cols": 16,
        "n_cadences": 20,
        "n_planets": 0,
        "n_variables": 0,
        "transient": False,
        "koi608": False,
    }
    cube, truth, catalog = synthetic.simulate_sector(params, "synthetic_test")
    cat = gaia.crossmatch(cube, catalog, margin_pixels=4.0, mag_limit=19.0)
    tid = np.asarray(truth["source_id"].values)
    bright = cat[cat["phot_g_mean_mag"] < 17]
    assert len(bright) >= 5 and np.asarray(bright["on_cutout"]).sum() >= 1
    idx = np.searchsorted(tid, bright["source_id"], sorter=np.argsort(tid))
    idx = np.argsort(tid)[idx]
    assert np.array_equal(tid[idx], np.asarray(bright["source_id"]))
    dcol = np.asarray(bright["column"]) - truth["column"].values[idx]
    drow = np.asarray(bright["row"]) - truth["row"].values[idx]
    assert np.all(np.hypot(dcol, drow) < 0.05), np.hypot(dcol, drow)

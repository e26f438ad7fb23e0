"""MAST downloads against recorded responses: astroquery's real request/parsing code runs, only
``requests.adapters.HTTPAdapter.send`` (the HTTP transport) is replaced. Never touches the network."""

import gzip
import io
import json
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pytest
import requests
from astropy.io import fits
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from workflow_lib.data import mast
from workflow_lib.data.cube import CubeError, open_cube
from workflow_lib.data.mast import MastError, download_field, parse_target, request_key

REC = Path(__file__).resolve().parent / "data" / "mast"
TESSCUT_6X6 = "tesscut/tess-s0001-4-2_84.291190_-80.469170_6x6_astrocut.fits"


def _response(request, status=200, body=b"", headers=None):
    r = requests.Response()
    r.status_code = status
    r.reason = "OK" if status < 400 else "Error"
    r._content = body
    r._content_consumed = True
    r.headers = CaseInsensitiveDict(headers or {})
    r.url = request.url
    r.request = request
    r.encoding = "utf-8"
    return r


class FakeMast:
    """Serves recorded MAST responses by URL; counts requests per kind."""

    def __init__(self, shared_data, *, offline=False, bad_files=(), fail_first=0):
        self.shared = shared_data
        self.offline = offline
        self.fail_first = fail_first
        self.timeouts = {}
        self.bad_files = set(bad_files)
        self.calls = []
        self.resolver = json.loads((REC / "santa_resolver.json").read_text())
        # the Kepler TPFs MAST would serve, keyed by product file name (real files, gzipped)
        self.tpfs = {}
        for f in sorted((shared_data / "kepler").glob("tpf_test_*.fits")):
            kic = fits.getheader(f, 0)["KEPLERID"]
            self.tpfs[f"kplr{kic:09d}-2012088054726_lpd-targ.fits.gz"] = f

    def count(self, kind):
        return sum(1 for k, _ in self.calls if k == kind)

    def send(self, adapter, request, **kwargs):
        url = urlparse(request.url)
        body = request.body.decode() if isinstance(request.body, bytes) else (request.body or "")
        if self.offline or self.fail_first > 0:
            self.fail_first -= 1
            self.calls.append(("offline", request.url))
            raise requests.ConnectionError(
                f"Failed to resolve '{url.hostname}' ([Errno -3] Temporary failure in name resolution)"
            )
        if url.hostname == "mastresolver.stsci.edu":
            self.calls.append(("resolve", request.url))
            name = parse_qs(url.query)["name"][0].lower()
            rec = self.resolver.get(name, {"resolvedCoordinate": [], "status": ""})
            return _response(request, body=json.dumps(rec).encode(), headers={"Content-Type": "application/json"})
        if url.path.endswith("/columnsconfig"):
            cfg = parse_qs(body)["colConfigId"][0]
            self.calls.append(("columnsconfig", cfg))
            return _response(request, body=(REC / f"columnsconfig_{cfg}.json").read_bytes())
        if url.path.endswith("/api/v0/invoke"):
            req = json.loads(unquote(body.split("request=", 1)[1]))
            service = req["service"]
            self.calls.append(("invoke", service))
            rec = json.loads((REC / f"invoke_{service}_kepler16.json").read_text())
            if service == "Mast.Caom.Products":  # the server returns the products of the requested obsids
                wanted = set(req["params"]["obsid"].split(","))
                rec["data"] = [row for row in rec["data"] if row["obsID"] in wanted]
            return _response(request, body=json.dumps(rec).encode())
        if url.path.endswith("/Download/file"):
            uri = unquote(parse_qs(url.query)["uri"][0])
            name = uri.rsplit("/", 1)[-1]
            self.calls.append(("download" if request.method == "GET" else "head", name))
            if name in self.bad_files:
                data = b"<html>503 Service Unavailable - maintenance</html>" * 40
            elif name in self.tpfs:
                data = gzip.compress(self.tpfs[name].read_bytes(), mtime=0)
            else:
                return _response(request, status=404, body=b"not found")
            return _response(
                request,
                body=b"" if request.method == "HEAD" else data,
                headers={"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"},
            )
        if url.path.endswith("/sector"):
            self.calls.append(("tesscut_sector", request.url))
            return _response(request, body=(REC / "tesscut_sector_pimen.json").read_bytes())
        if url.path.endswith("/astrocut"):
            q = parse_qs(url.query)
            self.timeouts["astrocut"] = kwargs.get("timeout")
            self.calls.append(("tesscut_cutout", request.url))
            src = self.shared / TESSCUT_6X6
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.write(src, arcname=src.name)
            assert q["sector"] == ["1"] and q["x"] == ["6"] and q["y"] == ["6"], q
            return _response(request, body=buf.getvalue(), headers={"Content-Type": "application/zip"})
        raise AssertionError(f"unexpected request {request.method} {request.url}")


@pytest.fixture
def fake_mast(monkeypatch, shared_data):
    def install(**kwargs):
        fake = FakeMast(shared_data, **kwargs)
        monkeypatch.setattr(HTTPAdapter, "send", lambda self, request, **kw: fake.send(self, request, **kw))
        return fake

    return install


def test_parse_target():
    c, name = parse_target("84.291188 -80.469119", "TESS")
    assert name is None and abs(c.ra.deg - 84.291188) < 1e-9 and abs(c.dec.deg + 80.469119) < 1e-9
    assert parse_target("12644769", "Kepler") == (None, "KIC 12644769")
    assert parse_target("273589987", "TESS") == (None, "TIC 273589987")
    assert parse_target("Kepler-16", "Kepler") == (None, "Kepler-16")
    with pytest.raises(MastError, match="RA must be"):
        parse_target("400 10", "TESS")


def test_tesscut_download_by_name(fake_mast, shared_data, tmp_path):
    fake = fake_mast()
    params = {"mission": "TESS", "target": "pi Men", "size": 6}
    out = download_field(
        params,
        tmp_path / "f" / "cube.zarr",
        field="pimen",
        cache_dir=tmp_path / "cache",
        retries=0,
        timeout_s=5,
        backoff_s=0.0,
    )
    assert fake.count("resolve") == 1 and fake.count("tesscut_sector") == 1 and fake.count("tesscut_cutout") == 1
    assert fake.timeouts["astrocut"] == 5  # the configured timeout reaches the HTTP transport
    ds = open_cube(out)
    assert ds.attrs["mission"] == "TESS" and ds.attrs["sector"] == 1 and ds.attrs["field"] == "pimen"
    assert dict(ds.sizes) == {"time": 50, "row": 6, "column": 6}
    with fits.open(shared_data / TESSCUT_6X6) as h:
        np.testing.assert_array_equal(ds["flux"].values, h[1].data["FLUX"])
    prov = json.loads(ds.attrs["provenance"])
    assert prov["step"] == "download_mast" and prov["inputs"][0].endswith("_6x6_astrocut.fits")

    # second run: the cache manifest is found, no request at all
    fake.calls.clear()
    download_field(
        params,
        tmp_path / "g" / "cube.zarr",
        field="pimen",
        cache_dir=tmp_path / "cache",
        retries=0,
        timeout_s=5,
        backoff_s=0.0,
    )
    assert fake.calls == []


def test_kepler_tpfs_by_name(fake_mast, shared_data, tmp_path):
    fake = fake_mast()
    params = {"mission": "Kepler", "target": "Kepler-16", "quarter": 12, "radius_arcmin": 5.0, "max_tpfs": 200}
    out = download_field(
        params,
        tmp_path / "k16" / "cube.zarr",
        field="k16",
        cache_dir=tmp_path / "cache",
        retries=1,
        timeout_s=5,
        backoff_s=0.0,
    )
    # astroquery's real portal code ran: column configs, the position query and the product list
    assert ("columnsconfig", "Mast.Caom.Cone") in fake.calls
    assert ("invoke", "Mast.Caom.Filtered.Position") in fake.calls and ("invoke", "Mast.Caom.Products") in fake.calls
    downloaded = sorted(n for k, n in fake.calls if k == "download")
    assert downloaded == sorted(fake.tpfs)  # only the Q12 lpd-targ files, not Q11, not light curves
    ds = open_cube(out)
    assert ds.attrs["layout"] == "pixel_table" and ds.attrs["quarter"] == 12 and ds.attrs["channel"] == 4
    stamps = json.loads(ds.attrs["stamps"])
    assert len(stamps) == 10 and stamps[0]["target_id"] == 12644769  # nearest (the target) first
    # pixel count = distinct CCD pixels collected by the ten real stamps (overlaps kept once)
    ccd = set()
    for f in fake.tpfs.values():
        with fits.open(f) as h:
            rr, cc = np.nonzero(np.isfinite(h[1].data["FLUX"]).any(axis=0))
            ccd |= set(zip((rr + h[1].header["2CRV5P"]).tolist(), (cc + h[1].header["1CRV5P"]).tolist()))
    assert ds.sizes["pixel"] == len(ccd)

    # max_tpfs keeps the nearest ones; those files are cache hits (no download)
    fake.calls.clear()
    out2 = download_field(
        dict(params, max_tpfs=3),
        tmp_path / "k3" / "cube.zarr",
        field="k3",
        cache_dir=tmp_path / "cache",
        retries=0,
        timeout_s=5,
        backoff_s=0.0,
    )
    assert fake.count("download") == 0 and fake.count("head") == 0
    ds3 = open_cube(out2)
    ids = [s["target_id"] for s in json.loads(ds3.attrs["stamps"])]
    assert ids[0] == 12644769 and len(ids) == 3
    assert ids[1:] == [12644774, 12644778]  # the two nearest neighbours (7" and 17" away)


def test_offline_clear_error_after_retries(fake_mast, tmp_path):
    fake = fake_mast(offline=True)
    with pytest.raises(MastError, match=r"cannot reach MAST: .*3 attempt.*use source: local"):
        download_field(
            {"mission": "TESS", "target": "pi Men", "sector": 1, "size": 6},
            tmp_path / "c.zarr",
            field="x",
            cache_dir=tmp_path / "cache",
            retries=2,
            timeout_s=1,
            backoff_s=0.001,
        )
    assert fake.count("offline") == 3
    assert not (tmp_path / "c.zarr").exists()


def test_transient_failures_are_retried(fake_mast, tmp_path):
    fake = fake_mast(fail_first=2)
    out = download_field(
        {"mission": "TESS", "target": "84.291188 -80.469119", "sector": 1, "size": 6},
        tmp_path / "c.zarr",
        field="x",
        cache_dir=tmp_path / "cache",
        retries=2,
        timeout_s=5,
        backoff_s=0.001,
    )
    assert fake.count("offline") == 2 and fake.count("tesscut_cutout") == 1 and fake.count("resolve") == 0
    assert open_cube(out).sizes["time"] == 50


def test_bad_downloaded_file_is_named(fake_mast, tmp_path):
    bad = "kplr012644774-2012088054726_lpd-targ.fits.gz"
    fake_mast(bad_files={bad})
    with pytest.raises(CubeError, match=bad):
        download_field(
            {"mission": "Kepler", "target": "KIC 12644769", "quarter": 12, "max_tpfs": 2},
            tmp_path / "c.zarr",
            field="x",
            cache_dir=tmp_path / "cache",
            retries=0,
            timeout_s=5,
            backoff_s=0,
        )
    assert not (tmp_path / "c.zarr").exists()
    # the corrupt file does not stay in the cache as if it were good
    assert not (tmp_path / "cache" / "tpf" / "kepler" / bad).exists()


def test_unknown_target_and_missing_quarter(fake_mast, tmp_path):
    fake_mast()
    with pytest.raises(MastError, match="could not resolve target 'No Such Star'"):
        download_field(
            {"mission": "TESS", "target": "No Such Star", "sector": 1},
            tmp_path / "a.zarr",
            field="a",
            cache_dir=tmp_path / "cache",
            retries=0,
            timeout_s=5,
            backoff_s=0,
        )
    with pytest.raises(MastError, match="quarter is required"):
        download_field(
            {"mission": "Kepler", "target": "Kepler-16"},
            tmp_path / "b.zarr",
            field="b",
            cache_dir=tmp_path / "cache",
            retries=0,
            timeout_s=5,
            backoff_s=0,
        )


def test_request_key_depends_on_selection():
    a = request_key({"mission": "Kepler", "target": "Kepler-16", "quarter": 12})
    assert a == request_key({"mission": "Kepler", "target": "Kepler-16", "quarter": 12})
    assert a != request_key({"mission": "Kepler", "target": "Kepler-16", "quarter": 11})


def test_name_resolver_that_hangs_times_out(monkeypatch):
    """astroquery's resolver uses a bare requests.get (no timeout): each attempt is cut at timeout_s."""
    import time as _time

    from astroquery.mast import utils as mast_utils

    monkeypatch.setattr(mast_utils, "resolve_object", lambda name, **kw: _time.sleep(5))
    t0 = _time.perf_counter()
    with pytest.raises(mast.MastError, match="no answer within 0.2 s"):
        mast.resolve_target("WASP-18", "TESS", retries=1, backoff_s=0.0, timeout_s=0.2)
    assert _time.perf_counter() - t0 < 2.0
    # a quick answer goes through unchanged
    assert mast.call_with_timeout(lambda: 42, 1.0, "quick") == 42
    with pytest.raises(ValueError, match="boom"):
        mast.call_with_timeout(lambda: (_ for _ in ()).throw(ValueError("boom")), 1.0, "failing")

"""Kepler/K2 channel fields (issue 11, item 5): every TPF of one CCD channel of a quarter/campaign as one
pixel-table field, from a local directory (real files) or from one MAST channel search (recorded,
hand-constructed responses in tests/data/mast: see make_channel_fixtures.py). Never touches the network."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import yaml
from astropy.io import fits
from conftest import REPO
from snakemake.utils import validate
from test_mast import REC, FakeMast, _response

from workflow_lib.core.settings import SCHEMA_PATH, ConfigError, check_config
from workflow_lib.data import mast
from workflow_lib.data.cube import CubeError, open_cube
from workflow_lib.data.fits_reader import local_files, read_field, select_channel_files, write_local_field
from workflow_lib.data.mast import MastError, download_field, parse_channel_search

K2_FILE = "ktwo210994964-c04_lpd-targ.fits"
OTHERS = ("ktwo210994964-c04_lpd-targ.fits", "test-tpf-kplr-tabby-100-cadences.fits")  # C4 ch49, Q8 ch56
NOT_TPF = "kplr-ffi_ch01_test.fits"


def _ccd_pixels(files):
    """Distinct CCD (row, column) pixels with data in the stamps of ``files`` (overlaps counted once)."""
    ccd = set()
    for f in files:
        with fits.open(f) as h:
            rr, cc = np.nonzero(np.isfinite(h[1].data["FLUX"]).any(axis=0))
            ccd |= set(zip((rr + h[1].header["2CRV5P"]).tolist(), (cc + h[1].header["1CRV5P"]).tolist()))
    return len(ccd)


# ------------------------------------------------------------------ local directory


def test_local_channel_directory_builds_one_pixel_table(shared_data, tmp_path, caplog):
    """The real kepler/ directory holds ten Q12 channel-4 TPFs, two TPFs of other channels and an FFI crop:
    the channel field keeps the ten, skips the others with a warning naming each."""
    kepler = shared_data / "kepler"
    with caplog.at_level(logging.INFO, logger="workflow_lib"):
        out = write_local_field(
            {"directory": str(kepler), "channel": 4, "quarter": 12}, tmp_path / "ch4" / "cube.zarr", field="ch4"
        )
    ds = open_cube(out)
    assert ds.attrs["layout"] == "pixel_table" and ds.attrs["mission"] == "Kepler"
    assert ds.attrs["channel"] == 4 and ds.attrs["quarter"] == 12 and ds.attrs["field"] == "ch4"
    stamps = json.loads(ds.attrs["stamps"])
    tpfs = sorted(kepler.glob("tpf_test_*.fits"))
    assert sorted(s["target_id"] for s in stamps) == sorted(fits.getheader(f, 0)["KEPLERID"] for f in tpfs)
    assert ds.sizes["pixel"] == _ccd_pixels(tpfs) and ds.sizes["time"] == 10
    with fits.open(tpfs[0]) as h:
        np.testing.assert_allclose(ds["time"].values, h[1].data["TIME"])
    used = json.loads(ds.attrs["source_files"])
    assert sorted(Path(u).name for u in used) == [f.name for f in tpfs]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    other = next(m for m in warnings if "other channels" in m)
    assert "skipping 2 of 13 files" in other and all(name in other for name in OTHERS)
    assert any(NOT_TPF in m and "not Kepler/K2 target pixel files" in m for m in warnings)


def test_local_channel_glob_and_refusals(shared_data, tmp_path):
    kepler = shared_data / "kepler"
    # a glob picks a subset
    files = local_files({"glob": str(kepler / "tpf_test_0[0-4].fits")})
    assert [f.name for f in files] == [f"tpf_test_0{k}.fits" for k in range(5)]
    ds = read_field(select_channel_files(files, channel=4, quarter=12))
    assert len(json.loads(ds.attrs["stamps"])) == 5
    # nothing on the requested channel: one error saying what was found
    with pytest.raises(
        CubeError,
        match=r"no target pixel file of Kepler quarter 12 channel 5 among 13 file\(s\) "
        r"\(found: C4 ch49 x1, Q12 ch4 x10, Q8 ch56 x1\)",
    ):
        select_channel_files(local_files({"directory": str(kepler)}), channel=5, quarter=12, what="field x")
    # the K2 file as a channel field of its own (campaign 4, channel 49)
    k2 = select_channel_files(local_files({"directory": str(kepler)}), channel=49, campaign=4)
    assert [f.name for f in k2] == [K2_FILE]
    # a corrupt file is an error naming it, not a skip
    bad = tmp_path / "kplr000000001-2012088054726_lpd-targ.fits"
    bad.write_bytes(b"<html>503</html>" * 100)
    with pytest.raises(CubeError, match=bad.name):
        select_channel_files([*files, bad], channel=4)
    # without `channel` (today's multi-TPF field) mixed channels stay an error naming the odd file
    with pytest.raises(CubeError, match="test-tpf-kplr-tabby.*one channel and quarter only"):
        read_field([kepler / "tpf_test_00.fits", kepler / "test-tpf-kplr-tabby-100-cadences.fits"])


def test_shipped_example_config(shared_data, tmp_path, monkeypatch):
    """config/kepler_channel.yaml validates and its local directory (relative to the repo) gives the ten stamps."""
    cfg = yaml.safe_load((REPO / "config" / "kepler_channel.yaml").read_text())
    check_config(cfg)
    validate(cfg, schema=str(SCHEMA_PATH))
    ((name, spec),) = cfg["fields"].items()
    assert spec["source"] == "local" and spec["local"]["channel"] == 4
    if not (REPO / spec["local"]["directory"]).is_dir():
        pytest.skip(f"{spec['local']['directory']} is not beside this checkout")
    monkeypatch.chdir(REPO)  # snakemake runs in the repo: the path is relative to it
    out = write_local_field(spec["local"], tmp_path / "cube.zarr", field=name)
    assert len(json.loads(open_cube(out).attrs["stamps"])) == 10


# ------------------------------------------------------------------ MAST: one channel search


class FakeChannelSearch(FakeMast):
    """FakeMast plus MAST's Kepler/K2 data search: serves the recorded rows, filtered by the query's
    channel and quarter/campaign as the archive does."""

    def __init__(self, shared_data, **kwargs):
        super().__init__(shared_data, **kwargs)
        self.tpfs[K2_FILE + ".gz"] = shared_data / "kepler" / K2_FILE
        self.searches = []

    def send(self, adapter, request, **kwargs):
        url = urlparse(request.url)
        if url.hostname == "archive.stsci.edu" and url.path.endswith("/data_search/search.php"):
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            self.searches.append((url.path, q, kwargs.get("timeout")))
            self.calls.append(("channel_search", request.url))
            if url.path.startswith("/kepler/"):
                rows = json.loads((REC / "kepler_data_search_q12.json").read_text())
                period, col = "sci_data_quarter", "Quarter"
            else:
                rows = json.loads((REC / "k2_data_search_c04.json").read_text())
                period, col = "sci_campaign", "Campaign"
            rows = [r for r in rows if r["Channel"] == int(q["sci_channel"]) and r[col] == int(q[period])]
            rows = rows[: int(q["max_records"])]
            body = json.dumps(rows).encode() if rows else b"no rows found"
            return _response(request, body=body, headers={"Content-Type": "text/html; charset=UTF-8"})
        return super().send(adapter, request, **kwargs)


@pytest.fixture
def fake_channel_mast(monkeypatch, shared_data):
    from requests.adapters import HTTPAdapter

    def install(**kwargs):
        fake = FakeChannelSearch(shared_data, **kwargs)
        monkeypatch.setattr(HTTPAdapter, "send", lambda self, request, **kw: fake.send(self, request, **kw))
        return fake

    return install


def _download(params, tmp_path, name="ch", **kw):
    return download_field(
        params,
        tmp_path / name / "cube.zarr",
        field=name,
        cache_dir=tmp_path / "cache",
        retries=kw.get("retries", 0),
        timeout_s=5,
        backoff_s=0.0,
    )


def test_mast_channel_search_selects_exactly_the_channel(fake_channel_mast, shared_data, tmp_path):
    fake = fake_channel_mast()
    params = {"mission": "Kepler", "quarter": 12, "channel": 4}
    ds = open_cube(_download(params, tmp_path))
    # ONE query, to the mission search with the channel column; no name resolver, no CAOM query
    assert fake.count("channel_search") == 1 and fake.count("resolve") == 0 and fake.count("invoke") == 0
    path, q, timeout = fake.searches[0]
    assert path == "/kepler/data_search/search.php" and timeout == 5
    assert q["sci_channel"] == "4" and q["sci_data_quarter"] == "12" and q["ktc_target_type"] == "LC"
    assert q["outputformat"] == "JSON" and q["max_records"] == "3001"
    # exactly the channel's ten TPFs are downloaded (not the Q12 rows of channels 3/5, not Q11)
    downloaded = sorted(n for k, n in fake.calls if k == "download")
    assert downloaded == sorted(fake.tpfs)[: len(downloaded)] and len(downloaded) == 10
    assert all(n.startswith("kplr") and n.endswith("-2012088054726_lpd-targ.fits.gz") for n in downloaded)
    assert ds.attrs["layout"] == "pixel_table" and ds.attrs["channel"] == 4 and ds.attrs["quarter"] == 12
    assert len(json.loads(ds.attrs["stamps"])) == 10
    assert ds.sizes["pixel"] == _ccd_pixels(sorted((shared_data / "kepler").glob("tpf_test_*.fits")))

    # a second run is a cache hit: no request at all
    fake.calls.clear()
    _download(params, tmp_path, name="again")
    assert fake.calls == []


def test_k2_channel_field(fake_channel_mast, tmp_path):
    fake = fake_channel_mast()
    ds = open_cube(_download({"mission": "K2", "campaign": 4, "channel": 49}, tmp_path))
    path, q, _ = fake.searches[0]
    assert path == "/k2/data_search/search.php" and q["sci_campaign"] == "4" and q["sci_channel"] == "49"
    assert [n for k, n in fake.calls if k == "download"] == [K2_FILE + ".gz"]
    assert ds.attrs["mission"] == "K2" and ds.attrs["campaign"] == 4 and ds.attrs["channel"] == 49
    # MAST's K2 archive layout: c4/<first 4 digits>00000/<next 2 digits>000/
    assert mast.tpf_product("KTWO210994964-C04", "K2")["dataURI"] == (
        "mast:K2/url/missions/k2/target_pixel_files/c4/210900000/94000/ktwo210994964-c04_lpd-targ.fits.gz"
    )


def test_parse_channel_search_drops_rows_of_other_channels(caplog):
    """Should the archive answer with rows of other channels/quarters, they are dropped and named."""
    rows = json.loads((REC / "kepler_data_search_q12.json").read_text())
    with caplog.at_level(logging.WARNING, logger="workflow_lib"):
        table = parse_channel_search(rows, "Kepler", channel=4, quarter=12)
    assert len(table) == 10 and set(table["obs_collection"]) == {"Kepler"}
    assert table["dataURI"][0] == (
        "mast:KEPLER/url/missions/kepler/target_pixel_files/0126/012644706/kplr012644706-2012088054726_lpd-targ.fits.gz"
    )
    assert "dropping 9 row(s)" in caplog.text and "KPLR012700000-2012004120508" in caplog.text


def test_channel_search_limits_and_empty(fake_channel_mast, tmp_path):
    fake_channel_mast()
    with pytest.raises(MastError, match="found no target pixel files"):
        _download({"mission": "Kepler", "quarter": 12, "channel": 7}, tmp_path, name="empty")
    with pytest.raises(MastError, match=r"more than 5 TPFs on channel 4: raise mast.max_channel_tpfs"):
        _download({"mission": "Kepler", "quarter": 12, "channel": 4, "max_channel_tpfs": 5}, tmp_path, name="big")
    with pytest.raises(MastError, match="target.*or.*channel.*not both"):
        _download({"mission": "Kepler", "quarter": 12, "channel": 4, "target": "Kepler-16"}, tmp_path, name="both")


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"source": "mast", "mast": {"mission": "Kepler", "quarter": 12, "channel": 85}}, r"channel=85: .* 1 to 84"),
        ({"source": "mast", "mast": {"channel": 4, "sector": 1}}, "set mast.mission to Kepler or K2"),
        ({"source": "mast", "mast": {"mission": "Kepler", "channel": 4}}, "needs mast.quarter"),
        ({"source": "mast", "mast": {"mission": "K2", "channel": 4}}, "needs mast.campaign"),
        (
            {"source": "mast", "mast": {"mission": "Kepler", "quarter": 12, "channel": 4, "target": "Kepler-16"}},
            "give target .* or channel .* not both",
        ),
        ({"source": "local", "local": {"channel": 4}}, "needs local.directory, local.glob or local.files"),
        (
            {"source": "local", "local": {"directory": "d", "channel": 4, "quarter": 1, "campaign": 2}},
            "quarter .* or campaign .* not both",
        ),
        (
            {"source": "local", "local": {"directory": "d", "chanel": 4}},
            "unknown key 'fields.k.local.chanel'; did you mean 'fields.k.local.channel'",
        ),
    ],
)
def test_channel_config_errors_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_config({"fields": {"k": spec}})
    assert "\n" not in str(err.value) and "fields.k." in str(err.value)


def test_channel_configs_validate():
    cfg = {
        "fields": {
            "q12ch4": {"source": "mast", "mast": {"mission": "Kepler", "quarter": 12, "channel": 4}},
            "c4ch49": {
                "source": "local",
                "local": {"glob": "data/ktwo*-c04_lpd-targ.fits", "channel": 49, "campaign": 4},
            },
        }
    }
    check_config(cfg)
    validate(cfg, schema=str(SCHEMA_PATH))


def test_channel_field_dry_run(tmp_path):
    """`snakemake -n` of the shipped channel config: the field is a download_local job given the channel."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    cmd += ["--configfile", str(REPO / "config" / "kepler_channel.yaml"), "-n", "-p", "--cores", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "download_local" in text and "gaia_crossmatch" in text and "download_mast" not in text
    assert '"channel": 4' in text and '"quarter": 12' in text

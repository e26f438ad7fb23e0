"""Stale products (issue 14, item 6): every product records digests of its inputs; one made from an input that
changed since is named by `python -m workflow_lib.steps stale` and left out of the field page, so products of
different inputs are never shown side by side as one run."""

import numpy as np
import pytest
import xarray as xr

from workflow_lib.core.provenance import input_digest, provenance, provenance_json, stale_inputs, stale_products
from workflow_lib.data.cube import write_zarr_atomic
from workflow_lib.report.products import FieldProducts, _open_lcset
from workflow_lib.steps.__main__ import main as steps_main


def _lcset(path, inputs):
    ds = xr.Dataset(
        {"flux": (("source", "time"), np.ones((2, 3)))},
        coords={"source_id": ("source", np.array([1, 2], np.int64)), "time": np.arange(3.0)},
        attrs={"provenance": provenance_json("test_step", inputs=[str(p) for p in inputs])},
    )
    write_zarr_atomic(ds, path)


def test_digests_follow_the_inputs_through_a_chain(tmp_path):
    cat = tmp_path / "catalog.ecsv"
    cat.write_text("# %ECSV 1.0\nsource_id\n1\n")
    lfd = tmp_path / "lfd.zarr"
    _lcset(lfd, [cat])
    dbl = tmp_path / "deblended.zarr"
    _lcset(dbl, [lfd / "zarr.json", cat])  # made from the LFD set, given as its zarr.json as the rules do
    assert provenance("x", [cat])["input_digests"] == {str(cat): input_digest(cat)}
    assert input_digest(lfd) == input_digest(lfd / "zarr.json") and input_digest(tmp_path / "nope") is None
    assert stale_inputs(xr.open_zarr(lfd).attrs["provenance"]) == [] and stale_products(tmp_path) == []

    cat.write_text("# %ECSV 1.0\nsource_id\n1\n2\n")  # the catalog changed after both sets were made
    assert stale_inputs(xr.open_zarr(lfd).attrs["provenance"]) == [str(cat)]
    assert [p for p, _ in stale_products(tmp_path)] == [str(dbl), str(lfd)]

    _lcset(lfd, [cat])  # the LFD set remade from the new catalog (same values, new provenance)...
    # ...makes the deblended set, made from the earlier LFD set, stale through the LFD set's digest
    [(product, inputs)] = stale_products(tmp_path)
    assert product == str(dbl) and sorted(inputs) == sorted([str(lfd / "zarr.json"), str(cat)])
    assert stale_inputs({"inputs": ["x"]}) == []  # products of earlier versions record no digests: not stale


def test_stale_set_left_out_of_the_page_and_listed_by_the_cli(tmp_path, capsys):
    cat = tmp_path / "catalog.ecsv"
    cat.write_text("# %ECSV 1.0\nsource_id\n1\n")
    lfd = tmp_path / "lfd" / "lightcurves.zarr"
    _lcset(lfd, [cat])
    fp = FieldProducts(field="f", cube=None)
    notes = fp.notes
    assert _open_lcset(lfd, fp) is not None and notes == []
    assert steps_main(["stale", str(tmp_path)]) == 0
    assert "no stale products" in capsys.readouterr().out

    cat.write_text("# %ECSV 1.0\nsource_id\n3\n")
    assert _open_lcset(lfd, fp) is None
    assert len(notes) == 1 and "stale" in notes[0] and str(cat) in notes[0] and "left out" in notes[0]
    with pytest.raises(SystemExit) as exit_:
        steps_main(["stale", str(tmp_path)])
    assert exit_.value.code == 1
    cap = capsys.readouterr()
    assert f"stale: {lfd} (made from an earlier {cat})" in cap.out
    assert "1 stale product(s)" in cap.err.strip().splitlines()[-1]  # after the progress lines


def test_index_marks_a_field_page_built_from_products_changed_since(tmp_path):
    """The field summary records the products its page was built from; the index marks the page stale
    when one of them has changed since (issue 14: no products of different inputs presented as one run)."""
    import shutil
    from pathlib import Path

    from test_report import make_field

    from workflow_lib.report import page as R

    field = make_field(tmp_path / "f")
    out = tmp_path / "report"
    summary = R.write_field_report(field, out / "fieldA.html", out / "fieldA.json", {}, field="fieldA")
    shown = summary["provenance"]["inputs"]
    assert str(field / "lfd" / "lightcurves.zarr") in shown and str(field / "cube.zarr") in shown
    R.write_index_report([out / "fieldA.json"], out / "index.html", config={}, run="t")
    assert "stale" not in (out / "index.html").read_text()

    # the LFD set remade after the page, with another config (its provenance, hence its digest, changes: a
    # store's digest is that of its metadata, so a store rewritten with the same provenance is not "changed")
    lfd = Path(field) / "lfd" / "lightcurves.zarr"
    ds = xr.open_zarr(lfd).load()
    ds["flux"] = ds["flux"] * 1.01
    ds.attrs["provenance"] = provenance_json("lfd_flux_solve", inputs=[], config={"prior_sigma_factor": 5.0})
    shutil.rmtree(lfd)
    write_zarr_atomic(ds, lfd)
    R.write_index_report([out / "fieldA.json"], out / "index.html", config={}, run="t")
    idx = (out / "index.html").read_text()
    assert "stale: this page was built from products that have changed since" in idx and str(lfd) in idx


def test_fits_headers_carry_the_config_and_inputs_hashes(tmp_path):
    """A light curve's FITS file names what it was made from: CFGHASH (the step's config) and INPHASH (the
    digests of its inputs), which changes when an input changes."""
    from astropy.io import fits

    from workflow_lib.data.lightcurves import write_lightcurve_fits

    cat = tmp_path / "catalog.ecsv"
    heads = []
    for text in ("1\n", "2\n"):
        cat.write_text("# %ECSV 1.0\nsource_id\n" + text)
        lc = xr.Dataset(
            {"flux": (("source", "time"), np.ones((1, 3))), "flux_err": (("source", "time"), np.ones((1, 3)))},
            coords={
                "source_id": ("source", np.array([7], np.int64)),
                "time": np.arange(3.0) + 1500.0,
                "cadenceno": ("time", np.arange(3)),
                "quality": ("time", np.zeros(3, np.int32)),
            },
            attrs={"method": "LFD", "provenance": provenance_json("s", inputs=[str(cat)], config={"a": 1})},
        )
        (path,) = write_lightcurve_fits(lc, tmp_path / text.strip(), "lfd")
        heads.append(fits.getheader(path, 0))
    assert heads[0]["CFGHASH"] == heads[1]["CFGHASH"] == provenance("s", config={"a": 1})["config_hash"]
    assert len(heads[0]["INPHASH"]) == 16 and heads[0]["INPHASH"] != heads[1]["INPHASH"]

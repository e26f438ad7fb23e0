"""Regenerate the recorded MAST responses in this directory (run once; the JSON files are committed).

The responses follow the formats MAST returns (SANTA resolver JSON, TESScut ``sector`` JSON, Mashup
``columnsconfig`` and ``invoke`` JSON with ``status/fields/data/paging``). The values are real where
they can be: positions, ids and quarters come from the headers of the real files in
``shared/data`` (Kepler-16 field, Kepler Q12 channel 4; pi Men TESScut cube). ``obsid`` values are
placeholders. Usage: ``python tests/data/mast/make_fixtures.py /path/to/shared/data``.
"""

import json
import sys
from pathlib import Path

from astropy.io import fits

HERE = Path(__file__).resolve().parent
Q_STAMP = {11: "2012004120508", 12: "2012088054726"}  # Kepler long-cadence TPF file time stamps


def santa(name, ra, dec, canonical, resolver="SIMBAD"):
    return {
        "resolvedCoordinate": [
            {
                "cacheDate": "Mar 3, 2024, 10:21:44 PM",
                "cached": True,
                "canonicalName": canonical,
                "decl": dec,
                "objectType": "*",
                "ra": ra,
                "radius": 0.0,
                "resolver": resolver,
                "resolverTime": 2,
                "searchRadius": -1.0,
                "searchString": name.lower(),
            }
        ],
        "status": "",
    }


def main(shared):
    shared = Path(shared)
    tpfs = sorted((shared / "kepler").glob("tpf_test_*.fits"))
    heads = [fits.getheader(f, 0) for f in tpfs]
    k16 = heads[0]
    resolver = {
        "kepler-16": santa("Kepler-16", k16["RA_OBJ"], k16["DEC_OBJ"], "Kepler-16"),
        "kic 12644769": santa("KIC 12644769", k16["RA_OBJ"], k16["DEC_OBJ"], "KIC 12644769", "KEPLER"),
        "pi men": santa("pi Men", 84.291188, -80.469119, "* pi. Men"),
    }
    (HERE / "santa_resolver.json").write_text(json.dumps(resolver, indent=1))

    (HERE / "tesscut_sector_pimen.json").write_text(
        json.dumps(
            {
                "results": [
                    {"sectorName": f"tess-s{s:04d}-4-{c}", "sector": f"{s:04d}", "camera": "4", "ccd": str(c)}
                    for s, c in ((1, 2), (4, 1), (8, 1), (11, 2), (12, 1), (13, 1))
                ]
            },
            indent=1,
        )
    )

    def col(vot, text, **kw):
        return {"text": text, "vot.datatype": vot, "vot.ucd": "", "visible": True, **kw}

    cone = {
        "intentType": col("char", "Observation Type"),
        "obs_collection": col("char", "Mission"),
        "provenance_name": col("char", "Provenance Name"),
        "instrument_name": col("char", "Instrument"),
        "project": col("char", "Project"),
        "filters": col("char", "Filters"),
        "wavelength_region": col("char", "Waveband"),
        "target_name": col("char", "Target Name"),
        "target_classification": col("char", "Target Classification"),
        "obs_id": col("char", "Observation ID"),
        "s_ra": col("double", "RA"),
        "s_dec": col("double", "Dec"),
        "dataproduct_type": col("char", "Data Product Type"),
        "proposal_pi": col("char", "Principal Investigator"),
        "calib_level": col("int", "Calibration Level"),
        "t_min": col("double", "Start Time"),
        "t_max": col("double", "End Time"),
        "t_exptime": col("double", "Exposure Length"),
        "sequence_number": col("int", "Sequence Number"),
        "obsid": col("char", "Product Group ID"),
        "distance": col("double", 'Distance (")'),
    }
    (HERE / "columnsconfig_Mast.Caom.Cone.json").write_text(json.dumps(cone, indent=1))
    products_cfg = {
        k: col("char", k)
        for k in (
            "obsID",
            "obs_collection",
            "dataproduct_type",
            "obs_id",
            "description",
            "type",
            "dataURI",
            "productType",
            "productGroupDescription",
            "productSubGroupDescription",
            "productDocumentationURL",
            "project",
            "prvversion",
            "proposal_id",
            "productFilename",
            "parent_obsid",
            "dataRights",
        )
    }
    products_cfg["size"] = col("int", "Size")
    products_cfg["calib_level"] = col("int", "Calibration Level")
    (HERE / "columnsconfig_Mast.Caom.Products.json").write_text(json.dumps(products_cfg, indent=1))

    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c0 = SkyCoord(k16["RA_OBJ"] * u.deg, k16["DEC_OBJ"] * u.deg)
    obs_fields = [
        ("intentType", "string"),
        ("obs_collection", "string"),
        ("provenance_name", "string"),
        ("instrument_name", "string"),
        ("project", "string"),
        ("filters", "string"),
        ("target_name", "string"),
        ("obs_id", "string"),
        ("s_ra", "float"),
        ("s_dec", "float"),
        ("dataproduct_type", "string"),
        ("calib_level", "int"),
        ("t_min", "float"),
        ("t_max", "float"),
        ("t_exptime", "float"),
        ("sequence_number", "int"),
        ("obsid", "string"),
        ("distance", "float"),
        ("_selected_", "boolean"),
    ]
    obs_rows, prod_rows = [], []
    for k, h in enumerate(heads):
        kic = int(h["KEPLERID"])
        obsid = str(9000000100 + k)
        sep = SkyCoord(h["RA_OBJ"] * u.deg, h["DEC_OBJ"] * u.deg).separation(c0).arcsec
        obs_rows.append(
            {
                "intentType": "science",
                "obs_collection": "Kepler",
                "provenance_name": "Kepler",
                "instrument_name": "Kepler",
                "project": "Kepler",
                "filters": "KEPLER",
                "target_name": f"kplr{kic:09d}",
                "obs_id": f"kplr{kic:09d}_lc_Q111111111111111111",
                "s_ra": h["RA_OBJ"],
                "s_dec": h["DEC_OBJ"],
                "dataproduct_type": "cube",
                "calib_level": 2,
                "t_min": 54953.02855,
                "t_max": 56414.23292,
                "t_exptime": 1625.9136,
                "sequence_number": None,
                "obsid": obsid,
                "distance": round(sep, 3),
                "_selected_": False,
            }
        )
        for q in (11, 12):
            name = f"kplr{kic:09d}-{Q_STAMP[q]}_lpd-targ.fits.gz"
            prod_rows.append(product(obsid, kic, name, f"Target Pixel Long Cadence (TPL) - Q{q}", "TARGETPIXELS"))
        prod_rows.append(
            product(
                obsid, kic, f"kplr{kic:09d}-{Q_STAMP[12]}_llc.fits", "Lightcurve Long Cadence (CLC) - Q12", "LIGHTCURVE"
            )
        )
    paging = {
        "page": 1,
        "pageSize": len(obs_rows),
        "pagesFiltered": 1,
        "rows": len(obs_rows),
        "rowsFiltered": len(obs_rows),
        "rowsTotal": len(obs_rows),
    }
    (HERE / "invoke_Mast.Caom.Filtered.Position_kepler16.json").write_text(
        json.dumps(
            {
                "status": "COMPLETE",
                "msg": "",
                "fields": [{"name": n, "type": t} for n, t in obs_fields],
                "data": obs_rows,
                "paging": paging,
            },
            indent=1,
        )
    )
    prod_fields = [(n, "string") for n in products_cfg if n not in ("size", "calib_level")] + [
        ("size", "int"),
        ("calib_level", "int"),
    ]
    (HERE / "invoke_Mast.Caom.Products_kepler16.json").write_text(
        json.dumps(
            {
                "status": "COMPLETE",
                "msg": "",
                "fields": [{"name": n, "type": t} for n, t in prod_fields],
                "data": prod_rows,
                "paging": dict(
                    paging,
                    pageSize=len(prod_rows),
                    rows=len(prod_rows),
                    rowsFiltered=len(prod_rows),
                    rowsTotal=len(prod_rows),
                ),
            },
            indent=1,
        )
    )


def product(obsid, kic, name, desc, ptype):
    return {
        "obsID": obsid,
        "obs_collection": "Kepler",
        "dataproduct_type": "cube",
        "obs_id": f"kplr{kic:09d}_lc_Q111111111111111111",
        "description": desc,
        "type": "S",
        "dataURI": "mast:KEPLER/url/missions/kepler/{}/{}/{:09d}/{}".format(
            "target_pixel_files" if "lpd" in name else "lightcurves", f"{kic:09d}"[:4], kic, name
        ),
        "productType": "SCIENCE",
        "productGroupDescription": "",
        "productSubGroupDescription": ptype,
        "productDocumentationURL": "",
        "project": "Kepler",
        "prvversion": "",
        "proposal_id": "EX",
        "productFilename": name,
        "size": 60480,
        "parent_obsid": obsid,
        "dataRights": "PUBLIC",
        "calib_level": 2,
    }


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data")

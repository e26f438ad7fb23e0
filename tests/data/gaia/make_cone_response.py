"""Regenerate ``cone_response.vot``: a Gaia TAP async-job result in the archive's exact layout.

The machines that build this project have no network, so the response cannot be recorded live.
Its envelope (VOTable 1.4, RESOURCE type=results, QUERY_STATUS/QUERY/JOBID INFOs, the GaiaRelease
PARAM, COOSYS epoch J2016.0, TABLEDATA) and the FIELD elements of the ten columns are copied
verbatim from ``real_gaia_response.vot`` (a genuine gea.esac.esa.int answer shipped with
astroquery's tests, BSD-3). The rows are a designed test field around the TAN WCS below
(``FIELD_WCS``), so that tests know which sources fall on / near / off a 12x10 cutout.

Run from the repository root:  python tests/data/gaia/make_cone_response.py
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from workflow_lib.data.gaia import GAIA_COLUMNS

HERE = Path(__file__).parent
COLUMNS = GAIA_COLUMNS

#: TAN WCS of the test cutout (0-based array indices); 21 arcsec pixels rotated by 30 deg
FIELD_WCS = dict(crval=(150.0, 30.0), crpix0=(5.5, 4.5), scale_deg=21.0 / 3600, rot_deg=30.0)
NCOL, NROW = 12, 10


def field_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = FIELD_WCS["crval"]
    w.wcs.crpix = np.array(FIELD_WCS["crpix0"]) + 1.0  # FITS is 1-based
    th = np.deg2rad(FIELD_WCS["rot_deg"])
    s = FIELD_WCS["scale_deg"]
    w.wcs.cd = s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    return w


#: source_id, x, y (0-based indices at J2016.0), pmra, pmdec [mas/yr], parallax [mas], G, bp_rp
DESIGN = [
    (1000000000000000001, 5.2, 4.1, 3.1, -7.4, 2.31, 10.5, 0.82),  # on the cutout
    (1000000000000000002, 0.0, 0.0, -1.2, 0.4, 0.52, 12.0, 1.10),  # corner pixel
    (1000000000000000003, -2.5, 5.0, 0.0, 0.0, 0.11, 13.0, 1.5),  # 2.0 px off: kept (margin 4)
    (1000000000000000004, 14.5, 3.0, 5.0, 5.0, 1.00, 14.0, 0.9),  # 2.5 px off: kept
    (1000000000000000005, 5.0, -6.0, 0.0, 0.0, 0.30, 15.0, 1.2),  # 5.5 px off: dropped
    (1000000000000000006, 20.0, 20.0, 0.0, 0.0, 0.20, 11.0, 0.7),  # far off: dropped
    (1000000000000000007, 6.0, 6.0, 0.0, 0.0, 0.05, 18.5, 1.9),  # on, faint (G > 18)
    (1000000000000000009, 3.0, 7.0, None, None, None, 16.0, None),  # 2-parameter source
    (1000000000000000010, 9.0, 2.0, -2.0, 1.0, -0.40, 17.0, 2.2),  # negative parallax
]
#: a high-proper-motion star 4.1 px off the left edge at J2016.0 (outside a 4 px margin), moving
#: +x at 9 arcsec/yr (0.43 px/yr): by mid-2019 it is ~2.6 px off the edge, inside the margin.
HIGH_PM = (1000000000000000008, -4.6, 2.0, 9.0, 1.00, 12.5, 1.0)  # id, x, y, pm [arcsec/yr] along +x, plx, G, bp_rp


def rows():
    w = field_wcs()
    out = []
    for sid, x, y, pmra, pmdec, plx, g, bprp in DESIGN:
        sky = w.pixel_to_world(x, y)
        out.append((sid, sky.ra.deg, sky.dec.deg, pmra, pmdec, plx, g, bprp))
    sid, x, y, pm, plx, g, bprp = HIGH_PM
    sky0 = w.pixel_to_world(x, y)
    sky1 = w.pixel_to_world(x + 1e-3, y)
    pa = sky0.position_angle(sky1)
    out.append((sid, sky0.ra.deg, sky0.dec.deg, 1e3 * pm * np.sin(pa.rad), 1e3 * pm * np.cos(pa.rad), plx, g, bprp))
    return out


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def main():
    real = (HERE / "real_gaia_response.vot").read_text()
    head = real[: real.index("<TABLE>")]
    head = re.sub(
        r'<INFO name="QUERY" value="[^"]*"><!\[CDATA\[.*?\]\]></INFO>',
        '<INFO name="QUERY" value="SELECT source_id, ra, dec, pmra, pmdec, parallax, phot_g_mean_flux, '
        'phot_g_mean_mag, bp_rp, ref_epoch FROM gaiadr3.gaia_source WHERE 1 = CONTAINS(...)"/>',
        head,
        flags=re.S,
    )
    head = head.replace("1710099673321VAL", "1717171717171O")
    fields = []
    for c in COLUMNS:
        m = re.search(rf'<FIELD [^>]*name="{c}"[^>]*>.*?</FIELD>', real, flags=re.S)
        fields.append(m.group(0))
    lines = [head + "<TABLE>", *fields, "<DATA>", "<TABLEDATA>"]
    for sid, ra, dec, pmra, pmdec, plx, g, bprp in rows():
        flux = 10 ** (-0.4 * (g - 25.6874))
        cells = [
            str(sid),
            fmt(ra, ".15g"),
            fmt(dec, ".15g"),
            fmt(pmra, ".15g"),
            fmt(pmdec, ".15g"),
            fmt(plx, ".15g"),
            fmt(flux, ".10g"),
            fmt(g, ".7g"),
            fmt(bprp, ".7g"),
            "2016.0",
        ]
        lines.append("<TR>" + "".join(f"<TD>{c}</TD>" for c in cells) + "</TR>")
    lines += ["</TABLEDATA>", "</DATA>", "</TABLE>", "</RESOURCE>", "</VOTABLE>", ""]
    (HERE / "cone_response.vot").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

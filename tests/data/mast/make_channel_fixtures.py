"""Write the recorded responses of MAST's Kepler/K2 channel search (``data_search/search.php``), used by
tests/test_kepler_channel.py. Run once; the JSON files are committed.

HAND-CONSTRUCTED, not recorded: the machines that build this project cannot reach MAST. The responses
follow the format the search returns with ``outputformat=JSON``: a JSON array with one object per
target pixel file, keyed by the *labels* of the ``selectedColumnsCsv`` columns (``Dataset Name`` is the
key that MAST-using tools such as k2mosaic read; the other labels are our best knowledge and the parser
in ``workflow_lib.data.mast.parse_channel_search`` accepts the column names too). An empty result is not
JSON but the text ``no rows found``. The values are real where they can be: data set names, Kepler/EPIC
ids, positions, quarter/campaign and channel come from the headers of the real files in
``shared/data/kepler``. Rows of other channels (``_other_channel_rows``) are placeholders (ids and
positions made up) so that the fake server's channel filter, like MAST's, has something to drop.

Usage: ``python tests/data/mast/make_channel_fixtures.py [/path/to/shared/data]``; with ``--live`` (on a
machine with internet) it instead saves the real responses of the same queries next to this file, for
comparison with the hand-made ones.
"""

import json
import sys
from pathlib import Path

from astropy.io import fits

HERE = Path(__file__).resolve().parent
Q12_STAMP = "2012088054726"  # Kepler Q12 long-cadence TPF file time stamp


def kepler_row(kic, quarter, channel, ra, dec, stamp=Q12_STAMP):
    return {
        "Dataset Name": f"KPLR{kic:09d}-{stamp}",
        "Kepler ID": kic,
        "Quarter": quarter,
        "Channel": channel,
        "RA (J2000)": round(ra, 6),
        "Dec (J2000)": round(dec, 6),
    }


def _other_channel_rows():
    """Q12 TPFs on channels 3 and 5 (neighbours of channel 4), and Q11 rows of channel 4 (placeholders)."""
    rows = [kepler_row(12600000 + k, 12, 3 if k % 2 else 5, 289.5 + 0.01 * k, 51.2 + 0.01 * k) for k in range(6)]
    rows += [kepler_row(12700000 + k, 11, 4, 290.1 + 0.01 * k, 50.9, stamp="2012004120508") for k in range(3)]
    return rows


def main(shared):
    kepler = Path(shared) / "kepler"
    rows = []
    for f in sorted(kepler.glob("tpf_test_*.fits")):
        h = fits.getheader(f, 0)
        rows.append(kepler_row(int(h["KEPLERID"]), int(h["QUARTER"]), int(h["CHANNEL"]), h["RA_OBJ"], h["DEC_OBJ"]))
    rows += _other_channel_rows()
    (HERE / "kepler_data_search_q12.json").write_text(json.dumps(rows, indent=1) + "\n")

    h = fits.getheader(kepler / "ktwo210994964-c04_lpd-targ.fits", 0)
    k2 = [
        {
            "Dataset Name": f"KTWO{int(h['KEPLERID']):09d}-C{int(h['CAMPAIGN']):02d}",
            "K2 ID": int(h["KEPLERID"]),
            "Campaign": int(h["CAMPAIGN"]),
            "Channel": int(h["CHANNEL"]),
            "RA (J2000)": round(h["RA_OBJ"], 6),
            "Dec (J2000)": round(h["DEC_OBJ"], 6),
        },
        {  # a placeholder row on another channel of the campaign
            "Dataset Name": "KTWO210000001-C04",
            "K2 ID": 210000001,
            "Campaign": 4,
            "Channel": 50,
            "RA (J2000)": 57.5,
            "Dec (J2000)": 23.1,
        },
    ]
    (HERE / "k2_data_search_c04.json").write_text(json.dumps(k2, indent=1) + "\n")


def live():
    """Save the real responses of the queries the tests make (needs internet)."""
    import requests

    from workflow_lib.data.mast import CHANNEL_SEARCH_URL, channel_search_params

    for mission, kw, out in (
        ("Kepler", {"quarter": 12}, "kepler_data_search_q12_ch4.live.json"),
        ("K2", {"campaign": 4}, "k2_data_search_c04_ch49.live.json"),
    ):
        ch = 4 if mission == "Kepler" else 49
        params = channel_search_params(mission, channel=ch, max_records=3001, **kw)
        resp = requests.get(CHANNEL_SEARCH_URL[mission], params=params, timeout=600)
        resp.raise_for_status()
        (HERE / out).write_text(resp.text)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--live"]
    if "--live" in sys.argv:
        live()
    else:
        main(args[0] if args else HERE.parents[3] / "shared" / "data")

"""core.quality: the one place QUALITY bits are written down; masks are built from the named bits."""

import re
from pathlib import Path

import pytest

from workflow_lib.core import quality as Q
from workflow_lib.core.quality import KeplerQuality, TessQuality

ROOT = Path(__file__).resolve().parents[1]


def test_bits_are_single_and_tables_follow_the_names():
    for flags, table in ((TessQuality, Q.TESS_QUALITY_FLAGS), (KeplerQuality, Q.KEPLER_QUALITY_FLAGS)):
        values = [int(m) for m in flags]
        assert all(v & (v - 1) == 0 for v in values) and len(set(values)) == len(values)
        assert list(table) == values == sorted(values)
    assert Q.TESS_QUALITY_FLAGS[int(TessQuality.DESAT)] == "Desat"
    assert Q.TESS_QUALITY_FLAGS[int(TessQuality.STRAYLIGHT2)] == "Straylight2"
    assert Q.KEPLER_QUALITY_FLAGS[int(KeplerQuality.ARGABRIGHTENING_ON_CCD)] == "ArgabrighteningOnCCD"
    assert len(Q.TESS_QUALITY_FLAGS) == 16 and len(Q.KEPLER_QUALITY_FLAGS) == 21


def test_decode():
    v = TessQuality.DESAT | TessQuality.COLLATERAL_COSMIC | TessQuality.EARTH_POINT
    assert Q.decode_quality(v, "TESS") == ["EarthPoint", "Desat", "CollateralCosmic"]
    assert Q.decode_quality(0, "TESS") == []
    assert Q.decode_quality(KeplerQuality.THRUSTER_FIRING, "K2") == ["ThrusterFiring"]
    assert Q.decode_quality(1 << 17, "TESS") == ["Bit18"]
    with pytest.raises(ValueError, match="JWST"):
        Q.quality_flags("JWST")


def test_masks_are_built_from_named_bits():
    assert Q.decode_quality(Q.HARD_BITMASK["TESS"], "TESS") == [
        "AttitudeTweak", "SafeMode", "CoarsePoint", "EarthPoint", "Argabrightening", "Desat", "ApertureCosmic",
        "ManualExclude", "ImpulsiveOutlier", "CollateralCosmic", "Straylight", "Straylight2", "BadCalibrationExclude",
    ]  # fmt: skip
    assert Q.decode_quality(Q.DEFAULT_CDPP_BITMASK, "TESS") == [
        "AttitudeTweak", "SafeMode", "CoarsePoint", "EarthPoint", "Desat", "ManualExclude"
    ]  # fmt: skip
    assert Q.HARD_BITMASK["Kepler"] == Q.HARD_BITMASK["K2"]
    for v in (*Q.HARD_BITMASK.values(), Q.DEFAULT_CDPP_BITMASK):
        assert type(v) is int  # plain ints: written to attributes / JSON


def test_masks_match_lightkurve():
    lk = pytest.importorskip("lightkurve.utils")
    T, K = lk.TessQualityFlags, lk.KeplerQualityFlags
    assert Q.HARD_BITMASK["TESS"] == T.HARD_BITMASK
    assert Q.HARD_BITMASK["Kepler"] == K.HARD_BITMASK
    # the CDPP mask: the spacecraft bits of lightkurve's TESS default bitmask
    assert Q.DEFAULT_CDPP_BITMASK & T.DEFAULT_BITMASK == Q.DEFAULT_CDPP_BITMASK
    # every bit lightkurve names is named here, at the same position
    assert set(T.STRINGS) == set(Q.TESS_QUALITY_FLAGS)
    assert set(K.STRINGS) <= set(Q.KEPLER_QUALITY_FLAGS)


#: files that read QUALITY bits / masks (and were cleaned of literal values)
QUALITY_USERS = [
    "workflow_lib/data/synthetic.py",
    "workflow_lib/data/fits_reader.py",
    "workflow_lib/data/mast.py",
    "workflow_lib/metrics.py",
    "workflow_lib/cpm/model.py",
    "workflow_lib/cpm/apertures.py",
    "workflow_lib/report/page.py",
    *[f"workflow_lib/lfd/{m}.py" for m in ("edge", "prf", "motion", "solve", "linsys", "geometry", "bspline")],
]


@pytest.mark.parametrize("path", QUALITY_USERS)
def test_no_quality_values_outside_core(path):
    text = (ROOT / path).read_text()
    assert not re.search(r"\b(24319|1664431|175)\b", text), path
    assert not re.search(r"^Q_\w+\s*=\s*\d", text, re.M), path

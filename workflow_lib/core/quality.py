"""QUALITY flags of TESS and Kepler/K2 in one place: the named bits, their display names, and the
bitmasks the pipeline uses, each built from the named bits (no bit value is written anywhere else).

* :class:`TessQuality` - TESS SPOC QUALITY bits (TESS Science Data Products Description Document);
* :class:`KeplerQuality` - Kepler / K2 QUALITY bits (Kepler Archive Manual, table 2-3);
* :data:`HARD_BITMASK` - lightkurve's "hard" bitmasks (``TessQualityFlags.HARD_BITMASK``,
  ``KeplerQualityFlags.HARD_BITMASK``): cadences the CPM step and the aperture light curves drop;
* :data:`DEFAULT_CDPP_BITMASK` - cadences left out of the CDPP: the pointing / exclusion bits of
  lightkurve's TESS default bitmask (without its Argabrightening, ImpulsiveOutlier and
  BadCalibrationExclude bits);
* :class:`LfdSourceFlag` - per-*source* flags of an LFD light-curve set (``lfd_flag``): why the data
  cannot constrain a source's flux; a flagged source stays in the zarr set and is left out of the
  default products (its FITS file).
"""

from __future__ import annotations

import enum

__all__ = [
    "TessQuality",
    "KeplerQuality",
    "TESS_QUALITY_FLAGS",
    "KEPLER_QUALITY_FLAGS",
    "quality_flags",
    "decode_quality",
    "HARD_BITMASK",
    "DEFAULT_CDPP_BITMASK",
    "LfdSourceFlag",
    "LFD_SOURCE_FLAGS",
]


class TessQuality(enum.IntFlag):
    """TESS SPOC QUALITY bits (TESS Science Data Products Description Document)."""

    ATTITUDE_TWEAK = 1 << 0
    SAFE_MODE = 1 << 1
    COARSE_POINT = 1 << 2
    EARTH_POINT = 1 << 3
    ARGABRIGHTENING = 1 << 4
    DESAT = 1 << 5  # reaction-wheel desaturation (momentum dump)
    APERTURE_COSMIC = 1 << 6
    MANUAL_EXCLUDE = 1 << 7
    DISCONTINUITY = 1 << 8
    IMPULSIVE_OUTLIER = 1 << 9
    COLLATERAL_COSMIC = 1 << 10
    STRAYLIGHT = 1 << 11
    STRAYLIGHT2 = 1 << 12
    PLANET_SEARCH_EXCLUDE = 1 << 13
    BAD_CALIBRATION_EXCLUDE = 1 << 14
    INSUFFICIENT_TARGETS = 1 << 15


class KeplerQuality(enum.IntFlag):
    """Kepler / K2 QUALITY bits (Kepler Archive Manual, table 2-3)."""

    ATTITUDE_TWEAK = 1 << 0
    SAFE_MODE = 1 << 1
    COARSE_POINT = 1 << 2
    EARTH_POINT = 1 << 3
    ZERO_CROSSING = 1 << 4
    DESAT = 1 << 5
    ARGABRIGHTENING = 1 << 6
    APERTURE_COSMIC = 1 << 7
    MANUAL_EXCLUDE = 1 << 8
    DISCONTINUITY = 1 << 9
    SENSITIVITY_DROPOUT = 1 << 10
    IMPULSIVE_OUTLIER = 1 << 11
    ARGABRIGHTENING_ON_CCD = 1 << 12
    COLLATERAL_COSMIC = 1 << 13
    DETECTOR_ANOMALY = 1 << 14
    NO_FINE_POINT = 1 << 15
    NO_DATA = 1 << 16
    ROLLING_BAND_IN_APERTURE = 1 << 17
    ROLLING_BAND_IN_MASK = 1 << 18
    POSSIBLE_THRUSTER_FIRING = 1 << 19
    THRUSTER_FIRING = 1 << 20


def _display_name(member: enum.IntFlag) -> str:
    """``ARGABRIGHTENING_ON_CCD`` -> ``ArgabrighteningOnCCD`` (the names shown in reports)."""
    return "".join("CCD" if w == "CCD" else w.title() for w in member.name.split("_"))


def _table(flags: type[enum.IntFlag]) -> dict[int, str]:
    return {int(m): _display_name(m) for m in flags}


#: TESS QUALITY bit -> display name
TESS_QUALITY_FLAGS = _table(TessQuality)

#: Kepler / K2 QUALITY bit -> display name
KEPLER_QUALITY_FLAGS = _table(KeplerQuality)


def quality_flags(mission: str) -> dict[int, str]:
    """The QUALITY bit -> name table of a mission (TESS, Kepler, K2)."""
    if mission == "TESS":
        return TESS_QUALITY_FLAGS
    if mission in ("Kepler", "K2"):
        return KEPLER_QUALITY_FLAGS
    raise ValueError(f"no QUALITY table for mission {mission!r} (expected TESS, Kepler or K2)")


def decode_quality(value: int, mission: str) -> list[str]:
    """Names of the bits set in one QUALITY value; unknown bits appear as ``Bit<n>``."""
    table = quality_flags(mission)
    value = int(value)
    names = []
    bit = 1
    while bit <= value:
        if value & bit:
            names.append(table.get(bit, f"Bit{bit.bit_length()}"))
        bit <<= 1
    return names


_T, _K = TessQuality, KeplerQuality

#: TESS "hard" bitmask (lightkurve ``TessQualityFlags.HARD_BITMASK``, incl. the momentum-dump bit DESAT)
TESS_HARD_BITMASK = int(
    _T.ATTITUDE_TWEAK
    | _T.SAFE_MODE
    | _T.COARSE_POINT
    | _T.EARTH_POINT
    | _T.ARGABRIGHTENING
    | _T.DESAT
    | _T.APERTURE_COSMIC
    | _T.MANUAL_EXCLUDE
    | _T.IMPULSIVE_OUTLIER
    | _T.COLLATERAL_COSMIC
    | _T.STRAYLIGHT
    | _T.STRAYLIGHT2
    | _T.BAD_CALIBRATION_EXCLUDE
)

#: Kepler / K2 "hard" bitmask (lightkurve ``KeplerQualityFlags.HARD_BITMASK``)
KEPLER_HARD_BITMASK = int(
    _K.ATTITUDE_TWEAK
    | _K.SAFE_MODE
    | _K.COARSE_POINT
    | _K.EARTH_POINT
    | _K.DESAT
    | _K.APERTURE_COSMIC
    | _K.MANUAL_EXCLUDE
    | _K.SENSITIVITY_DROPOUT
    | _K.COLLATERAL_COSMIC
    | _K.DETECTOR_ANOMALY
    | _K.NO_DATA
    | _K.POSSIBLE_THRUSTER_FIRING
    | _K.THRUSTER_FIRING
)

#: lightkurve's "hard" QUALITY bitmasks per mission
HARD_BITMASK = {"TESS": TESS_HARD_BITMASK, "Kepler": KEPLER_HARD_BITMASK, "K2": KEPLER_HARD_BITMASK}

#: quality bits ignored when measuring CDPP: pointing, safe mode, momentum dumps and manual excludes
#: (the spacecraft bits of lightkurve's TESS default bitmask)
DEFAULT_CDPP_BITMASK = int(
    _T.ATTITUDE_TWEAK | _T.SAFE_MODE | _T.COARSE_POINT | _T.EARTH_POINT | _T.DESAT | _T.MANUAL_EXCLUDE
)


class LfdSourceFlag(enum.IntFlag):
    """Per-source flags of an LFD light-curve set (``lfd_flag``): the data do not constrain the flux.

    ``NOT_IN_MODEL``: the PRF step removed the source because its mean-frame flux was significantly
    negative (§4.4: the catalog or the model is wrong there); its light curve is all NaN.
    ``OFF_PIXELS``: less than ``lfd.solve.min_flux_fraction`` of its PRF falls on the pixels (a star
    centred beyond the edge): its total flux is an extrapolation from its wings.
    ``NONPOSITIVE``: the median of its flux over good cadences is not above ``lfd.solve.min_median_snr``
    times that median's error (default 1; 0: not above 0): no measurable flux.
    """

    NOT_IN_MODEL = 1 << 0
    OFF_PIXELS = 1 << 1
    NONPOSITIVE = 1 << 2


#: LFD source flag bit -> display name
LFD_SOURCE_FLAGS = _table(LfdSourceFlag)

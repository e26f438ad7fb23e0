#: TESS SPOC QUALITY bits (TESS Science Data Products Description Document)
TESS_QUALITY_FLAGS = {
    1: "AttitudeTweak",
    2: "SafeMode",
    4: "CoarsePoint",
    8: "EarthPoint",
    16: "Argabrightening",
    32: "Desat",
    64: "ApertureCosmic",
    128: "ManualExclude",
    256: "Discontinuity",
    512: "ImpulsiveOutlier",
    1024: "CollateralCosmic",
    2048: "Straylight",
    4096: "Straylight2",
    8192: "PlanetSearchExclude",
    16384: "BadCalibrationExclude",
    32768: "InsufficientTargets",
}


#: Kepler / K2 QUALITY bits (Kepler Archive Manual, table 2-3)
KEPLER_QUALITY_FLAGS = {
    1: "AttitudeTweak",
    2: "SafeMode",
    4: "CoarsePoint",
    8: "EarthPoint",
    16: "ZeroCrossing",
    32: "Desat",
    64: "Argabrightening",
    128: "ApertureCosmic",
    256: "ManualExclude",
    512: "Discontinuity",
    1024: "SensitivityDropout",
    2048: "ImpulsiveOutlier",
    4096: "ArgabrighteningOnCCD",
    8192: "CollateralCosmic",
    16384: "DetectorAnomaly",
    32768: "NoFinePoint",
    65536: "NoData",
    131072: "RollingBandInAperture",
    262144: "RollingBandInMask",
    524288: "PossibleThrusterFiring",
    1048576: "ThrusterFiring",
}


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


#: lightkurve's "hard" QUALITY bitmasks (incl. the TESS momentum-dump / desaturation bit 32)
HARD_BITMASK = {"TESS": 24319, "Kepler": 1664431, "K2": 1664431}


#: quality bits ignored when measuring CDPP (lightkurve's TESS default bitmask)
DEFAULT_CDPP_BITMASK = 175

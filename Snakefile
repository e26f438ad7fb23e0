# TESS / Kepler survey photometry: pixels -> Gaia crossmatch -> LFD deblending -> CPM de-trending -> reports.
#
#   download         pixel cube (zarr) per field: synthetic sector, MAST (astroquery) or local FITS
#   gaia_crossmatch  sources propagated to the observation epoch, in pixel coordinates
#   LFD (rules/lfd.smk)      edge model -> PRF model -> motion model -> per-cadence flux solve
#   CPM (rules/cpm.smk)      causal pixel model de-trending of every pixel, aperture light curves
#   report                   static HTML pages with embedded Bokeh
#
# Run:  snakemake --cores 2            (default config: two synthetic TESS cutouts)
from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/gaia.smk"


# light or network work runs where snakemake runs (login node), not as cluster jobs
localrules:
    all,
    download_mast,


rule all:
    input:
        expand(f"{RESULTS}/{{field}}/catalog.ecsv", field=FIELDS),
    default_target: True

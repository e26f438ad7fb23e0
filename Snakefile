# TESS / Kepler survey photometry: pixels -> Gaia crossmatch -> LFD deblending -> CPM de-trending -> reports.
#
#   1 download          pixel cube (zarr) per field: synthetic sector, MAST (astroquery) or local FITS
#   2 gaia_crossmatch   sources propagated to the observation epoch, in pixel coordinates
#   3-6 LFD             edge model -> PRF model -> motion model -> per-cadence flux solve   (Hedges & Martinez-Palomera 2021)
#   7 CPM               causal pixel model de-trending of every pixel, aperture light curves (Hattori et al. 2022)
#   7b deblend          LFD model of the neighbours subtracted, CPM-de-trended aperture light curves (rules/deblend.smk)
#   8 report            static HTML pages with embedded Bokeh, an index page
#   survey mode         whole CCDs from FFIs (config `ccds`): ingest -> tiles -> steps 2-8 per tile ->
#                       merged per-CCD light curves + overview page (rules/survey.smk, docs/SURVEY.md)
#
# Run:  snakemake --cores 2            (default config: two synthetic TESS cutouts)
from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/gaia.smk"
include: "rules/lfd.smk"
include: "rules/cpm.smk"
include: "rules/deblend.smk"
include: "rules/report.smk"
include: "rules/survey.smk"


# light or network work runs where snakemake runs (login node), not as cluster jobs
localrules:
    all,
    download_mast,
    report_index,
    tile_grid,
    survey_table,


rule all:
    default_target: True
    input:
        expand(f"{RESULTS}/{{field}}/catalog.ecsv", field=FIELDS),
        lfd_outputs(),
        cpm_outputs(),
        deblend_outputs(),
        f"{RESULTS}/report/index.html",
        survey_outputs(),

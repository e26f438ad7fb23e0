"""workflow_lib: the science of the TESS/Kepler LFD + CPM pipeline, as plain importable functions.

Modules (one per concept): ``cube`` (pixel-cube format and zarr I/O), ``provenance``,
``fitsio`` (reading TESScut / TPF files), ``mast`` (astroquery downloads), ``tess_prf`` (the real
TESS PRF models), ``synthetic`` (the embedded synthetic sector), ``gaia`` (crossmatch),
``bspline``, ``edge``, ``prf``, ``motion``, ``solve`` (Linearized Field Deblending), ``cpm``
(causal pixel model), ``metrics`` (CDPP), ``lightcurve`` (FITS light-curve files), ``report``.
"""

__version__ = "0.1.0"

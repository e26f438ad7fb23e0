"""workflow_lib: the science of the TESS/Kepler LFD + CPM pipeline, as plain importable functions.

Subpackages, imports pointing down only (``tests/test_layers.py``; ``docs/ARCHITECTURE.md``):
``steps`` (what the rules call) -> ``report`` (HTML pages) -> ``lfd`` (Linearized Field Deblending:
``bspline``, ``geometry``, ``linsys``, ``edge``, ``prf``, ``motion``, ``solve``, ``io``, ``diagnostics``,
``plots``) | ``cpm`` (causal pixel model: ``model``, ``apertures``, ``stitch``) -> ``metrics`` (CDPP) ->
``data`` (``cube``, ``fits_reader``, ``mast``, ``gaia``, ``synthetic``, ``tess_prf``, ``lightcurves``) ->
``core`` (``settings``, ``atomic``, ``quality``, ``logs``, ``provenance``, ``parallel``, ``configdoc``).
The config schema is package data (``workflow_lib/schema.yaml``).
"""

__version__ = "0.1.0"

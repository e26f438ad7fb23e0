"""Deblended, de-trended light curves: the LFD model of every other source subtracted from the pixels,
the target's aperture CPM-de-trended (:mod:`workflow_lib.deblend.lightcurves`)."""

"""Survey mode: per-tile products of a whole CCD merged into one per-CCD catalog of light curves.

Sits above the methods (``lfd``, ``cpm``: it merges their products, without importing them) and below
``report``.  :mod:`workflow_lib.survey.merge` merges per-tile light-curve sets; the tile grid itself
is :mod:`workflow_lib.data.tiles`.
"""

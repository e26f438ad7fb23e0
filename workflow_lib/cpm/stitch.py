import numpy as np


def stitch_offset(t1, f1, t2, f2, n_points: int = 100) -> float:
    """Offset to add to segment 2 (paper §4.1): fit the last ``n_points`` of 1 and the first of 2
    simultaneously with one common slope and two means; the offset is the difference of the means."""
    ok1 = np.isfinite(t1) & np.isfinite(f1)
    ok2 = np.isfinite(t2) & np.isfinite(f2)
    a_t, a_f = np.asarray(t1)[ok1][-n_points:], np.asarray(f1)[ok1][-n_points:]
    b_t, b_f = np.asarray(t2)[ok2][:n_points], np.asarray(f2)[ok2][:n_points]
    if a_t.size < 2 or b_t.size < 2:
        raise ValueError("stitching needs at least 2 finite points on each side")
    t = np.concatenate([a_t, b_t])
    t0 = t.mean()
    A = np.zeros((t.size, 3))
    A[: a_t.size, 0] = 1.0
    A[a_t.size :, 1] = 1.0
    A[:, 2] = t - t0
    coef, *_ = np.linalg.lstsq(A, np.concatenate([a_f, b_f]), rcond=None)
    return float(coef[0] - coef[1])


def stitch_sectors(times, fluxes, n_points: int = 100):
    """Stitch per-sector light curves in order (paper §4.1): each next sector is shifted onto the
    partially stitched light curve.  Returns (time, flux, offsets)."""
    if not times:
        raise ValueError("nothing to stitch")
    t = np.asarray(times[0], dtype=np.float64)
    f = np.asarray(fluxes[0], dtype=np.float64)
    offsets = [0.0]
    for tn, fn in zip(times[1:], fluxes[1:]):
        tn = np.asarray(tn, dtype=np.float64)
        fn = np.asarray(fn, dtype=np.float64)
        off = stitch_offset(t, f, tn, fn, n_points)
        offsets.append(off)
        t = np.concatenate([t, tn])
        f = np.concatenate([f, fn + off])
    return t, f, np.array(offsets)

import json

import numpy as np

from workflow_lib.core.atomic import atomic_path, save_npz_deterministic
from workflow_lib.lfd.edge import EdgeModel
from workflow_lib.lfd.motion import MotionError, MotionModel


def load_edge_model(path) -> EdgeModel:
    """Read the JSON written by :func:`edge_model_step`."""
    with open(path) as fh:
        d = json.load(fh)
    bc = d.get("background_coefficients")
    return EdgeModel(
        np.asarray(d["coefficients"], float),
        float(d["threshold"]),
        float(d["min_radius"]),
        float(d["max_radius"]),
        float(d.get("background", 0.0)),
        None if bc is None else np.asarray(bc, float),
        int(d.get("background_order", 0)),
        float(d.get("background_rms", float("nan"))),
        tuple(d["log_flux_range"]) if d.get("log_flux_range") else None,
    )


def save_motion_model(path, model: MotionModel, summary: dict, provenance_json: str = "") -> None:

    arrays = {
        "weights": model.weights,
        "knots": model.knots,
        "degree": np.int64(model.degree),
        "time_degree": np.int64(model.time_degree),
        "t0": np.float64(model.t0),
        "tscale": np.float64(model.tscale),
        "provenance": np.str_(provenance_json),
        "time_model": np.str_(model.time_model),
    }
    if model.time_model in ("centroid", "shift"):
        arrays.update(reg_time=model.reg_time, reg_x=model.reg_x, reg_y=model.reg_y)
    if model.time_model == "shift":
        arrays.update(shift_cov=np.asarray(model.shift_cov, float), shift_range=np.float64(model.shift_range))
    arrays.update({k: np.asarray(v) for k, v in summary.items()})
    with atomic_path(path) as tmp:
        save_npz_deterministic(tmp, arrays)


def load_motion_model(path) -> MotionModel:
    try:
        with np.load(path) as z:
            mode = str(z["time_model"]) if "time_model" in z.files else "polynomial"
            extra = {}
            if mode in ("centroid", "shift"):
                extra = dict(reg_time=z["reg_time"], reg_x=z["reg_x"], reg_y=z["reg_y"])
            if mode == "shift":
                extra.update(shift_cov=z["shift_cov"], shift_range=float(z["shift_range"]))
            return MotionModel(
                z["weights"],
                z["knots"],
                int(z["degree"]),
                int(z["time_degree"]),
                float(z["t0"]),
                float(z["tscale"]),
                time_model=mode,
                **extra,
            )
    except (OSError, KeyError, ValueError) as exc:
        raise MotionError(f"{path}: not a readable motion model ({exc})") from exc

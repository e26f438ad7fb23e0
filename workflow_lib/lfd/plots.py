import numpy as np

from workflow_lib.core.atomic import atomic_path
from workflow_lib.lfd.prf import PRFModel, polar_coordinates


def plot_prf_model(model: PRFModel, diag: dict, out_png) -> None:
    """Picture of the model in polar (r, phi) and Cartesian (dx, dy) coordinates with the data points (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dx, dy, y, keep = diag["dx"], diag["dy"], diag["log_ratio"], diag["keep"]
    r, phi = polar_coordinates(dx, dy)
    yd = (y - model.log_norm)[keep]  # data on the normalised scale
    vmin, vmax = np.percentile(yd, [2, 99.5]) if yd.size else (-10, 0)
    fig, ax = plt.subplots(2, 2, figsize=(11, 9))
    ax[0, 0].scatter(r[keep], phi[keep], c=yd, s=4, vmin=vmin, vmax=vmax, cmap="viridis")
    ax[0, 0].set(xlabel="r [px]", ylabel="phi [rad]", title="data: ln(f / F) in (r, phi)")
    rg, pg = np.meshgrid(np.linspace(0, model.r_max, 200), np.linspace(-np.pi, np.pi, 181))
    mg = np.log(np.clip(model.evaluate(rg * np.cos(pg), rg * np.sin(pg)), 1e-30, None))
    im = ax[0, 1].pcolormesh(rg, pg, mg, vmin=vmin, vmax=vmax, cmap="viridis", shading="auto")
    ax[0, 1].axvline(model.inner_radius, color="w", ls="--", lw=1)
    ax[0, 1].set(xlabel="r [px]", ylabel="phi [rad]", title="model: ln PRF in (r, phi)")
    fig.colorbar(im, ax=ax[0, 1])
    ax[1, 0].scatter(dx[keep], dy[keep], c=yd, s=4, vmin=vmin, vmax=vmax, cmap="viridis")
    ax[1, 0].set(xlabel="dx [px]", ylabel="dy [px]", title="data in (dx, dy)", aspect="equal")
    g = np.linspace(-model.r_max, model.r_max, 201)
    X, Y = np.meshgrid(g, g)
    mc = np.log(np.clip(model.evaluate(X, Y), 1e-30, None))
    mc[np.hypot(X, Y) > model.r_max] = np.nan
    im = ax[1, 1].pcolormesh(X, Y, mc, vmin=vmin, vmax=vmax, cmap="viridis", shading="auto")
    ax[1, 1].set(xlabel="dx [px]", ylabel="dy [px]", title="model in (dx, dy)", aspect="equal")
    fig.colorbar(im, ax=ax[1, 1])
    fig.suptitle("LFD PRF model (Hedges & Martinez-Palomera 2021, §4.3)")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)

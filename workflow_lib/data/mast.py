"""MAST downloads with astroquery: TESScut cubes (TESS) and target pixel files (Kepler, K2).

``download_field`` is called by the ``download_mast`` rule. It

1. resolves the target (a name, ``TIC``/``KIC``/``EPIC`` id, a bare id number, or ``"RA Dec"`` in
   degrees) with the MAST name resolver,
2. TESS: cuts ``size x size`` pixels out of the sector's FFIs with
   ``astroquery.mast.Tesscut.download_cutouts``; Kepler/K2: finds the target pixel files within
   ``radius_arcmin`` with ``Observations.query_criteria``, keeps the ``*lpd-targ.fits*`` products of
   the requested quarter/campaign (nearest first, at most ``max_tpfs``) and downloads them with
   ``Observations.download_products``; a **channel field** (``channel`` with ``quarter`` / ``campaign``,
   no target) lists every long-cadence TPF of that CCD channel with ONE query of MAST's Kepler/K2
   mission data search (which has the ``sci_channel`` column that CAOM lacks) and downloads them with
   ``Observations.download_products`` in batches (:func:`download_channel_tpfs`),
3. reads the files with :func:`workflow_lib.data.fits_reader.read_field` and writes the cube atomically.

Downloads land in ``cache_dir``; a request whose files are already there (recorded in a small
manifest per request) touches no network at all, and TPFs already in the cache are not fetched
again. Network steps are retried ``retries`` times with exponential backoff; when MAST cannot be
reached the error says so and points to ``source: local``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from workflow_lib.core.logs import get_logger
from workflow_lib.core.settings import schema_defaults
from workflow_lib.data.cube import CubeError
from workflow_lib.data.fits_reader import (
    read_field,
    read_fits_cube,
    select_channel_files,
    tpf_channel_key,
    write_cube_with_provenance,
)

log = get_logger("mast")

#: id prefixes understood by the MAST resolver, per mission
ID_PREFIX = {"TESS": "TIC", "Kepler": "KIC", "K2": "EPIC"}
#: TPF product file pattern (Kepler and K2 long-cadence target pixel files)
TPF_PATTERN = "*lpd-targ.fits*"

_RADEC = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)[\s,]+([+-]?\d+(?:\.\d*)?)\s*$")


class MastError(RuntimeError):
    """MAST cannot be reached or returned nothing usable for a field."""


# ------------------------------------------------------------------ network plumbing


class _TimeoutAdapter(HTTPAdapter):
    """HTTP adapter that applies a default timeout to every request astroquery makes."""

    def __init__(self, timeout_s: float, **kwargs):
        self.timeout_s = timeout_s
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        return super().send(request, **kwargs)


def _with_timeout(client, timeout_s: float):
    """Give an astroquery client (and the sessions of its API connections) a default timeout."""
    sessions = {id(client._session): client._session}
    for attr in ("_portal_api_connection", "_service_api_connection"):
        conn = getattr(client, attr, None)
        if conn is not None and getattr(conn, "_session", None) is not None:
            sessions[id(conn._session)] = conn._session
        if conn is not None and hasattr(conn, "TIMEOUT"):
            conn.TIMEOUT = timeout_s  # long-polling limit of the portal API
    for s in sessions.values():
        adapter = _TimeoutAdapter(timeout_s)
        s.mount("https://", adapter)
        s.mount("http://", adapter)
    return client


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, requests.HTTPError):
        resp = exc.response
        return resp is None or resp.status_code >= 500 or resp.status_code == 429
    return False


def _in_fresh_dir(work: Path, download):
    """``download()`` into the empty directory ``work``, recreated first so every retry starts clean
    (astroquery's progress warnings silenced)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return download()


def with_retries(fn, what: str, *, retries: int = 3, backoff_s: float = 5.0):
    """Call ``fn()``; on network errors retry ``retries`` times, waiting ``backoff_s * 2**k``.

    Raises :class:`MastError` ("cannot reach MAST ...") when every attempt failed.
    """
    attempts = int(retries) + 1
    for k in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _retryable(exc):
                raise
            if k + 1 >= attempts:
                raise MastError(
                    f"cannot reach MAST: {what} failed after {attempts} attempt(s) ({type(exc).__name__}: {exc}); "
                    f"use source: local with files you already have"
                ) from exc
            wait = backoff_s * 2**k
            log.warning("%s: %s (attempt %d of %d); retrying in %.1f s", what, exc, k + 1, attempts, wait)
            time.sleep(wait)


# ------------------------------------------------------------------ targets


def parse_target(target, mission: str):
    """``(SkyCoord or None, objectname or None)`` for a target string.

    ``"RA Dec"`` (degrees) gives coordinates; a bare number becomes ``TIC n`` / ``KIC n`` / ``EPIC n``;
    anything else is a name for the MAST resolver.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    if target is None or str(target).strip() == "":
        raise MastError("mast.target is required (a name, TIC/KIC/EPIC id, or 'RA Dec' in degrees)")
    s = str(target).strip()
    m = _RADEC.match(s)
    if m:
        ra, dec = float(m.group(1)), float(m.group(2))
        if not (0 <= ra < 360 and -90 <= dec <= 90):
            raise MastError(f"mast.target {s!r}: RA must be in [0, 360) and Dec in [-90, 90] degrees")
        return SkyCoord(ra * u.deg, dec * u.deg, frame="icrs"), None
    if s.isdigit():
        return None, f"{ID_PREFIX[mission]} {int(s)}"
    return None, s


def call_with_timeout(fn, timeout_s: float, what: str):
    """``fn()`` in a daemon thread, giving up after ``timeout_s`` with :class:`TimeoutError` (retryable).

    For the astroquery calls that make a plain ``requests.get`` without a timeout (the MAST name
    resolver), which the session adapter of :func:`_with_timeout` cannot reach. An abandoned call
    keeps its daemon thread until it returns or the process exits.
    """
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    th = threading.Thread(target=run, name=f"mast: {what}", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def resolve_target(target, mission: str, *, retries: int, backoff_s: float, timeout_s: float = 60.0):
    """SkyCoord of the target (MAST resolver for names and ids; each attempt limited to ``timeout_s``)."""
    from astroquery.exceptions import ResolverError
    from astroquery.mast import utils as mast_utils

    coord, name = parse_target(target, mission)
    if coord is not None:
        return coord

    def _resolve():
        try:
            return mast_utils.resolve_object(name)
        except ResolverError as exc:
            raise MastError(f"MAST could not resolve target {name!r}: {exc}") from exc

    coord = with_retries(
        lambda: call_with_timeout(_resolve, timeout_s, f"resolving {name!r}"),
        f"resolving {name!r}",
        retries=retries,
        backoff_s=backoff_s,
    )
    log.info("resolved %r to RA %.6f Dec %.6f", name, coord.ra.deg, coord.dec.deg)
    return coord


# ------------------------------------------------------------------ cache


def request_key(mast_params: dict) -> str:
    """Directory name of one request in the cache (mission, target and selection, hashed)."""
    keep = {
        k: mast_params.get(k)
        for k in ("mission", "target", "sector", "quarter", "campaign", "size", "radius_arcmin", "max_tpfs")
    }
    if mast_params.get("channel") is not None:  # a channel field (absent from older keys: their cache stays valid)
        keep = {k: mast_params.get(k) for k in ("mission", "quarter", "campaign", "channel")}
    digest = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", str(mast_params.get("target", "")))[:40].strip("_")
    if mast_params.get("channel") is not None:
        slug = f"channel{int(mast_params['channel'])}"
    return f"{mast_params.get('mission', 'TESS').lower()}_{slug}_{digest}"


def _manifest_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "requests" / f"{key}.json"


def cached_files(cache_dir, mast_params: dict) -> list[Path] | None:
    """Files of an earlier identical request, if its manifest and all its files are in the cache."""
    cache_dir = Path(cache_dir)
    mp = _manifest_path(cache_dir, request_key(mast_params))
    if not mp.is_file():
        return None
    try:
        rec = json.loads(mp.read_text())
        files = [cache_dir / f for f in rec["files"]]
    except (ValueError, KeyError, TypeError):
        return None
    if files and all(f.is_file() and f.stat().st_size > 0 for f in files):
        return files
    return None


def _write_manifest(cache_dir: Path, mast_params: dict, files: list[Path], extra: dict) -> None:
    mp = _manifest_path(cache_dir, request_key(mast_params))
    mp.parent.mkdir(parents=True, exist_ok=True)
    rec = {"params": mast_params, "files": [str(Path(f).relative_to(cache_dir)) for f in files], **extra}
    tmp = mp.parent / f".{mp.name}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, default=str))
    os.replace(tmp, mp)


def _check_file(path: Path) -> None:
    """Read a downloaded file once; a corrupt file is removed from the cache and named in the error."""
    try:
        read_fits_cube(path)
    except CubeError as exc:
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
        except OSError:
            pass
        raise CubeError(f"downloaded file {path} is not usable (moved to {bad.name}): {exc}") from exc


# ------------------------------------------------------------------ TESS


def download_tesscut(
    mast_params: dict, cache_dir, *, retries: int = 3, timeout_s: float = 600, backoff_s: float = 5.0
) -> list[Path]:
    """Fetch one TESScut cube (one sector) into ``cache_dir/tesscut/<key>/``; returns ``[path]``."""
    from astroquery.mast.cutouts import TesscutClass

    cache_dir = Path(cache_dir)
    key = request_key(mast_params)
    coord = resolve_target(
        mast_params.get("target"), "TESS", retries=retries, backoff_s=backoff_s, timeout_s=min(timeout_s, 60.0)
    )
    client = _with_timeout(TesscutClass(), timeout_s)
    sector = mast_params.get("sector")
    if sector is None:

        def _sectors():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return client.get_sectors(coordinates=coord)

        table = with_retries(_sectors, "TESScut sector query", retries=retries, backoff_s=backoff_s)
        if len(table) == 0:
            raise MastError(f"target {mast_params.get('target')!r} is not on any TESS sector (TESScut)")
        sector = int(min(table["sector"]))
        log.info(
            "no sector given; TESScut has sectors %s, using sector %d",
            sorted(set(int(s) for s in table["sector"])),
            sector,
        )
    size = int(mast_params.get("size", 64))
    dest = cache_dir / "tesscut" / key
    work = cache_dir / "tesscut" / f".{key}.tmp-{uuid.uuid4().hex[:8]}"

    def _download():
        return _in_fresh_dir(
            work, lambda: client.download_cutouts(coordinates=coord, size=size, sector=sector, path=str(work))
        )

    try:
        table = with_retries(
            _download, f"TESScut download (sector {sector}, {size}x{size} px)", retries=retries, backoff_s=backoff_s
        )
        paths = [Path(p) for p in table["Local Path"]] if len(table) else []
        fits_files = [p for p in paths if p.name.endswith((".fits", ".fits.gz"))]
        if not fits_files:
            raise MastError(f"TESScut returned no cutout for {mast_params.get('target')!r} in sector {sector}")
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for p in fits_files:
            target = dest / p.name
            os.replace(p, target)
            out.append(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for p in out:
        _check_file(p)
    log.info("TESScut: %s", ", ".join(str(p) for p in out))
    return out[:1] if len(out) > 1 else out


# ------------------------------------------------------------------ Kepler / K2


def _campaign_from_filename(name: str):
    """K2 campaign of a TPF file name (``ktwo...-c04_lpd-targ``; split campaigns ``c91``, ``c102``, ``c111``)."""
    m = re.search(r"-c(\d+)_", name)
    if not m:
        return None
    n = int(m.group(1))
    return n // 10 if n > 19 else n


def _quarter_from_description(desc: str):
    m = re.search(r"Q\s*-?\s*(\d+)\s*$", str(desc).replace("-", " ").strip(), re.IGNORECASE)
    return int(m.group(1)) if m else None


def select_tpf_products(
    products, observations, coord, mission: str, *, quarter=None, campaign=None, max_tpfs: int = 200
):
    """The ``*lpd-targ.fits*`` products of one quarter/campaign, nearest observation first, at most ``max_tpfs``."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    names = [str(n) for n in products["productFilename"]]
    keep = np.array([fnmatch.fnmatch(n, TPF_PATTERN) for n in names], dtype=bool)
    if mission == "Kepler":
        if quarter is None:
            raise MastError("mast.quarter is required for Kepler fields (one field = one quarter)")
        q = [_quarter_from_description(d) for d in products["description"]]
        keep &= np.array([qq == int(quarter) for qq in q], dtype=bool)
    else:
        if campaign is None:
            raise MastError("mast.campaign is required for K2 fields (one field = one campaign)")
        keep &= np.array([_campaign_from_filename(n) == int(campaign) for n in names], dtype=bool)
    sel = products[keep]
    if len(sel) == 0:
        return sel
    # distance of each product's observation from the target
    obs_pos = {
        str(o): (float(ra), float(dec))
        for o, ra, dec in zip(observations["obsid"], observations["s_ra"], observations["s_dec"])
    }
    pos = np.array([obs_pos.get(str(o), (np.nan, np.nan)) for o in sel["obsID"]], dtype=float)
    sep = SkyCoord(pos[:, 0] * u.deg, pos[:, 1] * u.deg).separation(coord).arcsec
    sep = np.where(np.isfinite(sep), sep, np.inf)
    order = np.lexsort((np.array([str(n) for n in sel["productFilename"]]), sep))
    sel = sel[order]
    # one file per name (the same TPF can be listed under several observations)
    _, first = np.unique(np.array([str(n) for n in sel["productFilename"]]), return_index=True)
    sel = sel[np.sort(first)]
    return sel[: int(max_tpfs)]


def download_kepler_tpfs(
    mast_params: dict, cache_dir, *, retries: int = 3, timeout_s: float = 600, backoff_s: float = 5.0
) -> list[Path]:
    """Fetch the Kepler/K2 TPFs of one quarter/campaign around the target into ``cache_dir/tpf/``."""
    import astropy.units as u
    from astroquery.mast import ObservationsClass

    cache_dir = Path(cache_dir)
    mission = mast_params.get("mission", "Kepler")
    coord = resolve_target(
        mast_params.get("target"), mission, retries=retries, backoff_s=backoff_s, timeout_s=min(timeout_s, 60.0)
    )
    radius = float(mast_params.get("radius_arcmin", 5.0)) * u.arcmin
    client = _with_timeout(ObservationsClass(), timeout_s)

    def _query():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return client.query_criteria(
                coordinates=coord, radius=radius, obs_collection=mission, dataproduct_type=["cube", "timeseries"]
            )

    obs = with_retries(_query, f"MAST {mission} observation query", retries=retries, backoff_s=backoff_s)
    if len(obs) == 0:
        raise MastError(f"MAST has no {mission} observations within {radius} of {mast_params.get('target')!r}")
    log.info("MAST: %d %s observations within %s", len(obs), mission, radius)

    def _products():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return client.get_product_list(obs)

    products = with_retries(_products, "MAST product list", retries=retries, backoff_s=backoff_s)
    sel = select_tpf_products(
        products,
        obs,
        coord,
        mission,
        quarter=mast_params.get("quarter"),
        campaign=mast_params.get("campaign"),
        max_tpfs=int(mast_params.get("max_tpfs", 200)),
    )
    what = f"quarter {mast_params.get('quarter')}" if mission == "Kepler" else f"campaign {mast_params.get('campaign')}"
    if len(sel) == 0:
        raise MastError(
            f"MAST has no {mission} target pixel files ({TPF_PATTERN}) of {what} within {radius} "
            f"of {mast_params.get('target')!r}"
        )
    tpf_dir = cache_dir / "tpf" / mission.lower()
    tpf_dir.mkdir(parents=True, exist_ok=True)
    wanted = [tpf_dir / Path(str(n)).name for n in sel["productFilename"]]
    missing = np.array([not (p.is_file() and p.stat().st_size > 0) for p in wanted], dtype=bool)
    log.info("%d TPFs of %s selected; %d already in the cache", len(sel), what, int((~missing).sum()))
    if missing.any():
        _download_products(client, sel[missing], tpf_dir, retries=retries, backoff_s=backoff_s)
    for p in wanted:
        _check_file(p)
    return wanted


def _download_products(client, todo, tpf_dir: Path, *, retries: int, backoff_s: float) -> None:
    """Download the MAST products ``todo`` into a private directory, then move the complete files into
    ``tpf_dir`` (a failed file is an error naming it)."""
    work = tpf_dir / f".download-{uuid.uuid4().hex[:8]}"

    def _download():
        return _in_fresh_dir(
            work,
            lambda: client.download_products(todo, download_dir=str(work), flat=True, cache=False, verbose=False),
        )

    try:
        manifest = with_retries(_download, f"downloading {len(todo)} TPF(s)", retries=retries, backoff_s=backoff_s)
        failed = [
            (str(p), str(m))
            for p, s, m in zip(manifest["Local Path"], manifest["Status"], manifest["Message"])
            if s != "COMPLETE"
        ]
        if failed:
            raise MastError("MAST download failed for: " + "; ".join(f"{p} ({m})" for p, m in failed))
        for p in manifest["Local Path"]:
            os.replace(p, tpf_dir / Path(str(p)).name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _same_channel(files: list[Path]) -> list[Path]:
    """Keep the TPFs on the channel (and quarter/campaign) of the first (nearest) one."""
    k0 = tpf_channel_key(files[0])
    return select_channel_files(
        files,
        channel=k0["channel"],
        quarter=k0["quarter"],
        campaign=k0["campaign"],
        what=f"the channel of the nearest target ({files[0].name})",
    )


# ------------------------------------------------------------------ Kepler / K2: a whole channel

#: MAST's Kepler and K2 mission data searches: one row per target pixel file with its quarter or
#: campaign and CCD channel (``sci_channel``); astroquery's ``Observations`` (CAOM) has no channel column
CHANNEL_SEARCH_URL = {
    "Kepler": "https://archive.stsci.edu/kepler/data_search/search.php",
    "K2": "https://archive.stsci.edu/k2/data_search/search.php",
}
#: the columns asked of the channel search (their labels key the JSON rows MAST returns)
CHANNEL_SEARCH_COLUMNS = {
    "Kepler": "sci_data_set_name,sci_kepler_id,sci_data_quarter,sci_channel,sci_ra,sci_dec",
    "K2": "sci_data_set_name,ktc_k2_id,sci_campaign,sci_channel,sci_ra,sci_dec",
}
#: TPFs downloaded per astroquery call: each batch lands in the cache before the next starts, so an
#: interrupted channel download resumes where it stopped
DOWNLOAD_BATCH = 50

_KEPLER_DATASET = re.compile(r"^KPLR(\d{9})-(\d{13})$", re.IGNORECASE)
_K2_DATASET = re.compile(r"^KTWO(\d{9})-C(\d{2,3})$", re.IGNORECASE)


def channel_search_params(mission: str, *, channel: int, quarter=None, campaign=None, max_records: int) -> dict:
    """Query parameters of the one MAST search that lists the long-cadence TPFs of a channel."""
    if mission not in CHANNEL_SEARCH_URL:
        raise MastError(f"mast.channel is for Kepler and K2 fields, not {mission!r}")
    params = {
        "action": "Search",
        "outputformat": "JSON",
        "ktc_target_type": "LC",
        "sci_channel": int(channel),
        "max_records": int(max_records),
        "selectedColumnsCsv": CHANNEL_SEARCH_COLUMNS[mission],
    }
    if mission == "Kepler":
        if quarter is None:
            raise MastError("mast.quarter is required for a Kepler channel field (one field = one quarter)")
        params["sci_data_quarter"] = int(quarter)
    else:
        if campaign is None:
            raise MastError("mast.campaign is required for a K2 channel field (one field = one campaign)")
        params["sci_campaign"] = int(campaign)
    return params


def tpf_product(dataset_name: str, mission: str) -> dict:
    """File name and MAST data URI of the long-cadence TPF of a data set (``KPLR012644769-2012088054726``,
    ``KTWO210994964-C04``), laid out as MAST's Kepler/K2 archives store them."""
    name = str(dataset_name).strip()
    if mission == "Kepler":
        m = _KEPLER_DATASET.match(name)
        if not m:
            raise MastError(
                f"MAST channel search: {name!r} is not a Kepler data set name (KPLRnnnnnnnnn-yyyydddhhmmss)"
            )
        kic = m.group(1)
        fname = f"kplr{kic}-{m.group(2)}_lpd-targ.fits.gz"
        uri = f"mast:KEPLER/url/missions/kepler/target_pixel_files/{kic[:4]}/{kic}/{fname}"
        return {"productFilename": fname, "dataURI": uri, "target_id": int(kic), "obs_id": f"kplr{kic}"}
    m = _K2_DATASET.match(name)
    if not m:
        raise MastError(f"MAST channel search: {name!r} is not a K2 data set name (KTWOnnnnnnnnn-Cnn)")
    epic, camp = m.group(1), m.group(2)
    fname = f"ktwo{epic}-c{camp}_lpd-targ.fits.gz"
    uri = f"mast:K2/url/missions/k2/target_pixel_files/c{int(camp)}/{epic[:4]}00000/{epic[4:6]}000/{fname}"
    return {"productFilename": fname, "dataURI": uri, "target_id": int(epic), "obs_id": f"ktwo{epic}"}


def _row_value(row: dict, *labels):
    """The value of the first of ``labels`` present in a search row (MAST keys rows by column label)."""
    for lab in labels:
        if lab in row and row[lab] not in (None, ""):
            return row[lab]
    return None


def parse_channel_search(rows, mission: str, *, channel: int, quarter=None, campaign=None):
    """The products table (``productFilename``, ``dataURI``, ``obs_collection``, ``obs_id``, ``target_id``)
    of the rows of a channel search, one per TPF, sorted by file name. Rows whose own channel or
    quarter/campaign column disagrees with the request are dropped with a warning naming them."""
    from astropy.table import Table

    if isinstance(rows, dict):  # an error object instead of the list of rows
        raise MastError(f"MAST channel search returned an error: {rows}")
    products, wrong = {}, []
    period_labels = (
        ("Quarter", "Data Quarter", "sci_data_quarter")
        if mission == "Kepler"
        else (
            "Campaign",
            "K2 Campaign",
            "sci_campaign",
        )
    )
    period_wanted = quarter if mission == "Kepler" else campaign
    for row in rows:
        name = _row_value(row, "Dataset Name", "Data Set Name", "sci_data_set_name")
        if name is None:
            raise MastError(f"MAST channel search: a row without a data set name: {row}")
        ch = _row_value(row, "Channel", "sci_channel")
        per = _row_value(row, *period_labels)
        if (ch is not None and int(ch) != int(channel)) or (per is not None and int(per) != int(period_wanted)):
            wrong.append(str(name))
            continue
        prod = tpf_product(name, mission)
        products.setdefault(prod["productFilename"], prod)
    if wrong:
        log.warning(
            "MAST channel search: dropping %d row(s) not on channel %s of %s %s: %s",
            len(wrong),
            channel,
            "quarter" if mission == "Kepler" else "campaign",
            period_wanted,
            ", ".join(wrong[:20]) + (f" ... and {len(wrong) - 20} more" if len(wrong) > 20 else ""),
        )
    names = sorted(products)
    table = Table(
        {
            "productFilename": names,
            "dataURI": [products[n]["dataURI"] for n in names],
            "obs_collection": [mission] * len(names),
            "obs_id": [products[n]["obs_id"] for n in names],
            "target_id": np.array([products[n]["target_id"] for n in names], dtype=np.int64),
        }
    )
    return table


def search_channel_tpfs(
    client,
    mission: str,
    *,
    channel: int,
    quarter=None,
    campaign=None,
    max_records: int,
    retries: int,
    backoff_s: float,
    timeout_s: float,
):
    """One MAST query: the long-cadence TPFs of a Kepler quarter's / K2 campaign's channel (a products table)."""
    params = channel_search_params(
        mission, channel=channel, quarter=quarter, campaign=campaign, max_records=max_records
    )
    what = f"MAST {mission} channel search (channel {channel}, " + (
        f"quarter {quarter})" if mission == "Kepler" else f"campaign {campaign})"
    )

    def _query():
        resp = client._request("GET", CHANNEL_SEARCH_URL[mission], params=params, timeout=timeout_s, cache=False)
        resp.raise_for_status()
        return resp.text

    text = with_retries(_query, what, retries=retries, backoff_s=backoff_s)
    try:
        rows = json.loads(text)
    except ValueError:  # the search answers "no rows found" (plain text) when nothing matches
        snippet = " ".join(str(text).split())[:120]
        raise MastError(f"{what} found no target pixel files ({snippet!r})") from None
    table = parse_channel_search(rows, mission, channel=channel, quarter=quarter, campaign=campaign)
    if len(table) == 0:
        raise MastError(f"{what} found no target pixel files")
    log.info("%s: %d TPFs", what, len(table))
    return table


def download_channel_tpfs(
    mast_params: dict, cache_dir, *, retries: int = 3, timeout_s: float = 600, backoff_s: float = 5.0
) -> list[Path]:
    """Every long-cadence TPF of one Kepler quarter's / K2 campaign's CCD channel, from one MAST query,
    downloaded in batches of :data:`DOWNLOAD_BATCH` into ``cache_dir/tpf/<mission>/`` (files already
    there are not fetched again). More than ``max_channel_tpfs`` TPFs is an error, never a silent cut."""
    from astroquery.mast import ObservationsClass

    params = {**schema_defaults("$defs.mast"), **{k: v for k, v in mast_params.items() if v is not None}}
    mission, channel = params.get("mission"), params["channel"]
    if mission not in ("Kepler", "K2"):
        raise MastError(f"mast.channel is for Kepler and K2 fields, not mission {mission!r}")
    if params.get("target"):
        raise MastError("mast: give `target` (TPFs around a star) or `channel` (every TPF of a channel), not both")
    limit = int(params["max_channel_tpfs"])
    cache_dir = Path(cache_dir)
    client = _with_timeout(ObservationsClass(), timeout_s)
    table = search_channel_tpfs(
        client,
        mission,
        channel=channel,
        quarter=params.get("quarter"),
        campaign=params.get("campaign"),
        max_records=limit + 1,
        retries=retries,
        backoff_s=backoff_s,
        timeout_s=timeout_s,
    )
    if len(table) > limit:
        raise MastError(
            f"MAST lists more than {limit} TPFs on channel {channel}: raise mast.max_channel_tpfs "
            f"(memory grows with the channel's pixels, docs/SURVEY.md)"
        )
    tpf_dir = cache_dir / "tpf" / mission.lower()
    tpf_dir.mkdir(parents=True, exist_ok=True)
    wanted = [tpf_dir / str(n) for n in table["productFilename"]]
    missing = np.array([not (p.is_file() and p.stat().st_size > 0) for p in wanted], dtype=bool)
    todo = table[missing]
    log.info(
        "channel %s: %d TPFs, %d already in the cache, %d to download",
        channel,
        len(table),
        int((~missing).sum()),
        len(todo),
    )
    for start in range(0, len(todo), DOWNLOAD_BATCH):
        batch = todo[start : start + DOWNLOAD_BATCH]
        _download_products(client, batch, tpf_dir, retries=retries, backoff_s=backoff_s)
        log.info("downloaded %d of %d TPFs", min(start + DOWNLOAD_BATCH, len(todo)), len(todo))
    for p in wanted:
        _check_file(p)
    return select_channel_files(
        wanted,
        channel=channel,
        quarter=params.get("quarter") if mission == "Kepler" else None,
        campaign=params.get("campaign") if mission == "K2" else None,
        what=f"MAST {mission} channel {channel}",
    )


# ------------------------------------------------------------------ entry point


def fetch_files(
    mast_params: dict, cache_dir, *, retries: int = 3, timeout_s: float = 600, backoff_s: float = 5.0
) -> list[Path]:
    """The FITS files of a ``source: mast`` field, from the cache or from MAST."""
    mission = mast_params.get("mission", "TESS")
    cached = cached_files(cache_dir, mast_params)
    if cached is not None:
        log.info("cache hit: %d file(s) for this request in %s", len(cached), cache_dir)
        return cached
    if mission == "TESS":
        files = download_tesscut(mast_params, cache_dir, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s)
    elif mission in ("Kepler", "K2") and mast_params.get("channel") is not None:
        files = download_channel_tpfs(mast_params, cache_dir, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s)
    elif mission in ("Kepler", "K2"):
        files = download_kepler_tpfs(mast_params, cache_dir, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s)
        files = _same_channel(files)
    else:
        raise MastError(f"unknown mission {mission!r}; expected TESS, Kepler or K2")
    _write_manifest(Path(cache_dir), mast_params, files, {})
    return files


def download_field(
    mast_params: dict,
    out_cube,
    field: str,
    cache_dir: str = "results/.mast_cache",
    retries: int = 3,
    timeout_s: float = 600,
    backoff_s: float = 5.0,
):
    """``download_mast``: fetch the field's files from MAST (or the cache), read them, write the cube."""
    mast_params = dict(mast_params)
    mast_params.setdefault("mission", "TESS")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = fetch_files(mast_params, cache_dir, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s)
    ds = read_field(files)
    return write_cube_with_provenance(ds, files, out_cube, field=field, step="download_mast", config=mast_params)

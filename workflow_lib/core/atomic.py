import io
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_path(path: str | os.PathLike):
    """Context manager yielding a temporary sibling path that is renamed to ``path`` on success.

    Temporary siblings a killed earlier run left for ``path`` are removed first.
    Use for writers that take a filename (astropy ``Table.write``, ``HDUList.writeto``,
    ``fig.savefig``)::

        with atomic_path(out) as tmp:
            table.write(tmp, format="ascii.ecsv")
    """
    import contextlib

    @contextlib.contextmanager
    def _cm():
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(p)  # debris of a killed earlier run writing this output
        tmp = p.parent / f".tmp-{uuid.uuid4().hex[:8]}-{p.name}"
        try:
            yield tmp
            if p.is_dir() and tmp.is_dir():
                shutil.rmtree(p)
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink()

    return _cm()


def _stale_patterns(name: str) -> tuple[str, ...]:
    """Glob patterns of the temporary siblings this module writes for an output called ``name``."""
    return (f".{name}.tmp-*", f".tmp-*-{name}")


def remove_stale_tmp(*paths: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (``.<name>.tmp-*``, ``.tmp-*-<name>``) of each output path left by
    a killed earlier run; other files are never touched. Returns what was removed."""
    removed = []
    for path in paths:
        p = Path(path)
        if not p.parent.is_dir():
            continue
        for pattern in _stale_patterns(p.name):
            for stale in sorted(p.parent.glob(pattern)):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def atomic_dir(path: str | os.PathLike):
    """Context manager for multi-file outputs: yields an empty temporary sibling directory
    (``.<name>.tmp-<hex>``) that replaces ``path`` when the block succeeds.

    Stale temporary siblings of ``path`` (a killed earlier run) are removed first. On an exception the
    temporary directory is removed and ``path`` is left as it was: never a half-written directory,
    never files of an earlier run mixed with the new ones::

        with atomic_dir(fits_dir) as tmp:
            write_lightcurve_fits(lc, tmp, "lfd")
    """
    import contextlib

    @contextlib.contextmanager
    def _cm():
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(p)
        tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            if p.is_dir() and not p.is_symlink():
                # move the old directory aside (a name remove_stale_tmp knows), swap, then delete it
                old = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
                os.replace(p, old)
                os.replace(tmp, p)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if p.exists() or p.is_symlink():
                    p.unlink()
                os.replace(tmp, p)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return _cm()


def save_npz_deterministic(path, arrays: dict) -> None:
    """np.savez-compatible file with fixed zip timestamps (identical inputs -> identical bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())

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
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_path(path: str | os.PathLike):
    """Context manager yielding a temporary sibling path that is renamed to ``path`` on success.

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


def save_npz_deterministic(path, arrays: dict) -> None:
    """np.savez-compatible file with fixed zip timestamps (identical inputs -> identical bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())

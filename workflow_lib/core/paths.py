"""Output paths that can never resolve outside ``results/``.

Every output of a run lives under ``results/<run>/``; the run name and the field names come from the
user's config, so they are checked here before any path is built from them::

    results_path("my_run")                  -> "results/my_run"
    results_path("my_run", "synth_a", "cube.zarr")  -> "results/my_run/synth_a/cube.zarr"
    results_path("../x")                    -> ValueError: config run='../x' escapes results/: ...

A name is refused when it is empty, ``.`` / ``..`` or contains a ``..`` component, is absolute, or
resolves (following symlinks that already exist) outside ``results/<run>/`` (``results/`` itself may be a
symlink, e.g. to scratch storage).  A field that happens to be called like a pipeline folder (``rules``,
``logs``) is fine: it lands in ``results/<run>/rules``.  Snakemake wildcard placeholders (``{field}``)
pass through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

__all__ = ["RESULTS_ROOT", "results_path"]

#: the folder every output lives under (relative to the working directory)
RESULTS_ROOT = "results"


def _key_name(i: int, keys) -> str:
    if keys and i < len(keys):
        return keys[i]
    return ("run", "field")[i] if i < 2 else f"path part {i}"


def _check_part(value, key: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"config {key}={value!r} is not a name (expected a string)")
    text = os.fspath(value)
    why = None
    if text.strip() == "":
        why = "it is empty"
    elif "\x00" in text:
        why = "it contains a NUL character"
    elif os.path.isabs(text) or PurePosixPath(text).is_absolute():
        why = "it is an absolute path"
    elif text.startswith("~"):
        why = "it starts with '~' (a home directory)"
    elif any(p in ("..",) for p in PurePosixPath(text.replace("\\", "/")).parts):
        why = "it contains '..'"
    elif PurePosixPath(text).parts in ((), (".",)):
        why = "it names the folder itself"
    if why:
        raise ValueError(f"config {key}={text!r} escapes {RESULTS_ROOT}/: {why}; use a plain name such as 'my_run'")
    return text


def results_path(run: str, *parts: str, root: str | os.PathLike = RESULTS_ROOT, keys: tuple = ()) -> str:
    """``results/<run>/<parts...>`` as a relative string, refused (one-line ValueError naming the key and
    value) if any of ``run`` / ``parts`` would resolve outside ``results/<run>`` (see module doc).

    ``keys`` names the parts in the error (default ``run``, ``field``, ``path part 2``, ...)."""
    checked = [_check_part(v, _key_name(i, keys)) for i, v in enumerate((run, *parts))]
    root = Path(root)
    base = root.resolve()
    path = root
    inside = base
    for i, text in enumerate(checked):
        path = path / text
        resolved = (Path.cwd() / path).resolve() if not path.is_absolute() else path.resolve()
        limit = base if i == 0 else inside
        if resolved != limit and limit not in resolved.parents:
            raise ValueError(
                f"config {_key_name(i, keys)}={text!r} escapes {root.as_posix()}/: {path.as_posix()} resolves to "
                f"{resolved} (a symlink out?); use a plain name"
            )
        if i == 0:
            inside = resolved
    return path.as_posix()

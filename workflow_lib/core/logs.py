"""Logging for pipeline steps: progress messages to the rule's ``log:`` file (and stderr when there is none).

``logged`` wraps one step. ``main_step`` is what the command line
(``python -m workflow_lib.steps <step> ...``, the rules' ``shell:`` commands) uses: the full traceback
of a failure goes to the log file, stderr gets one line ``error: <message>`` and the process exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time

LOGGER_NAME = "workflow_lib"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def error_line(exc: BaseException) -> str:
    """One line naming what went wrong: the exception's message (file / key included), no traceback.

    ``KeyError('x')`` -> ``missing key 'x'``; ``FileNotFoundError`` -> ``<file>: No such file or directory``;
    other exceptions -> their message, prefixed with the exception type when the message is empty or
    does not say what kind of error it is.
    """
    if isinstance(exc, KeyError) and exc.args:
        msg = f"missing key {exc.args[0]!r}"
    elif isinstance(exc, OSError) and getattr(exc, "filename", None):
        msg = f"{exc.filename}: {exc.strerror or exc}"
    else:
        msg = str(exc).strip()
        if not msg:
            msg = type(exc).__name__
        elif type(exc).__module__ == "builtins" and not isinstance(exc, (ValueError, RuntimeError)):
            msg = f"{type(exc).__name__}: {msg}"
    return " ".join(msg.split())  # one line


def process_usage() -> tuple[float, float] | None:
    """``(cpu_s, peak_rss_mb)`` of this process so far, its threads and waited-for children included:
    user + system CPU seconds since the interpreter started (imports too) and the peak resident
    memory, from ``getrusage``. None where the ``resource`` module does not exist (Windows).

    Logged on every step's last line (``done <step> in W s, CPU C s, peak memory M MB``): the exact
    figures. Snakemake's ``benchmark:`` files sample the job with psutil every 30 s once it has run for
    30 s, so they miss the CPU and the memory peak of a long job's last stretch (a 45-s job read
    16 CPU-s there, docs/SURVEY.md); ``benchmarks/run_overhead.read_benchmarks`` prefers these.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return cpu, max(me.ru_maxrss, kids.ru_maxrss) / 1024.0  # ru_maxrss is in KiB on Linux


#: the usage part of a step log's last line (:func:`logged`)
_DONE_RE = re.compile(r"done \S+ in [\d.]+ s, CPU ([\d.]+) s, peak memory ([\d.]+) MB")


def read_step_usage(logfile) -> tuple[float, float] | None:
    """``(cpu_s, peak_rss_mb)`` of the step that wrote ``logfile`` (its ``done`` line, see
    :func:`process_usage`), or None: no such file, a failed or unfinished step, or a log without it."""
    from pathlib import Path

    path = Path(logfile)
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        m = _DONE_RE.search(line)
        if m:
            found = (float(m.group(1)), float(m.group(2)))
    return found


@contextlib.contextmanager
def logged(logfile: str | None, step: str = "step", *, echo: bool = True, warnings_to_log: bool = False):
    """Send ``workflow_lib`` log records (INFO and up) to ``logfile`` for the duration of a step.

    Exceptions are logged with their traceback and re-raised, so a failed rule's log says why.
    ``echo``: also write the records to stderr (always, when there is no ``logfile``).
    ``warnings_to_log``: route Python warnings (``warnings.warn``) through logging into the same file.
    """
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(logging.INFO)
    handlers = []
    if echo or not logfile:
        handlers.append(logging.StreamHandler(sys.stderr))
    if logfile:
        handlers.append(logging.FileHandler(logfile, mode="w"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    loggers = [root]
    if warnings_to_log:
        logging.captureWarnings(True)
        loggers.append(logging.getLogger("py.warnings"))
    for h in handlers:
        h.setFormatter(fmt)
        for lg in loggers:
            lg.addHandler(h)
    t0 = time.perf_counter()
    root.info("start %s", step)
    try:
        yield root
    except Exception:
        root.exception("%s failed", step)
        raise
    else:
        usage = process_usage()
        if usage is None:  # pragma: no cover - Windows
            root.info("done %s in %.1f s", step, time.perf_counter() - t0)
        else:
            root.info("done %s in %.1f s, CPU %.2f s, peak memory %.0f MB", step, time.perf_counter() - t0, *usage)
    finally:
        if warnings_to_log:
            logging.captureWarnings(False)
        for h in handlers:
            for lg in loggers:
                lg.removeHandler(h)
            h.close()


def main_step(logfile: str | None, step: str, func, *args, **kwargs) -> int:
    """Run one step ``func(*args, **kwargs)`` for the command line; returns the process exit status.

    With ``logfile``: progress, warnings and, on failure, the full traceback go to the file only;
    stderr gets a single line ``error: <message> (traceback in <logfile>)``. Without a log file,
    progress and the traceback go to stderr, followed by the same one-line summary. Exit status 1
    on failure (0 on success).
    """
    if logfile:
        from pathlib import Path

        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
    try:
        with logged(logfile, step, echo=not logfile, warnings_to_log=bool(logfile)):
            func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line + exit 1
        where = f" (traceback in {logfile})" if logfile else ""
        sys.stderr.write(f"error: {step}: {error_line(exc)}{where}\n")
        return 1
    return 0

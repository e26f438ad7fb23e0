"""Logging for pipeline steps: progress messages to the rule's ``log:`` file and stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

LOGGER_NAME = "workflow_lib"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


@contextlib.contextmanager
def logged(logfile: str | None, step: str = "step"):
    """Send ``workflow_lib`` log records (INFO and up) to ``logfile`` for the duration of a step.

    Exceptions are logged with their traceback and re-raised, so a failed rule's log says why.
    """
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(logging.INFO)
    handlers = [logging.StreamHandler(sys.stderr)]
    if logfile:
        handlers.append(logging.FileHandler(logfile, mode="w"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    t0 = time.perf_counter()
    root.info("start %s", step)
    try:
        yield root
    except Exception:
        root.exception("%s failed", step)
        raise
    else:
        root.info("done %s in %.1f s", step, time.perf_counter() - t0)
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


def run_step(log, func, *args, **kwargs):
    """Run one pipeline step ``func(*args, **kwargs)`` with its progress going to the rule's log file.

    This is what every Snakemake rule's ``run:`` block calls: ``run_step(log, edge_model_step, ...)``.
    """
    logfile = log[0] if log else None
    with logged(logfile, func.__name__):
        return func(*args, **kwargs)

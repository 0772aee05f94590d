"""Progress reporting: the flow calls report(); the CLI installs a reporter (rich), Prefect's log gets a line."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("pairforge")


class Reporter:
    def start(self, phase: str, total: int | None, unit: str = "rows") -> None: ...
    def advance(self, phase: str, n: int) -> None: ...
    def finish(self, phase: str, summary: str = "") -> None: ...


_reporter: Reporter = Reporter()


def set_reporter(r: Reporter | None) -> None:
    global _reporter
    _reporter = r or Reporter()


def get_reporter() -> Reporter:
    return _reporter


@contextmanager
def phase(name: str, total: int | None = None, unit: str = "rows", logger=None):
    """Time a phase, tell the reporter and the log; yields a function to advance it."""
    t0 = time.perf_counter()
    _reporter.start(name, total, unit)
    (logger or log).info("%s: started%s", name, f" ({total} {unit})" if total is not None else "")
    box = {"summary": ""}

    def advance(n: int = 1, summary: str | None = None):
        if n:
            _reporter.advance(name, n)
        if summary is not None:
            box["summary"] = summary

    yield advance
    dt = time.perf_counter() - t0
    _reporter.finish(name, box["summary"])
    (logger or log).info("%s: done in %.1fs %s", name, dt, box["summary"])

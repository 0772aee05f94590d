"""Progress reporting: the flow calls report(); the CLI installs a reporter (rich), Prefect's log gets a line."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("pairforge")


class Reporter:
    """finish(seconds=...): the phase's own working time, when it ran fused with others (a pipeline step's summed
    batch seconds); the reporter then states that time and its rate, not the wall time since the phase started."""

    def start(self, phase: str, total: int | None, unit: str = "rows") -> None: ...
    def advance(self, phase: str, n: int) -> None: ...
    def finish(self, phase: str, summary: str = "", seconds: float | None = None) -> None: ...


_reporter: Reporter = Reporter()


def set_reporter(r: Reporter | None) -> None:
    global _reporter
    _reporter = r or Reporter()


def get_reporter() -> Reporter:
    return _reporter


@contextmanager
def phase(name: str, total: int | None = None, unit: str = "rows", logger=None):
    """Time a phase, tell the reporter and the log; yields a function to advance it (and, for a phase fused with
    others, to set its own working seconds, which its last line reports instead of the wall time)."""
    t0 = time.perf_counter()
    _reporter.start(name, total, unit)
    (logger or log).info("%s: started%s", name, f" ({total} {unit})" if total is not None else "")
    box: dict = {"summary": "", "seconds": None}

    def advance(n: int = 1, summary: str | None = None, seconds: float | None = None):
        if n:
            _reporter.advance(name, n)
        if summary is not None:
            box["summary"] = summary
        if seconds is not None:
            box["seconds"] = seconds

    yield advance
    dt = time.perf_counter() - t0 if box["seconds"] is None else box["seconds"]
    _reporter.finish(name, box["summary"], box["seconds"])
    (logger or log).info("%s: done in %.1fs %s", name, dt, box["summary"])


def _duration(seconds: float, tenths: bool = False) -> str:
    if tenths and seconds < 9.95:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainReporter(Reporter):
    """Progress as whole lines for logs (cron, CI, nohup, a pipe): one when a phase starts, then at most one every
    `interval_s` while it runs (rows done of total, rows/s, ETA), and one when it ends. No bars, no cursor moves."""

    def __init__(self, stream=None, interval_s: float = 10.0, clock=time.monotonic):
        import sys

        self.stream = stream or sys.stdout
        self.interval_s, self.clock = interval_s, clock
        self.phases: dict[str, dict] = {}

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, phase: str, total: int | None, unit: str = "rows") -> None:
        now = self.clock()
        self.phases[phase] = {"t0": now, "last": now, "done": 0, "total": total, "unit": unit}
        self._line(f"{phase}: started" + (f", {total:,} {unit}" if total is not None else ""))

    def status(self, phase: str) -> str:
        p = self.phases[phase]
        elapsed = max(self.clock() - p["t0"], 1e-9)
        rate = p["done"] / elapsed
        done = f"{p['done']:,}" + (f"/{p['total']:,}" if p["total"] else "")
        pct = f" ({p['done'] / p['total']:.0%})" if p["total"] else ""
        eta = ""
        if p["total"] and rate > 0 and p["done"] < p["total"]:
            eta = f", eta {_duration((p['total'] - p['done']) / rate)}"
        return f"{phase}: {done} {p['unit']}{pct}, {rate:,.0f} {p['unit']}/s, {_duration(elapsed)} elapsed{eta}"

    def advance(self, phase: str, n: int) -> None:
        p = self.phases[phase]
        p["done"] += n
        now = self.clock()
        if now - p["last"] >= self.interval_s:
            p["last"] = now
            self._line(self.status(phase))

    def finish(self, phase: str, summary: str = "", seconds: float | None = None) -> None:
        p = self.phases[phase]
        own = seconds is not None
        elapsed = max(seconds if own else self.clock() - p["t0"], 1e-9)
        self._line(f"{phase}: done, {p['done']:,} {p['unit']} in {_duration(elapsed, tenths=own)} "
                   f"({p['done'] / elapsed:,.0f} {p['unit']}/s)" + (f"; {summary}" if summary else ""))

    def close(self) -> None:
        pass

"""Start-up of a build from the command line: Prefect's temporary server and Ray start side by side.

Without PREFECT_API_URL, Prefect starts a temporary server (a subprocess, seconds) the first time a flow runs;
Ray's local cluster takes seconds too. `orchestration` starts the server in a thread while Ray starts in this one,
so a flow run inside it finds both up (the flow's own ray_session then reuses Ray). Ray is shut down when the
block ends; the server stops at exit, as Prefect arranges. `timings` (if given) gets each phase's seconds.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from flows import env  # noqa: F401
from schemas.spec import BuildSpec


def _start_prefect_server(timings: dict, errors: list) -> None:
    t0 = time.perf_counter()
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return  # a server of the user's, or none allowed: the flow says so itself
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()  # the instance the flow's client takes (Prefect keeps one per port)
    except Exception as e:  # the flow's own start of the server reports it
        errors.append(e)
    finally:
        timings["prefect_server"] = time.perf_counter() - t0


@contextmanager
def orchestration(spec: BuildSpec, timings: dict | None = None):
    """Prefect's server (unless PREFECT_API_URL names one) and Ray for `spec`, started together."""
    from flows.engine.runner import ray_session

    timings = {} if timings is None else timings
    errors: list = []
    server = threading.Thread(target=_start_prefect_server, args=(timings, errors), name="prefect-server-start",
                              daemon=True)
    server.start()
    t0 = time.perf_counter()
    with ray_session(spec):
        timings["ray_init"] = time.perf_counter() - t0
        server.join()
        timings["both_up"] = time.perf_counter() - t0
        yield timings
        t1 = time.perf_counter()
    timings["ray_shutdown"] = time.perf_counter() - t1

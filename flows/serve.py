"""Scheduled builds: serve the build flow as a Prefect deployment with a cron schedule.

    pairforge serve SPEC [--cron "0 3 * * *"] [--name NAME] [--port P] [--prefect-home DIR]

Schedules do not run on Prefect's temporary per-run server, so unless PREFECT_API_URL already names a server,
`serve` starts one (`prefect server start --host 127.0.0.1`) with its database under <out>/_prefect, waits until
/api/health answers, serves the deployment until Ctrl-C (or SIGTERM), then stops the server it started.

A scheduled run waits for a manual build of the same dataset that holds the dataset lock (wait_lock) instead of
failing, and the runner executes one run at a time (limit=1), so scheduled runs of a dataset never overlap.
With `incremental: true` in the spec each run fetches only URLs earlier builds have not processed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows import env  # noqa: F401

DEFAULT_CRON = "0 3 * * *"


class ServeError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LocalPrefectServer:
    """`prefect server start --host 127.0.0.1 --port P` as a child process group, with its own PREFECT_HOME.

        with LocalPrefectServer(home) as srv:
            srv.api_url      # http://127.0.0.1:P/api
    """

    def __init__(self, home: Path, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 120.0,
                 extra_env: dict[str, str] | None = None):
        self.home = Path(home).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def start(self) -> "LocalPrefectServer":
        if self.proc is not None:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        server_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        server_env.update(PREFECT_HOME=str(self.home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
                          PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        server_env.update(self.extra_env)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port),
                 "--no-ui", "--analytics-off"],
                env=server_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    rc, self.proc = self.proc.returncode, None
                    raise ServeError(f"the Prefect server exited with code {rc} before it was healthy; "
                                     f"log {self.log_path}:\n{self.log_tail()}")
                if api_healthy(self.api_url):
                    return self
                time.sleep(0.5)
        except BaseException:  # Ctrl-C while waiting: leave no server behind
            self.stop()
            raise
        self.stop()
        raise ServeError(f"the Prefect server on {self.api_url} was not healthy after {self.startup_timeout:.0f} s; "
                         f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: the server and any children it started
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "LocalPrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_deployment(spec_path: Path, cron: str, name: str | None = None):
    """A RunnerDeployment of build_flow with a cron schedule, loaded by module path (flows.build.build_flow)."""
    from prefect.deployments.runner import EntrypointType

    from flows.build import build_flow
    from schemas.spec import load_spec

    spec = load_spec(spec_path)  # a bad spec fails here, before anything is served
    return build_flow.to_deployment(
        name=name or spec.dataset,
        cron=cron,
        parameters={"spec_path": str(Path(spec_path).resolve()), "quiet": True, "wait_lock": True},
        description=f"pairforge build of {spec.dataset} from {Path(spec_path).resolve()}",
        tags=["pairforge", spec.dataset],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_build(spec_path: str | Path, cron: str = DEFAULT_CRON, name: str | None = None, port: int | None = None,
                prefect_home: str | Path | None = None, limit: int = 1, say=None) -> None:
    """Serve build_flow for spec_path on a cron schedule until interrupted; see the module docstring.

    say(message, **fields) reports each step (default: print the message)."""
    from schemas.spec import is_uri, load_spec

    say = say or (lambda message, **fields: print(message, flush=True))

    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    from flows.preflight import preflight

    preflight(spec)  # its source, out, catalog, models and resources, before any server starts
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ServeError(f"--cron {cron!r} is not a valid cron expression (five fields: minute hour day month "
                         "weekday, e.g. \"0 3 * * *\")") from None

    server = None
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        say(f"using the Prefect server at {api_url} (PREFECT_API_URL)", event="server", api_url=api_url)
    else:
        local_out = spec.catalog_path.parent if is_uri(spec.out) else Path(spec.out)  # the server's files stay local
        home = Path(prefect_home) if prefect_home else local_out / "_prefect"
        say(f"starting a Prefect server on 127.0.0.1 (PREFECT_HOME={home}) ...", event="starting_server",
            prefect_home=str(home))
        server = LocalPrefectServer(home, port=port).start()
        api_url = server.api_url
        os.environ["PREFECT_API_URL"] = api_url  # flow runs the runner starts inherit it
        say(f"Prefect server ready at {api_url} (log: {server.log_path})", event="server", api_url=api_url,
            log=str(server.log_path))
    try:
        from prefect import serve
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            deployment = make_deployment(spec_path, cron, name)
            say(f"serving deployment pairforge-build/{deployment.name} on cron {cron!r}: build {spec.dataset} "
                f"from {spec_path} (Ctrl-C to stop)", event="serving", deployment=f"pairforge-build/{deployment.name}",
                cron=cron, dataset=spec.dataset, spec=str(spec_path))
            _serve_until_signal(serve, deployment, limit)
    finally:
        if server is not None:
            say("stopping the Prefect server ...", event="stopping_server")
            server.stop()
            os.environ.pop("PREFECT_API_URL", None)


def _serve_until_signal(serve, deployment, limit: int) -> None:
    """prefect.serve until Ctrl-C; SIGTERM is turned into KeyboardInterrupt so the server is stopped too."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        serve(deployment, limit=limit, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)

"""A small HTTP server for the demo corpus: serves routes.json (status, headers, content type, delay, trickle_s: the
body one byte every trickle_s seconds).

    with DemoServer(root) as srv:        # port 0: a free port
        urllib.request.urlopen(srv.url + "/img/abc.jpg")
        srv.requests                     # ["/img/abc.jpg"]

    python -m demo.server ROOT --port 8619
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_QUIET_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout, TimeoutError)
_NOT_FOUND = b"<!doctype html><html><body><h1>Not Found</h1></body></html>\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    demo: "DemoServer"

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet on client disconnects
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, _QUIET_ERRORS) or self.demo._stop.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = "pairforge-demo/1"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        demo = self.server.demo
        demo._record(self.path)
        route = demo.routes.get(self.path)
        if route is None:
            route = demo.routes.get(urlsplit(self.path).path)
        try:
            if route is None:
                self._send(404, {"Content-Type": "text/html; charset=utf-8"}, _NOT_FOUND, head)
                return
            delay = float(route.get("delay_s") or 0.0)
            if delay > 0 and demo._stop.wait(delay):
                return  # stopping: drop the connection without an answer
            body = b""
            if route.get("file"):
                body = demo.read(route["file"])
            headers = {"Content-Type": route.get("content_type") or "application/octet-stream"}
            headers.update(route.get("headers") or {})
            self._send(int(route.get("status", 200)), headers, body, head, float(route.get("trickle_s") or 0.0))
        except _QUIET_ERRORS:
            self.close_connection = True

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool, trickle_s: float = 0.0) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head or not body:
            return
        if trickle_s <= 0:
            self.wfile.write(body)
            return
        self.wfile.flush()
        for i in range(len(body)):  # one byte every trickle_s: a per-read timeout never fires
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
            if self.server.demo._stop.wait(trickle_s):
                return


class DemoServer:
    """Serves `root/routes.json` from `root` on (host, port) in a daemon thread; port 0 picks a free port."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.host = host
        self._port = port
        self.routes: dict[str, dict[str, Any]] = json.loads((self.root / "routes.json").read_text())
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._cache: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "DemoServer":
        if self._httpd is not None:
            return self
        self._stop.clear()
        httpd = _Server((self.host, self._port), _Handler)
        httpd.demo = self
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="demo-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()  # wakes delayed handlers
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- properties
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def requests(self) -> list[str]:
        """A snapshot of the request paths received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- internals
    def _record(self, path: str) -> None:
        with self._lock:
            self._requests.append(path)

    def read(self, rel: str) -> bytes:
        data = self._cache.get(rel)
        if data is None:
            data = (self.root / rel).read_bytes()
            with self._lock:
                self._cache[rel] = data
        return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.server", description="Serve a demo corpus.")
    ap.add_argument("root", type=Path, help="the corpus folder (with routes.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8619)
    a = ap.parse_args(argv)
    srv = DemoServer(a.root, host=a.host, port=a.port).start()
    print(f"serving {len(srv.routes)} routes from {a.root} at {srv.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

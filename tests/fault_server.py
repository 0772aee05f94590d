"""A loopback HTTP server whose paths are faults, for the ingest tests and benchmarks/ingest_faults.py.

    with FaultServer(image=jpeg_bytes, slow_s=0.5, stall_s=30, trickle_s=2) as srv:
        srv.url + "/fast/1.jpg"      # 200 with the image
        srv.open_connections          # connections the client has not closed yet

The first path segment names the behaviour (FAULTS); the rest only makes URLs distinct. Handlers that wait
(slow, stall, trickle) watch their socket and return as soon as the client hangs up, so `open_connections`
counts what the client still holds, not what the server is still sleeping on.

`LoopbackServer` (the thread, the port, open connections) and `CountingHandler` (quiet, counted, able to reset
a connection) are what other loopback servers in the tests build on (tests/object_storage.py's S3 fault proxy).
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# fault -> (what the server does, the reject reason ingest gives it; None: kept)
FAULTS: dict[str, tuple[str, str | None]] = {
    "fast": ("200 with the image", None),
    "slow": ("waits slow_s (under the deadline), then 200 with the image", None),
    "redirect": ("302 to /fast/...", None),
    "chain": ("three 302s, then /fast/...", None),
    "stall": ("accepts, then says nothing for stall_s", "timeout"),
    "trickle": ("headers, then the body one byte every trickle_s", "timeout"),
    "trickle_head": ("the status line and headers one byte every trickle_s", "timeout"),
    "fail": ("500", "http_500"),
    "missing": ("404", "http_404"),
    "reset": ("closes the connection without an answer", "connection_error"),
    "short": ("announces more bytes than it sends, then closes", "truncated"),
    "big": ("announces and sends max_bytes + 1 bytes", "too_large"),
    "bigstream": ("sends 2 x max_bytes with no Content-Length", "too_large"),
    "loop": ("302 to itself via a second URL", "too_many_redirects"),
    "to_file": ("302 to file:///etc/passwd", "bad_scheme"),
    "away": ("302 to http://<the rest of the path> (another host)", None),
    "html": ("200 with an HTML page", "not_an_image"),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024
    owner: "LoopbackServer"

    def get_request(self):
        sock, addr = super().get_request()
        if self.owner.tls is not None:  # the handshake happens on the handler's first read, in its thread
            sock = self.owner.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client hanging up is the point here
        pass


class CountingHandler(BaseHTTPRequestHandler):
    """Quiet, one request per connection, counted in the owner's open connections while it lasts."""

    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = "pairforge-faults/1"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def handle(self) -> None:
        owner = self.server.owner
        owner._opened()
        try:
            super().handle()
        except OSError:
            pass
        finally:
            owner._closed()

    def reset(self) -> None:
        """Close the connection with a TCP RST and no answer."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Handler(CountingHandler):

    def _client_gone(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the client closes its end (or the server stops)."""
        owner = self.server.owner
        end = owner.clock() + seconds
        while not owner._stop.is_set():
            left = end - owner.clock()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.connection], [], [], min(left, 0.25))
            if ready and isinstance(self.connection, ssl.SSLSocket):
                return True  # TLS clients here only hang up (close_notify or EOF)
            if ready:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return True
                except OSError:
                    return True
                owner._stop.wait(0.05)  # more bytes from a live client: not a hang-up
        return True

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        fault, rest = parts[0], "/".join(parts[1:])
        owner._record(fault, self.headers.get("Host"))
        img = owner.image
        if fault == "fast":
            self._answer(200, img, length=len(img))
        elif fault == "slow":
            if not self._client_gone(owner.slow_s):
                self._answer(200, img, length=len(img))
        elif fault == "redirect":
            self._answer(302, b"", {"Location": f"/fast/{rest}"}, length=0)
        elif fault == "chain":
            hops = int(self.path.split("?hop=", 1)[1]) if "?hop=" in self.path else 0
            target = f"/fast/{rest}" if hops >= 2 else f"/chain/{rest}?hop={hops + 1}"
            self._answer(302, b"", {"Location": target}, length=0)
        elif fault == "stall":
            self._client_gone(owner.stall_s)
        elif fault == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(owner.trickle_bytes))
            self.end_headers()
            self.wfile.flush()
            self._trickle(img * (owner.trickle_bytes // len(img) + 1))
        elif fault == "trickle_head":
            self._trickle(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n" + b"X-Pad: " + b"a" * 1000 + b"\r\n\r\n"
                          + img)
        elif fault == "fail":
            self._answer(500, b"oops", length=4)
        elif fault == "missing":
            self._answer(404, b"no", length=2)
        elif fault == "reset":
            self.reset()
        elif fault == "short":
            self._answer(200, img[: len(img) // 2], length=len(img))
        elif fault == "big":
            self._answer(200, b"\x00" * (owner.max_bytes + 1), length=owner.max_bytes + 1)
        elif fault == "bigstream":
            self._answer(200, b"\x00" * (2 * owner.max_bytes))
        elif fault == "loop":
            other = "b" if self.path.endswith("?a") else "a"
            self._answer(302, b"", {"Location": f"/loop/{rest}?{other}"}, length=0)
        elif fault == "away":
            self._answer(302, b"", {"Location": f"http://{rest}"}, length=0)
        elif fault == "to_file":
            self._answer(302, b"", {"Location": "file:///etc/passwd"}, length=0)
        elif fault == "html":
            body = b"<!doctype html><html><body>not an image</body></html>"
            self._answer(200, body, {"Content-Type": "text/html"}, length=len(body))
        else:
            self._answer(404, b"", length=0)

    def _trickle(self, data: bytes) -> None:
        owner = self.server.owner
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            if self._client_gone(owner.trickle_s):
                return


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (port 0: a free port) in a daemon thread; `handler` answers, with the server's
    `owner` set to this object. Counts the connections the client has not closed yet."""

    handler: type[CountingHandler] = CountingHandler

    def __init__(self, port: int = 0, tls: "ssl.SSLContext | None" = None):
        import time

        self.clock = time.monotonic
        self._port, self.tls = port, tls
        self._lock = threading.Lock()
        self._open = 0
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self):
        self._stop.clear()
        httpd = _Server(("127.0.0.1", self._port), self.handler)
        httpd.owner = self
        self._httpd, self._port = httpd, httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def _opened(self) -> None:
        with self._lock:
            self._open += 1

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1


class FaultServer(LoopbackServer):
    """Serves FAULTS on 127.0.0.1 (port 0: a free port) in a daemon thread."""

    handler = _Handler

    def __init__(self, image: bytes, *, slow_s: float = 0.3, stall_s: float = 30.0, trickle_s: float = 2.0,
                 trickle_bytes: int | None = None, max_bytes: int = 200_000, port: int = 0,
                 tls: "ssl.SSLContext | None" = None):
        super().__init__(port, tls)
        self.image, self.slow_s, self.stall_s, self.trickle_s = image, slow_s, stall_s, trickle_s
        self.trickle_bytes = trickle_bytes or max_bytes // 2  # announced: under the cap, so only time stops it
        self.max_bytes = max_bytes
        self.hits: dict[str, int] = {}
        self.host_headers: set[str | None] = set()

    def _record(self, fault: str, host: str | None) -> None:
        with self._lock:
            self.hits[fault] = self.hits.get(fault, 0) + 1
            self.host_headers.add(host)

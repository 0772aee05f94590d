"""An S3-compatible server on loopback for tests: moto in server mode, reached through the AWS_* variables."""
from __future__ import annotations

import os
from contextlib import contextmanager

from tests.builds import free_port
from tests.fault_server import CountingHandler, LoopbackServer

BUCKET = "pairforge-test"


@contextmanager
def s3_server(bucket: str = BUCKET):
    """Start moto on 127.0.0.1, create `bucket`, set AWS_ENDPOINT_URL and keys; undo all of it on exit."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield bucket
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def object_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every key under prefix, listed with boto3 (not the code under test)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ------------------------------------------------------------------------------------- a flaky object store

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request '
            b'rate.</Message></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}


class _ProxyHandler(CountingHandler):
    """Forwards each request to the S3 server, or answers it with the fault the proxy draws for it. HTTP/1.1 for
    `Expect: 100-continue` (the SDK's uploads), one request per connection."""

    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        """The request body as sent: a chunked one with its framing and trailers (the SDK's aws-chunked uploads
        carry their checksum there), forwarded as it came."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw = []
        while True:
            line = self.rfile.readline()
            raw.append(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = self.rfile.readline()
                    raw.append(line)
                    if line in (b"\r\n", b"\n", b""):
                        return b"".join(raw)
            raw.append(self.rfile.read(size + 2))  # the data and its CRLF

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False) -> None:
        self.close_connection = True
        self.send_response(status)
        length = str(len(body))
        for k, v in headers:
            if k.lower() == "content-length" and self.command == "HEAD":
                length = v  # the object's size
            elif k.lower() not in HOP_BY_HOP | {"content-length", "transfer-encoding"}:
                self.send_header(k, v)
        self.send_header("Content-Length", length)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut and len(body) > 1:  # half the announced body, then a reset
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.reset()
            return
        self.wfile.write(body)

    def _forward(self) -> None:
        import http.client

        proxy = self.server.owner
        body = self._body()
        fault = proxy.draw(self.command, self.path)
        if fault == "reset":
            self.reset()
            return
        if fault == "slowdown":
            self._answer(503, [("Content-Type", "application/xml")], SLOWDOWN)
            return
        if fault == "delay" and proxy._stop.wait(proxy.delay_s):
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
        finally:
            upstream.close()
        self._answer(resp.status, resp.getheaders(), data, cut=fault == "cut")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815


class S3FaultProxy(LoopbackServer):
    """A loopback proxy in front of an S3 server that answers a seeded random fraction of requests with a fault:
    `slowdown` (503 SlowDown), `reset` (a TCP reset, no answer), `delay` (delay_s, then forwarded), `cut` (a GET's
    body cut in half, then a reset). `rates` maps each fault to its fraction; `fail_all` answers every request with
    503 SlowDown (an outage) until cleared, `fail_when(method, path)` the requests it picks. Counts requests and
    faults."""

    handler = _ProxyHandler
    KINDS = ("slowdown", "reset", "delay", "cut")

    def __init__(self, target_port: int, rates: dict[str, float] | None = None, delay_s: float = 0.5, seed: int = 0):
        import random

        super().__init__()
        self.target_port, self.delay_s = target_port, delay_s
        self.rates = dict(rates or {})
        self.fail_all = False
        self.fail_when = None  # or a function (method, path) -> True: answer that request 503 SlowDown
        self.requests = 0
        self.faults = dict.fromkeys(self.KINDS, 0)
        self._rng = random.Random(seed)

    def draw(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self.fail_all or (self.fail_when is not None and self.fail_when(method, path)):
                self.faults["slowdown"] += 1
                return "slowdown"
            x, edge = self._rng.random(), 0.0
            for kind in self.KINDS:
                if kind == "cut" and method != "GET":
                    continue
                edge += self.rates.get(kind, 0.0)
                if x < edge:
                    self.faults[kind] += 1
                    return kind
        return None

    @property
    def injected(self) -> int:
        with self._lock:
            return sum(self.faults.values())


@contextmanager
def s3_fault_proxy(rates: dict[str, float] | None = None, **kw):
    """An S3FaultProxy in front of the S3 server AWS_ENDPOINT_URL points at (s3_server), which it then points at
    the proxy, for this process and the Ray workers it starts; restored on exit."""
    target = os.environ["AWS_ENDPOINT_URL"]
    proxy = S3FaultProxy(int(target.rsplit(":", 1)[1]), rates, **kw).start()
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = target
        proxy.stop()

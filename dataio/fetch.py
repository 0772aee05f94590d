"""Fetching one URL safely: http(s) only, an address guard against private and reserved addresses (checked for
every redirect, and the connection pinned to the checked address), and one deadline for the whole response. Installed
as urllib's opener while img2dataset downloads a shard (dataio.download)."""
from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urljoin, urlsplit

# --------------------------------------------------------------------------- the address guard

FETCH_SCHEMES = ("http", "https")


class FetchError(Exception):
    """A URL that could not be fetched: `reason` is a key of REASONS (or http_NNN), `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@lru_cache(maxsize=65536)
def system_resolve(host: str) -> tuple[str, ...]:
    """The system resolver's addresses for host, in its order, cached per process."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(i[4][0] for i in infos))


_DNS_POOL = None


def _dns_pool():
    """Lookups run here so a caller can stop waiting: getaddrinfo has no timeout of its own."""
    global _DNS_POOL
    if _DNS_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _DNS_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pairforge-dns")
    return _DNS_POOL


class AddressGuard:
    """Refuses URLs that are not http(s), or whose host resolves to a non-public address unless allow_hosts lists it.

    allow_hosts entries: a host name or IP ("127.0.0.1"), host:port ("127.0.0.1:8619") or a CIDR ("10.0.0.0/8").
    `resolver(host)` returns the host's addresses (default: the system resolver); a lookup that outlasts the
    caller's timeout is abandoned. `vet` hands the checked addresses to the fetcher, which connects to them and
    never resolves the name again.
    """

    def __init__(self, allow_hosts: list[str] | tuple[str, ...] = (), resolver=None):
        self.resolver = resolver or system_resolve
        self.hosts: set[str] = set()
        self.host_ports: set[tuple[str, int]] = set()
        self.networks = []
        for entry in allow_hosts:
            entry = entry.strip().lower()
            if "/" in entry:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            elif entry.count(":") == 1 and entry.rsplit(":", 1)[1].isdigit():
                host, port = entry.rsplit(":", 1)
                self.host_ports.add((host, int(port)))
            else:
                self.hosts.add(entry.strip("[]"))

    def resolve(self, host: str, timeout: float | None = None) -> tuple[str, ...]:
        try:
            return (str(ipaddress.ip_address(host)),)
        except ValueError:
            pass
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return tuple(_dns_pool().submit(self.resolver, host).result(timeout=timeout))
        except FutureTimeout:
            raise TimeoutError(f"resolving {host} took over {timeout:.1f}s") from None

    def _allowed(self, host: str, port: int, ip: str) -> bool:
        if host in self.hosts or ip in self.hosts:
            return True
        if (host, port) in self.host_ports or (ip, port) in self.host_ports:
            return True
        addr = ipaddress.ip_address(ip)
        return any(addr in n for n in self.networks)

    def vet(self, url: str, timeout: float | None = None) -> tuple[str, str, int, tuple[str, ...]]:
        """(scheme, host, port, addresses) of a URL that may be fetched; raises FetchError if it may not.
        Makes no connection to the host."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError("bad_url", f"{url[:200]}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in FETCH_SCHEMES:
            raise FetchError("bad_scheme", f"{scheme or '(none)'}:// is not fetched, only http and https")
        host = (parts.hostname or "").lower()
        if not host:
            raise FetchError("bad_url", f"no host in {url[:200]}")
        try:  # an internationalised name as DNS, the Host header and TLS carry it
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise FetchError("bad_url", f"host {host[:100]!r}: {e}") from None
        port = port or (443 if scheme == "https" else 80)
        try:
            ips = self.resolve(host, timeout)
        except TimeoutError as e:
            raise FetchError("timeout", str(e)) from None
        except (OSError, UnicodeError) as e:
            raise FetchError("dns_error", f"{host}: {e}") from None
        if not ips:
            raise FetchError("dns_error", f"{host}: no address")
        for ip in ips:
            addr = ipaddress.ip_address(ip.split("%")[0])
            public = addr.is_global and not addr.is_multicast
            if not public and not self._allowed(host, port, str(addr)):
                raise FetchError("blocked_address",
                                 f"{host} -> {addr} (not public; allow it with ingest.allow_hosts)")
        return scheme, host, port, tuple(ips)

    def check(self, url: str, timeout: float | None = None) -> tuple[str, str] | None:
        """None if the URL may be fetched, else (reason, detail). Makes no connection to the host."""
        try:
            self.vet(url, timeout)
        except FetchError as e:
            return e.reason, e.detail
        return None


# --------------------------------------------------------------------------- the fetch: one deadline, pinned address

class _Deadline:
    """Every blocking call waits at most until `deadline` (time.monotonic()): a server trickling one byte at a time
    cannot stretch a fetch past it, as it can with a per-read timeout. Mixed into the plain and the TLS socket."""

    deadline: float = float("inf")

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.settimeout(left)

    def recv(self, *args):
        self.arm()
        return super().recv(*args)

    def recv_into(self, *args):
        self.arm()
        return super().recv_into(*args)

    def sendall(self, *args):
        self.arm()
        return super().sendall(*args)


class _DeadlineSocket(_Deadline, socket.socket):
    def connect(self, address):
        self.arm()
        return super().connect(address)


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    """SSLContext.wrap_socket makes these (sslsocket_class); the handshake runs under the plain socket's timeout,
    armed just before."""

    def read(self, *args):
        self.arm()
        return super().read(*args)


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """The default verifying context (certificate and host name checked), with deadline sockets."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.sslsocket_class = _DeadlineSSLSocket
    return ctx


def _connect_pinned(ips: tuple[str, ...], port: int, deadline: float) -> _DeadlineSocket:
    """A TCP connection to the first of the checked addresses that answers; never resolves a name."""
    err: OSError | None = None
    for ip in ips:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline = deadline
        try:
            sock.connect((ip, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            err = e
    raise err if err else OSError("no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address: the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, ips: tuple[str, ...], deadline: float, context=None):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self.pinned, self.deadline, self.peer = ips, deadline, None

    def connect(self):
        self.sock = _connect_pinned(self.pinned, self.port, self.deadline)
        self.peer = self.sock.getpeername()[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address: Host header, SNI and certificate check all use the URL's host."""

    def __init__(self, host: str, port: int, ips: tuple[str, ...], deadline: float, context=None):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001), context=context)
        self.pinned, self.deadline, self.peer = ips, deadline, None

    def connect(self):
        sock = _connect_pinned(self.pinned, self.port, self.deadline)
        self.peer = sock.getpeername()[0]
        sock.arm()  # the handshake as a whole waits at most until the deadline
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock.deadline = self.deadline


@dataclass
class Fetched:
    """A complete response: final URL, status, headers, body, the address connected to, the redirects followed."""

    url: str
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    peer: str | None
    redirects: list[str]
    seconds: float


_REDIRECTS = (301, 302, 303, 307, 308)


class Fetcher:
    """GET with a deadline for the whole response (DNS, connect, TLS, headers, body and every redirect), to the
    address the guard checked (the name is never resolved again), http(s) only, capped at max_bytes.

    Every failure is a FetchError whose reason is a key of REASONS or http_NNN.
    """

    def __init__(self, guard: AddressGuard, deadline_s: float, max_bytes: int, max_redirects: int = 5,
                 context: ssl.SSLContext | None = None, user_agent: str | None = None):
        self.guard, self.deadline_s, self.max_bytes, self.max_redirects = guard, deadline_s, max_bytes, max_redirects
        self.context = context or tls_context()
        self.user_agent = user_agent
        self.durations: list[float] = []  # seconds per fetch, in completion order (list.append is thread-safe)

    def fetch(self, url: str, headers: dict[str, str] | None = None) -> Fetched:
        t0 = time.monotonic()
        try:
            return self._fetch(url, headers or {}, t0)
        finally:
            self.durations.append(time.monotonic() - t0)

    def _fetch(self, url: str, headers: dict[str, str], t0: float) -> Fetched:
        deadline = t0 + self.deadline_s
        chain = [url]
        current = url
        while True:
            try:
                scheme, host, port, ips = self.guard.vet(current, max(deadline - time.monotonic(), 0.001))
                status, reason, hdrs, body, peer = self._get(scheme, host, port, ips, current, headers, deadline)
            except FetchError as e:
                if len(chain) > 1:  # say which hop failed
                    raise FetchError(e.reason, f"{e.detail} (after redirects {' -> '.join(chain)})") from None
                raise
            except (TimeoutError, socket.timeout):
                raise FetchError("timeout", f"no complete answer within {self.deadline_s:g}s (ingest.timeout_s), "
                                            f"at {current[:200]}") from None
            except ssl.SSLError as e:  # includes certificate errors
                raise FetchError("tls_error", f"{host}: {e}") from None
            except ConnectionRefusedError as e:
                raise FetchError("connection_refused", f"{host}:{port}: {e.strerror or e}") from None
            except http.client.InvalidURL as e:
                raise FetchError("bad_url", f"{current[:200]}: {e}") from None
            except http.client.IncompleteRead as e:
                raise FetchError("truncated", f"the connection closed after {len(e.partial)} bytes, "
                                              f"{e.expected} more were announced") from None
            except (http.client.HTTPException, OSError) as e:
                raise FetchError("connection_error", f"{host}:{port}: {type(e).__name__}: {e}") from None
            if status in _REDIRECTS and hdrs.get("Location"):
                nxt = urljoin(current, hdrs["Location"].strip()).split("#", 1)[0]
                if nxt in chain:
                    raise FetchError("too_many_redirects", f"redirect loop: {' -> '.join(chain + [nxt])}"[:500])
                if len(chain) > self.max_redirects:
                    raise FetchError("too_many_redirects",
                                     f"more than {self.max_redirects} redirects (ingest.max_redirects): "
                                     f"{' -> '.join(chain[:3])} -> ..."[:500])
                chain.append(nxt)
                current = nxt
                continue
            if status >= 400:
                raise FetchError(f"http_{status}", f"{status} {reason}".strip())
            return Fetched(current, status, hdrs, body, peer, chain[1:], time.monotonic() - t0)

    def _get(self, scheme, host, port, ips, url, headers, deadline):
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # what a browser sends for a path with spaces or non-ASCII characters: their UTF-8, percent-encoded
        target = re.sub(r"[^\x21-\x7e]+", lambda m: quote(m.group(), safe=""), target)
        conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = conn_cls(host, port, ips, deadline, self.context)
        try:
            hdrs = {"Accept-Encoding": "identity", "Connection": "close"}
            if self.user_agent:
                hdrs["User-Agent"] = self.user_agent
            conn.request("GET", target, headers=hdrs | headers)
            resp = conn.getresponse()
            if resp.status in _REDIRECTS or resp.status >= 400:
                return resp.status, resp.reason, resp.headers, b"", conn.peer
            length = resp.headers.get("Content-Length", "").strip()
            if length.isdigit() and int(length) > self.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} > max_bytes {self.max_bytes}")
            chunks, size = [], 0
            while True:
                chunk = resp.read(min(65536, self.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:
                    raise FetchError("too_large", f"body over max_bytes {self.max_bytes}")
            if length.isdigit() and size < int(length):
                raise FetchError("truncated", f"the connection closed after {size} of {length} bytes")
            return resp.status, resp.reason, resp.headers, b"".join(chunks), conn.peer
        finally:
            conn.close()


class _FetchedResponse(io.BytesIO):
    """What urlopen's caller sees: the body, `headers`, `status`, `url`; a context manager."""

    def __init__(self, f: Fetched):
        super().__init__(f.body)
        self.headers, self.status, self.url, self.fetched = f.headers, f.status, f.url, f

    def getcode(self) -> int:
        return self.status


class FetchOpener:
    """Stands in for urllib's opener (urllib.request.install_opener), so img2dataset's downloader, which calls
    urllib.request.urlopen, fetches through a Fetcher: no other handler (file:, ftp:, data:, proxies) is reachable."""

    def __init__(self, fetcher: Fetcher):
        self.fetcher = fetcher

    def open(self, fullurl, data=None, timeout=None):
        if data is not None:
            raise FetchError("bad_url", "ingest only GETs")
        if isinstance(fullurl, urllib.request.Request):
            url, headers = fullurl.full_url, dict(fullurl.header_items())
        else:
            url, headers = str(fullurl), {}
        return _FetchedResponse(self.fetcher.fetch(url, headers))


def install_fetcher(fetcher: Fetcher):
    """img2dataset fetches with urllib.request.urlopen, which uses the process-wide opener: ours while a shard
    downloads. Returns the opener it replaced, for restore_opener (other urlopen callers of the process, such as
    a health check, must not go through the download guard)."""
    previous = urllib.request._opener
    urllib.request.install_opener(FetchOpener(fetcher))
    return previous


def restore_opener(previous) -> None:
    urllib.request._opener = previous

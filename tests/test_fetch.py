"""The fetch under ingest: one deadline per response, the checked address pinned, http(s) only, reasons a user can
act on. Real servers on 127.0.0.1 (tests/fault_server.py)."""
from __future__ import annotations

import datetime
import io
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from schemas.spec import IngestSpec
from dataio.build_folder import BuildFolder
from dataio.download import ingest_shard
from dataio.fetch import AddressGuard, FetchError, Fetcher, tls_context
from dataio.uids import assign_uids
from tests.fault_server import FAULTS, FaultServer

DEADLINE = 3.0
SLACK = 1.0  # scheduling on a loaded 2-core machine


def jpeg(w=64, h=48):
    b = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(b, "JPEG")
    return b.getvalue()


class ScriptedResolver:
    """Answers a host from a script, one answer per call (the last one repeats); records every call."""

    def __init__(self, script: dict[str, list[tuple[str, ...]]]):
        self.script, self.calls = script, []
        self._lock = threading.Lock()

    def __call__(self, host):
        with self._lock:
            n = sum(1 for h in self.calls if h == host)
            self.calls.append(host)
        answers = self.script.get(host)
        if answers is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[min(n, len(answers) - 1)]


@pytest.fixture(scope="module")
def server():
    with FaultServer(jpeg(), slow_s=0.3, stall_s=30, trickle_s=2.0, max_bytes=50_000) as srv:
        yield srv


def fetcher(srv, deadline=DEADLINE, resolver=None, allow=None, **kw):
    guard = AddressGuard(allow if allow is not None else [f"127.0.0.1:{srv.port}"], resolver)
    return Fetcher(guard, deadline, srv.max_bytes, **kw)


def reason_of(f: Fetcher, url: str) -> str | None:
    try:
        f.fetch(url)
    except FetchError as e:
        return e.reason
    return None


def test_a_trickling_or_silent_server_cannot_stretch_a_fetch_past_its_deadline(server):
    f = fetcher(server)
    urls = [f"{server.url}/{k}/1.jpg" for k in ("trickle", "trickle_head", "stall")]

    def timed(url):
        t0 = time.monotonic()
        try:
            f.fetch(url)
        except FetchError as e:
            return e.reason, time.monotonic() - t0
        return None, time.monotonic() - t0

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(timed, urls))
    for url, (reason, seconds) in zip(urls, results):
        assert reason == "timeout", url
        assert DEADLINE - 0.1 <= seconds <= DEADLINE + SLACK, (url, seconds)
    deadline = time.monotonic() + 3
    while server.open_connections and time.monotonic() < deadline:  # the client hung up on every one
        time.sleep(0.05)
    assert server.open_connections == 0


@pytest.mark.parametrize("fault", [k for k, (_, r) in FAULTS.items()
                                   if k not in ("trickle", "trickle_head", "stall", "away")])
def test_each_fault_gets_its_reason(server, fault):
    expected = None if fault == "html" else FAULTS[fault][1]  # HTML is fetched; the resizer rejects it
    assert reason_of(fetcher(server), f"{server.url}/{fault}/7.jpg") == expected


def test_redirects_are_counted_and_loops_named(server):
    assert reason_of(fetcher(server, max_redirects=2), f"{server.url}/chain/1.jpg") == "too_many_redirects"
    ok = fetcher(server, max_redirects=3).fetch(f"{server.url}/chain/1.jpg")
    assert ok.status == 200 and len(ok.redirects) == 3 and ok.url.endswith("/fast/1.jpg")
    with pytest.raises(FetchError, match="redirect loop: .*/loop/1.jpg") as e:
        fetcher(server, max_redirects=50).fetch(f"{server.url}/loop/1.jpg")
    assert e.value.reason == "too_many_redirects"


def test_only_http_and_https_are_fetched(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    f = fetcher(server, allow=["127.0.0.1", "localhost"])
    for url in (f"file://127.0.0.1{secret}", f"file://localhost{secret}", "ftp://127.0.0.1/x",
                "data:image/png;base64,AA", "javascript:alert(1)", f"gopher://127.0.0.1:{server.port}/"):
        assert reason_of(f, url) == "bad_scheme", url
    assert reason_of(f, f"{server.url}/to_file/1.jpg") == "bad_scheme"  # a redirect is vetted the same way
    inputs, rejects = assign_uids(pa.table({"url": [f"file://127.0.0.1{secret}", "FILE:///etc/passwd", "http:///x",
                                                    "http://a.com:99999/x.jpg", "http://a.com/ok.jpg"],
                                            "text": ["a"] * 5}), "t")
    assert rejects["reason"].to_pylist() == ["bad_scheme", "bad_scheme", "bad_url", "bad_url"]
    assert inputs["url"].to_pylist() == ["http://a.com/ok.jpg"]


def test_dns_and_refused_connections_have_their_own_reasons(server):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    try:
        f = fetcher(server, allow=["127.0.0.1"])
        assert reason_of(f, f"http://127.0.0.1:{port}/x.jpg") == "connection_refused"
        assert reason_of(f, "http://no-such-host.invalid/x.jpg") == "dns_error"
        slow_dns = fetcher(server, deadline=0.5, resolver=lambda host: time.sleep(2) or ())
        t0 = time.monotonic()
        assert reason_of(slow_dns, "http://example.test/x.jpg") == "timeout"
        assert time.monotonic() - t0 < 0.5 + SLACK
    finally:
        closed.close()


def test_the_connection_goes_to_the_checked_address(server):
    """DNS rebinding: the guard checks the first answer; a second lookup would say ::1 (loopback, not allowed, and
    nothing listens there). The fetch connects to the checked address and resolves no name again, redirects
    included, and the Host header still names the URL's host."""
    name, other = "rebind.test", "rebind-two.test"
    resolver = ScriptedResolver({name: [("127.0.0.1",), ("::1",)], other: [("127.0.0.1",), ("::1",)]})
    f = fetcher(server, resolver=resolver)
    got = f.fetch(f"http://{name}:{server.port}/fast/1.jpg")
    assert got.status == 200 and got.peer == "127.0.0.1" and resolver.calls == [name]
    assert f"{name}:{server.port}" in server.host_headers
    assert AddressGuard([], ScriptedResolver({name: [("::1",)]})).check(f"http://{name}/x")[0] == "blocked_address"

    # a later fetch looks the name up again: now it is ::1, which is refused before any connection
    assert reason_of(f, f"http://{name}:{server.port}/fast/1.jpg") == "blocked_address"

    resolver = ScriptedResolver({name: [("127.0.0.1",), ("::1",)], other: [("127.0.0.1",), ("::1",)]})
    got = fetcher(server, resolver=resolver).fetch(f"http://{name}:{server.port}/away/{other}:{server.port}/fast/2.jpg")
    assert got.status == 200 and got.peer == "127.0.0.1"
    assert got.redirects == [f"http://{other}:{server.port}/fast/2.jpg"]
    assert resolver.calls == [name, other]  # one lookup per hop, each hop pinned to its own checked answer
    assert f"{other}:{server.port}" in server.host_headers


def test_ingest_shard_pins_and_finishes_within_the_deadline(server, tmp_path):
    """A shard with trickling, stalling and rebinding URLs finishes in about one deadline; every row accounted."""
    resolver = ScriptedResolver({"rebind.test": [("127.0.0.1",), ("::1",)]})
    urls = {f"{server.url}/fast/1.jpg": None, f"{server.url}/trickle/1.jpg": "timeout",
            f"{server.url}/trickle_head/1.jpg": "timeout", f"{server.url}/stall/1.jpg": "timeout",
            f"http://rebind.test:{server.port}/fast/2.jpg": None, f"{server.url}/loop/1.jpg": "too_many_redirects",
            f"{server.url}/to_file/1.jpg": "bad_scheme", f"{server.url}/fail/1.jpg": "http_500"}
    inputs, _ = assign_uids(pa.table({"url": list(urls), "text": ["a red square"] * len(urls)}), "t")
    folder = BuildFolder(tmp_path)
    folder.input_dir.mkdir(parents=True)
    pq.write_table(inputs, folder.input_shard(0))
    params = IngestSpec(allow_hosts=[f"127.0.0.1:{server.port}"], timeout_s=DEADLINE, max_bytes=server.max_bytes,
                        image_size=32)
    import img2dataset.downloader  # noqa: F401  (its import is not the fetch's time)

    t0 = time.monotonic()
    summary = ingest_shard(folder, 0, params, resolver=resolver)
    seconds = time.monotonic() - t0
    # about one deadline: the slow rows run side by side (a per-read timeout would let the trickle run for days)
    assert seconds < 2 * DEADLINE + 5, seconds
    rejects = pq.read_table(folder.ingest_shard(0).rejects)
    pairs = pq.read_table(folder.ingest_shard(0).pairs)
    assert summary["pairs"] + summary["rejects"] == len(urls)
    assert dict(zip(rejects["url"].to_pylist(), rejects["reason"].to_pylist())) == {u: r for u, r in urls.items() if r}
    assert sorted(pairs["url"].to_pylist()) == sorted(u for u, r in urls.items() if r is None)
    assert max(summary["fetch_ms"]) <= 1000 * (DEADLINE + SLACK)
    assert resolver.calls == ["rebind.test"]


# --------------------------------------------------------------------------- TLS

def _certificates(tmp_path, names: list[str]):
    """A CA and a server certificate for `names`, signed by it (PEM files)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(subject, issuer, key, sign_key, ca: bool, sans=()):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = make("pairforge test CA", "pairforge test CA", ca_key, ca_key, True)
    cert = make(names[0], "pairforge test CA", key, ca_key, False, names)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls_keeps_the_server_name_on_the_pinned_address(tmp_path):
    ca, cert, key = _certificates(tmp_path, ["images.pairforge.test"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    resolver = ScriptedResolver({"images.pairforge.test": [("127.0.0.1",)], "other.pairforge.test": [("127.0.0.1",)]})
    with FaultServer(jpeg(), tls=server_ctx) as srv:
        allow = [f"127.0.0.1:{srv.port}"]
        trusting = Fetcher(AddressGuard(allow, resolver), DEADLINE, 10**6, context=tls_context(str(ca)))
        got = trusting.fetch(f"https://images.pairforge.test:{srv.port}/fast/1.jpg")
        assert got.status == 200 and got.peer == "127.0.0.1" and got.body == srv.image
        assert sni == ["images.pairforge.test"] and f"images.pairforge.test:{srv.port}" in srv.host_headers
        # the certificate is checked against the URL's name, not the address connected to
        assert reason_of(trusting, f"https://other.pairforge.test:{srv.port}/fast/1.jpg") == "tls_error"
        # an unknown CA (the system's store does not hold the test CA)
        default = Fetcher(AddressGuard(allow, resolver), DEADLINE, 10**6)
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED") as e:
            default.fetch(f"https://images.pairforge.test:{srv.port}/fast/1.jpg")
        assert e.value.reason == "tls_error"
        # TLS spoken to a plain-HTTP port
    with FaultServer(jpeg()) as plain:
        f = Fetcher(AddressGuard([f"127.0.0.1:{plain.port}"]), DEADLINE, 10**6)
        assert reason_of(f, f"https://127.0.0.1:{plain.port}/fast/1.jpg") == "tls_error"


def test_non_ascii_urls_are_sent_as_a_browser_sends_them(server):
    """Spaces and non-ASCII characters in the path are percent-encoded UTF-8; a name that cannot be a DNS name is
    bad_url."""
    f = fetcher(server)
    got = f.fetch(f"{server.url}/fast/bücher ö.jpg?q=ü x")
    assert got.status == 200 and got.body == server.image
    assert reason_of(fetcher(server, allow=["127.0.0.1"]), "http://" + "a" * 70 + ".example/x.jpg") == "bad_url"

"""ingest: every URL ends in pairs or rejects with its reason; the address guard; byte and pixel caps."""
import io
import json
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo.server import DemoServer
from schemas.records import make_uid
from schemas.spec import IngestSpec
from dataio.build_folder import BuildFolder
from dataio.download import ingest_shard, precheck_image
from dataio.fetch import AddressGuard
from dataio.reasons import classify_error
from dataio.uids import assign_uids


def jpeg(w=300, h=200, color="red"):
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "JPEG")
    return b.getvalue()


def png_declaring(w, h):
    """A tiny PNG whose header declares w x h pixels (a decompression bomb's shape) without the data."""
    raw = zlib.compress(b"\x00\x00" * 4)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def serve(tmp_path, routes: dict):
    """routes: path -> (status, body bytes, headers, delay)."""
    files = tmp_path / "files"
    files.mkdir(parents=True, exist_ok=True)
    table = {}
    for i, (path, (status, body, headers, delay)) in enumerate(routes.items()):
        (files / f"{i}.bin").write_bytes(body)
        table[path] = {"file": f"files/{i}.bin", "status": status, "headers": headers, "delay_s": delay,
                       "content_type": "image/jpeg"}
    (tmp_path / "routes.json").write_text(json.dumps(table))
    return DemoServer(tmp_path)


def test_precheck_catches_bombs_truncation_and_html():
    good = jpeg()
    assert precheck_image(good, 10**8) is None
    assert precheck_image(good[: len(good) // 2], 10**8).startswith("truncated")
    p = io.BytesIO()
    Image.new("RGB", (50, 50), "blue").save(p, "PNG")
    assert precheck_image(p.getvalue()[:-12], 10**8).startswith("truncated")
    assert precheck_image(png_declaring(100_000, 100_000), 10**8).startswith("decompression_bomb")
    assert precheck_image(png_declaring(5000, 5000), 10**6).startswith("decompression_bomb")
    assert precheck_image(b"<!DOCTYPE html><html></html>", 10**8).startswith("not_an_image")
    assert precheck_image(b"just text", 10**8).startswith("not_an_image")


@pytest.mark.parametrize("msg, reason", [
    ("http_404: 404 Not Found", "http_404"), ("HTTP Error 503: Service Unavailable", "http_503"),
    ("timeout: no complete answer within 5s", "timeout"), ("<urlopen error timed out>", "timeout"),
    ("connection_refused: 127.0.0.1:9: Connection refused", "connection_refused"),
    ("<urlopen error [Errno 104] Connection reset by peer>", "connection_error"),
    ("too_many_redirects: redirect loop: a -> b -> a", "too_many_redirects"),
    ("tls_error: x: [SSL: CERTIFICATE_VERIFY_FAILED]", "tls_error"), ("dns_error: x.invalid: ...", "dns_error"),
    ("bad_scheme: file:// is not fetched", "bad_scheme"),
    ("Use of image disallowed by X-Robots-Tag directive", "opt_out"),
    ("too_large: Content-Length 9 > max_bytes 1", "too_large"),
    ("truncated: JPEG ends without its end-of-image marker", "truncated"),
    ("Image decoding error", "not_an_image"), ("something new", "download_error"),
    ("no_such_reason: text", "download_error"),
])
def test_classify_error(msg, reason):
    assert classify_error(msg) == reason


def test_guard_blocks_non_public_unless_allowed():
    g = AddressGuard([])
    assert g.check("http://127.0.0.1:8000/a.jpg")[0] == "blocked_address"
    assert g.check("http://localhost/a.jpg")[0] == "blocked_address"
    assert g.check("http://[::1]/a.jpg")[0] == "blocked_address"
    assert g.check("http://93.184.216.34/a.jpg") is None  # public literal: allowed, nothing is contacted
    assert g.check("http://no-such-host.invalid/a.jpg")[0] == "dns_error"
    port_only = AddressGuard(["127.0.0.1:8000"])
    assert port_only.check("http://127.0.0.1:8000/a.jpg") is None
    assert port_only.check("http://127.0.0.1:8001/a.jpg")[0] == "blocked_address"
    assert AddressGuard(["127.0.0.0/8"]).check("http://127.0.0.5:9/a.jpg") is None
    assert AddressGuard(["localhost"]).check("http://localhost:1/a.jpg") is None


def test_assign_uids_accounts_for_every_row():
    t = pa.table({"url": ["http://a.com/1.jpg", "http://A.com/1.jpg#x", None, "ftp://a.com/x", "  ",
                          "http://a.com/2.jpg"],
                  "text": ["cat", "cat", "dog", "x", "y", None]})
    inputs, rejects = assign_uids(t, "src")
    assert inputs.num_rows + rejects.num_rows == t.num_rows
    assert inputs["uid"].to_pylist()[0] == make_uid("http://a.com/1.jpg", "cat")
    reasons = dict(zip(rejects["url"].to_pylist(), rejects["reason"].to_pylist()))
    assert reasons["http://A.com/1.jpg#x"] == "duplicate_input_row"  # same normalised url + caption
    assert reasons["ftp://a.com/x"] == "bad_scheme"
    assert sorted(rejects["reason"].to_pylist()).count("missing_url") == 2
    uids = inputs["uid"].to_pylist() + rejects["uid"].to_pylist()
    assert len(set(uids)) == len(uids)
    again, _ = assign_uids(t, "src")
    assert again["uid"].to_pylist() == inputs["uid"].to_pylist()


def test_ingest_shard_every_url_accounted(tmp_path):
    img = jpeg()
    with _two_servers(tmp_path, img) as (srv, forbidden):
        base = srv.url
        urls = {
            f"{base}/ok.jpg": None, f"{base}/missing.jpg": "http_404", f"{base}/err.jpg": "http_500",
            f"{base}/trunc.jpg": "truncated", f"{base}/html.jpg": "not_an_image", f"{base}/noai.jpg": "opt_out",
            f"{base}/big.jpg": "too_large", f"{base}/bomb.png": "decompression_bomb",
            f"{base}/slow.jpg": "timeout", f"{base}/redirect.jpg": "blocked_address",
            f"{forbidden.url}/ok.jpg": "blocked_address",
        }
        inputs, _ = assign_uids(pa.table({"url": list(urls), "text": ["a red square"] * len(urls)}), "t")
        folder = BuildFolder(tmp_path)
        folder.input_dir.mkdir(parents=True)
        pq.write_table(inputs, folder.input_shard(0))
        params = IngestSpec(allow_hosts=[f"127.0.0.1:{srv.port}"], timeout_s=4, max_bytes=200_000,
                            max_pixels=10**7)
        summary = ingest_shard(folder, 0, params)
        assert forbidden.requests == []  # refused before any connection, redirects included
    pairs = pq.read_table(tmp_path / "_work/ingest/00000.parquet")
    rejects = pq.read_table(tmp_path / "_work/ingest/00000.rejects.parquet")
    assert summary["pairs"] + summary["rejects"] == len(urls)
    got = dict(zip(rejects["url"].to_pylist(), rejects["reason"].to_pylist()))
    assert pairs["url"].to_pylist() == [f"{base}/ok.jpg"]
    assert got == {u: r for u, r in urls.items() if r}
    assert pairs["sha256"][0].as_py() is not None and pairs["width"][0].as_py() == 300
    # idempotent: a second call with the marker present does no work and returns the same summary
    assert ingest_shard(folder, 0, params) == summary


class _two_servers:
    def __init__(self, tmp_path, img):
        self.main_root, self.other_root, self.img = tmp_path / "main", tmp_path / "other", img

    def __enter__(self):
        self.forbidden = serve(self.other_root, {"/ok.jpg": (200, self.img, {}, 0)}).start()
        f = self.forbidden.url
        self.srv = serve(self.main_root, {
            "/ok.jpg": (200, self.img, {}, 0), "/err.jpg": (500, b"oops", {}, 0),
            "/trunc.jpg": (200, self.img[: len(self.img) // 2], {}, 0),
            "/html.jpg": (200, b"<html><body>not an image</body></html>", {}, 0),
            "/noai.jpg": (200, self.img, {"X-Robots-Tag": "noai"}, 0),
            "/big.jpg": (200, self.img + b"\x00" * 300_000, {}, 0),
            "/bomb.png": (200, png_declaring(20_000, 20_000), {}, 0),
            "/slow.jpg": (200, self.img, {}, 12),
            "/redirect.jpg": (302, b"", {"Location": f"{f}/ok.jpg"}, 0),
        }).start()
        return self.srv, self.forbidden

    def __exit__(self, *exc):
        self.srv.stop()
        self.forbidden.stop()

"""Where files live: a local folder or object storage (s3://bucket/prefix, any filesystem pyarrow opens by URI).

`location(x)` turns a local path or a URI into a Location: a pyarrow FileSystem and a path on it, with the few
pathlib operations the pipeline uses. Local paths stay local (absolute); `str()` of a remote one is its URI.

Endpoint and credentials of object storage come from the standard AWS environment variables (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which pyarrow reads, so the same
spec runs on a laptop and a cluster; URI query options (`?endpoint_override=`) are refused, since every derived path
and every worker would have to carry them.

Writes are whole or absent: locally a temporary file renamed into place; in object storage one upload of bytes
already serialized in memory, which the store publishes only when the upload completes (a PUT, or the final step of a
multipart upload), so a reader never sees half an object.

Requests to S3 are retried by pairforge's settings, not the SDK's defaults (3 attempts): every request (a read, a
listing, an upload part) gets up to S3_MAX_ATTEMPTS attempts with exponential backoff (50 ms, doubling: about 25 s of
waiting in all at 10 attempts), on 5xx answers (503 SlowDown included), throttling and network errors (resets,
cut bodies); connect timeout S3_CONNECT_TIMEOUT_S. `PAIRFORGE_S3_MAX_ATTEMPTS` changes the attempts; a build
forwards it to its Ray workers. A request that fails every attempt raises OSError naming the key and the error.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.errors import UserError
from schemas.spec import is_uri


class StorageError(UserError):
    """A location that cannot be used; the message names it."""


class Location:
    """A file or folder on a pyarrow FileSystem: `fs` and `path` (what pyarrow's readers take as filesystem= and
    the path), plus a pathlib-like subset. Pickles as its string, so Ray workers resolve it with their own env."""

    __slots__ = ("fs", "path", "scheme")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = ""):
        self.fs, self.path, self.scheme = fs, path.rstrip("/") or "/", scheme

    # identity ------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return not self.scheme

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __fspath__(self) -> str:
        if not self.is_local:
            raise StorageError(f"{self} is in object storage, not a local file")
        return self.path

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __reduce__(self):
        return (location, (str(self),))

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "Location") -> bool:
        return str(self) < str(other)

    # names ---------------------------------------------------------------------
    def __truediv__(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, str(name)), self.scheme)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path), self.scheme)

    def with_name(self, name: str) -> "Location":
        return self.parent / name

    def relative_to(self, other: "Location") -> str:
        rel = posixpath.relpath(self.path, other.path)
        if rel.startswith(".."):
            raise StorageError(f"{self} is not inside {other}")
        return rel

    # queries -------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def size(self) -> int:
        return self.info().size

    def _children(self, recursive: bool) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive))

    def subdirs(self) -> list["Location"]:
        """Folders directly inside, sorted."""
        return sorted(Location(self.fs, f.path, self.scheme) for f in self._children(False)
                      if f.type == pafs.FileType.Directory)

    def glob(self, pattern: str) -> list["Location"]:
        """Files directly inside whose name matches pattern (fnmatch), sorted."""
        return sorted(Location(self.fs, f.path, self.scheme) for f in self._children(False)
                      if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.base_name, pattern))

    def rglob(self, pattern: str) -> list["Location"]:
        """Files anywhere below whose name matches pattern, sorted."""
        return sorted(Location(self.fs, f.path, self.scheme) for f in self._children(True)
                      if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.base_name, pattern))

    # reads ---------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input(self):
        """A random-access pyarrow file (tarfile, ParquetFile and friends read it)."""
        return self.fs.open_input_file(self.path)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path, filesystem=self.fs, columns=columns)

    def read_schema(self) -> pa.Schema:
        return pq.read_schema(self.path, filesystem=self.fs)

    def read_metadata(self) -> pq.FileMetaData:
        return pq.read_metadata(self.path, filesystem=self.fs)

    def parquet_file(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.path, filesystem=self.fs)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    # writes --------------------------------------------------------------------
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> "Location":
        """Create the folder and its parents; an existing one is fine (pathlib's arguments are accepted)."""
        self.fs.create_dir(self.path, recursive=True)
        return self

    def rmtree(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def unlink(self) -> None:
        self.fs.delete_file(self.path)

    def write_bytes(self, data: bytes | pa.Buffer) -> None:
        """Whole or absent (see the module docstring)."""
        if self.is_local:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(self.path), f".{self.name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))


S3_MAX_ATTEMPTS = 10
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0  # pyarrow applies it on Windows and macOS only


def s3_max_attempts() -> int:
    raw = os.environ.get("PAIRFORGE_S3_MAX_ATTEMPTS", "")
    try:
        return max(1, int(raw)) if raw else S3_MAX_ATTEMPTS
    except ValueError:
        raise StorageError(f"PAIRFORGE_S3_MAX_ATTEMPTS={raw!r}: expected a whole number of attempts") from None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with pairforge's retries and timeouts. It pickles with them (pyarrow's own pickling
    drops the retry strategy), so Ray workers that receive it, as Ray Data's filesystem=, retry the same way."""

    def __init__(self, **options):
        self.options = options
        options = {"allow_delayed_open": True} | options  # an object under the part size: one PUT, not three
        self.options = options
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=s3_max_attempts()),
                         connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S, **options)

    def __reduce__(self):
        return (_retrying_s3, (self.options,))


def _retrying_s3(options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def with_retries(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem (as FileSystem.from_uri made it, endpoint and region from the environment) with pairforge's
    retries and timeouts; any other filesystem as it is."""
    if not isinstance(fs, pafs.S3FileSystem) or isinstance(fs, RetryingS3FileSystem):
        return fs
    made = fs.__reduce__()[1][0]
    keep = ("access_key", "secret_key", "session_token", "anonymous", "scheme", "endpoint_override", "role_arn",
            "session_name", "external_id", "load_frequency", "background_writes", "default_metadata",
            "proxy_options", "force_virtual_addressing", "tls_ca_file_path")
    options = {k: made[k] for k in keep if made.get(k) not in (None, "", -1, -1.0)}
    if not (options.get("proxy_options") or {}).get("host"):
        options.pop("proxy_options", None)
    return RetryingS3FileSystem(region=fs.region, **options)


def location(value: str | os.PathLike | Location) -> Location:
    """A local path (made absolute) or a URI such as s3://bucket/prefix as a Location."""
    if isinstance(value, Location):
        return value
    s = os.fspath(value) if not isinstance(value, str) else value
    if s.startswith("file://"):
        s = s[len("file://"):]
    if not is_uri(s):
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s)))
    if "?" in s:
        raise StorageError(f"{s}: query options in a storage URI are not supported; give the endpoint and "
                           "credentials in the AWS_* environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise StorageError(f"{s}: cannot open this storage location: {e}") from None
    return Location(with_retries(fs), path, s.split("://", 1)[0])


def write_table_whole(table: pa.Table, where: str | os.PathLike | Location, compression: str | None = "zstd",
                      checksum: bool = False, **kw) -> dict:
    """Write Parquet whole or absent; returns {path, rows, bytes, sha256 (with checksum, else None)}."""
    loc = location(where)
    compression = None if compression == "none" else compression
    if loc.is_local:  # stream to a temporary file, rename, hash the file: no second copy in memory
        os.makedirs(posixpath.dirname(loc.path), exist_ok=True)
        tmp = loc.with_name(f".{loc.name}.tmp")
        pq.write_table(table, tmp.path, compression=compression, **kw)
        os.replace(tmp.path, loc.path)
        size, digest = loc.size(), loc.sha256() if checksum else None
    else:  # serialize in memory, then one upload
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression, **kw)
        buf = sink.getvalue()
        loc.write_bytes(buf)
        size, digest = buf.size, hashlib.sha256(buf).hexdigest() if checksum else None
    return {"path": str(loc), "rows": table.num_rows, "bytes": size, "sha256": digest}


def parquet_dataset(files: list[Location] | Location, **kw):
    """A pyarrow dataset over Parquet files (all on one filesystem) or one folder."""
    import pyarrow.dataset as pads

    if isinstance(files, Location):
        return pads.dataset(files.path, filesystem=files.fs, format="parquet", **kw)
    if not files:
        raise StorageError("no Parquet files to read")
    return pads.dataset([f.path for f in files], filesystem=files[0].fs, format="parquet", **kw)


__all__ = ["Location", "RetryingS3FileSystem", "StorageError", "is_uri", "location", "parquet_dataset",
           "with_retries", "write_table_whole"]

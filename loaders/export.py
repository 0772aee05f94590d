"""Export a build's kept pairs for other trainers: WebDataset tars or a DataComp-style uid subset.

`pairforge export BUILD --format webdataset|uids OUT` (BUILD: a build folder, whose shards/ is read, or a folder /
glob of pairforge Parquet shards).

webdataset  The img2dataset / open_clip layout: OUT/00000.tar, 00001.tar, ... with `samples_per_tar` samples each
            (the last one short); sample KEY = 5-digit tar number + 4-digit (or wider) index in the tar, like
            img2dataset's "000010003"; members KEY.jpg (the stored image bytes, unchanged; .png / .webp when the
            stored image is one), KEY.txt (the caption, UTF-8) and KEY.json ({"key", "uid", "url", "caption",
            "width", "height", "original_width", "original_height", "sha256", plus every other scalar column of
            the shard: the stage stats such as clip_score, lang, junk_kind}); plus OUT/NNNNN_stats.json per tar
            and OUT/_export.json. Read it with `webdataset.WebDataset("OUT/{00000..0000N}.tar")` or open_clip's
            `--dataset-type webdataset`. Rows are written in shard order (file, row), so two exports of a build are
            byte-identical (tar member mtimes are fixed).

uids        DataComp's subset format (the resharder's `--subset-file`): a .npy of the kept uids as 128-bit
            integers, each split into two little-endian uint64 (high 64 bits first: int(uid[:16], 16),
            int(uid[16:32], 16)), sorted ascending. The dtype is DataComp's own `np.dtype("u8,u8")`, i.e. fields
            (f0, f1): DataComp's resharder compares the loaded array's dtype with exactly that, so field names
            u0 / u1 would be rejected there. pairforge uids are 32 hex digits (128 bits) as DataComp's are.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from loaders.pairs import resolve_shards
from schemas.errors import UserError
from dataio.storage import Location, location

UID_DTYPE = np.dtype("u8,u8")  # DataComp: np.dtype("u8,u8"), fields f0 (high 64 bits), f1 (low 64 bits)
FORMATS = ("webdataset", "uids")
_META_SKIP = {"image", "text"}


class ExportError(UserError):
    pass


def build_shards(build: str | Path | Location) -> list[Location]:
    try:
        p = location(build) if not any(ch in str(build) for ch in "*?[") else build
        if isinstance(p, Location) and (p / "shards").is_dir():
            p = p / "shards"
        return resolve_shards([p])
    except ValueError as e:
        raise ExportError(str(e)) from None


def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def _jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, float) and v != v:
        return None
    return v


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_webdataset(build: str | Path | Location, out: str | Path | Location, samples_per_tar: int = 10000) -> dict:
    """Write OUT/NNNNN.tar (img2dataset layout), local or in object storage; returns the summary also written to
    OUT/_export.json."""
    if samples_per_tar <= 0:
        raise ExportError("samples_per_tar must be positive")
    files = build_shards(build)
    out = location(out).mkdir()
    width = max(4, len(str(samples_per_tar - 1)))
    tars, n, tar, k, stats, stream = [], 0, None, 0, None, None

    def close():
        if tar is not None:
            tar.close()
            stream.close()
            (out / f"{len(tars) - 1:05d}_stats.json").write_text(json.dumps(stats, indent=2))

    for f in files:
        pf = f.parquet_file()
        scalar = [fld.name for fld in pf.schema_arrow
                  if fld.name not in _META_SKIP and not (str(fld.type).startswith(("list", "large_list", "struct"))
                                                         or str(fld.type) in ("binary", "large_binary"))]
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg)
            cols = {c: t.column(c).to_pylist() for c in ["image", "text"] + scalar}
            for i in range(t.num_rows):
                img = cols["image"][i]
                if img is None:
                    continue
                if tar is None or k == samples_per_tar:
                    close()
                    path = out / f"{len(tars):05d}.tar"
                    stream = path.fs.open_output_stream(path.path)  # in object storage: one upload per tar
                    tar = tarfile.open(fileobj=stream, mode="w")
                    tars.append(path.name)
                    k, stats = 0, {"count": 0, "successes": 0}
                key = f"{len(tars) - 1:05d}{k:0{width}d}"
                text = cols["text"][i] or ""
                meta = {"key": key, "caption": text}
                meta.update({c: _jsonable(cols[c][i]) for c in scalar})
                _add(tar, f"{key}.{_image_ext(img)}", img)
                _add(tar, f"{key}.txt", text.encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                k += 1
                n += 1
                stats["count"] += 1
                stats["successes"] += 1
    close()
    summary = {"format": "webdataset", "samples": n, "tars": tars, "samples_per_tar": samples_per_tar,
               "source_shards": [str(f) for f in files]}
    (out / "_export.json").write_text(json.dumps(summary, indent=2))
    return summary


def uid_array(uids) -> np.ndarray:
    """128-bit hex uids -> DataComp's sorted structured array of two uint64 (dtype "u8,u8")."""
    vals = []
    for u in uids:
        if u is None:
            continue
        if len(u) != 32:
            raise ExportError(f"uid {u!r} is not 32 hex digits (128 bits)")
        vals.append((int(u[:16], 16), int(u[16:32], 16)))
    arr = np.array(vals, dtype=UID_DTYPE)
    arr.sort()  # structured sort: by f0 then f1, i.e. by the 128-bit value
    return arr


def uids_from_array(arr: np.ndarray) -> list[str]:
    return [f"{int(a):016x}{int(b):016x}" for a, b in arr.tolist()]


def export_uids(build: str | Path | Location, out: str | Path | Location) -> dict:
    """Write the kept uids of a build to OUT (a .npy file; '.npy' is added when missing)."""
    files = build_shards(build)
    uids = set()
    for f in files:
        uids.update(f.read_table(columns=["uid"]).column(0).to_pylist())
    uids.discard(None)
    arr = uid_array(sorted(uids))
    out = location(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    buf = io.BytesIO()
    np.save(buf, arr)
    out.write_bytes(buf.getvalue())
    return {"format": "uids", "uids": len(arr), "out": str(out), "dtype": str(arr.dtype)}


def export(build: str | Path, fmt: str, out: str | Path, samples_per_tar: int = 10000) -> dict:
    if fmt == "webdataset":
        return export_webdataset(build, out, samples_per_tar)
    if fmt == "uids":
        return export_uids(build, out)
    raise ExportError(f"unknown format {fmt!r}; expected one of {FORMATS}")

"""Decode once: a batch's image bytes become RGB pixels one time, and every image stage reads those pixels.

The flow runs `add_pixels` on a batch before the first stage that reads pixels and drops the private columns after
the last one; a stage called on a plain table (tests, benchmarks) decodes on the fly through `images()`, so it
works either way. The `image` bytes stay in the batch for stages that need them.

Reduced-size decoding: each image stage declares the shorter side it needs (Stage.pixel_side: None for the image
as stored). When every image stage of a spec is content with fewer pixels, the shared decode asks libjpeg for the
smallest DCT scale (1/2, 1/4, 1/8) that keeps the shorter side at least the largest of those needs: the decode
itself then costs a fraction of a full one, and so does every resize after it. Other formats decode in full. The
file is still decoded to its end, so truncated or corrupt files fail as they do in full. SIZE keeps the stored
size (the header's), which is what size statistics report; `resize()` maps a reduced image back onto the stored
image's extent (the draft's box), so a resize from it has the geometry of a resize from the stored pixels.

Its private columns (PIXELS, SHAPE, SIZE, ERROR) never reach a written file.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from schemas.errors import exception_text

PIXELS = "_pixels"  # HxWx3 uint8 RGB, row-major bytes; null when the image does not decode
SHAPE = "_pixels_shape"  # [height, width] of the pixels (smaller than SIZE after a reduced decode)
SIZE = "_image_size"  # [height, width] of the image as stored
ERROR = "_decode_error"  # why the image does not decode; null when it does
PRIVATE = (PIXELS, SHAPE, SIZE, ERROR)

# resize(): an integer box reduction first while the rest of the resize stays at least this factor (Pillow's
# reducing_gap; 3 is "almost indistinguishable" from a plain resize). Below 3x it changes nothing.
REDUCING_GAP = 3.0
DCT_SCALES = (1, 2, 4, 8)  # libjpeg's reductions as PIL's draft picks them

_decodes = 0


def decodes() -> int:
    """Images decoded by this process so far (the flow reports decodes per row from it)."""
    return _decodes


def decode_at(data: bytes | None, side: int | None = None
              ) -> tuple[np.ndarray | None, tuple[int, int] | None, str | None]:
    """(HxWx3 uint8 RGB, stored (height, width), None), transparency composited on white; (None, None, error) for
    missing or bad bytes. A full decode, so truncated or corrupt files fail here.

    side: a JPEG decodes at the smallest DCT scale whose shorter side is still >= side (0: the smallest scale,
    for readers of the size alone); None: at the stored size."""
    global _decodes
    if not data:
        return None, None, "no image bytes"
    _decodes += 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            stored = (im.height, im.width)
            if side is not None and im.format == "JPEG":
                im.draft("RGB", (max(1, side), max(1, side)))
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            return np.asarray(im.convert("RGB")), stored, None
    except Exception as e:  # PIL raises many types for bad files
        return None, None, exception_text(e)


def decode_image(data: bytes | None, draft: tuple[int, int] | None = None) -> tuple[np.ndarray | None, str | None]:
    """(HxWx3 uint8 RGB, None) or (None, error): decode_at without the stored size. `draft` lets a JPEG decode at
    a reduced scale (never below the size asked for)."""
    arr, _, err = decode_at(data, None if draft is None else min(draft))
    return arr, err


def add_pixels(batch: pa.Table, side: int | None = None) -> pa.Table:
    """The shared decode step: adds the private pixel columns (each image decoded once, at `side`: decode_at)."""
    if PIXELS in batch.column_names:
        return batch
    pixels, shapes, sizes, errors = [], [], [], []
    for data in batch.column("image").to_pylist():
        arr, stored, err = decode_at(data, side)
        pixels.append(None if arr is None else arr.tobytes())
        shapes.append(None if arr is None else list(arr.shape[:2]))
        sizes.append(None if stored is None else list(stored))
        errors.append(err)
    hw = pa.list_(pa.int32(), 2)
    return (batch.append_column(PIXELS, pa.array(pixels, pa.large_binary()))
            .append_column(SHAPE, pa.array(shapes, hw))
            .append_column(SIZE, pa.array(sizes, hw))
            .append_column(ERROR, pa.array(errors, pa.string())))


def decoded(batch: pa.Table, side: int | None = None) -> tuple[list[np.ndarray | None], pa.Array]:
    """(each row's RGB pixels or None, why each row does not decode or null): read-only views of the shared
    decode when the batch has it, else decoded now at `side` (decode_at)."""
    if PIXELS not in batch.column_names:
        got = [decode_at(d, side) for d in batch.column("image").to_pylist()]
        return [g[0] for g in got], pa.array([g[2] for g in got], pa.string())
    out: list[np.ndarray | None] = []
    for buf, shape in zip(batch.column(PIXELS).combine_chunks(), batch.column(SHAPE).to_pylist()):
        if shape is None:
            out.append(None)
        else:
            out.append(np.frombuffer(buf.as_buffer(), np.uint8).reshape(shape[0], shape[1], 3))
    return out, batch.column(ERROR).combine_chunks()


def decoded_sized(batch: pa.Table, side: int | None = None
                  ) -> tuple[list[np.ndarray | None], np.ndarray, pa.Array]:
    """decoded() with each row's stored [height, width] (int64 [n, 2], 0 where it does not decode)."""
    if PIXELS not in batch.column_names:
        got = [decode_at(d, side) for d in batch.column("image").to_pylist()]
        sizes = np.array([g[1] or (0, 0) for g in got], np.int64).reshape(-1, 2)
        return [g[0] for g in got], sizes, pa.array([g[2] for g in got], pa.string())
    pixels, errors = decoded(batch)
    return pixels, _sizes(batch.column(SIZE)), errors


def stored_sizes(batch: pa.Table) -> tuple[np.ndarray, pa.Array]:
    """(each row's stored [height, width] as int64 [n, 2], 0 where it does not decode; why not, or null). From the
    shared decode when the batch has it; else each image is decoded now at the smallest scale (still to its end)."""
    if SIZE in batch.column_names:
        return _sizes(batch.column(SIZE)), batch.column(ERROR).combine_chunks()
    _, sizes, errors = decoded_sized(batch, 0)
    return sizes, errors


def _sizes(col) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = np.asarray(col.fill_null([0, 0]).flatten().to_numpy(zero_copy_only=False), np.int64)
    return flat.reshape(-1, 2)


def images(batch: pa.Table, side: int | None = None) -> list[np.ndarray | None]:
    """Each row's RGB pixels, or None where the image does not decode."""
    return decoded(batch, side)[0]


def pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr, "RGB")


def source_box(stored: tuple[int, int], shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the stored image lies in pixels of `shape` (a DCT-scaled decode of it): (0, 0, W/k, H/k) for the
    scale k that gives that shape (libjpeg rounds the last, partial block up)."""
    h, w = int(stored[0]), int(stored[1])
    k = min(DCT_SCALES, key=lambda s: abs(-(-w // s) - shape[1]) + abs(-(-h // s) - shape[0]))
    return 0.0, 0.0, w / k, h / k


def resize(arr: np.ndarray, stored: tuple[int, int], size: tuple[int, int],
           resample: int = Image.Resampling.BICUBIC, reducing_gap: float | None = REDUCING_GAP) -> Image.Image:
    """RGB pixels (maybe a reduced decode of an image stored at `stored` [height, width]) resized to `size`
    (width, height) as from the stored pixels: the box covers the stored image's extent, and Pillow reduces by
    whole factors first while reducing_gap allows."""
    im = pil(arr)
    box = None if tuple(arr.shape[:2]) == tuple(stored) else source_box(stored, arr.shape[:2])
    return im.resize(size, resample, box=box, reducing_gap=reducing_gap)


def drop_pixels(batch: pa.Table) -> pa.Table:
    """The batch without the shared decode's columns (what may be written)."""
    private = [c for c in PRIVATE if c in batch.column_names]
    return batch.drop_columns(private) if private else batch

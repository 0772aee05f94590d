"""Decode once: a batch's image bytes become RGB pixels one time, and every image stage reads those pixels.

The flow runs `add_pixels` on a batch before the first stage that declares `needs_image` and drops the private
columns after the last one; a stage called on a plain table (tests, benchmarks) decodes on the fly through
`images()`, so it works either way. The `image` bytes stay in the batch for stages that need them.

Its private columns (PIXELS, SHAPE, ERROR) never reach a written file.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from schemas.errors import exception_text

PIXELS = "_pixels"  # HxWx3 uint8 RGB, row-major bytes; null when the image does not decode
SHAPE = "_pixels_shape"  # [height, width]
ERROR = "_decode_error"  # why the image does not decode; null when it does

_decodes = 0


def decodes() -> int:
    """Images decoded by this process so far (the flow reports decodes per row from it)."""
    return _decodes


def decode_image(data: bytes | None, draft: tuple[int, int] | None = None) -> tuple[np.ndarray | None, str | None]:
    """(HxWx3 uint8 RGB, None), transparency composited on white; (None, error) for missing or bad bytes.

    A full decode, so truncated or corrupt files fail here. `draft` lets a JPEG decode at a reduced scale (never
    below the size asked for)."""
    global _decodes
    if not data:
        return None, "no image bytes"
    _decodes += 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            return np.asarray(im.convert("RGB")), None
    except Exception as e:  # PIL raises many types for bad files
        return None, exception_text(e)


def add_pixels(batch: pa.Table) -> pa.Table:
    """The shared decode step: adds the private pixel columns (each image decoded once)."""
    if PIXELS in batch.column_names:
        return batch
    pixels, shapes, errors = [], [], []
    for data in batch.column("image").to_pylist():
        arr, err = decode_image(data)
        pixels.append(None if arr is None else arr.tobytes())
        shapes.append(None if arr is None else list(arr.shape[:2]))
        errors.append(err)
    return (batch.append_column(PIXELS, pa.array(pixels, pa.large_binary()))
            .append_column(SHAPE, pa.array(shapes, pa.list_(pa.int32(), 2)))
            .append_column(ERROR, pa.array(errors, pa.string())))


def decoded(batch: pa.Table) -> tuple[list[np.ndarray | None], pa.Array]:
    """(each row's RGB pixels or None, why each row does not decode or null): read-only views of the shared
    decode when the batch has it, else decoded now."""
    if PIXELS not in batch.column_names:
        pairs = [decode_image(d) for d in batch.column("image").to_pylist()]
        return [p[0] for p in pairs], pa.array([p[1] for p in pairs], pa.string())
    out: list[np.ndarray | None] = []
    for buf, shape in zip(batch.column(PIXELS).combine_chunks(), batch.column(SHAPE).to_pylist()):
        if shape is None:
            out.append(None)
        else:
            out.append(np.frombuffer(buf.as_buffer(), np.uint8).reshape(shape[0], shape[1], 3))
    return out, batch.column(ERROR).combine_chunks()


def images(batch: pa.Table) -> list[np.ndarray | None]:
    """Each row's RGB pixels, or None where the image does not decode."""
    return decoded(batch)[0]


def pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr, "RGB")


def drop_pixels(batch: pa.Table) -> pa.Table:
    """The batch without the shared decode's columns (what may be written)."""
    private = [c for c in (PIXELS, SHAPE, ERROR) if c in batch.column_names]
    return batch.drop_columns(private) if private else batch

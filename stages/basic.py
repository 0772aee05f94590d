"""basic: decodability, image size and aspect, caption length (DataComp's basic filter as defaults)."""
from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from schemas.spec import BasicParams
from stages.base import Decision, Resources, Stage


def inspect_image(data: bytes | None) -> tuple[bool, str | None, int | None, int | None]:
    """(decodes, error, width, height): a full decode, so truncated or corrupt files fail here."""
    if not data:
        return False, "no image bytes", None, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return True, None, im.width, im.height
    except Exception as e:  # PIL raises many types for bad files
        return False, f"{type(e).__name__}: {e}", None, None


def caption_counts(text: str | None) -> tuple[int, int]:
    t = (text or "").strip()
    return len(t.split()), len(t)


class BasicStage(Stage):
    name = "basic"
    version = 1
    default_resources = Resources(cpus=1.0, batch_size=256)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        cols: dict[str, list] = {k: [] for k in self.stats_columns()}
        for data, text in zip(batch.column("image").to_pylist(), batch.column("text").to_pylist()):
            ok, err, w, h = inspect_image(data)
            words, chars = caption_counts(text)
            cols["decode_ok"].append(ok)
            cols["decode_error"].append(err)
            cols["min_side"].append(min(w, h) if ok else None)
            cols["aspect_ratio"].append(max(w, h) / max(1, min(w, h)) if ok else None)
            cols["caption_words"].append(words)
            cols["caption_chars"].append(chars)
        return self.add_columns(batch, cols)

    @classmethod
    def decide(cls, table: pa.Table, params: BasicParams) -> Decision:
        d = Decision.keep_all(table.num_rows)
        ok = table.column("decode_ok").to_pylist()
        err = table.column("decode_error").to_pylist()
        side = table.column("min_side").to_pylist()
        aspect = table.column("aspect_ratio").to_pylist()
        words = table.column("caption_words").to_pylist()
        chars = table.column("caption_chars").to_pylist()
        d.reject([not o for o in ok], "undecodable", err)
        d.reject([s is not None and s < params.min_side for s in side], "too_small", [f"min_side={s}" for s in side])
        d.reject(
            [a is not None and a > params.max_aspect for a in aspect],
            "bad_aspect",
            [f"aspect={a:.2f}" if a else None for a in aspect],
        )
        d.reject([w < params.min_words for w in words], "caption_too_few_words", [f"words={w}" for w in words])
        d.reject([c < params.min_chars for c in chars], "caption_too_short", [f"chars={c}" for c in chars])
        return d

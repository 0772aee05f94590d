"""blur: out-of-focus or heavily smoothed images, by the variance of the Laplacian of the grey image.

The image is scaled so its longer side is at most `max_side` (bounding the cost per image), turned grey
(ITU-R 601 luma), and filtered with the 3x3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]]; a sharp photo has strong edges
and a high variance, a blurred one a low variance. Flat graphics (logos, diagrams, solid colours) score low too:
the threshold is a heuristic to tune per corpus, as in NeMo Curator's interleaved pipeline.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, Threshold, concat, fixed
from stages.imaging.decode import images


class BlurParams(StageParams):
    min_variance: float = Field(100.0, ge=0.0, description="reject images whose Laplacian variance is below this")
    max_side: int = Field(512, ge=16, description="images are downscaled to this longest side before measuring")


def laplacian_variance(rgb: np.ndarray, max_side: int = 512) -> float:
    """Variance of the 3x3 Laplacian of the grey image (longer side scaled down to max_side)."""
    im = Image.fromarray(rgb, "RGB").convert("L")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BILINEAR)
    g = np.asarray(im, np.float32)
    if min(g.shape) < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


class BlurStage(Stage):
    name = "blur"
    version = 1
    summary = "blurry images by the variance of the Laplacian of the grey image"
    Params = BlurParams
    needs_image = True
    default_resources = Resources(cpus=1.0, batch_size=256)
    columns = (
        Column("laplacian_var", pa.float32(), "variance of the grey image's Laplacian; null: undecodable"),
    )
    reasons = (
        Reason("blurry", "the Laplacian variance is below min_variance", ("laplacian_var",),
               (Threshold("laplacian_var", "min_variance", "min"),)),
    )

    params: BlurParams

    def process_batch(self, batch: pa.Table) -> pa.Table:
        side = self.params.max_side
        return self.add_columns(batch, {
            "laplacian_var": [None if rgb is None else laplacian_variance(rgb, side) for rgb in images(batch)],
        })

    @classmethod
    def decide(cls, table: pa.Table, params: BlurParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        v = table.column("laplacian_var")
        d.reject(pc.less(v, params.min_variance), "blurry", concat("laplacian_var=", fixed(v, 1)))
        return d

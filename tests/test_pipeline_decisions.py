"""Decisions in the pipeline: every stage's row-wise decide() batch by batch in spec order (global steps come
after the pipeline); the top fraction run as Ray tasks keeps exactly the rows it keeps in one process."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from flows.engine.decide import decide_rowwise, global_positions
from schemas.spec import parse_spec
from stages.align import AlignParams


def spec(tmp_path, stages):
    (tmp_path / "u.csv").write_text("url,caption\nhttp://x.test/a.jpg,a cat\n")
    return parse_spec({"dataset": "d", "source": {"urls": "u.csv"}, "stages": stages}, tmp_path)


def test_rowwise_decisions_first_stage_in_order_owns_the_row(tmp_path):
    s = spec(tmp_path, [{"junk": {}}, {"dedup": {}}, {"basic": {"min_side": 100, "min_words": 2}},
                        {"align": {"model": "demo-clip", "threshold": 0.5}}])
    assert global_positions(s) == [1]  # dedup decides over the whole build, after the pipeline
    batch = pa.table({
        "uid": ["a", "b", "c", "d"],
        "junk_kind": ["junk_url", None, None, None], "junk_detail": ["www.x.com", None, None, None],
        "decode_ok": [True, True, True, True], "decode_error": pa.nulls(4, pa.string()),
        "min_side": pa.array([50, 50, 200, 200], pa.int32()), "aspect_ratio": pa.array([1.0] * 4, pa.float32()),
        "caption_words": pa.array([5, 5, 5, 5], pa.int32()), "caption_chars": pa.array([20] * 4, pa.int32()),
        "clip_score": pa.array([0.1, 0.1, 0.1, 0.9], pa.float32()),
    })
    out = decide_rowwise(batch, s)
    assert out.column("reject_pos").to_pylist() == [0, 2, 3, None]
    assert out.column("reject_stage").to_pylist() == ["junk", "basic", "align", None]
    assert out.column("reject_reason").to_pylist() == ["junk_url", "too_small", "low_alignment", None]
    assert out.column("reject_detail").to_pylist()[1] == "min_side=50"


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.97, 0.001])
def test_top_fraction_as_ray_tasks_equals_in_process(local_ray, fraction):
    """The distributed cutoff (a sample brackets it, only the bracket travels) keeps exactly the rows the
    in-process step keeps, ties included, and those are the top rows by (score desc, uid asc)."""
    from tests.test_align import decide_align

    rng = np.random.default_rng(7)
    n = 5000
    scores = np.round(rng.normal(0.3, 0.1, n), 2).astype(np.float32)  # rounded: many ties at the cutoff
    scores[rng.random(n) < 0.05] = np.nan
    uids = [f"{i:032x}" for i in rng.permutation(n)]
    table = pa.table({"uid": uids, "clip_score": pa.array(scores, pa.float32(), mask=np.isnan(scores))})
    want = decide_align(table, AlignParams(top_fraction=fraction)).reason
    got = decide_align(table, AlignParams(top_fraction=fraction), ray_tasks=True, parts=4).reason
    assert got == want
    ranked = sorted((-float(s), u) for s, u in zip(scores, uids) if not np.isnan(s))
    keep = {u for _, u in ranked[:math.floor(fraction * len(ranked) + 0.5)]}
    assert {u for u, r, s in zip(uids, want, scores) if r is None and not np.isnan(s)} == keep

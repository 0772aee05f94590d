"""The `render` editor (demo domain only): the negative caption parsed back into a demo Scene and redrawn with the
original render seed, so the background and layout stay. Needs the row's `scene` (JSON) and `render_seed` in `context`
(the demo corpus's labels.parquet has both per uid; the negatives flow joins it). Importing the demo package registers it.
"""
from __future__ import annotations

import json
import re
from itertools import permutations

from PIL import Image

from demo.scenes import COLORS, INVERSE_RELATION, RELATION_PHRASE, SHAPES, Group, Scene, render_scene
from negatives.editors import NOT_APPLICABLE, Editor, Skip, register_editor

_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def parse_demo_caption(text: str):
    """A demo caption (demo.scenes.caption, any variant) -> Scene, or None if it is not one."""
    t = text.strip().lower()
    for p in ("a simple drawing of ", "a picture of ", "an image of ", "a drawing of ", "an illustration of "):
        if t.startswith(p):
            t = t[len(p):]
            break
    shapes = "|".join(SHAPES)
    colours = "|".join(COLORS)
    np_re = rf"(a|an|one|two|three) (?:(small|large) )?({colours}) ({shapes})(s?)"

    def group(m: re.Match):
        head, size, colour, shape, plural = m.groups()
        count = _NUM[head]
        if (count > 1) != bool(plural):
            return None
        return Group(shape, colour, size or "medium", count)

    rel_alt = "|".join(re.escape(p) for p in RELATION_PHRASE.values())
    phrase_rel = {v: k for k, v in RELATION_PHRASE.items()}
    m = re.fullmatch(rf"{np_re} ({rel_alt}) {np_re}", t)
    try:
        if m:
            g1 = group(re.fullmatch(np_re, t[:m.start(6)].strip()))
            g2 = group(re.fullmatch(np_re, t[m.end(6):].strip()))
            if g1 is None or g2 is None:
                return None
            return Scene((g1, g2), phrase_rel[m.group(6)])
        m = re.fullmatch(rf"({np_re}), ({np_re}) and ({np_re})", t)
        if m:
            gs = [group(re.fullmatch(np_re, m.group(i))) for i in (1, 7, 13)]
            return None if None in gs else Scene(tuple(gs))
        m = re.fullmatch(np_re, t)
        if m:
            g = group(m)
            return None if g is None else Scene((g,))
    except ValueError:
        return None
    return None


def align_scene(edited, original):
    """Order `edited`'s groups like `original`'s (a caption may state them in another order), so re-rendering with
    the same seed keeps the layout: the permutation matching the most group attributes position by position."""
    if len(edited.groups) != len(original.groups) or len(edited.groups) == 1:
        return edited
    best, best_score = edited, -1
    for perm in permutations(range(len(edited.groups))):
        groups = tuple(edited.groups[i] for i in perm)
        rel = edited.relation
        if rel is not None and perm != (0, 1):
            rel = INVERSE_RELATION[rel]
        score = sum((a.shape == b.shape) + (a.color == b.color) + (a.size == b.size) + (a.count == b.count)
                    for a, b in zip(groups, original.groups))
        score += 0.5 * (rel == original.relation)
        if score > best_score:
            best, best_score = Scene(groups, rel), score
    return best


def _norm_scene(scene) -> tuple:
    """A scene up to the order its caption states groups in (the same picture)."""
    gs = [g.to_dict() for g in scene.groups]
    key = sorted(json.dumps(g, sort_keys=True) for g in gs)
    rel = scene.relation
    if rel is not None:
        a, b = (json.dumps(g, sort_keys=True) for g in gs)
        if a > b:
            rel = INVERSE_RELATION[rel]
    return tuple(key), rel


@register_editor
class RenderEditor(Editor):
    """Demo domain: redraw the scene the negative caption describes with the original seed."""

    name = "render"

    def _edit(self, image, caption, neg_caption, kind, context):
        scene_json, seed = context.get("scene"), context.get("render_seed")
        if not scene_json or seed is None:
            raise Skip(NOT_APPLICABLE, "no scene / render_seed for this row (not a demo scene)")
        original = Scene.from_json(scene_json) if isinstance(scene_json, str) else Scene.from_dict(scene_json)
        edited = parse_demo_caption(neg_caption)
        if edited is None:
            raise Skip(NOT_APPLICABLE, "the negative caption does not describe a demo scene")
        edited = align_scene(edited, original)
        if _norm_scene(edited) == _norm_scene(original):
            raise Skip(NOT_APPLICABLE, "the negative caption describes the same scene")
        w, h = image.size
        try:
            out = render_scene(edited, max(w, h), int(seed))
        except (RuntimeError, ValueError) as e:  # a scene that cannot be laid out
            raise Skip(NOT_APPLICABLE, f"cannot render: {e}") from None
        return out if out.size == (w, h) else out.resize((w, h), Image.BICUBIC)

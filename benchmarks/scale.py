"""Scale of a curate build (stages junk, basic, dedup with near and crops) at N and 10N rows of a synthetic corpus of
small images: wall seconds, rows/s, the driver's peak RSS and the whole job's; beside it a plain Ray Data job over the
same corpus; and the row-wise decisions and the distributed near-dup search in rows/s per core.

    .venv/bin/python benchmarks/scale.py [--n 100000] [--sizes 1,10] [--work DIR]

The corpus (cached under --work, made once per size, shared shard by shard between sizes): JPEGs of 32-64 px, each a
random crop of one of 256 base images, colour-shifted, blended with a random low-frequency pattern (so that rows are
distinct images, as in a crawl); with planted copies of earlier rows anywhere in the corpus (exact copies under another
URL, re-encoded, upscaled and cropped near copies, other images under a repeated URL), junk and too-short captions,
too small, too wide, truncated and missing images. Every row is a function of its index and --seed alone.

Per size, each in a fresh process:
- pairforge: `flows.curate.curate_flow` over the corpus (a new build). Wall seconds of the whole call (Prefect and
  Ray start-up included), rows/s = listed rows / wall; the driver's peak RSS (its own VmHWM) and the whole job's peak
  (the driver process tree, Ray's processes and Prefect's server included, summed every 0.5 s: RSS, which counts
  shared object-store pages in every process that maps them, and PSS, which shares them out); the driver's RSS peak
  after each phase, to show which phase grows it.
- baseline: a plain Ray Data job with the same Ray settings (flows.engine.runner.ray_session): read_parquet ->
  map_batches of the same stage objects (JunkStage, one decode, BasicStage, DedupStage, with the spec's batch sizes
  and CPUs) -> write_parquet. No uids, decisions, global dedup, accounting, shards, report or catalog.
Then, once: flows.engine.decide.decide_rowwise over 1M rows of the stages' stat columns (CPU seconds of this
process: rows/s per core), and dedup's near step with crops run partitioned as Ray tasks
(flows.engine.global_decisions.decide_table) over --near-rows synthetic hashes with planted near copies:
rows / (wall seconds x Ray CPUs). `--driver-max-rows 0` makes every build decide its global stages partitioned.

Goals (issue 22): driver peak RSS at 10N / at N <= 1.1; pairforge rows/s >= 0.8 x the baseline's (>= 0.6 at N with
--driver-max-rows 0); row-wise decisions >= 1M rows/s per core; partitioned near-dup with crops >= 200,000 rows/s
per core. The last lines print them, each met or not met.

Cost here (2 shared cores): N=100,000 with sizes 1,10 took about an hour (the 1M-row build 21 min, its baseline 9 min)
and, with dedup decided in the driver, the 1M-row build's process tree peaked at about 21 GB of summed RSS: on a
smaller machine use --sizes 1,2. Needs psutil (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_DRIVER_RSS_RATIO = 1.1
GOAL_VS_BASELINE = 0.8
GOAL_ROWS_PER_CORE = 1_000_000
GOAL_NEAR_PER_CORE = 200_000
CORPUS_VERSION = 1  # bump when the generator changes: cached corpus files are then made again
CORPUS_FILE_ROWS = 10_000
CORPUS_ROW_GROUP = 2_000
SAMPLE_S = 0.5

# ------------------------------------------------------------------------------------------- synthetic corpus

BASE_SIDE = 128
BASE_IMAGES = 256
PATTERN = 8  # the random low-frequency pattern: an 8x8 grid, bilinearly enlarged (pHash reads 8x8 DCT terms)
PATTERN_WEIGHT = 0.65

# Row kinds and their shares; the rest are plain rows. Copies pick their source uniformly among earlier rows.
KINDS = (
    ("exact", 0.03),        # the same bytes as an earlier row, under its own URL and caption -> duplicate_exact
    ("near_quality", 0.01),  # an earlier row re-encoded at quality 60                       -> duplicate_near
    ("near_larger", 0.01),   # an earlier row enlarged 1.25x (the copy survives)               -> duplicate_near
    ("near_crop", 0.01),     # an earlier row with 4% cut from each side (matched by crops)    -> duplicate_near
    ("same_url", 0.01),      # another image under an earlier row's URL                        -> duplicate_url
    ("junk", 0.04),          # a junk caption (file name, URL, boilerplate, repeated, emoji)   -> junk_*
    ("few_words", 0.01),     # a two-word caption                                              -> caption_too_few_words
    ("tiny", 0.01),          # 16-28 px                                                        -> too_small
    ("wide", 0.005),         # 36 x 112-128 px                                                 -> bad_aspect
    ("truncated", 0.005),    # the first half of a JPEG                                        -> undecodable
    ("missing", 0.001),      # no image bytes                                                  -> missing_image (input)
)
KIND_NAMES = ("plain",) + tuple(k for k, _ in KINDS)
_EDGES = np.cumsum([s for _, s in KINDS])
FIELDS = 128  # random fields per row: 0..99 shape the image, then these
F_KIND, F_SOURCE, F_CAPTION = 100, 101, 102

ADJ = ("small", "old", "bright", "quiet", "wooden", "shiny", "broken", "tall", "empty", "busy", "narrow", "wild",
       "golden", "foggy", "sunny", "rusty", "modern", "tiny", "crowded", "frozen")
COLOUR = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown")
NOUN = ("house", "boat", "bicycle", "dog", "teapot", "tree", "bridge", "lamp", "chair", "car", "window", "horse",
        "guitar", "kite", "train", "garden", "mountain", "street", "market", "castle")
PLACE = ("harbour", "river", "old town", "forest", "beach", "station", "park", "village square", "hill", "lake")
PREP = ("near", "beside", "behind", "in front of", "across", "above")
JUNK = ("IMG_{n:04d}.JPG", "DSC{n:05d}", "click here", "https://www.site{n}.com/p/{n}", "sale sale sale sale",
        "\U0001F600\U0001F600\U0001F600", "Stock Photo", "image {n} of {m}")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 values."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(idx, field, seed: int) -> np.ndarray:
    """Uniform [0, 1) values per row index and field (broadcast): a function of (seed, index, field) alone."""
    with np.errstate(over="ignore"):
        z = _mix(_mix(np.asarray(idx, np.uint64) * np.uint64(FIELDS) + np.asarray(field, np.uint64))
                 ^ _mix(np.uint64(seed + 1)))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_kinds(idx: np.ndarray, seed: int) -> np.ndarray:
    """Kind code per row (0 plain, else 1 + position in KINDS); row 0 is plain (copies need an earlier row)."""
    kind = np.searchsorted(_EDGES, uniform(idx, F_KIND, seed), side="right") + 1
    kind[kind > len(KINDS)] = 0
    return np.where(np.asarray(idx) == 0, 0, kind)


@functools.cache
def base_images(seed: int) -> tuple[np.ndarray, ...]:
    """BASE_IMAGES images of BASE_SIDE px: a colour gradient with random discs and boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:BASE_SIDE, 0:BASE_SIDE] / BASE_SIDE
    out = []
    for _ in range(BASE_IMAGES):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        img = c0 + (c1 - c0) * ((t - t.min()) / (np.ptp(t) + 1e-9))[..., None]
        for _ in range(rng.integers(3, 8)):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            else:
                mask = (abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.3, 1.5))
            img[mask] = rng.uniform(0, 255, 3)
        out.append(img.astype(np.float32))
    return tuple(out)


def _jpeg(px: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(px, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class Corpus:
    """Rows of the synthetic corpus by index; copies regenerate their source row."""

    def __init__(self, seed: int):
        self.seed = seed
        self.bases = base_images(seed)
        self.u = functools.lru_cache(maxsize=8192)(self._u)
        self.pixels = functools.lru_cache(maxsize=4096)(self._pixels)

    def _u(self, i: int) -> np.ndarray:
        """Row i's FIELDS uniform values."""
        return uniform(np.uint64(i), np.arange(FIELDS, dtype=np.uint64), self.seed)

    def kind(self, i: int) -> str:
        k = int(np.searchsorted(_EDGES, self.u(i)[F_KIND], side="right")) + 1
        return KIND_NAMES[k if i > 0 and k <= len(KINDS) else 0]

    def source(self, i: int) -> int:
        return int(self.u(i)[F_SOURCE] * i)

    def _pixels(self, i: int) -> np.ndarray:
        from PIL import Image

        kind = self.kind(i)
        if kind in ("exact", "near_quality"):
            return self.pixels(self.source(i))
        if kind == "near_larger":
            src = self.pixels(self.source(i))
            h, w = src.shape[:2]
            return np.asarray(Image.fromarray(src).resize((round(w * 1.25), round(h * 1.25)), Image.BICUBIC))
        if kind == "near_crop":
            src = self.pixels(self.source(i))
            h, w = src.shape[:2]
            dy, dx = max(1, round(h * 0.04)), max(1, round(w * 0.04))
            return np.ascontiguousarray(src[dy:h - dy, dx:w - dx])
        r = self.u(i)
        if kind == "tiny":
            h, w = 16 + int(r[0] * 13), 16 + int(r[1] * 13)
        elif kind == "wide":
            h, w = 36, 112 + int(r[1] * 17)
        else:
            h, w = 32 + int(r[0] * 33), 32 + int(r[1] * 33)
        base = self.bases[int(r[2] * len(self.bases))]
        y0, x0 = int(r[3] * (BASE_SIDE - h)), int(r[4] * (BASE_SIDE - w))
        gain = (0.6 + 0.8 * r[5:8]).astype(np.float32)
        grid = (r[8:8 + PATTERN * PATTERN] * 255).astype(np.uint8).reshape(PATTERN, PATTERN)
        pattern = np.asarray(Image.fromarray(grid, "L").resize((w, h), Image.BILINEAR), np.float32)
        px = base[y0:y0 + h, x0:x0 + w] * gain * (1 - PATTERN_WEIGHT) + pattern[..., None] * PATTERN_WEIGHT
        return np.clip(px, 0, 255).astype(np.uint8)

    def image(self, i: int) -> bytes | None:
        kind = self.kind(i)
        if kind == "missing":
            return None
        if kind == "exact":
            return self.image(self.source(i))
        data = _jpeg(self.pixels(i), 60 if kind == "near_quality" else 85)
        return data[: len(data) // 2] if kind == "truncated" else data

    def url(self, i: int) -> str:
        j = self.source(i) if self.kind(i) == "same_url" else i
        return f"https://cdn{j % 7}.pics-{j % 13}.example.com/img/{j // 1000:05d}/{j:09d}.jpg"

    def caption(self, i: int) -> str:
        kind, c = self.kind(i), int(self.u(i)[F_CAPTION] * 2**40)
        if kind == "junk":
            return JUNK[c % len(JUNK)].format(n=c % 100_000, m=c % 97 + 2)
        if kind == "few_words":
            return f"{COLOUR[c % 10]} {NOUN[(c // 10) % 20]}"
        return (f"a {ADJ[c % 20]} {COLOUR[(c // 20) % 10]} {NOUN[(c // 200) % 20]} {PREP[(c // 4000) % 6]} the "
                f"{PLACE[(c // 24000) % 10]}")

    def table(self, start: int, stop: int):
        import pyarrow as pa

        rows = range(start, stop)
        return pa.table({"url": pa.array([self.url(i) for i in rows], pa.string()),
                         "caption": pa.array([self.caption(i) for i in rows], pa.string()),
                         "image": pa.array([self.image(i) for i in rows], pa.binary())})


def _write_corpus_file(seed: int, start: int, stop: int, path: str) -> str:
    import pyarrow.parquet as pq

    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    pq.write_table(Corpus(seed).table(start, stop), tmp, row_group_size=CORPUS_ROW_GROUP)
    os.replace(tmp, path)
    return path


def make_corpus(work: Path, rows: int, seed: int, workers: int) -> Path:
    """The corpus of `rows` rows as a folder of Parquet files (url, caption, image), made once: files of
    CORPUS_FILE_ROWS rows are cached under work/ and hard-linked into each size's folder."""
    cache = work / f"corpus-v{CORPUS_VERSION}-seed{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    ranges = [(a, min(a + CORPUS_FILE_ROWS, rows)) for a in range(0, rows, CORPUS_FILE_ROWS)]
    paths = [cache / f"rows-{a:010d}-{b:010d}.parquet" for a, b in ranges]
    todo = [(r, p) for r, p in zip(ranges, paths) if not p.exists()]
    if todo:
        t0 = time.perf_counter()
        print(f"making the corpus: {sum(b - a for (a, b), _ in todo):,} rows in {len(todo)} files, {workers} processes",
              flush=True)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_write_corpus_file, *zip(*((seed, a, b, str(p)) for (a, b), p in todo))):
                pass
        print(f"  made in {time.perf_counter() - t0:.0f} s", flush=True)
    folder = work / f"corpus-{rows}-seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for p in paths:
        os.link(p, folder / p.name)
    return folder


def planted_counts(rows: int, seed: int) -> dict[str, int]:
    kinds = row_kinds(np.arange(rows, dtype=np.uint64), seed)
    return {KIND_NAMES[k]: int(c) for k, c in zip(*np.unique(kinds, return_counts=True))}


# ------------------------------------------------------------------------------------------- the measured runs

def spec_dict(corpus: Path, out: Path, a) -> dict:
    return {
        "dataset": "scale",
        "source": {"pairs": str(corpus), "caption_col": "caption", "name": corpus.name},
        "ingest": {"shard_rows": a.shard_rows},
        "stages": [{"junk": {}}, {"basic": {"min_side": 32, "max_aspect": 3.0, "min_words": 3}},
                   {"dedup": {"near_hamming": 6, "near_crops": True, "semantic": False}}],
        "write": {"rows_per_shard": 10_000},
        "ray": {"num_cpus": a.cpus, "object_store_gb": a.object_store_gb},
        "out": str(out),
    } | ({"decide": {"driver_max_rows": a.driver_max_rows}} if a.driver_max_rows is not None else {})


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _PhaseMemory(logging.Handler):
    """Records, as each pairforge phase ends ("<phase>: done in <s>s"), its seconds and the driver's RSS peak then."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.phases: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "%s: done in %.1fs %s" and record.args:
            self.phases.append({"phase": record.args[0], "seconds": float(record.args[1]), "summary": record.args[2],
                                "driver_peak_mb": _vm_kb("VmHWM") / 1024, "driver_rss_mb": _vm_kb("VmRSS") / 1024})


def child_build(spec_path: str, result: str) -> None:
    import flows.env  # noqa: F401

    rss0 = _vm_kb("VmRSS") / 1024
    from flows.curate import curate_flow

    handler = _PhaseMemory()
    log = logging.getLogger("pairforge")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    rss_imported = _vm_kb("VmRSS") / 1024
    t0 = time.perf_counter()
    r = curate_flow(spec_path, new=True, quiet=True)
    wall = time.perf_counter() - t0
    Path(result).write_text(json.dumps({
        "wall_s": wall, "rows": r["stats"]["rows_listed"], "stats": r["stats"], "build_dir": r["build_dir"],
        "driver_peak_mb": _vm_kb("VmHWM") / 1024, "driver_rss_start_mb": rss0, "driver_rss_imported_mb": rss_imported,
        "phases": handler.phases}))


_BASELINE_STAGES: dict = {}


def _baseline_pairs(batch):
    return batch.rename_columns(["text" if c == "caption" else c for c in batch.column_names])


def _baseline_stage(batch, name: str, params_json: str, drop_after: bool):
    from stages import stage_class
    from stages.imaging.decode import drop_pixels

    stage = _BASELINE_STAGES.get((name, params_json))
    if stage is None:
        cls = stage_class(name)
        stage = _BASELINE_STAGES[(name, params_json)] = cls(cls.Params.model_validate_json(params_json))
        stage.setup()
    out = stage(batch)
    return drop_pixels(out) if drop_after else out


def child_baseline(spec_path: str, out: str, result: str) -> None:
    """read_parquet -> the stages' functions -> write_parquet, with the build's Ray settings; nothing else."""
    import flows.env  # noqa: F401

    import pyarrow.parquet as pq
    import ray

    from flows.engine.runner import image_span, quiet_ray_data, ray_session
    from schemas.spec import load_spec
    from stages import stage_class
    from stages.imaging.decode import add_pixels

    spec = load_spec(spec_path)
    corpus = str(spec.source.pairs)
    rows = sum(pq.read_metadata(p).num_rows for p in sorted(Path(corpus).glob("*.parquet")))
    t0 = time.perf_counter()
    with ray_session(spec):
        ray.data.DataContext.get_current().enable_progress_bars = False
        quiet_ray_data()
        ds = ray.data.read_parquet(corpus).map_batches(_baseline_pairs, batch_format="pyarrow")
        span = image_span(spec)
        for i, entry in enumerate(spec.stages):
            res = stage_class(entry.name).default_resources.override(entry.params)
            if span is not None and i == span[0]:
                ds = ds.map_batches(add_pixels, batch_format="pyarrow", batch_size=res.batch_size,
                                    num_cpus=min(1.0, res.cpus))
            ds = ds.map_batches(_baseline_stage, fn_args=(entry.name, entry.params.model_dump_json(),
                                                          span is not None and i == span[1]),
                                batch_format="pyarrow", batch_size=res.batch_size, num_cpus=res.cpus)
        ds.write_parquet(out)
    wall = time.perf_counter() - t0
    written = sum(pq.read_metadata(p).num_rows for p in Path(out).glob("*.parquet"))
    Path(result).write_text(json.dumps({"wall_s": wall, "rows": rows, "rows_written": written,
                                        "driver_peak_mb": _vm_kb("VmHWM") / 1024}))


def run_monitored(args: list[str], result: Path, log: Path, timeout_s: float) -> dict:
    """Run this script with `args` in a fresh process; sample the process tree's memory every SAMPLE_S seconds."""
    import psutil

    result.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as lf:
        proc = subprocess.Popen([sys.executable, __file__, *args, "--result", str(result)], cwd=ROOT, env=env,
                                stdout=lf, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak_rss = peak_pss = peak_procs = 0
        cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> user + system seconds when last seen
        t0 = time.perf_counter()
        while proc.poll() is None:
            rss = pss = 0
            procs = [root]
            try:
                procs += root.children(recursive=True)
            except psutil.Error:
                pass
            for p in procs:
                try:
                    m = p.memory_full_info()
                    rss += m.rss
                    pss += m.pss
                    t = p.cpu_times()
                    cpu[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:  # exited between the listing and the read
                    pass
            peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs, len(procs))
            if time.perf_counter() - t0 > timeout_s:
                for p in reversed(procs):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                proc.wait()
                raise RuntimeError(f"{args[:2]} ran past {timeout_s:.0f} s; killed (log: {log})")
            time.sleep(SAMPLE_S)
    if proc.returncode or not result.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{args[:2]} failed with exit code {proc.returncode} (log: {log}):\n{tail}")
    out = json.loads(result.read_text())
    out.update(tree_peak_rss_mb=peak_rss / 2**20, tree_peak_pss_mb=peak_pss / 2**20, tree_peak_processes=peak_procs,
               tree_cpu_s=sum(cpu.values()))
    return out


# ------------------------------------------------------------------------------------------- decisions, near-dup

def stat_table(n: int, seed: int = 0):
    """n rows of the row-wise stages' stat columns (junk, basic), with rejections at the corpus's rates."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    junk = rng.random(n) < 0.04
    kinds = np.array(["junk_filename", "junk_url", "junk_boilerplate", "junk_repeated", "junk_emoji"], object)
    kind = pa.array(np.where(junk, kinds[rng.integers(0, len(kinds), n)], None), pa.string())
    detail = pa.array(np.where(junk, "matched text", None), pa.string())
    ok = rng.random(n) >= 0.005
    side = rng.integers(16, 65, n).astype(np.int32)
    words = np.where(rng.random(n) < 0.01, 2, rng.integers(5, 12, n)).astype(np.int32)
    return pa.table({
        "uid": pa.array(np.char.mod("%032x", np.arange(n)), pa.string()),
        "junk_kind": kind, "junk_detail": detail,
        "decode_ok": pa.array(ok), "decode_error": pa.array(np.where(ok, None, "OSError: truncated"), pa.string()),
        "min_side": pa.array(side, pa.int32(), mask=~ok),
        "aspect_ratio": pa.array(rng.uniform(1.0, 3.5, n).astype(np.float32), mask=~ok),
        "caption_words": pa.array(words), "caption_chars": pa.array((words * 6).astype(np.int32)),
    })


def measure_decisions(spec, rows: int, batch_rows: list[int]) -> list[dict]:
    """decide_rowwise over `rows` rows as one table and in batches: rows per CPU second of this process."""
    from flows.engine.decide import decide_rowwise

    table = stat_table(rows)
    out = []
    for size in [rows] + batch_rows:
        best = None
        for _ in range(3):
            w0, c0 = time.perf_counter(), time.process_time()
            rejected = 0
            for start in range(0, rows, size):
                d = decide_rowwise(table.slice(start, size), spec)
                rejected += d.num_rows - d.column("reject_pos").null_count
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if best is None or cpu < best["cpu_s"]:
                best = {"batch_rows": size, "wall_s": wall, "cpu_s": cpu, "rejected": rejected}
        out.append(best)
    return out


def near_table(n: int, k: int, seed: int = 0):
    """n rows of dedup metadata: random pHashes, 1% of rows a copy of another at distance 0..k, and 9 crop pHashes
    per row a few bits from the row's own pHash, as real ones are (a build of this corpus: median 10 bits from the
    full hash, 8 between two crops of one image), so the crop entries bring the search its real work."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    m = n // 100
    rows = rng.permutation(n)[: 2 * m]
    src, dst = rows[:m], rows[m:]
    h[dst] = h[src] ^ _flips(rng, m, k)
    crop_centre = h ^ _flips(rng, n, 6)
    crops = (crop_centre[:, None] ^ _flips(rng, 9 * n, 4).reshape(n, 9)).view(np.int64)
    side = rng.integers(32, 65, n).astype(np.int32)
    ids = np.char.mod("%032x", np.arange(n))
    return pa.table({
        "uid": pa.array(ids, pa.string()),
        "url": pa.array(np.char.add("https://x.test/", ids), pa.string()),
        "sha256": pa.array(np.char.mod("%064x", np.arange(n)), pa.string()),
        "url_norm": pa.array(np.char.add("x.test/", ids), pa.string()),
        "phash": pa.array(h.view(np.int64)),
        "phash_crops": pa.ListArray.from_arrays(np.arange(0, 9 * n + 1, 9, dtype=np.int32), pa.array(crops.ravel())),
        "image_bytes": pa.array(rng.integers(500, 3000, n)),
        "original_width": pa.array(side), "original_height": pa.array(side), "width": pa.array(side),
        "height": pa.array(side),
    }), int(m)


def _flips(rng, count: int, bits: int) -> np.ndarray:
    """`count` masks of up to `bits` set bits (a bit drawn twice sets once)."""
    out = np.zeros(count, np.uint64)
    for _ in range(bits):
        out |= np.uint64(1) << rng.integers(0, 64, count).astype(np.uint64)
    return out


def child_neardup(spec_path: str, rows: int, result: str) -> None:
    """dedup's near step (with crops) as Ray tasks with hash partitions (flows.engine.global_decisions) over `rows`
    synthetic rows on the build's Ray."""
    import flows.env  # noqa: F401

    import pyarrow.compute as pc
    import ray

    from flows.engine.global_decisions import decide_table, partitions_for
    from flows.engine.runner import ray_session
    from schemas.spec import load_spec
    from stages import stage_class

    spec = load_spec(spec_path)
    params = stage_class("dedup").Params(exact=False, url=False, near_hamming=6, near_crops=True, semantic=False)
    table, planted = near_table(rows, params.near_hamming)
    with ray_session(spec):
        cpus = ray.cluster_resources().get("CPU", 1.0)
        t0 = time.perf_counter()
        decisions = decide_table("dedup", params, table, ray_tasks=True, parts=partitions_for(rows, cpus))
        wall = time.perf_counter() - t0
        found = int(pc.sum(pc.equal(decisions.column("reason"), "duplicate_near")).as_py() or 0)
    Path(result).write_text(json.dumps({"rows": rows, "wall_s": wall, "cpus": cpus, "planted": planted,
                                        "rejected_near": found, "driver_peak_mb": _vm_kb("VmHWM") / 1024}))


# ------------------------------------------------------------------------------------------- main

def _mb(x: float) -> str:
    return f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="N, rows of the smallest corpus")
    ap.add_argument("--sizes", default="1,10", help="corpus sizes as multiples of N")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pairforge-scale"),
                    help="corpus cache and builds (the corpus is kept, builds are replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=None, help="Ray CPUs (spec ray.num_cpus); default: all")
    ap.add_argument("--object-store-gb", type=float, default=1.0)
    ap.add_argument("--shard-rows", type=int, default=10_000, help="ingest.shard_rows: rows per input shard")
    ap.add_argument("--decide-rows", type=int, default=1_000_000)
    ap.add_argument("--near-rows", type=int, default=1_000_000)
    ap.add_argument("--timeout-min", type=float, default=90, help="per measured run")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--driver-max-rows", type=int, default=None,
                    help="decide.driver_max_rows (0: global decisions partitioned at every size)")
    ap.add_argument("--child", choices=["build", "baseline", "neardup"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "build":
        child_build(a.spec, a.result)
        return 0
    if a.child == "baseline":
        child_baseline(a.spec, a.out, a.result)
        return 0
    if a.child == "neardup":
        child_neardup(a.spec, a.rows, a.result)
        return 0

    import yaml

    import flows.env  # noqa: F401
    from schemas.spec import load_spec

    sizes = [int(s) for s in a.sizes.split(",")]
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cpus = a.cpus or os.cpu_count()
    print(f"pairforge scale benchmark: N={a.n:,}, sizes {sizes} x N, {cpus} Ray CPUs on a {os.cpu_count()}-CPU "
          f"machine (load average {os.getloadavg()[0]:.1f}), object store {a.object_store_gb:g} GB, "
          f"ingest.shard_rows {a.shard_rows:,} (curate cuts input shards at the corpus's row groups too: "
          f"{CORPUS_ROW_GROUP:,} rows); work folder {work}", flush=True)
    runs = []
    for mult in sizes:
        rows = a.n * mult
        corpus = make_corpus(work, rows, a.seed, workers=cpus)
        run_dir = work / f"run-{rows}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        spec_path = run_dir / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec_dict(corpus, run_dir / "builds", a), sort_keys=False))
        print(f"\n{rows:,} rows ({mult} x N): pairforge curate build ...", flush=True)
        build = run_monitored(["--child", "build", "--spec", str(spec_path)], run_dir / "build.json",
                              run_dir / "build.log", a.timeout_min * 60)
        _print_build(build, planted_counts(rows, a.seed))
        base = None
        if not a.skip_baseline:
            print(f"{rows:,} rows: plain Ray Data job ...", flush=True)
            base = run_monitored(["--child", "baseline", "--spec", str(spec_path), "--out", str(run_dir / "baseline")],
                                 run_dir / "baseline.json", run_dir / "baseline.log", a.timeout_min * 60)
            print(f"  {base['wall_s']:.1f} s, {base['rows'] / base['wall_s']:,.0f} rows/s, job CPU "
                  f"{base['tree_cpu_s']:.0f} s, {base['rows_written']:,} rows written; driver peak {_mb(base['driver_peak_mb'])} MB, job peak RSS "
                  f"{_mb(base['tree_peak_rss_mb'])} MB (PSS {_mb(base['tree_peak_pss_mb'])} MB)", flush=True)
            shutil.rmtree(run_dir / "baseline", ignore_errors=True)
        runs.append((mult, rows, build, base))
        shutil.rmtree(run_dir / "builds", ignore_errors=True)  # the build's copy of the corpus; the figures are kept

    spec = load_spec(spec_path)
    print(f"\nrow-wise decisions: decide_rowwise (junk, basic) over {a.decide_rows:,} rows of stat columns ...",
          flush=True)
    dec = measure_decisions(spec, a.decide_rows, [a.shard_rows, 1_000])
    for d in dec:
        print(f"  batches of {d['batch_rows']:>9,} rows: {d['cpu_s']:.2f} s CPU, {d['wall_s']:.2f} s wall, "
              f"{a.decide_rows / d['cpu_s']:,.0f} rows/s per core; {d['rejected']:,} rejected", flush=True)

    print(f"\nnear-dup step, partitioned (flows.engine.global_decisions), with crops, {a.near_rows:,} rows ...",
          flush=True)
    near = run_monitored(["--child", "neardup", "--spec", str(spec_path), "--rows", str(a.near_rows)],
                         work / "neardup.json", work / "neardup.log", a.timeout_min * 60)
    print(f"  {near['wall_s']:.1f} s on {near['cpus']:g} CPUs; {near['rejected_near']:,} rejected as near "
          f"duplicates, {near['planted']:,} planted; driver peak {_mb(near['driver_peak_mb'])} MB "
          f"(benchmarks/global_decisions.py measures every step, and the decisions' quality)", flush=True)

    # ------------------------------------------------------------------ summary
    print("\nsummary (job CPU: user + system seconds of the process tree, sampled; rows/CPU-s is robust to the load of a"
          " shared machine, rows/s is not)")
    print(f"{'rows':>10s} | {'pairforge s':>11s} {'rows/s':>7s} {'CPU s':>7s} {'driver peak MB':>14s} "
          f"{'job RSS MB':>10s} {'job PSS MB':>10s} | {'baseline s':>10s} {'rows/s':>7s} {'CPU s':>7s} "
          f"{'job RSS MB':>10s} | {'rows/s ratio':>12s} {'rows/CPU-s ratio':>16s}")
    for mult, rows, b, base in runs:
        line = (f"{rows:>10,} | {b['wall_s']:11.1f} {rows / b['wall_s']:7,.0f} {b['tree_cpu_s']:7.0f} "
                f"{b['driver_peak_mb']:14,.0f} {b['tree_peak_rss_mb']:10,.0f} {b['tree_peak_pss_mb']:10,.0f} | ")
        if base:
            line += (f"{base['wall_s']:10.1f} {base['rows'] / base['wall_s']:7,.0f} {base['tree_cpu_s']:7.0f} "
                     f"{base['tree_peak_rss_mb']:10,.0f} | {base['wall_s'] / b['wall_s']:12.2f} "
                     f"{base['tree_cpu_s'] / b['tree_cpu_s']:16.2f}")
        else:
            line += f"{'-':>10s} {'-':>7s} {'-':>7s} {'-':>10s} | {'-':>12s} {'-':>16s}"
        print(line)

    goals = []
    small, large = runs[0], runs[-1]
    if len(runs) > 1:
        r = large[2]["driver_peak_mb"] / small[2]["driver_peak_mb"]
        goals.append((f"driver peak RSS {large[0]}N / {small[0]}N", f"{r:.2f}", f"<= {GOAL_DRIVER_RSS_RATIO}",
                      r <= GOAL_DRIVER_RSS_RATIO))
    else:
        goals.append(("driver peak RSS 10N / N", "- (one size)", f"<= {GOAL_DRIVER_RSS_RATIO}", None))
    with_base = [(m, rows, b, base) for m, rows, b, base in runs if base]
    if with_base:  # same rows on both sides: the rows/s ratio is the baseline's wall over pairforge's
        worst = min(base["wall_s"] / b["wall_s"] for _, _, b, base in with_base)
        each = ", ".join(f"{m}N {base['wall_s'] / b['wall_s']:.2f}" for m, _, b, base in with_base)
        cpu = ", ".join(f"{m}N {base['tree_cpu_s'] / b['tree_cpu_s']:.2f}" for m, _, b, base in with_base)
        value = f"{worst:.2f} (by size {each}; per job CPU second {cpu})"
        goals.append(("pairforge rows/s / baseline rows/s (lowest)", value, f">= {GOAL_VS_BASELINE}",
                      worst >= GOAL_VS_BASELINE))
    else:
        goals.append(("pairforge rows/s / baseline rows/s", "- (--skip-baseline)", f">= {GOAL_VS_BASELINE}",
                      None))
    dec_rate = a.decide_rows / dec[0]["cpu_s"]
    shard_rate = a.decide_rows / dec[1]["cpu_s"]
    goals.append((f"row-wise decisions rows/s per core ({a.decide_rows:,} rows in one table)",
                  f"{dec_rate:,.0f} (batches of {a.shard_rows:,}: {shard_rate:,.0f})", f">= {GOAL_ROWS_PER_CORE:,}",
                  dec_rate >= GOAL_ROWS_PER_CORE))
    nr = near["rows"] / (near["wall_s"] * near["cpus"])
    goals.append(("partitioned near-dup with crops, rows/s per core", f"{nr:,.0f}", f">= {GOAL_NEAR_PER_CORE:,}",
                  nr >= GOAL_NEAR_PER_CORE))
    print("\ngoals")
    for name, value, goal, ok in goals:
        print(f"  {name}: {value} (goal {goal}): {_mark(ok)}")
    print("ratios: " + "; ".join(f"{name} {value.split(' (')[0]} {_mark(ok)}" for name, value, _, ok in goals))
    return 0


def _mark(ok: bool | None) -> str:
    return "met" if ok else ("not met" if ok is False else "not measured")


def _print_build(b: dict, planted: dict[str, int]) -> None:
    rows = b["rows"]
    st = b["stats"]
    print(f"  {b['wall_s']:.1f} s, {rows / b['wall_s']:,.0f} rows/s, job CPU {b['tree_cpu_s']:.0f} s; "
          f"{st['rows_kept']:,} kept, "
          f"{st['rows_rejected']:,} rejected; driver peak {_mb(b['driver_peak_mb'])} MB (after imports "
          f"{_mb(b['driver_rss_imported_mb'])} MB), job peak RSS {_mb(b['tree_peak_rss_mb'])} MB, PSS "
          f"{_mb(b['tree_peak_pss_mb'])} MB over {b['tree_peak_processes']} processes", flush=True)
    phases: list[list] = []  # the pipeline's steps are phases that end together: one line for them
    for p in b["phases"]:
        if phases and round(phases[-1][1]["seconds"], 1) == round(p["seconds"], 1) and p["phase"] not in ("input", "ingest"):
            phases[-1][0].append(p["phase"])
        else:
            phases.append([[p["phase"]], p])
    for names, p in phases:
        name = names[0] if len(names) == 1 else "stages (" + ", ".join(reversed(names)) + ")"
        note = f" ({p['summary']})" if name == "input" else ""
        print(f"    phase {name}: {p['seconds']:.1f} s; driver RSS at its end {_mb(p['driver_rss_mb'])} MB, "
              f"peak so far {_mb(p['driver_peak_mb'])} MB{note}")
    by = {s["stage"]: s["rejected"] for s in st["stages"]}
    got = {r: c for rej in by.values() for r, c in rej.items()}
    print("    planted rows -> rejections: "
          f"exact {planted.get('exact', 0):,} -> duplicate_exact {got.get('duplicate_exact', 0):,}; near "
          f"{sum(planted.get(k, 0) for k in ('near_quality', 'near_larger', 'near_crop')):,} -> duplicate_near "
          f"{got.get('duplicate_near', 0):,}; same URL {planted.get('same_url', 0):,} -> duplicate_url "
          f"{got.get('duplicate_url', 0):,}; junk {planted.get('junk', 0):,} -> junk_* "
          f"{sum(c for r, c in got.items() if r.startswith('junk_')):,}; basic "
          f"{sum(planted.get(k, 0) for k in ('few_words', 'tiny', 'wide', 'truncated')):,} -> "
          f"{sum(by.get('basic', {}).values()):,}; missing {planted.get('missing', 0):,} -> input "
          f"{sum(by.get('input', {}).values()):,}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

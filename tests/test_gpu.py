"""CUDA only (every test skips where torch sees no CUDA device): device choice, fp16/bf16, the pixels' trip to the
GPU, JPEGs decoded on the GPU, two batches at once on their own streams, and several actors per GPU with fractional
`gpus` in the build's own pipeline (threaded actors)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from schemas.spec import parse_spec

from stages.align import AlignParams
from stages.align import AlignStage
from tests.test_align import (mixed_batch, mixed_table, pair_table, scene_pairs, tiny_clip,  # noqa: F401 (fixtures)
                               tiny_siglip)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")


def _scores(table: pa.Table) -> np.ndarray:
    return table.column("clip_score").to_numpy(zero_copy_only=False)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_auto_picks_cuda_and_fp16_and_scores_like_the_cpu(which, tiny_clip, tiny_siglip, mixed_batch):  # noqa: F811
    from stages.models import resolve_device

    folder = str(tiny_clip if which == "clip" else tiny_siglip)
    assert resolve_device("auto") == torch.device("cuda:0")
    stage = AlignStage(AlignParams(model=folder, batch_size=4))
    stage.preflight()
    gpu = stage(stage.prepare_batch(mixed_batch))
    meta = stage.metadata()
    assert meta["device"] == "cuda:0" and meta["dtype"] == "float16"
    weights = next(stage.clip.model.parameters())
    assert weights.device.type == "cuda" and weights.dtype == torch.float16
    cpu = AlignStage(AlignParams(model=folder, batch_size=4, device="cpu"))(mixed_batch)
    assert gpu.column("clip_score").is_valid().to_pylist() == cpu.column("clip_score").is_valid().to_pylist()
    ok = cpu.column("clip_score").is_valid().to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(_scores(gpu)[ok], _scores(cpu)[ok], atol=2e-2)

    bf16 = AlignStage(AlignParams(model=folder, batch_size=4, dtype="bfloat16"))
    out = bf16(mixed_batch)
    assert bf16.metadata()["dtype"] == "bfloat16"
    np.testing.assert_allclose(_scores(out)[ok], _scores(cpu)[ok], atol=5e-2)


def test_uint8_pixels_normalised_on_the_gpu_match_the_processor(tiny_clip):  # noqa: F811
    from stages.models import as_tensor, load_clip

    clip = load_clip(str(tiny_clip), "cuda", "float32")
    images, _ = scene_pairs(6, seed=2)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    px = clip.pixels(pil)
    assert px.dtype == np.uint8
    pinned = as_tensor(px).pin_memory()
    got = clip.pixel_prep.to_model(pinned, clip.device, torch.float32)
    torch.cuda.synchronize()
    want = clip.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=2e-6, rtol=0)


def test_jpegs_decoded_on_the_gpu_score_like_the_cpu(tiny_clip):  # noqa: F811
    """decode: gpu (nvImageCodec or torchvision's CUDA decode, whichever is installed): JPEG rows reach the actor as
    bytes, are decoded, resized and cropped on the GPU, and score as the CPU path does; the PNG, GIF and broken
    rows take the CPU path or stay unscored."""
    from stages.align import JPEG, decodes_on_gpu
    from stages.imaging import gpu_decode

    if gpu_decode.backend() is None:
        pytest.skip("no GPU JPEG decoder installed (nvidia-nvimgcodec-cu12/cu13, or torchvision with CUDA)")
    batch = mixed_table(96)
    params = AlignParams(model=str(tiny_clip), batch_size=4, decode="gpu", gpus=1)
    assert decodes_on_gpu(params)
    stage = AlignStage(params)
    stage.preflight()
    prepared = stage.prepare_batch(batch)
    assert prepared[JPEG].null_count == 4  # the PNG, the GIF, broken bytes, no image
    out = stage(prepared)
    decoder = stage._jpeg_decoder()
    assert decoder is not None and decoder.broken is None and decoder.decoded == 11, decoder.broken
    cpu = AlignStage(AlignParams(model=str(tiny_clip), batch_size=4, decode="cpu", gpus=1))(batch)
    assert out.column("clip_score").is_valid().to_pylist() == cpu.column("clip_score").is_valid().to_pylist()
    ok = cpu.column("clip_score").is_valid().to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(_scores(out)[ok], _scores(cpu)[ok], atol=2e-2)


def test_two_threads_run_batches_at_once_on_their_own_streams(tiny_clip):  # noqa: F811
    """A GPU actor runs two batches at once (flows.engine.runner.actor_strategy): each thread's forwards run on its
    own CUDA stream and give what one thread alone gives."""
    import threading

    stage = AlignStage(AlignParams(model=str(tiny_clip), batch_size=4, gpus=1))
    batches = [pair_table(*scene_pairs(24, seed=20 + k)) for k in range(2)]
    alone = [stage(b) for b in batches]
    got: dict = {}

    def run(k):
        for _ in range(3):
            got[k] = stage(batches[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        np.testing.assert_allclose(_scores(got[k]), _scores(alone[k]), atol=1e-3)
    assert stage.clip.attention in ("sdpa", "eager")


class _Probe:
    """An align stage in a Ray actor, saying where its model landed."""

    def __init__(self, model: str, gpus: float):
        self.stage = AlignStage(AlignParams(model=model, gpus=gpus, cpus=0.5))
        self.stage.setup()

    def info(self) -> tuple:
        from stages.models import ray_gpu_ids

        return str(self.stage.clip.device), str(self.stage.clip.dtype), [str(i) for i in ray_gpu_ids()]


def test_fractional_gpus_put_several_actors_on_one_gpu(tiny_clip, tmp_path):  # noqa: F811
    """gpus: 0.5 -> two actors share the one GPU (the build's pool size says 2 and Ray places both at once); a gpus: 0
    actor on the same machine stays on the CPU. Then the build's own pipeline (prepare tasks + a pool of that size,
    two batches at once per actor; JPEGs decoded on the GPU where a decoder is installed) scores a batch like the
    CPU does."""
    import ray

    import flows.engine.runner as fb
    from flows.engine.resources import fit_resources

    (tmp_path / "u.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red circle\n")
    spec = parse_spec({"dataset": "t", "source": {"urls": "u.csv"},
                       "stages": [{"align": {"model": str(tiny_clip), "gpus": 0.5, "cpus": 0.5, "batch_size": 8}}]},
                      tmp_path)
    assert fit_resources(spec, 4, 1)[0].pool_size == 2
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, num_gpus=1, object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        probe = ray.remote(_Probe)
        on_gpu = [probe.options(num_gpus=0.5, num_cpus=0.5).remote(str(tiny_clip), 0.5) for _ in range(2)]
        infos = ray.get([p.info.remote() for p in on_gpu], timeout=300)  # both alive at once on one GPU
        for device, dtype, ids in infos:
            assert device == "cuda:0" and dtype == "torch.float16" and len(ids) == 1
        assert infos[0][2] == infos[1][2]
        on_cpu = probe.options(num_cpus=0.5).remote(str(tiny_clip), 0.0)
        assert ray.get(on_cpu.info.remote(), timeout=300)[0] == "cpu"
        for a in on_gpu + [on_cpu]:
            ray.kill(a)

        images, texts = scene_pairs(32, seed=4)
        table = pair_table(images, texts)
        fb.quiet_ray_data()
        timer = ray.remote(num_cpus=0)(fb.StageTimer).options(name="gpu-test-timer").remote()
        ds = fb.stage_pipeline(ray.data.from_arrow(table), spec, "gpu-test-timer",
                               fit_resources(spec, 4, 1))  # two threaded actors
        got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        totals = ray.get(timer.get.remote())
        assert totals["align"][0] == 32 and totals["align.prepare"][0] == 32
    finally:
        if started:
            ray.shutdown()
    assert sorted(got["uid"].to_pylist()) == sorted(table["uid"].to_pylist())
    assert [c for c in got.column_names if c.startswith("_") or c == "image"] == []
    cpu = AlignStage(AlignParams(model=str(tiny_clip), batch_size=8, device="cpu"))(table)
    by_uid = dict(zip(cpu["uid"].to_pylist(), cpu["clip_score"].to_pylist()))
    want = np.array([by_uid[u] for u in got["uid"].to_pylist()])
    np.testing.assert_allclose(_scores(got), want, atol=2e-2)

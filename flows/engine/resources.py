"""What each stage gets of the cluster: CPUs, GPUs and actors, fitted before any download.

Ray Data's actor pools hold their CPUs (and GPUs) for the whole pipeline; if what they leave cannot run a read task
or a CPU stage's task, the pipeline waits forever. So:
- the reads and the CPU stages (tasks) keep what the largest of them needs: one CPU for a read, a stage's `cpus`,
  one CPU for a model stage's prepare tasks;
- model stages with `cpus` in the spec hold `cpus` x actors; the model stages without share what is left, each
  actor a fraction of a CPU at most its stage's default (`Resources.cpus`): safety and text with no resources on
  2 CPUs get half a CPU each, on a 16-CPU cluster one each;
- actors per model stage: `pool_size` when the spec sets it; a GPU stage without one gets as many as its `gpus`
  fit in its share of the GPUs (the GPUs left by stages with a pool_size, split evenly; `gpus: 0.25` on one GPU:
  four); a CPU stage its default pool size;
- explicit resources that cannot fit (pools leaving too little for the reads, more GPUs than the cluster has, a
  task wanting more CPUs than the cluster) are refused with the numbers, by `check_fit` at preflight (a local
  cluster's size is known then; a remote cluster's once connected, still before any download).
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

from flows.engine.context import BuildError
from schemas.spec import BuildSpec
from stages import stage_class
from stages.base import Resources

PREPARE_CPUS = 1.0  # one prepare task (PIL decode and resize: one thread)
READ_CPUS = 1.0  # a Ray Data read task


def fit_resources(spec: BuildSpec, cluster_cpus: float, cluster_gpus: float = 0.0) -> dict[int, Resources]:
    """Each stage's resources on this cluster, by its position in the spec (pool_size: actors, for the stages that
    run as actor pools). Raises BuildError naming the stages and the numbers when explicit resources cannot fit."""
    out: dict[int, Resources] = {}
    actors: list[int] = []
    tasks = {"a read task": READ_CPUS}
    for i, entry in enumerate(spec.stages):
        cls = stage_class(entry.name)
        res = cls.default_resources.override(entry.params)
        out[i] = res
        if cls.runs_as_actor(entry.params):
            actors.append(i)
            if cls.prepares_batches():
                tasks[f"{entry.name}'s prepare tasks"] = PREPARE_CPUS
        else:
            tasks[f"stage {entry.name}"] = res.cpus
    need_name, need = max(tasks.items(), key=lambda kv: kv[1])
    if need > cluster_cpus + 1e-9:
        raise BuildError(f"{need_name} needs {need:g} CPUs but the cluster has {cluster_cpus:g}: lower its `cpus`, "
                         f"or add CPUs")

    # actors per stage
    fixed = [i for i in actors if spec.stages[i].params.pool_size is not None or not out[i].gpus]
    auto = [i for i in actors if i not in fixed]
    if auto:
        share = (cluster_gpus - sum(out[i].gpus * out[i].pool_size for i in fixed)) / len(auto)
        for i in auto:
            out[i] = replace(out[i], pool_size=max(1, math.floor(share / out[i].gpus + 1e-9)))
    gpus = sum(out[i].gpus * out[i].pool_size for i in actors)
    if gpus > cluster_gpus + 1e-9:
        raise BuildError(
            f"the model stages' actor pools want {gpus:g} GPUs ({_list(spec, actors, out, 'gpus')}) but the cluster "
            f"has {cluster_gpus:g}: the pipeline would wait for them forever. Lower `gpus` or `pool_size`, or add GPUs")

    # CPUs: explicit pools first, the others share what is left after the tasks' reserve
    explicit = [i for i in actors if spec.stages[i].params.cpus is not None]
    shared = [i for i in actors if i not in explicit]
    left = cluster_cpus - need - sum(out[i].cpus * out[i].pool_size for i in explicit)
    if left < -1e-9 or (shared and left <= 1e-9):
        held = sum(out[i].cpus * out[i].pool_size for i in explicit)
        raise BuildError(
            f"the model stages' actor pools hold {held:g} of the cluster's {cluster_cpus:g} CPUs "
            f"({_list(spec, explicit, out, 'cpus')}), leaving less than the {need:g} {need_name} needs"
            + (f" and none for {', '.join(spec.stages[i].name for i in shared)}" if shared else "")
            + ": the pipeline would stall. Lower those stages' `cpus` or `pool_size`, leave `cpus` out (model "
              "stages without it share the CPUs left after the reads), or add CPUs")
    if shared:
        per_actor = left / sum(out[i].pool_size for i in shared)
        for i in shared:
            out[i] = replace(out[i], cpus=min(out[i].cpus, _round_down(per_actor)))
    return out


def _round_down(x: float) -> float:
    return math.floor(x * 1000) / 1000  # Ray's resource granularity is 1e-4; keep shares readable


def _list(spec: BuildSpec, positions: list[int], fitted: dict[int, Resources], what: str) -> str:
    """"safety: 1 x 2, text: 0.5 x 1": each stage's cpus or gpus per actor x its actors."""
    return ", ".join(f"{spec.stages[i].name}: {getattr(fitted[i], what):g} x {fitted[i].pool_size}"
                     for i in positions) or "none"


def pool_sizes(spec: BuildSpec, cluster_cpus: float, cluster_gpus: float = 0.0) -> dict[int, int]:
    """Actors per model stage, by position in the spec (fit_resources)."""
    fitted = fit_resources(spec, cluster_cpus, cluster_gpus)
    return {i: r.pool_size for i, r in fitted.items()
            if stage_class(spec.stages[i].name).runs_as_actor(spec.stages[i].params)}


def local_cluster(spec: BuildSpec) -> tuple[float, float] | None:
    """(CPUs, GPUs) of the local Ray a build of this spec starts, or None when it joins a cluster (`ray.address`)."""
    if spec.ray.address:
        return None
    cpus = spec.ray.num_cpus or len(os.sched_getaffinity(0))
    gpus = 0.0
    if any(stage_class(e.name).default_resources.override(e.params).gpus for e in spec.stages):
        import torch  # only a spec that asks for GPUs pays for the import

        gpus = float(torch.cuda.device_count())
    return float(cpus), gpus


def check_fit(spec: BuildSpec, cluster: tuple[float, float] | None = None) -> dict[int, Resources] | None:
    """The preflight check: the spec's resources fit the cluster (`cluster`: (CPUs, GPUs); default: the local Ray
    this spec starts). Raises BuildError when they cannot; None when the cluster is remote and not known yet."""
    cluster = cluster or local_cluster(spec)
    return None if cluster is None else fit_resources(spec, *cluster)

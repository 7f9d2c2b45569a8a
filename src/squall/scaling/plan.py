"""The shape of one scaling point, checked before any resource is spent on it.

:func:`plan_point` turns a composed ``scale`` config (``parallel``, ``scale``, ``cluster``) into a
frozen :class:`PointPlan`: how many ranks, on how many nodes, how they split into data- and
model-parallel groups, and the batch each rank draws. Every rule a layout can break is checked up
front and reported in one :class:`LayoutError` that prints every number involved, so a bad point
fails in the sweep's launcher (recorded, the others go on) instead of after a queue wait.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# One error for every layout that cannot run (ranks, nodes, batch, parallel degrees, scheme).
from squall.distributed.layout import LayoutError

MODES = ("strong", "weak")
__all__ = ["LayoutError", "PointPlan", "plan_point"]


@dataclass(frozen=True)
class PointPlan:
    """One point of a scaling sweep.

    Attributes
    ----------
    gpus : int
        Ranks (one process per GPU; CPU processes on ``cluster=local``).
    nodes, tasks_per_node : int
        ``gpus == nodes * tasks_per_node``; ``tasks_per_node <= cluster.gpus_per_node``.
    data_parallel, model_parallel : int
        ``gpus == data_parallel * model_parallel * ensemble``.
    batch_per_rank : int
        Samples each data-parallel group draws per step.
    global_batch : int
        ``batch_per_rank * data_parallel``: samples per optimiser step.
    mode : str
        ``strong`` (global batch fixed) or ``weak`` (batch per data-parallel rank fixed).
    partition : str or None
        Partitioning scheme of model-parallel points.
    cluster : str
        Cluster config name.
    ensemble : int
        Ranks sharing the members of each sample (``parallel.ensemble``).
    members : int
        Ensemble members per sample (``model.ensemble.members``; 1: deterministic).
    """

    gpus: int
    nodes: int
    tasks_per_node: int
    data_parallel: int
    model_parallel: int
    batch_per_rank: int
    global_batch: int
    mode: str
    partition: str | None
    cluster: str
    ensemble: int = 1
    members: int = 1

    @property
    def layout(self) -> str:
        """Short name, e.g. ``dp4``, ``dp2xmp4``, ``dp1xmp2xens2``."""
        return (f"dp{self.data_parallel}" + (f"xmp{self.model_parallel}" if self.model_parallel > 1
                                             else "")
                + (f"xens{self.ensemble}" if self.ensemble > 1 else ""))  # fmt: skip

    @property
    def members_per_gpu(self) -> float:
        """Members each GPU computes (a fraction when a member's graph spans GPUs)."""
        return self.members / self.ensemble / self.model_parallel

    def as_params(self) -> dict[str, str]:
        """Plan fields as MLflow params under ``point.``."""
        return {f"point.{k}": str(v) for k, v in asdict(self).items()} | {"point.layout": self.layout}


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise LayoutError(f"{name}={value!r} is not an integer") from None
    if number < 1 or number != float(value):
        raise LayoutError(f"{name}={value!r} must be a whole number >= 1")
    return number


def plan_point(cfg) -> PointPlan:
    """Check the layout of the point described by ``cfg`` and return its plan.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``conf/scale.yaml`` (``parallel``, ``scale`` and ``cluster`` sections).

    Returns
    -------
    PointPlan

    Raises
    ------
    LayoutError
        If the point cannot run as configured; the message names every value involved.
    """
    p, s, c = cfg.parallel, cfg.scale, cfg.cluster
    if p.get("gpus") is None:  # one replica of ensemble x model_parallel (x data_parallel) ranks
        gpus = 1
        for key in ("ensemble", "model_parallel", "data_parallel"):
            if p.get(key) is not None:
                gpus *= _positive_int(p[key], f"parallel.{key}")
    else:
        gpus = _positive_int(p.gpus, "parallel.gpus")
    per_node = _positive_int(c.gpus_per_node, "cluster.gpus_per_node")
    max_nodes = _positive_int(c.get("max_nodes", 1), "cluster.max_nodes")
    mode = str(s.mode)
    if mode not in MODES:
        raise LayoutError(f"scale.mode={mode!r}: choose one of {', '.join(MODES)}")
    if p.nodes is None:
        nodes = math.ceil(gpus / per_node)
    else:
        nodes = _positive_int(p.nodes, "parallel.nodes")
    problems = []
    if gpus % nodes:
        how = "parallel.nodes" if p.nodes is not None else (
            f"nodes (more than one {c.name} node of cluster.gpus_per_node={per_node})")
        problems.append(f"parallel.gpus={gpus} does not split evenly over {nodes} {how}")
    elif gpus // nodes > per_node:
        problems.append(f"{gpus // nodes} GPUs per node (parallel.gpus={gpus} over {nodes} "
                        f"node(s)) but a {c.name} node has cluster.gpus_per_node={per_node}")
    if nodes > max_nodes:
        problems.append(f"{nodes} nodes needed but cluster {c.name} allows "
                        f"cluster.max_nodes={max_nodes}")
    mp = _positive_int(p.model_parallel, "parallel.model_parallel")
    ens = _positive_int(p.get("ensemble", 1), "parallel.ensemble")
    ens_text = f" x parallel.ensemble={ens}" if ens > 1 else ""
    if gpus % (mp * ens):
        problems.append(f"parallel.gpus={gpus} is not a multiple of parallel.model_parallel={mp}"
                        + ens_text)
        dp = max(1, gpus // (mp * ens))
    else:
        dp = gpus // (mp * ens)
    members = 1
    ens_cfg = cfg.get("model", {}).get("ensemble") or {}
    if ens_cfg:
        members = _positive_int(ens_cfg.get("members", 1), "model.ensemble.members")
    if members % ens:
        problems.append(f"model.ensemble.members={members} does not split over "
                        f"parallel.ensemble={ens} ranks")
    if p.get("data_parallel") is not None:
        want = _positive_int(p.data_parallel, "parallel.data_parallel")
        if want * mp * ens != gpus:
            problems.append(f"parallel.data_parallel={want} x parallel.model_parallel={mp}"
                            f"{ens_text} != parallel.gpus={gpus}")
        dp = want
    batch = _positive_int(s.batch, "scale.batch")
    if mode == "strong":
        if batch % dp:
            problems.append(f"strong scaling: global batch scale.batch={batch} does not split "
                            f"over {dp} data-parallel ranks")
        per_rank = max(1, batch // dp)
    else:
        per_rank = batch
    if problems:
        raise LayoutError("point cannot run: " + "; ".join(problems))
    if mp > 1:  # scheme names and degrees, checked where no GPU hour is spent yet
        from squall.parallel.parallelize import ParallelConfig

        ParallelConfig.from_cfg(p)
    return PointPlan(gpus=gpus, nodes=nodes, tasks_per_node=gpus // nodes, data_parallel=dp,
                     model_parallel=mp, batch_per_rank=per_rank, global_batch=per_rank * dp,
                     mode=mode, partition=None if p.get("partition") is None else str(p.partition),
                     cluster=str(c.name), ensemble=ens, members=members)

"""Apply everything that changes how a plain :class:`GraphForecaster` runs, in one place.

:func:`parallelize` (the shape of torchtitan's ``parallelize``) takes a single-device model and
applies, in this order:

1. **degree checks**: the process groups' :class:`Layout` against the config and the graph;
   errors print every number;
2. **graph sharding with halo exchange** (``model_parallel > 1``, or ``chunks > 1``): the partition
   of every node set (:func:`make_partition`, pure, identical on every rank), this rank's halo
   plans of the encoder, processor and decoder, and ``model.graph`` becomes this rank's rows and
   edges (:class:`ShardedGraphInputs`); each block then runs on the local destinations: halo
   exchange of its sources, and with ``overlap`` the interior destinations while the halo is in
   flight, the boundary ones after;
3. **sequential chunking** (``chunks > 1``): the encoder and decoder run in ``chunks`` pieces of
   their destinations, each recomputed in backward;
   **ensemble members** (any stochastic model): this rank's share of the members of each sample
   (``members / ensemble``), their noise drawn as one process holding every member and sample
   draws it, and the member all-gather of the loss over the ensemble group
   (:func:`squall.parallel.ensemble.apply_ensemble_parallel`);
4. **activation checkpoint policies** of ``model.cfg``: ``full`` blocks are recomputed in backward
   by the runner, ``mlp`` blocks recompute their MLP themselves;
5. **torch.compile** of every block when ``model.cfg.compile`` and each block runs on one set
   of destinations (the whole graph, or this rank's part of it; not with ``chunks`` or
   ``overlap``, whose blocks run on several subsets and would recompile per subset; with
   ``shard_parameters``, blocks of the ``full`` checkpoint policy stay eager);
6. **gradient synchronisation** whenever the world has more than one rank: every replica of a
   parameter steps on the same gradient, the average over data-parallel replicas of the full
   gradient. A plain data-parallel model (``model_parallel == 1``, ``chunks == 1``) goes through
   DDP (``replicate``, in place), which overlaps the all-reduce with the backward; any other
   layout through :class:`GradReducer` (summed over the model and ensemble groups, whose ranks
   each hold a share of one replica's gradient, averaged over replicas), in buckets of
   ``grad_bucket_mb`` launched during the backward as DDP does.
   With ``shard_parameters``, any layout goes through FSDP2 instead
   (:func:`squall.parallel.sharding.shard_parameters`): parameters, gradients and optimizer
   state sharded over the whole world, each block gathered just in time, gradients
   reduce-scattered with the same sum-over-the-model-group, mean-over-replicas rule.
   Parameters and buffers start from global rank 0's, as DDP does.

Steps 2 to 4 are carried out by the block runner installed as ``model.runner``
(:class:`ParallelRunner`; the model calls it for every block). The model's class, parameters and
parameter names stay what they were (``state_dict`` keys unchanged), so checkpoints move freely
between layouts. :func:`apply_parallelism` and :func:`prepare_parallel` are the jobs' entry
points; a single process (world 1, chunks 1) goes through the same :func:`parallelize`.

A sharded model's inputs and outputs hold this rank's grid rows only,
``[B, T, G_local, V] -> [B, G_local, V]``, in ascending global order (:func:`local_grid_indices`;
cut a full-grid tensor with :meth:`ParallelRunner.local_rows`, assemble the full grid with
:meth:`ParallelRunner.gather`). Its ``graph.area`` is the local rows' area scaled by
``G_local / G``, so that the trainer's ``mean`` of an area-weighted error over local rows is this
rank's share of the global mean: the shares of a model group sum to the single-device loss, and so
do their gradients (hence gradients are *summed* over the model group, then averaged over the
data-parallel replicas).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from squall.config import as_flag
from squall.distributed.layout import Layout, LayoutError, ProcessGroups, build_groups
from squall.graphs import Graph
from squall.models.forecaster import (
    ROLES,
    BlockRunner,
    GraphForecaster,
    GraphInputs,
    compile_blocks,
)
from squall.parallel.chunking import (
    DeviceSubGraph,
    merge,
    merge_order,
    run_chunks,
    run_subgraph,
)
from squall.parallel.comm import HaloExchange, all_reduce_sum, gather_nodes
from squall.parallel.ensemble import apply_ensemble_parallel
from squall.parallel.halo import (
    HaloPlan,
    build_halo_plans,
    chunk_subgraphs,
    interior_first_order,
)
from squall.parallel.partition import ALIASES, METHODS, Partition, partition_graph
from squall.parallel.sharding import PARAM_DTYPES, shard_parameters
from squall.tracking import metrics as M

log = logging.getLogger(__name__)

MAPPERS = ("encoder", "decoder")

# Gradient MiB per all-reduce launched during the backward: DDP's default bucket size. The
# o320_l7 model (1024 channels, 16 layers) has 0.94 GiB of fp32 gradients in 57 buckets; the last
# four (the trainable edge features and the embeddings, ~100 MiB, complete only once the encoder's
# backward is done) are reduced after the backward, the rest while it computes. 0: one
# all-reduce of every gradient once the backward has finished.
GRAD_BUCKET_MB = 25.0
# Buckets whose all-reduce may still be in flight when the next one launches (older ones are
# finished then): at most this many flat copies (~100 MiB) on top of the gradients during the
# backward instead of all of them (0.94 GiB for o320_l7), without making the compute stream wait
# on a bucket launched a moment before.
BUCKETS_IN_FLIGHT = 4


@dataclass(frozen=True)
class ParallelConfig:
    """``conf/parallel`` settings.

    Attributes
    ----------
    model_parallel : int
        Ranks sharing one sample's graph.
    partition : str
        ``"sfc"`` (locality-aware), or the baselines ``"ranges"`` (index ranges) and ``"bands"``
        (latitude bands); see :mod:`squall.parallel.partition`.
    overlap : bool
        Compute interior destinations while the halo is in flight. Off by default: on 2 and 4
        H100s (o320_l7, 1024 channels) the split cost 4 to 7 % of the step against a halo of 1
        to 3 % (profiling/results/parallel.md), on 2 H200 7 % against 0.5 ms of forward
        exchanges, and its blocks are not compiled (profiling/results/parallel_fastpath.md).
    chunks : int
        Sequential pieces of the encoder and decoder per rank (1 = off), each recomputed in
        backward.
    shard_parameters : bool
        Shard parameters, gradients and optimizer state over every rank (FSDP2; see
        :mod:`squall.parallel.sharding`). No effect on a world of one.
    param_dtype : str
        ``fp32`` or ``bf16``: dtype sharded blocks are gathered and computed in; :func:`
        prepare_parallel` sets ``bf16`` when training computes in bf16.
    ensemble : int
        Ranks sharing the members of each sample (``model.ensemble.members / ensemble`` each).
    noise_seed : int
        Seed of an ensemble model's noise (:func:`prepare_parallel`: ``training.seed``).
    grad_bucket_mb : float
        Gradient MiB per all-reduce of :class:`GradReducer`, launched during the backward (0:
        one all-reduce after it).
    """

    model_parallel: int = 1
    partition: str = "sfc"
    overlap: bool = False
    chunks: int = 1
    shard_parameters: bool = False
    param_dtype: str = "fp32"
    ensemble: int = 1
    noise_seed: int = 0
    grad_bucket_mb: float = GRAD_BUCKET_MB

    def __post_init__(self) -> None:
        if self.partition in ALIASES:
            object.__setattr__(self, "partition", ALIASES[self.partition])
        if self.partition not in METHODS:
            raise LayoutError(
                f"parallel.partition={self.partition!r}: choose one of {METHODS} or "
                f"{tuple(ALIASES)}"
            )
        if self.model_parallel < 1 or self.chunks < 1 or self.ensemble < 1:
            raise LayoutError(
                f"parallel.model_parallel={self.model_parallel}, parallel.ensemble="
                f"{self.ensemble} and parallel.chunks={self.chunks} must be >= 1"
            )
        if self.grad_bucket_mb < 0:
            raise LayoutError(f"parallel.grad_bucket_mb={self.grad_bucket_mb} must be >= 0")
        if self.param_dtype not in PARAM_DTYPES:
            raise LayoutError(f"param_dtype={self.param_dtype!r}: choose one of "
                              f"{tuple(PARAM_DTYPES)}")  # fmt: skip

    @classmethod
    def from_cfg(cls, cfg) -> ParallelConfig:
        cfg = cfg or {}
        return cls(
            model_parallel=int(cfg.get("model_parallel", 1)),
            partition=str(cfg.get("partition") or "sfc"),
            overlap=bool(cfg.get("overlap", False)),
            chunks=int(cfg.get("chunks", 1)),
            shard_parameters=as_flag(cfg.get("shard_parameters", False),
                                     "parallel.shard_parameters"),
            ensemble=int(cfg.get("ensemble", 1)),
            grad_bucket_mb=float(cfg.get("grad_bucket_mb", GRAD_BUCKET_MB)),
        )  # fmt: skip


def make_partition(graph: Graph, cfg: ParallelConfig, processor_layers: int) -> Partition:
    """The run's partition (the processor's edges weigh ``processor_layers`` in the balance)."""
    return partition_graph(
        graph, cfg.model_parallel, cfg.partition, edge_weights={"processor": processor_layers}
    )


def build_plans(graph: Graph, partition: Partition) -> list[dict[str, HaloPlan]]:
    """Every part's halo plans of the encoder, processor and decoder, with the mesh nodes of each
    part numbered processor-interior first (:func:`interior_first_order`; grid points stay
    ascending, the order datasets read them in)."""
    proc = graph.edges["processor"]
    mesh = {proc.dst: interior_first_order(build_halo_plans(proc, partition))}
    by_role = {role: build_halo_plans(graph.edges[role], partition, mesh) for role in ROLES}
    return [{role: by_role[role][r] for role in ROLES} for r in range(partition.num_parts)]


def local_grid_indices(graph: Graph, cfg: ParallelConfig, model_rank: int, processor_layers: int):
    """Global grid-point ids owned by ``model_rank``, ascending: the dataset's ``grid_indices``."""
    return make_partition(graph, cfg, processor_layers).owned("data", model_rank)


class LocalEdges:
    """One edge set on this rank: plan, exchange (``None`` when the group exchanges nothing) and
    the subgraphs run by the forward (``full``; ``interior`` / ``boundary``; ``chunks``)."""

    def __init__(self, plan: HaloPlan, group, chunks, device):
        self.plan, self.group, self.chunk_subs = plan, group, chunks
        self.exchange = HaloExchange(plan, group, device) if plan.group_exchanges else None
        n = (len(plan.owned_dst), plan.num_local_src, len(plan.edge_ids))
        own = plan.num_owned_src
        self.device = device
        self.full = DeviceSubGraph(plan.full, *n, device, own)
        # the interior runs before the halo arrives: its sources are the owned rows alone
        self.interior = DeviceSubGraph(plan.interior, n[0], own, n[2], device)
        self.boundary = DeviceSubGraph(plan.boundary, *n, device, own)
        perm = merge_order([plan.interior, plan.boundary], n[0])
        identity = np.array_equal(perm, np.arange(n[0]))
        self.overlap_perm = None if identity else torch.from_numpy(perm).to(device)
        self.chunks = None
        if chunks:
            self.chunks = [DeviceSubGraph(s, *n, device, own) for s in chunks]
            self.chunk_perm = torch.from_numpy(merge_order(chunks, n[0])).to(device)

    def to(self, device) -> LocalEdges:
        return LocalEdges(self.plan, self.group, self.chunk_subs, device)


class ShardedGraphInputs(nn.Module):
    """This rank's part of :class:`GraphInputs`: owned node rows, local edges, halo plans.

    Attributes
    ----------
    num_data, num_mesh : int
        Owned grid points and mesh nodes (``num_data`` is what inputs must have).
    data_ids, mesh_ids : numpy.ndarray
        Their global ids, ascending.
    area : torch.Tensor
        ``[num_data]`` cell areas of the owned points times ``num_data / G`` (see the module
        docstring).
    local : dict of str to LocalEdges
        Per edge set.
    """

    def __init__(self, graph: GraphInputs, plans: dict[str, HaloPlan], group, chunks: dict):
        super().__init__()
        device = graph.area.device
        self.data_name, self.mesh_name = graph.data_name, graph.mesh_name
        self.data_ids = plans["decoder"].owned_dst
        self.mesh_ids = plans["processor"].owned_dst
        self.num_data, self.num_mesh = len(self.data_ids), len(self.mesh_ids)
        data_idx = torch.from_numpy(self.data_ids).to(device)
        mesh_idx = torch.from_numpy(self.mesh_ids).to(device)
        self.register_buffer("data_ids_t", data_idx, persistent=False)
        self.register_buffer(
            "data_attrs", graph.data_attrs.index_select(0, data_idx), persistent=False
        )
        self.register_buffer(
            "mesh_attrs", graph.mesh_attrs.index_select(0, mesh_idx), persistent=False
        )
        share = self.num_data / graph.num_data
        self.register_buffer("area", graph.area.index_select(0, data_idx) * share, persistent=False)
        self.num_edges = {}
        for role in ROLES:
            ids = torch.from_numpy(plans[role].edge_ids).to(device)
            attrs = getattr(graph, f"{role}_attrs").index_select(0, ids)
            self.register_buffer(f"{role}_attrs", attrs, persistent=False)
            self.register_buffer(f"{role}_edge_ids", ids, persistent=False)
            self.num_edges[role] = len(ids)
        self.local = {role: LocalEdges(plans[role], group, chunks.get(role), device)
                      for role in ROLES}  # fmt: skip

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.area.device
        if torch.device(self.local["processor"].device) != device:
            self.local = {k: v.to(device) for k, v in self.local.items()}
        return self

    def edge_rows(self, role: str, per_edge: torch.Tensor) -> torch.Tensor:
        """The rows of a whole-graph per-edge tensor ``[E, ...]`` for this rank's edges."""
        return per_edge.index_select(0, getattr(self, f"{role}_edge_ids"))


class ParallelRunner(BlockRunner):
    """The block runner :func:`parallelize` installs as ``model.runner``.

    Without a partition it runs every block whole, as :class:`BlockRunner`. With one
    (``model.graph`` is then a :class:`ShardedGraphInputs`) it runs each block on this rank's
    destinations: halo exchange of the block's sources, interior destinations while the halo is in
    flight (``overlap``), boundary destinations after, and the encoder and decoder in ``chunks``
    recomputed pieces.

    Attributes
    ----------
    config : ParallelConfig
    groups : ProcessGroups
    partition : Partition or None
        ``None``: the graph is not sharded.
    overlap : bool
        Split interior and boundary destinations (``config.overlap``; may be switched between
        steps, e.g. by a benchmark).
    edge_imbalance : float
        Max / mean local edges over the model group (1 when not sharded).
    grad_reducer : GradReducer or None
    """

    def __init__(self, recompute, config: ParallelConfig, groups: ProcessGroups,
                 partition: Partition | None = None, graph: ShardedGraphInputs | None = None,
                 edge_imbalance: float = 1.0):  # fmt: skip
        super().__init__(recompute)
        self.config, self.groups, self.partition = config, groups, partition
        self.overlap, self.edge_imbalance = config.overlap, edge_imbalance
        self.grad_reducer: GradReducer | None = None
        self._graph = graph  # the model's sharded graph view (halo counters, local rows)

    @property
    def sharded(self) -> bool:
        return self.partition is not None

    def __call__(self, graph, role: str, block, x_src, x_dst, edge_attr) -> torch.Tensor:
        if not self.sharded:
            return super().__call__(graph, role, block, x_src, x_dst, edge_attr)
        le = graph.local[role]
        recompute = block in self.recompute
        chunked = le.chunks is not None
        # the halo rows go to the block apart from the owned ones (see subgraph_block: never a
        # concatenated copy of the sources kept for backward)
        if le.exchange is None:
            halo = None  # nothing received: the local sources are the owned rows
        else:
            pending = le.exchange.start(x_src)
            # compute with the exchange's view of the owned rows (the processor's destinations
            # too): their gradient then takes the returned halo gradient in one pass
            if x_dst is x_src:
                x_dst = pending.source
            x_src = pending.source
            if self.overlap and not chunked:
                inner = run_subgraph(block, le.interior, x_src, x_dst, edge_attr, recompute)
                halo = pending.wait()
                if le.boundary.num_dst:
                    outer = run_subgraph(
                        block, le.boundary, x_src, x_dst, edge_attr, recompute, halo
                    )
                else:
                    # nothing reads the halo here, but the backward must still join the reverse
                    # exchange (peers send back gradients of rows this rank sent): an empty
                    # slice keeps the halo, hence the exchange, on the autograd path
                    outer = halo.narrow(1, 0, 0)
                return merge([inner, outer], le.overlap_perm)
            halo = pending.wait()
        if not chunked:
            return run_subgraph(block, le.full, x_src, x_dst, edge_attr, recompute, halo)
        return run_chunks(block, le.chunks, le.chunk_perm, x_src, x_dst, edge_attr, halo)

    @property
    def model_rank(self) -> int:
        """Part of the graph this rank computes (0 when not sharded)."""
        return self.groups.model_rank if self.sharded else 0

    def local_rows(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's grid rows of a full-grid tensor (``x`` itself when not sharded)."""
        if not self.sharded:
            return x
        return x.index_select(dim, self._graph.data_ids_t.to(x.device))

    def gather(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Full-grid ``[B, G, V]`` from every model rank's ``[B, G_local, V]`` (evaluation only:
        not differentiable; ``y`` itself when not sharded or on a model group of one)."""
        if not self.sharded or self.groups.model is None:
            return y
        owned = [self.partition.owned("data", r) for r in range(self.config.model_parallel)]
        return gather_nodes(y, owned, self.groups.model, dim=dim)

    def parallel_metrics(self, steps: int = 1) -> dict[str, float]:
        """This rank's halo traffic per step since the last call (forward and backward), and the
        partition's edge imbalance; empty when not sharded.

        Keys are :mod:`squall.tracking.metrics` names; host-side counters, no device sync.
        """
        if not self.sharded:
            return {}
        exchanges = [le.exchange for le in self._graph.local.values() if le.exchange is not None]
        rows = sum(e.rows_sent for e in exchanges)
        sent = sum(e.bytes_sent for e in exchanges)
        for e in exchanges:
            e.rows_sent = e.bytes_sent = 0
        steps = max(1, steps)
        return {M.HALO_ROWS_SENT: rows / steps, M.HALO_BYTES_PER_STEP: sent / steps,
                M.EDGE_IMBALANCE: self.edge_imbalance}  # fmt: skip


class GradReducer:
    """Sum gradients over all ranks and divide by the data-parallel degree, in every backward.

    Model-parallel ranks each hold their nodes' share of every parameter's gradient (the halo
    backward has already moved contributions to the ranks that own the rows): summing over the
    model group gives the full gradient; so do ensemble ranks, each holding its members' share.
    Data-parallel replicas average. Both are one all-reduce over the world with the factor
    ``1 / data_parallel``.

    As DDP does, the parameters are cut into buckets of about ``bucket_mb`` MiB in reverse
    registration order (roughly the order the backward produces their gradients); a bucket's
    asynchronous all-reduce is launched as soon as all its gradients are accumulated, while the
    backward goes on, and every bucket is waited for, scaled and copied back into ``.grad`` when
    autograd finishes (an older bucket as soon as a few newer ones are in flight). Buckets
    launch strictly in their order on every rank, whatever order the hooks fire in, so the
    collectives match across ranks; a parameter without a gradient in this backward reduces as
    zeros (its bucket then launches at the end). ``bucket_mb=0``: one
    all-reduce of every gradient at the end of the backward.

    Parameters
    ----------
    model : nn.Module
    group : ProcessGroup
        Ranks to sum over (the world).
    data_parallel : int
        Replicas to average over.
    bucket_mb : float
        Gradient MiB per bucket (:data:`GRAD_BUCKET_MB`); 0 for a single bucket.
    """

    def __init__(self, model: nn.Module, group, data_parallel: int,
                 bucket_mb: float = GRAD_BUCKET_MB):  # fmt: skip
        if bucket_mb < 0:
            raise ValueError(f"parallel.grad_bucket_mb={bucket_mb} must be >= 0")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.group, self.scale = group, 1.0 / data_parallel
        self.bucket_mb = bucket_mb
        self.buckets = _buckets(self.params, int(bucket_mb * 2**20))
        self._bucket_of = [0] * len(self.params)
        for b, members in enumerate(self.buckets):
            for i in members:
                self._bucket_of[i] = b
        self.enabled = True
        self._reset()
        self.handles = [p.register_post_accumulate_grad_hook(partial(self._ready, i))
                        for i, p in enumerate(self.params)]  # fmt: skip

    def _reset(self) -> None:
        self._queued = False
        self._fired = [False] * len(self.params)
        self._missing = [len(members) for members in self.buckets]
        self._next = 0  # the next bucket to launch
        self._inflight: list = []

    @contextmanager
    def no_sync(self):
        """Backward passes inside accumulate local gradients only; the first backward after it
        reduces the accumulated gradients (DDP's ``no_sync``)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def _ready(self, i: int, _param) -> None:
        if not self.enabled or not self.buckets:
            return
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        if self._fired[i]:
            raise RuntimeError(
                f"the gradient of parameter {i} ({tuple(self.params[i].shape)}) was accumulated "
                "twice in one backward after its bucket's all-reduce started: run such a "
                "backward with parallel.grad_bucket_mb=0"
            )
        self._fired[i] = True
        b = self._bucket_of[i]
        self._missing[b] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        """Start the all-reduce of bucket ``b`` (the next one in order)."""
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._inflight.append((work, flat, grads))
        self._next = b + 1
        # older buckets are back long since: finish them now, so that no more than a few
        # buckets' flat copies live during the backward (on NCCL the wait only orders streams)
        while len(self._inflight) > BUCKETS_IN_FLIGHT:
            self._complete(*self._inflight.pop(0))

    def _complete(self, work, flat, grads) -> None:
        """Wait for one bucket, scale it, copy it back into the gradients."""
        work.wait()
        if self.scale != 1.0:
            flat.mul_(self.scale)
        torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))

    def _finish(self) -> None:
        """Launch what is left in order, wait for every bucket, scale, copy back."""
        try:
            while self._next < len(self.buckets):
                self._launch(self._next)
            for entry in self._inflight:
                self._complete(*entry)
        finally:
            self._reset()

    def reduce(self) -> None:
        """All-reduce every gradient now, one bucket after another (also callable by hand, e.g.
        after ``no_sync`` backward passes, instead of a synced backward)."""
        self._reset()
        self._finish()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _buckets(params: list, cap_bytes: int) -> list[list[int]]:
    """Indices of ``params`` in buckets of at most ``cap_bytes`` (a larger tensor alone), in
    reverse order, one dtype and device per bucket; ``cap_bytes`` 0: one bucket per dtype and
    device."""
    buckets, current, size, key = [], [], 0, None
    for i in reversed(range(len(params))):
        p = params[i]
        nbytes = p.numel() * p.element_size()
        k = (p.dtype, p.device)
        if current and (k != key or (cap_bytes and size + nbytes > cap_bytes)):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size, key = size + nbytes, k
    if current:
        buckets.append(current)
    return buckets


def parallelize(
    model: GraphForecaster,
    graph: Graph,
    config: ParallelConfig,
    groups: ProcessGroups | None = None,
    partition: Partition | None = None,
) -> GraphForecaster:
    """Apply sharding, chunking, checkpointing, compile and gradient synchronisation to ``model``,
    in place, in the order of the module docstring.

    Parameters
    ----------
    model : GraphForecaster
        Single-device model, already on its device, identical on every rank (or it is made so:
        rank 0's parameters are broadcast), not parallelized before.
    graph : Graph
        The graph the model was built from.
    config : ParallelConfig
    groups : ProcessGroups, optional
        From :func:`build_groups`; default: ``Layout(world_size, config.model_parallel)`` over the
        initialised default group (or one process).
    partition : Partition, optional
        Overrides :func:`make_partition` (same on every rank; ``num_parts == model_parallel``).

    Returns
    -------
    GraphForecaster
        The same object, its ``runner`` a :class:`ParallelRunner`; when sharded it takes and
        returns this rank's grid rows.
    """
    # 1. degrees
    if groups is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        groups = build_groups(Layout(world, config.model_parallel, config.ensemble))
    layout = groups.layout
    if (layout.model_parallel, layout.ensemble) != (config.model_parallel, config.ensemble):
        raise LayoutError(
            f"parallel.model_parallel={config.model_parallel} and parallel.ensemble="
            f"{config.ensemble} but the process groups were built for model_parallel="
            f"{layout.model_parallel}, ensemble={layout.ensemble} (world_size={layout.world_size})"
        )
    layout.check({k: len(v) for k, v in graph.nodes.items()}, batch_size=1,
                 members=model.members)  # fmt: skip
    if isinstance(model.runner, ParallelRunner):
        raise ValueError("model is already parallelized")
    if partition is not None and partition.num_parts != config.model_parallel:
        raise LayoutError(
            f"partition into {partition.num_parts} parts for model_parallel={config.model_parallel}"
        )

    # 2. graph sharding with halo exchange, and 3. sequential chunking of the mappers
    sharded = config.model_parallel > 1 or config.chunks > 1
    imbalance, sharded_graph = 1.0, None
    if sharded:
        if partition is None:
            partition = make_partition(graph, config, model.cfg.processor_layers)
        every = build_plans(graph, partition)
        plans = every[groups.model_rank]
        local_edges = np.array([sum(len(p[role].edge_ids) for role in ROLES) for p in every])
        imbalance = float(local_edges.max() / local_edges.mean())
        chunks = {}
        if config.chunks > 1:
            for role in MAPPERS:
                dst_xyz = graph.nodes[graph.edges[role].dst].xyz
                chunks[role] = chunk_subgraphs(plans[role], dst_xyz, config.chunks)
        sharded_graph = ShardedGraphInputs(model.graph, plans, groups.model, chunks)
        model.graph = sharded_graph
    else:
        partition = None
    # ... and this rank's ensemble members
    if model.cfg.ensemble:
        apply_ensemble_parallel(model, groups.ensemble, config.noise_seed, groups.data_rank)

    # 4. activation checkpoint policies (chunked mappers recompute whatever the policy)
    recompute = []
    for role, block, layer in _blocks(model):
        policy = model.cfg.block_policy(role, layer)
        block.recompute_mlp = policy == "mlp"
        if policy == "full":
            recompute.append(block)
    runner = ParallelRunner(recompute, config, groups, partition, sharded_graph, imbalance)

    # 5. torch.compile of blocks that run on one set of destinations (the whole graph, or this
    # rank's part of it without overlap or chunks: one shape per block, as on one device)
    if model.cfg.compile:
        if config.chunks > 1 or (sharded and config.overlap):
            log.warning("model.compile has no effect on chunked blocks or with parallel.overlap: "
                        "each block runs on several subsets of its destinations, outside "
                        "torch.compile")  # fmt: skip
        elif config.shard_parameters and groups.world is not None and recompute:
            # a compiled FSDP block recomputed by torch.utils.checkpoint saves other tensors in
            # the recompute than in its forward, which checkpoint refuses (torch 2.13, gloo and
            # CPU); the ``mlp`` policy recomputes inside the compiled block and is unaffected
            log.warning("model.compile with parallel.shard_parameters: the %d blocks with the "
                        "'full' checkpoint policy run eagerly (use 'mlp' to compile them)",
                        len(recompute))  # fmt: skip
            for _, block, _ in _blocks(model):
                if block not in recompute:
                    block.compile(dynamic=False)
        else:
            compile_blocks(model)
    model.runner = runner

    # 6. gradient synchronisation (and parameter sharding)
    if groups.world is not None:
        if sharded or config.shard_parameters or layout.ensemble > 1:
            # one starting point everywhere, as DDP does: parameters and persistent buffers of
            # global rank 0 (the graph's buffers are built from the same file on every rank)
            with torch.no_grad():
                for t in model.state_dict().values():
                    dist.broadcast(t, src=0, group=groups.world)
        if config.shard_parameters:
            # sharded over the world; reduce-scattered: sum over the model and ensemble groups,
            # average over data-parallel replicas
            blocks = [block for _, block, _ in _blocks(model)]
            # a communicator of its own: gathers and reduce-scatters do not queue behind the
            # halo exchanges of the model group (the world itself when data_parallel is 1)
            shard_group = dist.new_group(list(range(layout.world_size)))
            shard_parameters(model, blocks, shard_group, layout.data_parallel,
                             config.param_dtype)  # fmt: skip
        elif sharded or layout.ensemble > 1:
            # sum over the model and ensemble groups, average over data-parallel replicas; with
            # buckets on a communicator of its own: on the world's (the model group's when
            # data_parallel is 1), one NCCL stream, a reverse halo exchange of the backward
            # queues behind the buckets its layer has just launched (two H200, o320_l7, shared
            # communicator: 190-840 us per reverse exchange against 25-30 us per forward one
            # moving the same rows; profiling/results/parallel_fastpath.md)
            reduce_group = groups.world
            if config.grad_bucket_mb > 0:
                reduce_group = dist.new_group(list(range(layout.world_size)))
            runner.grad_reducer = GradReducer(model, reduce_group, layout.data_parallel,
                                              config.grad_bucket_mb)  # fmt: skip
        else:  # DDP broadcasts rank 0's parameters and buffers itself
            from torch.distributed._composable.replicate import replicate

            device = next(model.parameters()).device
            replicate(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _blocks(model: GraphForecaster):
    """``(role, block, layer)`` of every block (``layer``: index within its role)."""
    yield "encoder", model.encoder, 0
    for i, block in enumerate(model.processor):
        yield "processor", block, i
    yield "decoder", model.decoder, 0


def single_process_groups() -> ProcessGroups:
    """Groups of this process alone (no communication), whatever the default group is."""
    return ProcessGroups(Layout(1, 1), 0, None, None, None)


def apply_parallelism(model: GraphForecaster, graph: Graph, setup: ParallelSetup | None,
                      device: torch.device) -> tuple[GraphForecaster, nn.Module | None]:  # fmt: skip
    """Make ``model`` run across the ranks of ``setup`` through :func:`parallelize` (``None``:
    this process alone).

    Returns
    -------
    (model, wrapped)
        ``model``, parallelized in place, and ``None``: no wrapper, the training step calls
        ``model`` (kept for callers that accept a wrapping module). Gradients of every replica of
        a parameter are averaged whenever the world has more than one rank.
    """
    del device  # the model's own device; kept for callers
    if setup is None:
        return parallelize(model, graph, ParallelConfig(), single_process_groups()), None
    return parallelize(model, graph, setup.config, setup.groups), None


@dataclass(frozen=True, eq=False)
class ParallelSetup:
    """What a run needs before building its datasets and model (see :func:`prepare_parallel`).

    Attributes
    ----------
    config : ParallelConfig
    groups : ProcessGroups
    grid_indices : numpy.ndarray or None
        This rank's grid points (the datasets' ``grid_indices``); ``None``: the whole grid.
    """

    config: ParallelConfig
    groups: ProcessGroups
    grid_indices: object

    @property
    def model_parallel(self) -> bool:
        return self.config.model_parallel > 1

    @property
    def data_parallel_rank(self) -> int:
        """Replica index for the data sampler (ranks of one model group read the same samples)."""
        return self.groups.data_rank

    @property
    def data_parallel_size(self) -> int:
        return self.groups.layout.data_parallel


def prepare_parallel(cfg, graph: Graph) -> ParallelSetup:
    """Process groups and this rank's grid points, from ``cfg.parallel`` and ``cfg.model``.

    Call after ``init_distributed`` (or in a single process) and before building the datasets;
    then build the model, move it to its device and call :func:`apply_parallelism` (or
    :func:`parallelize` with ``setup.config`` and ``setup.groups``).
    """
    pcfg = ParallelConfig.from_cfg(cfg.get("parallel"))
    if pcfg.shard_parameters and _computes_in_bf16(cfg.get("training")):
        pcfg = replace(pcfg, param_dtype="bf16")
    world = dist.get_world_size() if dist.is_initialized() else 1
    seed = int(cfg.training.seed) if cfg.get("training") is not None else 0
    pcfg = replace(pcfg, noise_seed=seed)
    groups = build_groups(Layout(world, pcfg.model_parallel, pcfg.ensemble))
    grid = None
    if pcfg.model_parallel > 1:
        layers = int(cfg.model.processor_layers)
        grid = local_grid_indices(graph, pcfg, groups.model_rank, layers)
    return ParallelSetup(pcfg, groups, grid)


def _computes_in_bf16(training) -> bool:
    """Whether the trainer autocasts to bf16: ``precision`` bf16, or auto on a CUDA device (as
    :class:`squall.train.loop.Trainer` and ``training.device`` decide)."""
    if training is None:
        return False
    precision = str(training.get("precision", "fp32"))
    if precision != "auto":
        return precision == "bf16"
    device = str(training.get("device", "auto"))
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def reduce_loss(loss: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """The global loss (for logging) from each rank's share: sum over the model group, mean over
    the ensemble group (each of its ranks scores all members) and the data-parallel replicas. One
    all-reduce; call it where the value is synchronised anyway."""
    if groups.world is None:
        return loss.detach()
    layout = groups.layout
    return all_reduce_sum(loss, groups.world) / (layout.data_parallel * layout.ensemble)


def model_rank_of(model) -> int:
    """Part of the graph ``model`` computes (0 for a model that is not sharded)."""
    runner = getattr(model, "runner", None)
    return runner.model_rank if isinstance(runner, ParallelRunner) else 0


def gather(model, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Full-grid output from every model rank's rows of ``y`` (``y`` itself when ``model`` is not
    sharded); see :meth:`ParallelRunner.gather`."""
    runner = getattr(model, "runner", None)
    return runner.gather(y, dim) if isinstance(runner, ParallelRunner) else y


__all__ = [
    "GradReducer", "LocalEdges", "ParallelConfig", "ParallelRunner", "ParallelSetup",
    "ShardedGraphInputs", "apply_parallelism", "gather", "local_grid_indices", "make_partition",
    "model_rank_of", "parallelize", "prepare_parallel", "reduce_loss", "single_process_groups",
]  # fmt: skip

"""Scaling model: seconds per step and peak memory per rank for P GPUs on N nodes, before the
allocation is spent.

Inputs
------
* a **calibration** (:class:`Calibration`): one measured single-GPU step of a model on a graph
  (its step time, and the processor's share when the run measured it), from the committed
  results (``profiling/results/step.csv``, ``parallel_runs/*/time_1.json``) or an MLflow run;
* the **graph** to project, cut by the real partition (:func:`squall.parallel.partition.
  partition_graph`, the run's method and weights) for every model-parallel degree up to
  ``exact_parts``; beyond, a surface-to-volume extrapolation (see :func:`extrapolate_sizes`);
* the **cluster** (:class:`ClusterSpec`, ``conf/cluster/*.yaml``): GPUs per node, device memory,
  NVLink and network bandwidth per GPU, message latencies, measured HBM rate.

Step time of a layout (``model_parallel`` M x ``data_parallel`` D, optional parameter sharding),
no overlap of communication with compute assumed (as the runs measure today)::

    t = fixed + max over model ranks (compute_r + halo_r + host_r) + gradient sync + optimizer
        + member gather

* ``compute_r``: the rank's training FLOPs (forward x 3 plus what its checkpoint plan recomputes,
  :func:`squall.layers.graph_transformer.block_flops` on the rank's own destination rows, local
  source rows and edges) at the calibration's FLOP rate, processor and mappers apart. Blocks that
  run eager where the calibration was compiled take :data:`EAGER_OVER_COMPILED` longer.
* ``halo_r``: every halo exchange of the step (each edge-set use once forward, once backward),
  each ``exchange latency + peers x peer latency + bytes / link``, with the bytes each rank sends
  and receives to ranks of its own node over NVLink and to other nodes over the network.
* gradient sync: one all-reduce of the fp32 gradients over every replica of a parameter (all
  ``M x D`` ranks hold every parameter); with sharding, an all-gather of bf16 parameters in
  forward and again in backward and a reduce-scatter of fp32 gradients (FSDP); ring bandwidth
  term ``(W - 1) / W`` per pass, latency per tree step.
* optimizer: fused AdamW reads parameters, gradients and both moments and writes three of them
  (28 B per fp32 parameter held) at the measured HBM rate.
* ``host_r`` (when the calibration measured the host, :class:`HostTimes`): the device runs a
  phase (forward; backward) no faster than the host launches it. The host's time of a phase is
  the calibration model's (scaled by the block count; any graph: eager kernels are the same)
  plus each halo exchange's launches; what exceeds the phase's device time (compute and
  exchanges) is waited for. This is what stops a small graph from scaling: its rank's device
  work falls as 1/P, the host's does not.
* member gather (ensemble models, ``ensemble`` ranks per sample): one ring all-gather of the
  members' outputs on the rank's grid part per rollout step.

Peak memory per rank: :mod:`squall.planning.estimate` on the largest rank: what it holds for
the whole step (parameters and AdamW moments, a ``1 / world`` share of them with sharding; the
gradient buckets in flight; its part of the graph; the batch) plus the largest, over the phases
of the step (:func:`~squall.planning.estimate.step_phases`: end of forward, each block's
backward in reverse order, optimizer), of what the step adds in that phase: the activations of
the checkpoint plan still kept, the block's transient, the gradients so far and autocast's bf16
weight copies. A memory budget picks the checkpoint plan
(:func:`~squall.planning.estimate.plan_checkpointing`), whose recomputation then costs time.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from squall.errors import ConfigError
from squall.graphs import Graph
from squall.layers.graph_transformer import block_flops
from squall.models.forecaster import ROLES, GraphForecaster, ModelConfig
from squall.parallel.parallelize import ParallelConfig
from squall.parallel.partition import partition_graph
from squall.planning.estimate import (
    GIB,
    PLAN_HEADROOM_GIB,
    SCORE_FP32_COPIES,
    ModelSizes,
    activation_bytes,
    estimate,
    input_bytes,
    plan_checkpointing,
    state_bytes,
    step_phases,
)

# Eager blocks against compiled ones, same card, kernels and plan: 212.8 / 183.3 ms (H100, o96_l6,
# 1024 channels, no checkpointing, git 3ae6303, profiling/results/step.csv). Chunked blocks, and
# model-parallel ones with overlap, run eager (squall.planning.estimate).
EAGER_OVER_COMPILED = 212.8 / 183.3
# Fused AdamW per fp32 parameter: reads parameter, gradient and two moments, writes parameter
# and two moments (7 x 4 B).
ADAMW_BYTES_PER_PARAM = 28
# Model-parallel degrees cut by the real partition by default; beyond, extrapolated. Cutting
# o1280_l8 (35 M edges) into 64 parts and counting its halo took 29 s on this project's 2-core
# CPU machine under load (2026-11-30); 1 to 64 parts of both curves about 3 minutes.
EXACT_PARTS = 64
# Kernel launches one halo exchange adds on a rank of a model group (forward: the send rows'
# gather and copy, the NCCL all-to-all, the received rows' copy; backward: the reverse and one
# index-add per peer), when no two-rank profile_launch run counted them: o96_l6 at P=2 on two
# H200, 2,408 launches per step against 1,987 at P=1 over 36 exchanges (git 58172ae,
# profiling/results/scaling_model_runs/h200x2_20261201).
EXCHANGE_LAUNCHES = 11.7


# ----------------------------------------------------------------------------------------------
# cluster


@dataclass(frozen=True)
class ClusterSpec:
    """What the model needs of a cluster (``conf/cluster/*.yaml``: ``links`` and ``rates``).

    Bandwidths are per GPU and direction, bytes per second; latencies in seconds.
    """

    name: str
    gpus_per_node: int
    memory_gib: float | None
    nvlink_Bps: float
    network_Bps: float
    exchange_latency_s: float
    peer_latency_s: float
    collective_latency_s: float
    hbm_Bps: float

    @classmethod
    def from_cfg(cls, cluster) -> ClusterSpec:
        """From the ``cluster`` config node (or a plain dict); a one-line error names a missing
        key."""
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        if not isinstance(cluster, DictConfig):
            cluster = OmegaConf.create(cluster)

        def get(path):
            try:
                node = OmegaConf.select(cluster, path, throw_on_missing=True)
            except MissingMandatoryValue:
                node = None
            if node is None:
                name = OmegaConf.select(cluster, "name", default="?", throw_on_missing=False)
                raise ConfigError(f"cluster {name}: cluster.{path} is not set; the scaling "
                                  "model needs it (see conf/cluster/base/slurm_gpu.yaml)")  # fmt: skip
            return node

        memory = OmegaConf.select(cluster, "gpu_memory_gb", throw_on_missing=False)
        memory = None if memory in (None, "???") else memory
        return cls(
            name=str(get("name")),
            gpus_per_node=int(get("gpus_per_node")),
            memory_gib=None if memory is None else float(memory) * 1e9 / GIB,
            nvlink_Bps=float(get("links.nvlink_GBps")) * 1e9,
            network_Bps=float(get("links.network_GBps")) * 1e9,
            exchange_latency_s=float(get("links.exchange_latency_us")) * 1e-6,
            peer_latency_s=float(get("links.peer_latency_us")) * 1e-6,
            collective_latency_s=float(get("links.collective_latency_us")) * 1e-6,
            hbm_Bps=float(get("rates.hbm_GBps")) * 1e9,
        )


# ----------------------------------------------------------------------------------------------
# per-rank sizes of a partition


@dataclass(frozen=True)
class PartSizes:
    """Per-rank counts of one model group of ``parts`` ranks (arrays ``[parts]``).

    ``rows``: owned ``data`` and ``mesh`` rows and local source rows per edge set
    (``src_<role>``: owned plus halo, as :mod:`squall.planning.estimate` counts them); ``edges``
    per edge set; ``send`` / ``recv``: halo rows sent and received per edge set and exchange,
    ``[parts, 2]`` (to/from ranks on the same node, on other nodes); ``peers``: ranks exchanged
    with per edge set. ``exact``: from the real partition (False: extrapolated).
    """

    parts: int
    rows: dict[str, np.ndarray]
    edges: dict[str, np.ndarray]
    send: dict[str, np.ndarray]
    recv: dict[str, np.ndarray]
    peers: dict[str, np.ndarray]
    exact: bool = True

    def largest(self) -> tuple[dict, dict]:
        """Rows and edges of the largest rank in each count (what memory must hold)."""
        return ({k: int(v.max()) for k, v in self.rows.items()},
                {k: int(v.max()) for k, v in self.edges.items()})  # fmt: skip


def _mesh_name(graph: Graph) -> str:
    return graph.edges["processor"].dst


def partition_sizes(graph: Graph, parts: int, layers: int, method: str = "sfc",
                    gpus_per_node: int | None = None) -> PartSizes:  # fmt: skip
    """Sizes of every rank under the run's partition (:func:`partition_graph` with the
    processor's edges weighing ``layers``, as ``squall.parallel.parallelize`` cuts it).

    Halo rows are the unique (receiving rank, source node) pairs of edges that cross parts: the
    rows each rank's halo plan receives (:func:`squall.parallel.halo.build_halo_plans`). Ranks
    ``r`` and ``q`` of the group share a node when ``r // gpus_per_node == q // gpus_per_node``
    (model ranks are consecutive global ranks; None: one node).
    """
    part = partition_graph(graph, parts, method, edge_weights={"processor": layers})
    node_of = np.arange(parts) // (gpus_per_node or parts)
    mesh = _mesh_name(graph)
    dst_set = {"encoder": mesh, "processor": mesh, "decoder": graph.edges["decoder"].dst}
    rows = {"data": part.counts(dst_set["decoder"]), "mesh": part.counts(mesh)}
    edges, send, recv, peers = {}, {}, {}, {}
    for role in ROLES:
        e = graph.edges[role]
        dst_owner = part.owner[e.dst][e.dst_index]
        src_owner = part.owner[e.src][e.row]
        edges[role] = np.bincount(dst_owner, minlength=parts)
        remote = dst_owner != src_owner
        pairs = np.unique(dst_owner[remote].astype(np.int64) * e.num_src + e.row[remote])
        receiver = pairs // e.num_src
        sender = part.owner[e.src][pairs % e.num_src].astype(np.int64)
        links = np.bincount(receiver * parts + sender, minlength=parts * parts)
        links = links.reshape(parts, parts)  # [receiver, sender] rows
        same = node_of[:, None] == node_of[None, :]
        recv[role] = np.stack([(links * same).sum(1), (links * ~same).sum(1)], 1)
        send[role] = np.stack([(links * same).sum(0), (links * ~same).sum(0)], 1)
        peers[role] = ((links + links.T) > 0).sum(1)
        rows[f"src_{role}"] = part.counts(e.src) + recv[role].sum(1)
    return PartSizes(parts, rows, edges, send, recv, peers)


def extrapolate_sizes(base: PartSizes, parts: int, gpus_per_node: int | None) -> PartSizes:
    """Sizes at ``parts`` ranks from a real partition into ``base.parts`` (fewer) ranks.

    Surface to volume on the sphere: a part's owned rows and edges fall as ``1 / P`` (the
    imbalance of ``base`` kept), its halo as the perimeter of its patch, ``sqrt(1 / P)``, capped
    at its edge count (every edge reading a remote source). Peers stay those of ``base`` (a patch
    of a 2-D cut keeps its few neighbours); the share of halo rows crossing nodes is ``base``'s
    when ``base`` spanned several nodes, else every row crosses when the group does.
    This is an extrapolation, not a partition: it misses the mesh's coarse long edges becoming
    a larger share of a small patch's halo.
    """
    if parts <= base.parts:
        raise ValueError(f"extrapolate to {parts} parts from {base.parts}: use the partition")
    s = base.parts / parts
    spans = gpus_per_node is not None and parts > gpus_per_node
    rows = {"data": np.array([math.ceil(base.rows["data"].max() * s)]),
            "mesh": np.array([math.ceil(base.rows["mesh"].max() * s)])}  # fmt: skip
    edges, send, recv, peers = {}, {}, {}, {}
    for role in ROLES:
        edges[role] = np.array([math.ceil(base.edges[role].max() * s)])
        for out, src in ((send, base.send[role]), (recv, base.recv[role])):
            total = src.sum(1)
            worst = int(total.argmax())
            rows_r = min(math.ceil(total[worst] * math.sqrt(s)), int(edges[role][0]))
            if not spans:
                share = 0.0
            elif base.parts > (gpus_per_node or base.parts):
                share = src[:, 1].sum() / max(src.sum(), 1)
            else:
                share = 1.0
            out[role] = np.array([[rows_r - round(rows_r * share), round(rows_r * share)]])
        peers[role] = np.array([min(int(base.peers[role].max()), parts - 1)])
        owned_src = (
            rows["mesh"][0]
            if role != "encoder"
            else math.ceil((base.rows["src_encoder"] - base.recv["encoder"].sum(1)).max() * s)
        )
        rows[f"src_{role}"] = np.array([owned_src + recv[role][0].sum()])
    return PartSizes(parts, rows, edges, send, recv, peers, exact=False)


class GraphSizes:
    """Per-rank sizes of one graph for any model-parallel degree, computed once per degree:
    the real partition up to ``exact_parts``, :func:`extrapolate_sizes` from the largest real
    one beyond."""

    def __init__(self, graph: Graph, layers: int, gpus_per_node: int | None,
                 method: str = "sfc", exact_parts: int = EXACT_PARTS) -> None:  # fmt: skip
        self.graph, self.layers, self.method = graph, layers, method
        self.gpus_per_node, self.exact_parts = gpus_per_node, exact_parts
        self.smallest_set = min(len(n) for n in graph.nodes.values())
        self._cache: dict[int, PartSizes] = {}

    def __call__(self, parts: int) -> PartSizes:
        if parts not in self._cache:
            limit = min(self.exact_parts, self.smallest_set)
            if parts <= limit:
                self._cache[parts] = partition_sizes(self.graph, parts, self.layers, self.method,
                                                     self.gpus_per_node)  # fmt: skip
            else:
                base = 1 << int(math.log2(limit))
                self._cache[parts] = extrapolate_sizes(self(base), parts, self.gpus_per_node)
        return self._cache[parts]


# ----------------------------------------------------------------------------------------------
# work


def edge_dims(model: GraphForecaster) -> dict[str, int]:
    """Edge feature width of each edge set's projection."""
    return {"encoder": model.encoder.edge_weight.shape[0],
            "processor": model.processor[0].edge_weight.shape[0],
            "decoder": model.decoder.edge_weight.shape[0]}  # fmt: skip


def training_flops(mcfg: ModelConfig, rows: dict, edges: dict, dims: dict,
                   batch: int = 1) -> dict[str, float]:  # fmt: skip
    """Training FLOPs of one rank per step, ``{"processor": ..., "mappers": ...}``: every block's
    forward three times (forward, and backward at twice the forward) plus what its checkpoint
    policy recomputes (``full``: its forward; ``mlp``: its first MLP product, as
    :func:`squall.planning.estimate.recompute_flops` counts). ``forward_processor`` and
    ``forward_mappers``: the forward pass's share of each."""
    c, ratio = mcfg.num_channels, mcfg.mlp_ratio
    dst = {"encoder": rows["mesh"], "processor": rows["mesh"], "decoder": rows["data"]}
    out = {"processor": 0.0, "mappers": 0.0, "forward_processor": 0.0, "forward_mappers": 0.0}
    blocks = [("encoder", 0), *(("processor", i) for i in range(mcfg.processor_layers)),
              ("decoder", 0)]  # fmt: skip
    for role, layer in blocks:
        fwd = block_flops(c, ratio, dims[role], rows[f"src_{role}"], dst[role], edges[role])
        policy = mcfg.block_policy(role, layer)
        extra = fwd if policy == "full" else 2 * c * ratio * c * dst[role] if policy == "mlp" else 0
        key = "processor" if role == "processor" else "mappers"
        out[key] += batch * (3 * fwd + extra)
        out[f"forward_{key}"] += batch * fwd
    return out


def _model_facts(graph: Graph, mcfg: ModelConfig, num_vars: tuple[int, int],
                 input_steps: int) -> tuple[int, ModelSizes, dict]:  # fmt: skip
    """Parameters, the sizes a step's memory depends on (:class:`~squall.planning.estimate.
    ModelSizes`), and edge feature widths (meta device)."""
    with torch.device("meta"):
        model = GraphForecaster(graph, mcfg, num_vars[0], num_vars[1], input_steps)
    return model.num_parameters(), ModelSizes.of(model, graph), edge_dims(model)


def whole_graph_sizes(graph: Graph) -> tuple[dict, dict]:
    """Rows and edges of one rank holding the whole graph."""
    mesh = _mesh_name(graph)
    rows = {"data": len(graph.nodes[graph.edges["decoder"].dst]), "mesh": len(graph.nodes[mesh])}
    rows.update({f"src_{r}": len(graph.nodes[graph.edges[r].src]) for r in ROLES})
    return rows, {r: graph.edges[r].num_edges for r in ROLES}


# ----------------------------------------------------------------------------------------------
# calibration


def parse_checkpoint_plan(text: str, layers: int) -> dict:
    """``"encoder full, processor 13 mlp, 3 full, decoder full"`` (bench_step's description) ->
    ModelConfig checkpoint fields."""
    try:
        enc, rest = text.split("encoder ", 1)[1].split(",", 1)
        proc, dec = rest.split("decoder ", 1)
        counts = [p.split() for p in proc.replace("processor", "").split(",") if p.strip()]
        per_layer = tuple(pol for n, pol in counts for _ in range(int(n)))
    except (IndexError, ValueError) as err:
        raise ConfigError(f"cannot read checkpoint plan {text!r}") from err
    if len(per_layer) != layers:
        raise ConfigError(f"checkpoint plan {text!r} names {len(per_layer)} of {layers} layers")
    return {"checkpoint_encoder": enc.strip(), "checkpoint_processor": per_layer,
            "checkpoint_decoder": dec.strip().rstrip(",")}  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """One measured single-GPU training step: what the model's FLOP rates come from.

    Attributes
    ----------
    source : str
        Where it was read (file and row, or MLflow run).
    gpu, graph : str
        Device name and graph name of the run.
    mcfg : ModelConfig
        Model as it ran (checkpoint plan resolved, compile flag).
    batch : int
        Samples per step.
    step_s : float
        Median step time.
    processor_s : float or None
        Forward + backward of the processor layers alone, when measured (then the mappers get
        their own rate).
    peak_gib : float or None
        Peak allocated memory of the run (compared, never used to predict).
    fixed_s : float
        Per-step time that does not scale with the graph (0 unless the run measured it).
    num_vars, input_steps : tuple of int, int
        Model inputs (the parameter count).
    host : HostTimes or None
        The host's time per step of the same model, when measured.
    """

    source: str
    gpu: str
    graph: str
    mcfg: ModelConfig
    batch: int
    step_s: float
    processor_s: float | None = None
    peak_gib: float | None = None
    fixed_s: float = 0.0
    num_vars: tuple[int, int] = (100, 100)
    input_steps: int = 2
    host: HostTimes | None = None


@dataclass(frozen=True)
class HostTimes:
    """What launching a step costs, beside its arithmetic: the host's time (Python, the autograd
    engine, one call per kernel) and the device's least time per kernel
    (``profiling/profile_launch.py``).

    An eager step launches the same kernels on any graph, so both are the model's, not the
    graph's. The host's time is read where the host ran ahead of the device (the calibration
    graph's step: the host's clock per phase, no synchronisation); the least time per kernel on
    the same model on a graph so small that every kernel ends before the next is launched. A
    rank of a model group launches more: each halo exchange's packing, NCCL call and unpacking
    (:attr:`exchange_launches`, at the step's host time per launch).

    Attributes
    ----------
    forward_s, backward_s : float
        Host time of the forward (with the loss) and of the backward (with the optimizer step).
    blocks : int
        Blocks of the measured model (encoder, processor layers, decoder): launches and host
        time scale with the block count.
    launches, forward_launches : int
        Kernel launches per step (all; forward and loss) on the calibration graph.
    exchange_launches : float
        Launches one halo exchange adds on a rank, counted at two ranks.
    kernel_s : float
        Device time per kernel launched when the kernels have (almost) no data: the part of a
        step that does not shrink when a rank's share of the graph does.
    source : str
    """

    forward_s: float
    backward_s: float
    blocks: int
    launches: int
    forward_launches: int
    exchange_launches: float
    kernel_s: float
    source: str

    @property
    def per_launch_s(self) -> float:
        return (self.forward_s + self.backward_s) / self.launches

    @property
    def exchange_s(self) -> float:
        return self.exchange_launches * self.per_launch_s


def _select(rows: list[dict], query: dict, source: str) -> dict:
    found = [r for r in rows if all(str(r.get(k, "")) == v for k, v in query.items())]
    if len(found) != 1:
        keys = sorted({k for r in rows for k in ("git", "graph", "gpu", "checkpoint", "compile")})
        have = ["&".join(f"{k}={r.get(k, '')}" for k in keys) for r in rows]
        raise ConfigError(f"calibration {source}: {len(found)} rows match {query}, need one; "
                          f"rows: {'; '.join(have)}")  # fmt: skip
    return found[0]


def load_calibration(spec: str) -> Calibration:
    """Read a calibration named by ``spec``.

    * ``path/step.csv?git=eee58d7&graph=o96_l6&checkpoint=budget:14.1``: the one row of a
      ``profiling/bench_step.py`` CSV matching every ``key=value`` (checkpoint plan, compile,
      processor time and peak from the row; 1024-channel columns as written);
    * ``path/time_1.json``: a one-GPU ``profiling/bench_parallel.py time`` result;
    * ``path/launch_1.json``: a one-GPU ``profiling/profile_launch.py`` run (host times too);
    * any of them ``?host=path/launch_1.json``: with the host times of that run
      (:func:`load_host_times`; a relative path is the repository's);
    * ``mlflow:<run id>[@<tracking uri>]``: a one-GPU scaling point or training run in MLflow
      (``time/step_s``, ``memory/peak_allocated_GiB``, model and graph from its parameters).
    """
    if spec.startswith("mlflow:"):
        return _calibration_from_mlflow(spec[len("mlflow:") :])
    path, _, query = spec.partition("?")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration {spec!r}: no file {path}")
    params = dict(parse_qsl(query))
    if "host" in params:  # the host times of the same model, from a profile_launch run
        host = params.pop("host")
        if not Path(host).is_absolute():  # relative to the repository, as cluster configs
            host = str(REPO_ROOT / host)
        rest = "&".join(f"{k}={v}" for k, v in params.items())
        return replace(load_calibration(path + (f"?{rest}" if rest else "")),
                       host=load_host_times(host))  # fmt: skip
    if p.suffix == ".json" and p.name.startswith("launch_"):
        return _calibration_from_launch(p)
    if p.suffix == ".json":
        r = json.loads(p.read_text())
        if r.get("gpus") != 1:
            raise ConfigError(f"calibration {spec!r}: a one-GPU run is needed, this has "
                              f"{r.get('gpus')} GPUs")  # fmt: skip
        ckpt = "full" if r["checkpoint"] else "none"
        rank = r["ranks"][0]
        if not rank["rows"]:
            raise ConfigError(f"calibration {spec!r}: the run has no timed rows")
        # one GPU exchanges nothing: overlap makes no difference, any row is the step
        row = rank["rows"][0]
        mcfg = ModelConfig(num_channels=r["channels"], num_heads=r["heads"],
                           processor_layers=r["layers"], mlp_ratio=4, trainable_edge_features=8,
                           attention_backend=r["backend"], checkpoint_encoder=ckpt,
                           checkpoint_processor=ckpt, checkpoint_decoder=ckpt,
                           compile=bool(r.get("compile", False)))  # fmt: skip
        # runs that split the step measure the loss and the host time the device stood idle:
        # fixed per-step work that does not shrink with P (the optimizer is modelled apart)
        fixed = row.get("loss_s", 0.0) + row.get("host_s", 0.0)
        return Calibration(f"{p} (git {r['info']['git']})", r["info"]["gpu"], r["graph"], mcfg,
                           r["batch"], row["s_per_step"], None, row["peak_GiB"], fixed)  # fmt: skip
    with p.open() as f:
        rows = list(csv.DictReader(f))
    r = _select(rows, params, spec)
    layers = int(r["layers"])
    plan = r.get("checkpoint_plan") or ""
    ck = r["checkpoint"]
    if plan:
        fields = parse_checkpoint_plan(plan, layers)
    else:
        pol = "full" if ck in ("True", "on") else "none"
        fields = {"checkpoint_encoder": pol, "checkpoint_processor": pol, "checkpoint_decoder": pol}
    mcfg = ModelConfig(num_channels=int(r["channels"]), num_heads=int(r["heads"]),
                       processor_layers=layers, mlp_ratio=4, trainable_edge_features=8,
                       attention_backend=r["backend"], compile=r.get("compile") == "True",
                       **fields)  # fmt: skip
    proc = r.get("processor_ms_median")
    vars_ = int(r.get("vars") or 100)
    return Calibration(f"{p} ({query})", r["gpu"], r["graph"], mcfg, 1,
                       float(r["step_ms_median"]) / 1e3, float(proc) / 1e3 if proc else None,
                       float(r["peak_GiB"]), 0.0, (vars_, vars_))  # fmt: skip


def _launch_run(path: Path) -> dict:
    r = json.loads(path.read_text())
    if r.get("gpus") != 1 or not r.get("graphs"):
        raise ConfigError(f"calibration {path}: a one-GPU profile_launch run is needed (gpus="
                          f"{r.get('gpus')})")  # fmt: skip
    return r


def load_host_times(path: str | Path) -> HostTimes:
    """:class:`HostTimes` from a one-GPU ``profiling/profile_launch.py`` run (``launch_1.json``:
    the calibration graph first, the small graph last). The launches one halo exchange adds are
    counted from the two-rank run beside it (``launch_2.json``) when there is one, else
    :data:`EXCHANGE_LAUNCHES`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"host times: no file {path}")
    r = _launch_run(path)
    names = list(r["graphs"])
    if len(names) < 2:
        raise ConfigError(f"host times {path}: the run has no small graph (profile_launch "
                          "--host-graph)")  # fmt: skip
    main = r["graphs"][names[0]][0]
    tiny = r["graphs"][names[-1]][0]["trace"]["real"]
    counts = main["trace"]["real"]["launches"]
    launches = sum(counts.values())
    exchange = EXCHANGE_LAUNCHES
    two = path.with_name("launch_2.json")
    if two.is_file():
        r2 = json.loads(two.read_text())
        if names[0] in r2.get("graphs", {}):
            more = max(sum(k["trace"]["real"]["launches"].values()) for k in r2["graphs"][names[0]])
            exchange = (more - launches) / (2 * (r["layers"] + 2))
    t = main["real"]
    return HostTimes(t["host_forward"] + t["host_loss"], t["host_backward"] + t["host_optimizer"],
                     r["layers"] + 2, launches, counts["forward"] + counts["loss"], exchange,
                     tiny["busy_union_s"] / tiny["kernels"],
                     f"{path} (git {r['info']['git']}, small graph {names[-1]})")  # fmt: skip


def _calibration_from_launch(path: Path) -> Calibration:
    """A one-GPU ``profiling/profile_launch.py`` run as a calibration, its host times included."""
    r = _launch_run(path)
    name = next(iter(r["graphs"]))
    rank = r["graphs"][name][0]
    row = rank["real"]
    ckpt = "full" if r["checkpoint"] else "none"
    mcfg = ModelConfig(num_channels=r["channels"], num_heads=r["heads"],
                       processor_layers=r["layers"], mlp_ratio=4, trainable_edge_features=8,
                       attention_backend=r["backend"], checkpoint_encoder=ckpt,
                       checkpoint_processor=ckpt, checkpoint_decoder=ckpt,
                       compile=bool(r.get("compile", False)))  # fmt: skip
    return Calibration(f"{path} (git {r['info']['git']})", r["info"]["gpu"], name, mcfg,
                       r["batch"], row["step_s"], None, rank["peak_GiB"], row["loss"],
                       host=load_host_times(path))  # fmt: skip


def _unflatten(params: dict, prefix: str) -> dict:
    """The nested config under ``prefix`` from MLflow's dotted string params (values parsed as
    YAML scalars and lists, ``None`` as null)."""
    import yaml

    out: dict = {}
    for key, text in params.items():
        if not key.startswith(prefix + "."):
            continue
        node = out
        *parents, leaf = key[len(prefix) + 1 :].split(".")
        for k in parents:
            node = node.setdefault(k, {})
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node[leaf] = None if value == "None" else value
    return out


def _calibration_from_mlflow(ref: str) -> Calibration:
    import mlflow

    from squall.tracking import metrics as m

    run_id, _, uri = ref.partition("@")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri or None)
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - any MLflow failure is one message
        raise ConfigError(f"calibration mlflow:{ref}: cannot read the run ({err})") from err
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    gpus = int(params.get("parallel.gpus") or params.get("parallel.model_parallel") or 1)
    if gpus != 1 or m.STEP_S not in metrics or "model.num_channels" not in params:
        raise ConfigError(f"calibration mlflow:{ref}: a one-GPU run with {m.STEP_S} and the model "
                          f"config is needed (gpus={gpus}, metrics {sorted(metrics)})")  # fmt: skip
    from omegaconf import OmegaConf

    mcfg = ModelConfig.from_cfg(OmegaConf.create(_unflatten(params, "model")))
    data = _unflatten(params, "data")
    variables = data.get("variables") or []
    num_vars = ((len(variables) - len(data.get("diagnostics") or []),
                 len(variables) - len(data.get("forcings") or [])) if variables else (100, 100))  # fmt: skip
    batch = params.get("scale.batch") or params.get("training.batch_size") or 1
    return Calibration(f"mlflow run {run_id}", tags.get("env.gpu_name", "?"),
                       params.get("graph.name", "?"), mcfg, int(batch), float(metrics[m.STEP_S]),
                       None, metrics.get(m.PEAK_ALLOCATED_GIB), 0.0, num_vars,
                       int(params.get("data.input_steps") or 2))  # fmt: skip


@dataclass(frozen=True)
class Rates:
    """FLOP rates (FLOP/s) of the processor and the mappers, and the calibration's own terms."""

    processor: float
    mappers: float
    compiled: bool
    optimizer_s: float
    fixed_s: float
    source: str
    host: HostTimes | None = None


def calibrate(cal: Calibration, graph: Graph, hbm_Bps: float) -> Rates:
    """FLOP rates of a calibration run on its own graph (``graph`` must be it): the step less
    its optimizer and fixed time, over the training FLOPs; processor and mappers apart when the
    processor was timed alone."""
    if graph.name != cal.graph:
        raise ConfigError(f"calibration {cal.source} ran on {cal.graph}, given graph {graph.name}")
    mcfg = cal.mcfg
    rows_batch = cal.batch * mcfg.ensemble_members  # an ensemble's members run as batch rows
    if mcfg.checkpoint_budget_gib is not None:  # the plan the run's planner chose
        mcfg = estimate(graph, mcfg, ParallelConfig(), 1, rows_batch, cal.num_vars,
                        cal.input_steps)[3]  # fmt: skip
    params, _, dims = _model_facts(graph, mcfg, cal.num_vars, cal.input_steps)
    rows, edges = whole_graph_sizes(graph)
    work = training_flops(mcfg, rows, edges, dims, rows_batch)
    opt = ADAMW_BYTES_PER_PARAM * params / hbm_Bps
    busy = cal.step_s - opt - cal.fixed_s
    if cal.host is not None:  # the kernels' least time does not scale with the work
        floor = cal.host.launches * (mcfg.processor_layers + 2) / cal.host.blocks
        floor *= cal.host.kernel_s
        if floor >= busy:
            raise ConfigError(f"calibration {cal.source}: its kernels' least time ({floor:.4f} "
                              f"s, {cal.host.source}) is not below the step's {busy:.4f} s")  # fmt: skip
        busy -= floor
    if cal.processor_s is not None and 0 < cal.processor_s < busy:
        proc, maps = work["processor"] / cal.processor_s, work["mappers"] / (busy - cal.processor_s)
    else:
        proc = maps = (work["processor"] + work["mappers"]) / busy
    return Rates(proc, maps, mcfg.compile, opt, cal.fixed_s, cal.source, cal.host)


# ----------------------------------------------------------------------------------------------
# projection


@dataclass(frozen=True)
class Projection:
    """Projected step of one layout (seconds, GiB per rank)."""

    gpus: int
    nodes: int
    model_parallel: int
    data_parallel: int
    shard: bool
    batch: int  # samples per model group per step
    compute_s: float
    halo_s: float
    grad_s: float
    optimizer_s: float
    fixed_s: float
    static_gib: float
    activation_gib: float
    plan: str
    exact: bool  # sizes from the real partition
    ensemble: int = 1  # ranks sharing the members of each sample
    members: int = 1  # ensemble members per sample (1: deterministic)
    member_s: float = 0.0  # the member all-gather of the score
    host_s: float = 0.0  # the device waiting for the host's launches (HostTimes)
    peak_phase: str = ""  # the phase of the step at its memory peak (estimate.step_phases)

    @property
    def step_s(self) -> float:
        return (self.fixed_s + self.compute_s + self.halo_s + self.grad_s + self.optimizer_s
                + self.member_s + self.host_s)  # fmt: skip

    @property
    def comm_s(self) -> float:
        return self.halo_s + self.grad_s + self.member_s

    @property
    def peak_gib(self) -> float:
        return self.static_gib + self.activation_gib

    @property
    def layout(self) -> str:
        ens = f"ens{self.ensemble}x" if self.ensemble > 1 else ""
        return (f"{ens}dp{self.data_parallel}xmp{self.model_parallel}"
                + ("+shard" if self.shard else ""))  # fmt: skip

    @property
    def samples_per_s(self) -> float:
        """Samples (of every member) per second."""
        return self.batch * self.data_parallel / self.step_s

    @property
    def member_samples_per_s(self) -> float:
        return self.samples_per_s * self.members


def _ring(bytes_: float, world: int, bw: float, latency: float) -> float:
    """One ring pass (all-gather or reduce-scatter) of ``bytes_`` over ``world`` ranks; an
    all-reduce is two."""
    if world <= 1:
        return 0.0
    return (world - 1) / world * bytes_ / bw + math.ceil(math.log2(world)) * latency


@dataclass
class ScalingModel:
    """Projections of one model on one graph and cluster (see the module docstring).

    Parameters
    ----------
    graph : Graph
    mcfg : ModelConfig
        The model; ``checkpoint_budget_gib`` (or ``budget_gib`` of :meth:`project`) chooses the
        checkpoint plan per layout, else its own policies are kept.
    rates : Rates
        From :func:`calibrate` (a run of the same model width and kernels).
    cluster : ClusterSpec
    partition : str
    act_bytes, rollout, num_vars, input_steps
        As :func:`squall.planning.estimate.estimate`.
    """

    graph: Graph
    mcfg: ModelConfig
    rates: Rates
    cluster: ClusterSpec
    partition: str = "sfc"
    act_bytes: int = 2
    rollout: int = 1
    num_vars: tuple[int, int] = (100, 100)
    input_steps: int = 2
    exact_parts: int = EXACT_PARTS
    sizes: GraphSizes = field(init=False)

    def __post_init__(self) -> None:
        self.params, self.model_sizes, self.dims = _model_facts(
            self.graph, self.mcfg, self.num_vars, self.input_steps
        )
        self._plans: dict = {}
        self.sizes = GraphSizes(self.graph, self.mcfg.processor_layers,
                                self.cluster.gpus_per_node, self.partition, self.exact_parts)  # fmt: skip

    def static_gib(self, world: int, shard: bool) -> float:
        """Parameters and AdamW state held by one rank for the whole step (with more than one
        rank unsharded, the gradient buckets in flight): :func:`~squall.planning.estimate.
        state_bytes`."""
        return state_bytes(self.params, world, shard) / GIB

    def _held_gib(self, gpus: int, model_parallel: int, shard: bool, batch: int,
                  rows: dict, edges: dict) -> float:  # fmt: skip
        """Everything a rank holds for the whole step: state, its part of the graph, the batch
        (``batch`` samples)."""
        return (
            self.static_gib(gpus, shard)
            + (
                self.model_sizes.graph_bytes(rows, edges, model_parallel)
                + input_bytes(batch, rows, self.num_vars, self.input_steps, self.rollout)
            )
            / GIB
        )

    def project(self, gpus: int, model_parallel: int, batch: int, shard: bool = False,
                budget_gib: float | None = None, ensemble: int = 1) -> Projection:  # fmt: skip
        """Step time and memory of ``gpus`` ranks as ``ensemble`` x ``model_parallel`` x
        ``gpus / (ensemble x model_parallel)``, ``batch`` samples per model group.

        An ensemble model (``mcfg.ensemble_members`` M) runs ``M / ensemble`` members of each
        sample per rank as batch rows; once per rollout step the ranks of an ensemble group
        all-gather their members' outputs on their grid part (ring; NVLink when the
        ``ensemble x model_parallel`` consecutive ranks share a node), and keep them for the
        score (:func:`squall.planning.estimate.estimate`).

        Raises :class:`~squall.errors.ConfigError` when the layout cannot be cut, or no
        checkpoint plan fits ``budget_gib`` (default ``mcfg.checkpoint_budget_gib``).
        """
        members = self.mcfg.ensemble_members
        if members % ensemble:
            raise ConfigError(f"model.ensemble.members={members} does not split over "
                              f"ensemble={ensemble} ranks")  # fmt: skip
        if gpus % (model_parallel * ensemble):
            raise ConfigError(f"{gpus} GPUs do not split into groups of ensemble={ensemble} x "
                              f"model_parallel={model_parallel}")  # fmt: skip
        samples, batch = batch, batch * (members // ensemble)  # batch: rows through the model
        if model_parallel > self.sizes.smallest_set:
            raise ConfigError(f"model_parallel={model_parallel} exceeds the smallest node set "
                              f"({self.sizes.smallest_set} nodes)")  # fmt: skip
        c = self.cluster
        dp = gpus // (model_parallel * ensemble)
        nodes = math.ceil(gpus / c.gpus_per_node)
        sizes = self.sizes(model_parallel)
        rows, edges = sizes.largest()
        static = self._held_gib(gpus, model_parallel, shard, samples, rows, edges)
        shards = gpus if shard and gpus > 1 else 1
        mcfg = self.mcfg
        # a rank's blocks run compiled on its part of the graph as on one device (no overlap,
        # no chunks: squall.parallel.parallelize)
        compiled = mcfg.compile
        budget = budget_gib if budget_gib is not None else mcfg.checkpoint_budget_gib
        if budget is not None:
            key = (round(static, 6), batch, model_parallel, compiled, budget)
            if key not in self._plans:
                try:
                    self._plans[key] = plan_checkpointing(
                        replace(mcfg, compile=compiled),
                        budget,
                        static,
                        batch,
                        rows,
                        edges,
                        self.dims,
                        self.act_bytes,
                        self.rollout,
                        sizes=self.model_sizes,
                        shard=shards,
                    )
                except ConfigError as err:
                    self._plans[key] = err
            if isinstance(self._plans[key], ConfigError):
                raise self._plans[key]
            mcfg = self._plans[key]
        phases = step_phases(replace(mcfg, compile=compiled), batch, rows, edges,
                             self.act_bytes, self.rollout, self.model_sizes, shards)  # fmt: skip
        peak_phase = max(phases, key=phases.get)
        act = phases[peak_phase] / GIB
        member = 0.0
        if members > 1:
            values = samples * rows["data"] * self.num_vars[1] * self.rollout
            act += members * values * (self.act_bytes + SCORE_FP32_COPIES * 4) / GIB
            inside = ensemble * model_parallel <= c.gpus_per_node
            member = _ring(members * values * self.act_bytes, ensemble,
                           c.nvlink_Bps if inside else c.network_Bps,
                           c.collective_latency_s)  # fmt: skip
        slow = EAGER_OVER_COMPILED if self.rates.compiled and not compiled else 1.0
        compute = 0.0
        uses = {"encoder": 1, "processor": mcfg.processor_layers, "decoder": 1}
        halo = 0.0
        row_bytes = batch * mcfg.num_channels * self.act_bytes
        host, waited = self.rates.host, 0.0
        for r in range(len(sizes.rows["data"])):  # one entry when extrapolated
            rr = {k: int(v[r]) for k, v in sizes.rows.items()}
            er = {k: int(v[r]) for k, v in sizes.edges.items()}
            w = training_flops(mcfg, rr, er, self.dims, batch * self.rollout)
            rate = self.rates
            t_c = slow * (w["processor"] / rate.processor + w["mappers"] / rate.mappers)
            t_f = slow * (w["forward_processor"] / rate.processor
                          + w["forward_mappers"] / rate.mappers)  # fmt: skip
            blocks = (mcfg.processor_layers + 2) * self.rollout / host.blocks if host else 0.0
            t_h, exchanges = 0.0, 0
            for role in ROLES:
                peers = int(sizes.peers[role][r])
                if not peers:
                    continue
                moved = np.maximum(sizes.send[role][r], sizes.recv[role][r]) * row_bytes
                wire = max(moved[0] / c.nvlink_Bps, moved[1] / c.network_Bps)
                # forward and backward (reverse) exchange of every use of the edge set
                per = c.exchange_latency_s + peers * c.peer_latency_s + wire
                t_h += 2 * uses[role] * self.rollout * per
                exchanges += uses[role] * self.rollout
            wait = 0.0
            if host is not None:
                # every kernel takes the device at least kernel_s, however small its share
                f_launch = host.forward_launches * blocks + exchanges * host.exchange_launches
                b_launch = (host.launches - host.forward_launches) * blocks + (
                    exchanges * host.exchange_launches)  # fmt: skip
                t_f += f_launch * host.kernel_s
                t_c += (f_launch + b_launch) * host.kernel_s
                # the device runs a phase no faster than the host launches it: per phase, the
                # host's time beyond the device's (kernels and exchanges) is waited for
                h_f = host.forward_s * blocks + exchanges * host.exchange_s
                h_b = host.backward_s * blocks + exchanges * host.exchange_s
                wait = max(0.0, h_f - t_f - t_h / 2) + max(0.0, h_b - (t_c - t_f) - t_h / 2)
            if t_c + t_h + wait > compute + halo + waited:
                compute, halo, waited = t_c, t_h, wait
        bw = c.nvlink_Bps if nodes == 1 else c.network_Bps
        lat = c.collective_latency_s
        if shard and gpus > 1:
            blocks = mcfg.processor_layers + 2
            grad = (2 * _ring(2 * self.params, gpus, bw, 0.0)  # bf16 gathers, forward + backward
                    + _ring(4 * self.params, gpus, bw, 0.0)  # fp32 reduce-scatter
                    + 3 * blocks * math.ceil(math.log2(gpus)) * lat)  # fmt: skip
            held = self.params / gpus
        else:
            grad = 2 * _ring(4 * self.params, gpus, bw, lat)
            held = self.params
        opt = ADAMW_BYTES_PER_PARAM * held / c.hbm_Bps
        from squall.planning.estimate import describe_checkpointing

        return Projection(gpus, nodes, model_parallel, dp, shard, samples, compute, halo, grad,
                          opt, self.rates.fixed_s, static, act,
                          describe_checkpointing(mcfg).removeprefix("checkpointing: "),
                          sizes.exact, ensemble, members, member, waited, peak_phase)  # fmt: skip

    def least_memory_gib(self, gpus: int, model_parallel: int, batch: int, shard: bool,
                         ensemble: int = 1) -> float:  # fmt: skip
        """Peak per rank of a layout with every block checkpointed (``full``): about the least a
        checkpoint plan needs (``batch`` samples, this rank's members as rows; the exact least:
        :func:`~squall.planning.estimate.smallest_plan`)."""
        rows, edges = self.sizes(model_parallel).largest()
        full = replace(self.mcfg, checkpoint_encoder="full", checkpoint_decoder="full",
                       checkpoint_processor="full", compile=False)  # fmt: skip
        act = activation_bytes(full, batch * (self.mcfg.ensemble_members // ensemble), rows,
                               edges, self.act_bytes, self.rollout, self.model_sizes,
                               gpus if shard and gpus > 1 else 1)  # fmt: skip
        return self._held_gib(gpus, model_parallel, shard, batch, rows, edges) + act / GIB

    def choose(self, gpus: int, batch: int, mode: str = "strong",
               budget_gib: float | None = None) -> tuple[Projection, list[Projection]]:  # fmt: skip
        """The layout of ``gpus`` ranks with the most samples per second that fits the budget.

        ``mode="strong"``: ``batch`` is the global batch, split over the data-parallel ranks
        (which must divide it), so the most samples per second is the shortest step;
        ``"weak"``: ``batch`` samples per model group. Candidates: every power-of-two
        model-parallel degree, with and without parameter sharding, and for an ensemble model
        every ensemble degree that divides its members; ties go to no sharding, then fewer
        model-parallel ranks, then fewer ensemble ranks. Returns the choice and every candidate
        that fits; raises :class:`ConfigError` when none does, naming the candidate that comes
        closest.
        """
        budget = budget_gib if budget_gib is not None else self.mcfg.checkpoint_budget_gib
        if budget is None:
            budget = self.cluster.memory_gib
        members = self.mcfg.ensemble_members
        fitting, closest = [], None
        for ens in (e for e in range(1, members + 1) if members % e == 0 and gpus % e == 0):
            mp = 1
            while mp <= min(gpus // ens, self.sizes.smallest_set):
                dp = gpus // (mp * ens)
                if gpus % (mp * ens) == 0 and (mode == "weak" or batch % dp == 0):
                    per_group = batch if mode == "weak" else batch // dp
                    for shard in (False, True) if gpus > 1 else (False,):
                        try:
                            fitting.append(self.project(gpus, mp, per_group, shard, budget, ens))
                        except ConfigError:
                            need = self.least_memory_gib(gpus, mp, per_group, shard, ens)
                            name = (f"{f'ens{ens}x' if ens > 1 else ''}dp{dp}xmp{mp}"
                                    f"{'+shard' if shard else ''}")  # fmt: skip
                            if closest is None or need < closest[0]:
                                closest = (need, name)
                mp *= 2
        if not fitting:
            hint = (f"; the closest, {closest[1]} with every block checkpointed, needs "
                    f"{closest[0]:.1f} GiB + {PLAN_HEADROOM_GIB} headroom" if closest else
                    f"; the global batch {batch} splits over none of them")  # fmt: skip
            raise ConfigError(f"no layout of {gpus} GPUs fits {budget:.1f} GiB per GPU "
                              f"({mode} scaling, batch {batch}){hint}")  # fmt: skip
        best = max(fitting, key=lambda p: (round(p.samples_per_s, 6), not p.shard,
                                           -p.model_parallel, -p.ensemble))  # fmt: skip
        return best, fitting

    def scaling(self, gpus_list, batch: int, mode: str = "strong",
                budget_gib: float | None = None) -> list[Projection | str]:  # fmt: skip
        """:meth:`choose` for every GPU count; a count without a fitting layout gives its
        reason (a string) instead."""
        out = []
        for g in gpus_list:
            try:
                out.append(self.choose(g, batch, mode, budget_gib)[0])
            except ConfigError as err:
                out.append(str(err))
        return out


# ----------------------------------------------------------------------------------------------
# text and plots


def crossover(points: list) -> int | None:
    """The first GPU count whose communication takes longer than its compute."""
    for p in points:
        if isinstance(p, Projection) and p.comm_s > p.compute_s:
            return p.gpus
    return None


def format_scaling(title: str, points: list, mode: str) -> str:
    """Plain-text table of :meth:`ScalingModel.scaling` with efficiencies against its first
    point and the crossover marked."""
    first = next((p for p in points if isinstance(p, Projection)), None)
    if first is not None:
        title += f" (eff against {first.gpus} GPU(s), the first count that fits)"
    lines = [title, f"{'GPUs':>5} {'nodes':>5} {'layout':>16} {'batch/grp':>9} {'s/step':>9} "
             f"{'compute':>8} {'halo':>8} {'grad':>8} {'eff':>6} {'GiB/rank':>8} "
             f"{'part':>5}  checkpoint plan"]  # fmt: skip
    cross = crossover(points)
    for p in points:
        if not isinstance(p, Projection):
            lines.append(f"  (no layout) {p}")
            continue
        if mode == "strong":
            eff = first.step_s * first.gpus / (p.step_s * p.gpus)
        else:
            eff = (p.samples_per_s / p.gpus) / (first.samples_per_s / first.gpus)
        mark = "  <- communication > compute" if p.gpus == cross else ""
        lines.append(f"{p.gpus:>5} {p.nodes:>5} {p.layout:>16} {p.batch:>9} {p.step_s:>9.4f} "
                     f"{p.compute_s:>8.4f} {p.halo_s:>8.4f} {p.grad_s:>8.4f} {eff:>6.2f} "
                     f"{p.peak_gib:>8.2f} {'real' if p.exact else 'extr':>5}  {p.plan}{mark}")  # fmt: skip
    return "\n".join(lines)


def plot_scaling(curves: dict[str, tuple[list, str]], path: str | Path) -> Path:
    """Write one figure: per curve (name -> (points, mode)) the step time against GPUs, compute
    and communication apart, the crossover marked; strong and weak side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({mode for _, mode in curves.values()}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, (name, (points, m)) in enumerate(curves.items()):
            if m != mode:
                continue
            pts = [p for p in points if isinstance(p, Projection)]
            if not pts:
                continue
            color = f"C{i}"
            g = [p.gpus for p in pts]
            ax.plot(g, [p.step_s for p in pts], "o-", color=color, label=f"{name}: step")
            ax.plot(g, [p.compute_s for p in pts], "--", color=color, label=f"{name}: compute")
            ax.plot(g, [p.comm_s for p in pts], ":", color=color, label=f"{name}: communication")
            if mode == "strong":
                ideal = [pts[0].step_s * pts[0].gpus / x for x in g]
                ax.plot(g, ideal, "-", color=color, alpha=0.25, lw=4)
            cross = crossover(pts)
            if cross is not None:
                ax.axvline(cross, color=color, lw=0.8)
                ax.annotate("comm > compute", (cross, ax.get_ylim()[1]), color=color,
                            fontsize=7, rotation=90, va="top", ha="right")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("s / step")
        ax.set_title(f"{mode} scaling (projected; thick pale line: ideal)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# projections from a config (jobs.dry_run, the scaling report)

#: GPU counts of the projected scaling curves.
PROJECTION_GPUS = tuple(2**i for i in range(11))  # 1 .. 1024
REPO_ROOT = Path(__file__).resolve().parents[3]


def _graph_from_conf(name: str, cache: str | Path | None) -> Graph:
    import yaml

    from squall.graphs import load_or_build

    path = REPO_ROOT / "conf" / "graph" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"graph {name!r}: no {path}")
    return load_or_build(yaml.safe_load(path.read_text()), cache)


def project_scaling(cluster_cfg, graph: Graph, mcfg: ModelConfig, *,
                    calibration: str | None = None, gpus=PROJECTION_GPUS,
                    strong_batch: int | None = None, weak_batch: int = 1,
                    budget_gib: float | None = None, plot: str | Path | None = None,
                    graph_cache: str | Path | None = None, load_graph=None,
                    exact_parts: int = EXACT_PARTS) -> tuple[str, dict]:  # fmt: skip
    """Projected strong and weak scaling of ``mcfg`` on ``graph`` over ``gpus`` on a cluster.

    Parameters
    ----------
    cluster_cfg
        The ``cluster`` config node (links, rates, ``calibration``).
    calibration : str, optional
        :func:`load_calibration` spec; default ``cluster_cfg.calibration``.
    strong_batch : int, optional
        Global batch of strong scaling (default ``cluster.strong_scaling_batch``).
    weak_batch : int
        Samples per model group of weak scaling.
    budget_gib : float, optional
        Memory per GPU the layouts must fit (default the model's checkpoint budget, else the
        GPU's memory).
    plot : path, optional
        Where to write the figure (:func:`plot_scaling`).
    load_graph : callable, optional
        ``name -> Graph`` for the calibration's graph (default ``conf/graph/<name>.yaml``
        through ``graph_cache``).

    Returns
    -------
    text : str
        Both tables, the crossover and the layout chosen at each count.
    curves : dict
        ``{"strong": [...], "weak": [...]}`` of :class:`Projection` (or reasons).
    """
    cluster = ClusterSpec.from_cfg(cluster_cfg)
    spec = calibration or cluster_cfg.get("calibration")
    if not spec:
        raise ConfigError(f"cluster {cluster.name}: no cluster.calibration (a one-GPU run to "
                          "take the FLOP rates from)")  # fmt: skip
    if not spec.startswith("mlflow:") and not Path(spec.partition("?")[0]).is_absolute():
        spec = str(REPO_ROOT / spec)
    cal = load_calibration(spec)
    load_graph = load_graph or (lambda name: _graph_from_conf(name, graph_cache))
    cal_graph = graph if cal.graph == graph.name else load_graph(cal.graph)
    rates = calibrate(cal, cal_graph, cluster.hbm_Bps)
    if budget_gib is None:
        budget_gib = mcfg.checkpoint_budget_gib or cluster.memory_gib
    model = ScalingModel(graph, mcfg, rates, cluster, exact_parts=exact_parts)
    strong_batch = strong_batch or int(cluster_cfg.get("strong_scaling_batch", 1))
    curves = {"strong": model.scaling(gpus, strong_batch, "strong", budget_gib),
              "weak": model.scaling(gpus, weak_batch, "weak", budget_gib)}  # fmt: skip
    head = (f"Projected scaling of {graph.name} on {cluster.name} ({model.params:,} parameters, "
            f"{mcfg.num_channels} channels, {mcfg.processor_layers} layers), budget "
            f"{budget_gib:.1f} GiB per GPU; calibration {rates.source} "
            f"(processor {rates.processor / 1e12:.0f}, mappers {rates.mappers / 1e12:.0f} "
            "TFLOP/s); no overlap of communication; part: real partition or extrapolated "
            "(surface to volume)")  # fmt: skip
    text = [head, ""]
    for mode, batch in (("strong", f"global batch {strong_batch}"),
                        ("weak", f"{weak_batch} sample(s) per model group")):  # fmt: skip
        text.append(format_scaling(f"{mode} scaling, {batch}:", curves[mode], mode))
        cross = crossover(curves[mode])
        text.append(f"communication overtakes compute at {cross} GPUs" if cross else
                    "communication stays below compute up to "
                    f"{max(gpus)} GPUs")  # fmt: skip
        text.append("")
    if plot is not None:
        path = plot_scaling({f"{graph.name} {m}": (curves[m], m) for m in curves}, plot)
        text.append(f"plot: {path}")
    return "\n".join(text), curves


def compare_to_measurement(model: ScalingModel, measured: list[dict]) -> list[dict]:
    """Prediction against measurement, one row per measured point.

    ``measured`` rows give ``gpus``, ``model_parallel``, ``batch`` (samples per model group),
    ``step_s`` and ``peak_gib`` (either may be None); each returned row adds ``predicted_s``,
    ``predicted_gib`` and the relative errors ``err_s``, ``err_gib`` (None where nothing was
    measured). The model's own checkpoint policies are used (no budget: the run's plan).
    """
    out = []
    for m in measured:
        p = model.project(int(m["gpus"]), int(m["model_parallel"]), int(m.get("batch") or 1),
                          ensemble=int(m.get("ensemble") or 1))  # fmt: skip
        s, g = m.get("step_s"), m.get("peak_gib")
        out.append({**m, "layout": p.layout, "predicted_s": p.step_s, "predicted_gib": p.peak_gib,
                    "err_s": None if not s else p.step_s / s - 1,
                    "err_gib": None if not g else p.peak_gib / g - 1})  # fmt: skip
    return out

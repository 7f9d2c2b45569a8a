"""Dry run of a layout: per-rank memory and communication estimates, on one CPU process.

Builds the partition and halo plans (the same pure functions a run uses) and the model on the
``meta`` device (parameter count only, no memory), then estimates per rank:

* static memory: fp32 parameters, gradients and two AdamW moments (16 B per parameter), plus the
  flat gradient all-reduce buffer (4 B per parameter) when there is more than one rank;
* activation memory at the step's peak (see :func:`activation_bytes`);
* communication per step: halo rows received per edge set times its uses (encoder and decoder
  once, the processor once per layer), forward and backward, and the gradient all-reduce
  (ring: ``2 (W - 1) / W`` of the gradient bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squall.graphs import Graph
from squall.models.forecaster import ROLES, GraphForecaster, ModelConfig
from squall.parallel.halo import build_halo_plans
from squall.parallel.layout import Layout
from squall.parallel.parallelize import ParallelConfig, make_partition

GIB = 1024**3
# Values of C activations per destination row of one block at its peak, besides the MLP hidden
# layer (2 x mlp_ratio: before and after GELU): layer norms, q, attention output, projections,
# residuals, the output head and gradients in flight. Fitted on H100 (o320_l7, 1024 channels,
# bf16, checkpointing, profiling/results/parallel.md): measured peaks 29.1 / 19.7 / 11.6 GiB at
# 1 / 2 / 4 GPUs, estimated 29.0 / 17.3 / 11.2. Per source row: layer norm, k, v.
DST_ROW_UNITS = 12
SRC_ROW_UNITS = 3
# Per edge: the Triton kernels keep p and p*dp (fp32, per head) in backward; the torch reference
# materialises k+e, v+e, the edge term and the weighted values ([E, H, C] each) plus gradients.
EDGE_UNITS_TRITON_PER_HEAD = 2 * 4  # bytes: two fp32 values per head
EDGE_UNITS_TORCH = 4 * 2  # C-wide tensors, forward and gradient


@dataclass(frozen=True)
class RankEstimate:
    """Estimates for one model-parallel rank (identical across data-parallel replicas)."""

    model_rank: int
    nodes: dict[str, int]
    edges: dict[str, int]
    halo_rows: dict[str, int]
    peers: int
    static_gib: float
    activation_gib: float
    halo_bytes_per_step: int
    grad_allreduce_bytes_per_step: int

    @property
    def total_gib(self) -> float:
        return self.static_gib + self.activation_gib


def activation_bytes(mcfg: ModelConfig, batch: int, rows: dict, edges: dict, act: int) -> int:
    """Peak activation bytes of one rank.

    ``rows`` holds owned rows ``data``, ``mesh`` and local source rows per edge set
    (``src_<role>``); ``edges`` local edges per edge set; ``act`` bytes per activation (2 for bf16).
    With a block checkpointed, its input stays (``[B, N, C]``) and its inner activations exist for
    one block at a time; without, every block's inner activations stay until backward.
    """
    c, b, ratio = mcfg.num_channels, batch, mcfg.mlp_ratio
    dst_units = DST_ROW_UNITS + 2 * ratio

    def block(role, n_dst):
        n_src = rows[f"src_{role}"]
        e = edges[role]
        if mcfg.attention_backend == "triton":
            edge_bytes = e * b * mcfg.num_heads * EDGE_UNITS_TRITON_PER_HEAD
        else:
            edge_bytes = e * b * c * act * EDGE_UNITS_TORCH
        return (n_dst * dst_units + n_src * SRC_ROW_UNITS) * b * c * act + edge_bytes

    inner = {"encoder": block("encoder", rows["mesh"]),
             "processor": block("processor", rows["mesh"]),
             "decoder": block("decoder", rows["data"])}  # fmt: skip
    ckpt = {role: getattr(mcfg, f"checkpoint_{role}") for role in ROLES}
    layers = mcfg.processor_layers
    # block inputs kept for backward: data and mesh streams, one mesh tensor per layer
    kept = (3 * rows["data"] + (layers + 2) * rows["mesh"]) * b * c * act
    live = sum(inner[r] * (layers if r == "processor" else 1) for r in ROLES if not ckpt[r])
    peak_recompute = max((inner[r] for r in ROLES if ckpt[r]), default=0)
    return kept + live + peak_recompute


def estimate(
    graph: Graph,
    mcfg: ModelConfig,
    pcfg: ParallelConfig,
    world_size: int,
    batch: int,
    num_vars: tuple[int, int] = (100, 100),
    input_steps: int = 2,
    act_bytes: int = 2,
) -> tuple[Layout, list[RankEstimate], int]:
    """Per-rank estimates of a layout.

    Parameters
    ----------
    graph, mcfg, pcfg : Graph, ModelConfig, ParallelConfig
    world_size : int
        Ranks in the run (``model_parallel x data_parallel``).
    batch : int
        Samples per model group per step.
    num_vars : tuple of int
        Input and output variables.
    act_bytes : int
        Bytes per activation (2: bf16 autocast).

    Returns
    -------
    layout : Layout
    ranks : list of RankEstimate
        One per model-parallel rank.
    params : int
        Parameters of the model.
    """
    layout = Layout(world_size, pcfg.model_parallel)
    layout.check({k: len(v) for k, v in graph.nodes.items()}, batch)
    with torch.device("meta"):
        model = GraphForecaster(graph, mcfg, num_vars[0], num_vars[1], input_steps)
    params = model.num_parameters()
    partition = make_partition(graph, pcfg, mcfg.processor_layers)
    plans = {role: build_halo_plans(graph.edges[role], partition) for role in ROLES}
    static = 16 * params + (4 * params if world_size > 1 else 0)
    ring = 2 * (world_size - 1) / world_size if world_size > 1 else 0.0
    out = []
    for r in range(pcfg.model_parallel):
        mine = {role: plans[role][r] for role in ROLES}
        rows = {"data": len(mine["decoder"].owned_dst), "mesh": len(mine["processor"].owned_dst)}
        rows.update({f"src_{role}": mine[role].num_local_src for role in ROLES})
        edges = {role: len(mine[role].edge_ids) for role in ROLES}
        halo = {role: len(mine[role].halo_src) for role in ROLES}
        uses = {"encoder": 1, "processor": mcfg.processor_layers, "decoder": 1}
        halo_bytes = sum(2 * uses[k] * v * batch * mcfg.num_channels * act_bytes
                         for k, v in halo.items())  # fmt: skip
        peers = len({p for role in ROLES for p in mine[role].peers})
        act = activation_bytes(mcfg, batch, rows, edges, act_bytes)
        out.append(RankEstimate(r, rows, edges, halo, peers, static / GIB, act / GIB,
                                int(halo_bytes), int(ring * 4 * params)))  # fmt: skip
    return layout, out, params


def format_estimate(layout: Layout, ranks: list[RankEstimate], params: int, graph: Graph,
                    mcfg: ModelConfig, pcfg: ParallelConfig, batch: int) -> str:  # fmt: skip
    """Plain-text table of :func:`estimate`."""
    lines = [
        f"layout: world_size={layout.world_size} = model_parallel={layout.model_parallel} x "
        f"data_parallel={layout.data_parallel}; batch {batch} per model group; graph "
        f"{graph.name}; {params:,} parameters; {mcfg.num_channels} channels, "
        f"{mcfg.processor_layers} layers, backend {mcfg.attention_backend}; partition "
        f"{pcfg.partition}, overlap {pcfg.overlap}, chunks {pcfg.chunks}",
        "",
        f"{'rank':>4} {'data':>9} {'mesh':>8} {'edges':>10} {'halo rows e/p/d':>20} "
        f"{'peers':>5} {'static GiB':>10} {'act GiB':>8} {'total GiB':>9} {'halo MB/step':>12} "
        f"{'grad AR MB/step':>15}",
    ]
    for r in ranks:
        halo = "/".join(str(r.halo_rows[k]) for k in ROLES)
        lines.append(
            f"{r.model_rank:>4} {r.nodes['data']:>9,} {r.nodes['mesh']:>8,} "
            f"{sum(r.edges.values()):>10,} {halo:>20} {r.peers:>5} {r.static_gib:>10.2f} "
            f"{r.activation_gib:>8.2f} {r.total_gib:>9.2f} {r.halo_bytes_per_step / 1e6:>12.1f} "
            f"{r.grad_allreduce_bytes_per_step / 1e6:>15.1f}"
        )
    return "\n".join(lines)

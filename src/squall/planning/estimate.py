"""Dry run of a layout: per-rank memory and communication estimates, on one CPU process.

Builds the partition and halo plans (the same pure functions a run uses) and the model on the
``meta`` device (parameter count only, no memory), then estimates per rank:

* static memory: fp32 parameters, gradients and two AdamW moments (16 B per parameter), the bf16
  weight copies autocast keeps for backward (2 B), plus the flat gradient all-reduce buffer (4 B
  per parameter) when there is more than one rank;
* activation memory at the step's peak (see :func:`activation_bytes`);
* communication per step: halo rows received per edge set times its uses (encoder and decoder
  once, the processor once per layer), forward and backward, and the gradient all-reduce
  (ring: ``2 (W - 1) / W`` of the gradient bytes).

An ensemble model (``model.ensemble.members`` M) on ``parallel.ensemble`` E ranks
(``world = E x model_parallel x data_parallel``, :class:`~squall.distributed.layout.Layout`):
each rank runs ``M / E`` members of every sample as batch rows, receives the other ranks'
members of its grid part once per rollout step (the member all-gather of the score; its backward
sends nothing) and keeps the gathered members for the score's backward. Every rank holds every
parameter, so the gradient all-reduce spans the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from squall.distributed.layout import Layout
from squall.errors import ConfigError
from squall.graphs import Graph
from squall.layers.graph_transformer import block_flops
from squall.models.forecaster import CHECKPOINT_POLICIES, ROLES, GraphForecaster, ModelConfig
from squall.parallel.halo import build_halo_plans
from squall.parallel.parallelize import ParallelConfig, make_partition

GIB = 1024**3
# Activations kept for backward, in values of C per row (bf16 under autocast: the residual stream
# is bf16 too, layer norms keep their bf16 input and hand a bf16 copy of their output to the next
# matrix product). Per destination row: the attention layer norm's copy, q, the attention output,
# the post-attention residual and the MLP layer norm's copy (5), plus the MLP hidden layer before
# and after GELU (2 x mlp_ratio). Per source row: the source layer norm's copy, k and v (3); in the
# processor the sources are the destinations and share the layer norm (2).
DST_ROW_UNITS = 5
# The MLP keeps more than its hidden layer twice and its layer norm's copy: 1.5 values per row
# more, fitted on H100 (o96_l6, 1024 channels, 16 layers, no checkpointing: 29.7 GiB measured,
# 27.4 GiB estimated without it).
MLP_EXTRA_UNITS = 1.5
SRC_ROW_UNITS = {True: 3, False: 2}
# Per edge: the Triton kernels keep nothing per edge (p and p*dp, fp32 per head, exist during
# backward only); the torch reference keeps about four C-wide tensors per edge (k+e, v+e, the
# gathered q and the weights' expansion): fitted, o96_l6 1024 channels on H100 (step.md).
EDGE_UNITS_TRITON_PER_HEAD = 2 * 4  # bytes: two fp32 values per head
# Compiled blocks (torch.compile) that keep their MLP keep about two C-wide values per destination
# row fewer: the partitioner recomputes cheap elementwise outputs (GELU's) in backward (H100,
# o96_l6, 1024 channels, no checkpointing: 26.57 GiB compiled vs 29.7 GiB eager, 3.1 GiB over 18
# blocks = 2.2 values). Blocks that recompute their MLP gain nothing measurable.
COMPILED_DST_ROW_SAVING = 2
EDGE_UNITS_TORCH = 4
# The ensemble score keeps fp32 tensors of the gathered members ``[B, M, G, V]`` for its backward:
# their fp32 copy, ``x - y`` and its magnitude (squall.train.scores.afcrps_pointwise).
SCORE_FP32_COPIES = 3
# Checked against peaks measured on one H100 (bench_step.py, o96_l6, 1024 channels, 16 layers,
# bf16; static 3.88 GiB): see profiling/results/step.md for the measured and estimated pairs.


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
    members: int = 1  # ensemble members of each sample run on this rank
    member_gather_bytes_per_step: int = 0  # received by the member all-gather

    @property
    def total_gib(self) -> float:
        return self.static_gib + self.activation_gib


def _block_bytes(mcfg: ModelConfig, b: int, act: int, n_dst: int, n_src: int, e: int,
                 bipartite: bool) -> tuple[int, int, int]:  # fmt: skip
    """One block's activations: (kept for backward, the MLP part of those that ``mlp``
    recomputes, in flight during its backward, freed by a whole recomputed block's backward
    before its peak)."""
    c, ratio = mcfg.num_channels, mcfg.mlp_ratio
    if mcfg.attention_backend == "triton":
        edges_kept, edges_backward = 0, e * b * mcfg.num_heads * EDGE_UNITS_TRITON_PER_HEAD
    else:
        edges_kept = edges_backward = e * b * c * act * EDGE_UNITS_TORCH
    row = b * c * act
    dst_units = DST_ROW_UNITS + 2 * ratio + MLP_EXTRA_UNITS
    kept = int((n_dst * dst_units + n_src * SRC_ROW_UNITS[bipartite]) * row)
    # what ``mlp`` recomputes: its layer norm's copy, the hidden layer before and after GELU
    mlp = int(n_dst * (2 * ratio + 1 + MLP_EXTRA_UNITS) * row)
    if mcfg.compile:  # recomputed by the compiled backward, only where the MLP is kept
        mlp -= n_dst * COMPILED_DST_ROW_SAVING * row
        kept -= n_dst * COMPILED_DST_ROW_SAVING * row
    # gradients of the MLP hidden layer and of q, k, v at once
    in_flight = n_dst * 2 * ratio * row + edges_backward
    # a block recomputed whole frees its MLP's hidden activation (GELU's output, ``ratio`` values
    # per row) once its gradient exists, before the hidden-layer gradients peak: its transient
    # counted on one H200 (o320_l7, every block ``full``, squall.planning.memory) is 15.0 GiB
    # against 19.2 GiB for inner + in-flight, 16.0 GiB with this
    freed = n_dst * ratio * row
    return kept + edges_kept, mlp, in_flight, freed


def activation_bytes(mcfg: ModelConfig, batch: int, rows: dict, edges: dict, act: int,
                     rollout: int = 1) -> int:  # fmt: skip
    """Peak activation bytes of one rank.

    ``rows`` holds owned rows ``data``, ``mesh`` and local source rows per edge set
    (``src_<role>``); ``edges`` local edges per edge set; ``act`` bytes per activation (2 for bf16);
    ``rollout`` forward steps per sample, each kept until the backward.
    Per block policy (:data:`squall.models.forecaster.CHECKPOINT_POLICIES`): ``none`` keeps its
    inner activations until backward; ``mlp`` keeps them less the MLP part, which then exists for
    one block at a time during recomputation; ``full`` keeps only the block's input and its inner
    activations exist for one block at a time.
    """
    c, b = mcfg.num_channels, batch
    dst = {"encoder": rows["mesh"], "processor": rows["mesh"], "decoder": rows["data"]}
    layers = mcfg.processor_layers
    # block inputs kept for backward: data and mesh streams, one mesh tensor per layer, and the
    # halo rows each block received (kept apart from the owned rows: squall.parallel.chunking),
    # the encoder's and decoder's once, the processor's per layer (0 on one device)
    halo = (rows["src_encoder"] - rows["data"] + rows["src_decoder"] - rows["mesh"]
            + layers * (rows["src_processor"] - rows["mesh"]))  # fmt: skip
    kept = (3 * rows["data"] + (layers + 2) * rows["mesh"] + halo) * b * c * act * rollout
    live, transient = 0, 0
    blocks = [("encoder", 0), *(("processor", i) for i in range(layers)), ("decoder", 0)]
    sizes = {role: _block_bytes(mcfg, b, act, dst[role], rows[f"src_{role}"], edges[role],
                                role != "processor") for role in ROLES}  # fmt: skip
    for role, layer in blocks:
        inner, mlp, in_flight, freed = sizes[role]
        policy = mcfg.block_policy(role, layer)
        if policy == "none":
            live += inner
            transient = max(transient, in_flight)
        elif policy == "mlp":
            live += inner - mlp
            transient = max(transient, mlp + in_flight)
        else:
            transient = max(transient, inner + in_flight - freed)
    return kept + live * rollout + transient


def recompute_flops(mcfg: ModelConfig, batch: int, rows: dict, edges: dict, edge_dims: dict,
                    rollout: int = 1) -> int:  # fmt: skip
    """Forward FLOPs that checkpointing repeats in backward (``full``: the block's forward;
    ``mlp``: its first MLP product, recomputation stopping once GELU's output is back)."""
    c, ratio = mcfg.num_channels, mcfg.mlp_ratio
    dst = {"encoder": rows["mesh"], "processor": rows["mesh"], "decoder": rows["data"]}
    total = 0
    for role, layer in [("encoder", 0), *(("processor", i) for i in range(mcfg.processor_layers)),
                        ("decoder", 0)]:  # fmt: skip
        policy = mcfg.block_policy(role, layer)
        if policy == "full":
            total += block_flops(c, ratio, edge_dims[role], rows[f"src_{role}"], dst[role],
                                 edges[role])  # fmt: skip
        elif policy == "mlp":
            total += 2 * c * ratio * c * dst[role]
    return batch * rollout * total


# The planner keeps this far below the budget: the estimate's largest underestimate among the
# configurations measured (profiling/results/scaling_model.md: o320_l7, every block ``full``,
# eager, one H100: 29.14 GiB measured against 28.23 GiB estimated; o96_l6 with 16 ``mlp``
# layers, compiled: 15.36 against 14.83).
PLAN_HEADROOM_GIB = 1.0


def plan_checkpointing(mcfg: ModelConfig, budget_gib: float, static_gib: float, batch: int,
                       rows: dict, edges: dict, edge_dims: dict, act: int = 2, rollout: int = 1,
                       fixed_mappers: bool = False) -> ModelConfig:  # fmt: skip
    """The checkpoint policies with the least recomputation whose estimated peak (static plus
    activations, :func:`activation_bytes`) fits ``budget_gib`` less :data:`PLAN_HEADROOM_GIB`.

    Searches every encoder and decoder policy and every count of ``full`` / ``mlp`` / ``none``
    processor layers (layers are alike, so which ones does not matter); ties go to less memory.
    ``fixed_mappers`` keeps the encoder's and decoder's policies (chunked mappers always
    recompute). Raises :class:`~squall.errors.ConfigError` with the smallest estimate when
    nothing fits.
    """
    if static_gib + PLAN_HEADROOM_GIB > budget_gib:
        raise ConfigError(f"checkpoint.budget_gib={budget_gib:g}: parameters, gradients and AdamW "
                          f"state alone take {static_gib:.2f} GiB per GPU (+ {PLAN_HEADROOM_GIB} "
                          "GiB headroom) and model-parallel ranks each hold all of them; raise "
                          "the budget")  # fmt: skip
    layers, fitting, smallest = mcfg.processor_layers, [], None
    encoders = [mcfg.checkpoint_encoder] if fixed_mappers else CHECKPOINT_POLICIES
    decoders = [mcfg.checkpoint_decoder] if fixed_mappers else CHECKPOINT_POLICIES
    for enc in encoders:
        for dec in decoders:
            for n_full in range(layers + 1):
                for n_mlp in range(layers - n_full + 1):
                    n_none = layers - n_full - n_mlp
                    proc = ("full",) * n_full + ("mlp",) * n_mlp + ("none",) * n_none
                    cand = replace(mcfg, checkpoint_encoder=enc, checkpoint_decoder=dec,
                                   checkpoint_processor=proc, checkpoint_budget_gib=budget_gib)  # fmt: skip
                    gib = (
                        static_gib + activation_bytes(cand, batch, rows, edges, act, rollout) / GIB
                    )
                    if smallest is None or gib < smallest:
                        smallest = gib
                    if gib <= budget_gib - PLAN_HEADROOM_GIB:
                        flops = recompute_flops(cand, batch, rows, edges, edge_dims, rollout)
                        fitting.append((flops, gib, cand))
    if not fitting:
        raise ConfigError(f"checkpoint.budget_gib={budget_gib:g}: the smallest estimate, with every "
                          f"block checkpointed, is {smallest:.2f} GiB per GPU (static "
                          f"{static_gib:.2f}), so the budget must be at least "
                          f"{smallest + PLAN_HEADROOM_GIB:.2f} (with {PLAN_HEADROOM_GIB} GiB "
                          "headroom); raise it or add model-parallel ranks")  # fmt: skip
    return min(fitting, key=lambda f: f[:2])[2]


def describe_checkpointing(mcfg: ModelConfig) -> str:
    """One line: the policy of every block, processor layers counted by policy."""
    proc = mcfg.checkpoint_processor
    proc = proc if isinstance(proc, tuple) else (proc,) * mcfg.processor_layers
    counts = ", ".join(f"{proc.count(p)} {p}" for p in CHECKPOINT_POLICIES if proc.count(p))
    return (f"checkpointing: encoder {mcfg.checkpoint_encoder}, processor {counts}, "
            f"decoder {mcfg.checkpoint_decoder}")  # fmt: skip


@dataclass(frozen=True)
class _RankSizes:
    rows: dict
    edges: dict
    halo: dict
    peers: int


def _sizes(graph: Graph, mcfg: ModelConfig, pcfg: ParallelConfig) -> list[_RankSizes]:
    partition = make_partition(graph, pcfg, mcfg.processor_layers)
    plans = {role: build_halo_plans(graph.edges[role], partition) for role in ROLES}
    out = []
    for r in range(pcfg.model_parallel):
        mine = {role: plans[role][r] for role in ROLES}
        rows = {"data": len(mine["decoder"].owned_dst), "mesh": len(mine["processor"].owned_dst)}
        rows.update({f"src_{role}": mine[role].num_local_src for role in ROLES})
        out.append(_RankSizes(rows, {role: len(mine[role].edge_ids) for role in ROLES},
                              {role: len(mine[role].halo_src) for role in ROLES},
                              len({p for role in ROLES for p in mine[role].peers})))  # fmt: skip
    return out


def estimate(
    graph: Graph,
    mcfg: ModelConfig,
    pcfg: ParallelConfig,
    world_size: int,
    batch: int,
    num_vars: tuple[int, int] = (100, 100),
    input_steps: int = 2,
    act_bytes: int = 2,
    rollout: int = 1,
    members: int | None = None,
) -> tuple[Layout, list[RankEstimate], int, ModelConfig]:
    """Per-rank estimates of a layout.

    Parameters
    ----------
    graph, mcfg, pcfg : Graph, ModelConfig, ParallelConfig
        With ``mcfg.checkpoint_budget_gib`` set, the checkpoint policies are chosen first
        (:func:`plan_checkpointing`, on the largest rank's sizes).
    world_size : int
        Ranks in the run (``ensemble x model_parallel x data_parallel``).
    batch : int
        Samples per model group per step; batch rows when ``members`` is None.
    num_vars : tuple of int
        Input and output variables.
    act_bytes : int
        Bytes per activation (2: bf16 autocast).
    rollout : int
        Forward steps per sample (``training.rollout``): their activations are all kept.
    members : int, optional
        Ensemble members per sample (``model.ensemble.members``), spread over
        ``pcfg.ensemble`` ranks: each rank runs ``batch x members / ensemble`` rows, gathers
        the other members for the score. None: ``batch`` already counts this rank's rows and
        the ensemble axis is not modelled (a caller that folded the members itself).

    Returns
    -------
    layout : Layout
    ranks : list of RankEstimate
        One per model-parallel rank.
    params : int
        Parameters of the model.
    mcfg : ModelConfig
        The model configuration estimated (checkpoint policies resolved).
    """
    ensemble = pcfg.ensemble if members is not None else 1
    layout = Layout(world_size, pcfg.model_parallel, ensemble)
    layout.check({k: len(v) for k, v in graph.nodes.items()}, batch,
                 members=members if ensemble > 1 else None)  # fmt: skip
    local_members = (members or 1) // ensemble
    samples, batch = batch, batch * local_members  # batch: rows through the model
    with torch.device("meta"):
        model = GraphForecaster(graph, mcfg, num_vars[0], num_vars[1], input_steps)
    params = model.num_parameters()
    edge_dims = {"encoder": model.encoder.edge_weight.shape[0],
                 "processor": model.processor[0].edge_weight.shape[0] if mcfg.processor_layers else 0,
                 "decoder": model.decoder.edge_weight.shape[0]}  # fmt: skip
    # fp32 parameters, gradients and AdamW moments; bf16 copies of the weights that autocast
    # keeps for backward; the flat gradient buffer of the all-reduce
    static = (16 + (2 if act_bytes == 2 else 0)) * params + (4 * params if world_size > 1 else 0)
    ring = 2 * (world_size - 1) / world_size if world_size > 1 else 0.0
    sizes = _sizes(graph, mcfg, pcfg)
    # What runs: chunked mappers always recompute (squall.parallel.chunking), and chunked blocks
    # or sharded ones with overlap run on several subsets, outside torch.compile.
    chunked = pcfg.chunks > 1
    if chunked:
        mcfg = replace(mcfg, checkpoint_encoder="full", checkpoint_decoder="full")
    compiled = mcfg.compile
    split = chunked or (pcfg.model_parallel > 1 and pcfg.overlap)
    mcfg = replace(mcfg, compile=compiled and not split)
    if mcfg.checkpoint_budget_gib is not None:
        largest_rows = {k: max(s.rows[k] for s in sizes) for k in sizes[0].rows}
        largest_edges = {k: max(s.edges[k] for s in sizes) for k in ROLES}
        mcfg = plan_checkpointing(mcfg, mcfg.checkpoint_budget_gib, static / GIB, batch,
                                  largest_rows, largest_edges, edge_dims, act_bytes, rollout,
                                  fixed_mappers=chunked)  # fmt: skip
    uses = {"encoder": 1, "processor": mcfg.processor_layers, "decoder": 1}
    out = []
    for r, size in enumerate(sizes):
        halo_bytes = sum(2 * uses[k] * v * batch * mcfg.num_channels * act_bytes
                         for k, v in size.halo.items())  # fmt: skip
        act = activation_bytes(mcfg, batch, size.rows, size.edges, act_bytes, rollout)
        gather = 0
        if (members or 1) > 1:
            # one output value per member, grid point of this part and output variable
            values = samples * size.rows["data"] * num_vars[1] * rollout
            gather = (ensemble - 1) * local_members * values * act_bytes
            act += members * values * (act_bytes + SCORE_FP32_COPIES * 4)
        out.append(RankEstimate(r, size.rows, size.edges, size.halo, size.peers, static / GIB,
                                act / GIB, int(halo_bytes), int(ring * 4 * params),
                                local_members, int(gather)))  # fmt: skip
    return layout, out, params, replace(mcfg, compile=compiled)


def format_estimate(layout: Layout, ranks: list[RankEstimate], params: int, graph: Graph,
                    mcfg: ModelConfig, pcfg: ParallelConfig, batch: int) -> str:  # fmt: skip
    """Plain-text table of :func:`estimate`."""
    ens = ranks[0].members * layout.ensemble
    lines = [
        f"layout: world_size={layout.world_size} = ensemble={layout.ensemble} x model_parallel="
        f"{layout.model_parallel} x data_parallel={layout.data_parallel}; batch {batch} per "
        "model group"
        + (f", {ens} members per sample, {ranks[0].members} per rank" if ens > 1 else "")
        + "; graph "
        f"{graph.name}; {params:,} parameters; {mcfg.num_channels} channels, "
        f"{mcfg.processor_layers} layers, backend {mcfg.attention_backend}; partition "
        f"{pcfg.partition}, overlap {pcfg.overlap}, chunks {pcfg.chunks}",
        describe_checkpointing(mcfg)
        + (
            f" (chosen for checkpoint.budget_gib={mcfg.checkpoint_budget_gib:g})"
            if mcfg.checkpoint_budget_gib is not None
            else ""
        ),
        "",
        f"{'rank':>4} {'data':>9} {'mesh':>8} {'edges':>10} {'halo rows e/p/d':>20} "
        f"{'peers':>5} {'static GiB':>10} {'act GiB':>8} {'total GiB':>9} {'halo MB/step':>12} "
        f"{'grad AR MB/step':>15}" + (f" {'members MB/step':>15}" if ens > 1 else ""),
    ]
    for r in ranks:
        halo = "/".join(str(r.halo_rows[k]) for k in ROLES)
        lines.append(
            f"{r.model_rank:>4} {r.nodes['data']:>9,} {r.nodes['mesh']:>8,} "
            f"{sum(r.edges.values()):>10,} {halo:>20} {r.peers:>5} {r.static_gib:>10.2f} "
            f"{r.activation_gib:>8.2f} {r.total_gib:>9.2f} {r.halo_bytes_per_step / 1e6:>12.1f} "
            f"{r.grad_allreduce_bytes_per_step / 1e6:>15.1f}"
            + (f" {r.member_gather_bytes_per_step / 1e6:>15.3f}" if ens > 1 else "")
        )
    return "\n".join(lines)

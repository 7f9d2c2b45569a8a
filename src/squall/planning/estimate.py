"""Dry run of a layout: per-rank memory and communication estimates, on one CPU process.

Builds the partition and halo plans (the same pure functions a run uses) and the model on the
``meta`` device (parameter count only, no memory), then estimates per rank:

* state held for the whole step (``static``): fp32 parameters and two AdamW moments (12 B per
  parameter; their share of the world with parameter sharding), the graph's buffers of the
  rank's part, the batch's fp32 inputs and targets, and with more than one rank and no sharding
  the flat copies of the gradient buckets in flight (squall.parallel.parallelize.GradReducer);
* the peak of what the step adds (``activation``, :func:`activation_bytes`): the largest, over
  the phases of the step, of the activations alive, the gradients that exist by then and
  autocast's bf16 weight copies; the phases are the end of the forward, each block's backward
  in reverse order (the gradients of the blocks already done exist, the activations they kept
  are freed), and the optimizer step (every gradient, no activation);
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
from squall.parallel.parallelize import (
    BUCKETS_IN_FLIGHT,
    GRAD_BUCKET_MB,
    ParallelConfig,
    make_partition,
)

GIB = 1024**3
# Activations one block keeps for its backward, in values of C per row at the activation's bytes
# (counted tensor by tensor: squall.planning.memory.count_block; tests/planning/
# test_step_memory.py checks them byte for byte). Per destination row: the attention layer norm's
# output (autocast's bf16 copy), q, the attention output and the post-attention residual (4); the
# MLP's layer norm output and its hidden layer before and after GELU (1 + 2 x mlp_ratio). Per
# source row: the source layer norm's output, k and v (3); in the processor the sources are the
# destinations and share the layer norm and the projection (2).
DST_ROW_UNITS = 4
SRC_ROW_UNITS = {True: 3, False: 2}
# Under CUDA's autocast a layer norm runs in fp32 and keeps the fp32 copy of its input (2 values
# at bf16) for its backward: the sources' norm (and a mapper's destinations' norm) keep it on top
# of their bf16 input, the MLP's norm instead of the post-attention residual (+1). Compiled
# blocks (torch.compile) keep none: the partitioner saves the bf16 input and recomputes the cast
# (measured: every compiled row of profiling/results/scaling_model.md with blocks recomputed is
# within 2.1 % without them, 6-19 % over with them).
NORM_FP32_COPY_UNITS = 2
# Per row also fp32 statistics: mean and reciprocal deviation of each layer norm (8 B) and the
# attention's log-sum-exp per head (4 B).
NORM_STATS_BYTES, LSE_BYTES_PER_HEAD = 8, 4
# Per edge: the Triton kernels keep nothing per edge (p and p*dp, fp32 per head, exist during
# backward only); the torch reference keeps about four C-wide tensors per edge (k+e, v+e, the
# gathered q and the weights' expansion): fitted, o96_l6 1024 channels on H100 (step.md).
EDGE_UNITS_TRITON_PER_HEAD = 2 * 4  # bytes: two fp32 values per head
EDGE_UNITS_TORCH = 4
# The ensemble score keeps fp32 tensors of the gathered members ``[B, M, G, V]`` for its backward:
# their fp32 copy, ``x - y`` and its magnitude (squall.train.scores.afcrps_pointwise).
SCORE_FP32_COPIES = 3
# State bytes per parameter held for the whole step: the fp32 parameter and AdamW's two moments.
# Gradients (4 B) exist from their block's backward on (the step starts with them freed:
# ``zero_grad(set_to_none=True)``); autocast's bf16 copy of a weight (2 B) exists while its block
# runs, or until its backward when the block keeps what it computed (``none``).
PARAM_MOMENT_BYTES, GRAD_BYTES, BF16_BYTES = 12, 4, 2
# Flat bucket copies of the gradient all-reduce alive at once: the ones in flight and the one
# being launched (squall.parallel.parallelize.GradReducer).
BUCKETS_ALIVE = BUCKETS_IN_FLIGHT + 1


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
    peak_phase: str = ""  # the phase of the step at the activation peak (step_phases)

    @property
    def total_gib(self) -> float:
        return self.static_gib + self.activation_gib


@dataclass(frozen=True)
class ModelSizes:
    """What a step's memory depends on besides the activations, counted on the model's tensors
    (:meth:`of`, on the meta device): parameters by the phase of the backward that completes
    their gradients, the ones autocast casts to bf16, and the widths of the tensors a step keeps
    outside the blocks.

    Attributes
    ----------
    params : int
        All parameters.
    first : int
        The output norm and head: their gradients exist before the decoder's backward.
    block, cast : dict of str to int
        Parameters of one block per edge set (``encoder``, each ``processor`` layer,
        ``decoder``), and of those the ones autocast casts (all but its layer norms').
    edge_features : dict of str to int
        Trainable edge features per edge set: their gradient completes after that set's last
        block backward.
    cast_rest : int
        Cast parameters outside the blocks (embeddings, head).
    embed_in, out_vars : int
        Values per grid row into the data embedding, out of the head.
    edge_dims : dict of str to int
        Values per edge into each edge set's projection (kept in fp32 for the backward).
    edge_bytes : dict of str to int
        Graph buffer bytes per edge of each edge set (attributes and index arrays).
    row_bytes : dict of str to int
        Graph buffer bytes per ``data`` and ``mesh`` row (node attributes, cell area).
    """

    params: int
    first: int
    block: dict
    cast: dict
    edge_features: dict
    cast_rest: int
    embed_in: int
    out_vars: int
    edge_dims: dict
    edge_bytes: dict
    row_bytes: dict

    @classmethod
    def of(cls, model: GraphForecaster, graph: Graph) -> ModelSizes:
        """Count ``model``'s parameters (any device, ``meta`` included) and ``graph``'s arrays."""

        def count(mod, cast_only=False):
            if mod is None:
                return 0
            norms = {id(p) for m in mod.modules() if isinstance(m, torch.nn.LayerNorm)
                     for p in m.parameters()}  # fmt: skip
            return sum(p.numel() for p in mod.parameters() if not (cast_only and id(p) in norms))

        blocks = {"encoder": model.encoder, "decoder": model.decoder,
                  "processor": model.processor[0] if len(model.processor) else None}  # fmt: skip
        feats = {r: model.edge_features[r].numel() if r in model.edge_features else 0
                 for r in ROLES}  # fmt: skip
        cast = {r: count(b, True) for r, b in blocks.items()}
        layers = len(model.processor)
        blocks_cast = cast["encoder"] + cast["decoder"] + layers * cast["processor"]
        cast_all = count(model, True) - sum(feats.values())
        edge_bytes = {}
        for r in ROLES:
            e = graph.edges[r]
            edge_bytes[r] = e.attrs.itemsize * e.attrs.shape[1] + sum(
                getattr(e, a).itemsize for a in ("row", "dst_index", "csr_perm")
            )
        data = graph.node_attributes(model.graph.data_name)
        mesh = graph.node_attributes(model.graph.mesh_name)
        return cls(model.num_parameters(), count(model.norm_out) + count(model.head),
                   {r: count(b) for r, b in blocks.items()}, cast, feats,
                   cast_all - blocks_cast, model.embed_data.in_features,
                   model.head.out_features,
                   {r: (b.edge_weight.shape[0] if b is not None else 0)
                    for r, b in blocks.items()},
                   edge_bytes,
                   {"data": data.itemsize * data.shape[1] + 4,
                    "mesh": mesh.itemsize * mesh.shape[1]})  # fmt: skip

    @classmethod
    def zero(cls) -> ModelSizes:
        """No parameters and no tensors outside the blocks: :func:`step_phases` then counts the
        blocks' activations alone."""
        roles = dict.fromkeys(ROLES, 0)
        return cls(0, 0, roles, roles, roles, 0, 0, 0, roles, roles, {"data": 0, "mesh": 0})

    def graph_bytes(self, rows: dict, edges: dict, parts: int = 1) -> int:
        """The graph buffers of a rank with ``rows`` and ``edges`` (its part of ``parts``; a
        part also holds the global ids of its edges, int64)."""
        ids = 8 if parts > 1 else 0
        return (
            sum(edges[r] * (self.edge_bytes[r] + ids) for r in ROLES)
            + rows["data"] * self.row_bytes["data"]
            + rows["mesh"] * self.row_bytes["mesh"]
        )


def state_bytes(params: int, world: int, shard: bool,
                bucket_mb: float = GRAD_BUCKET_MB) -> int:  # fmt: skip
    """Bytes of parameter state a rank holds for the whole step: fp32 parameters and AdamW
    moments (a ``1 / world`` share with sharding), and with ``world > 1`` ranks unsharded the
    gradient buckets' flat copies alive at once (all the gradients with ``bucket_mb`` 0)."""
    if shard and world > 1:
        return PARAM_MOMENT_BYTES * params // world
    flat = 0
    if world > 1:
        flat = GRAD_BYTES * params
        if bucket_mb > 0:
            flat = min(flat, int(BUCKETS_ALIVE * bucket_mb * 2**20))
    return PARAM_MOMENT_BYTES * params + flat


def input_bytes(batch: int, rows: dict, num_vars: tuple[int, int], input_steps: int,
                rollout: int = 1) -> int:  # fmt: skip
    """The batch on the device for the whole step: fp32 inputs of every input step and targets of
    every rollout step, on the rank's grid points."""
    return 4 * batch * rows["data"] * (input_steps * num_vars[0] + rollout * num_vars[1])


def _block_bytes(mcfg: ModelConfig, b: int, act: int, n_dst: int, n_src: int, e: int,
                 bipartite: bool, edge_dim: int = 0,
                 autocast: bool = True) -> tuple[int, int, int]:  # fmt: skip
    """One block's activations: (kept for backward, the MLP part of those that ``mlp``
    recomputes, in flight during its backward)."""
    c, ratio = mcfg.num_channels, mcfg.mlp_ratio
    if mcfg.attention_backend == "triton":
        edges_kept, edges_backward = 0, e * b * mcfg.num_heads * EDGE_UNITS_TRITON_PER_HEAD
    else:
        edges_kept = edges_backward = e * b * c * act * EDGE_UNITS_TORCH
    if autocast:  # the edge inputs' bf16 copy, kept for the edge projection's backward
        edges_kept += e * edge_dim * act
    row = b * c * act
    stats = b * (2 * NORM_STATS_BYTES + LSE_BYTES_PER_HEAD * mcfg.num_heads)
    # compiled blocks keep the norms' bf16 input and recompute the fp32 copy in their backward
    copy = NORM_FP32_COPY_UNITS if autocast and not mcfg.compile else 0
    dst_units = DST_ROW_UNITS + 1 + 2 * ratio + (copy - 1 if copy else 0)
    dst_units += copy if bipartite else 0  # the destinations' own norm (the processor's: sources)
    kept = int(n_dst * (dst_units * row + stats)
               + n_src * ((SRC_ROW_UNITS[bipartite] + copy) * row
                          + (b * NORM_STATS_BYTES if bipartite else 0)))  # fmt: skip
    # what ``mlp`` recomputes: its layer norm's output, input copy and statistics, the hidden
    # layer before and after GELU (its input, the post-attention residual, stays kept)
    mlp = int(n_dst * ((1 + 2 * ratio + (copy - 1 if copy else 0)) * row + b * NORM_STATS_BYTES))
    # In flight at the peak of a block's backward, in its MLP: the gradients of GELU's output and
    # input (2 x mlp_ratio) less GELU's output, freed with the second product's backward
    # (mlp_ratio), plus the gradient of the block's output (1); the attention's per-edge scratch.
    in_flight = n_dst * (ratio + 1) * row + edges_backward
    return kept + edges_kept, mlp, in_flight


def _destinations(rows: dict) -> dict:
    """Owned destination rows of each edge set's blocks."""
    return {"encoder": rows["mesh"], "processor": rows["mesh"], "decoder": rows["data"]}


def _kept_inputs(mcfg: ModelConfig, blocks: list, batch: int, act: int, rows: dict, edges: dict,
                 z: ModelSizes, autocast: bool) -> dict:  # fmt: skip
    """Bytes of its inputs each block keeps for its backward; the arguments as
    :func:`step_phases`'s."""
    row = batch * mcfg.num_channels * act
    dst = _destinations(rows)
    # halo rows each block received (kept apart from the owned rows: squall.parallel.chunking;
    # 0 on one device)
    halo = {"encoder": rows["src_encoder"] - rows["data"], "decoder": rows["src_decoder"]
            - rows["mesh"], "processor": rows["src_processor"] - rows["mesh"]}  # fmt: skip
    # A block keeps its input rows when it is recomputed whole (the checkpoint keeps them) or
    # when its layer norms keep them (fp32, compiled); an eager block under autocast that keeps
    # its activations holds the norms' fp32 copies instead (counted in its units), so nothing
    # keeps the bf16 rows it was given.
    eager_bf16 = autocast and not mcfg.compile

    def keeps_input(role, layer):
        return not eager_bf16 or mcfg.block_policy(role, layer) == "full"

    # the processor's edge inputs are shared by every layer: kept by the first if any keeps them
    shared = any(keeps_input("processor", i) for i in range(mcfg.processor_layers))
    inputs = {}
    for role, layer in blocks:
        # the block's sources (the previous block's output) and their halo rows
        kept = 0
        if role != "encoder" and keeps_input(role, layer):
            kept = (dst["processor"] + halo[role]) * row
        # its edge set's fp32 inputs (the processor's shared by every layer), kept by the blocks
        # that keep their inputs (a kept block under autocast keeps their bf16 copy instead)
        if role == "decoder" and keeps_input(role, layer) or (
                role == "processor" and layer == 0 and shared):  # fmt: skip
            kept += 4 * z.edge_dims[role] * edges[role]
        if role == "encoder":
            # the data stream (the decoder's destinations too), the mesh embedding and their
            # halo rows, the embedding's input (autocast's copy), the edge set's inputs
            enc = keeps_input("encoder", 0)
            kept = ((rows["data"] if enc or keeps_input("decoder", 0) else 0) * row
                    + ((halo["encoder"] + rows["mesh"]) * row if enc else 0)
                    + rows["data"] * batch * act * z.embed_in
                    + (4 * z.edge_dims["encoder"] * edges["encoder"] if enc else 0))  # fmt: skip
        inputs[(role, layer)] = kept
    return inputs


def _block_memory(mcfg: ModelConfig, blocks: list, sizes_of: dict, z: ModelSizes,
                  cast_w: bool) -> tuple[dict, dict, dict]:  # fmt: skip
    """Per block, by its checkpoint policy: bytes held from its forward to its backward, bytes
    that exist only during its backward (recomputed, in flight), and bf16 weight copies made
    again for the backward (``cast_w``: weights cast by autocast on this rank)."""
    held, trans, copies = {}, {}, {}
    attn_share = 4 / (4 + 2 * mcfg.mlp_ratio)  # q, k, v, out of the block's C x C products
    for role, layer in blocks:
        inner, mlp, in_flight = sizes_of[role]
        policy = mcfg.block_policy(role, layer)
        cast = BF16_BYTES * z.cast[role] if cast_w else 0
        if policy == "none":
            held[(role, layer)] = inner + cast  # its bf16 weights saved with its activations
            trans[(role, layer)] = in_flight
            copies[(role, layer)] = 0
        elif policy == "mlp":
            held[(role, layer)] = inner - mlp + int(cast * attn_share)
            trans[(role, layer)] = mlp + in_flight
            copies[(role, layer)] = cast - int(cast * attn_share)
        else:
            held[(role, layer)] = 0
            trans[(role, layer)] = inner + in_flight
            copies[(role, layer)] = cast
    return held, trans, copies


def step_phases(mcfg: ModelConfig, batch: int, rows: dict, edges: dict, act: int,
                rollout: int = 1, sizes: ModelSizes | None = None, shard: int = 1,
                autocast: bool | None = None) -> dict[str, int]:  # fmt: skip
    """Bytes a step adds to the state it starts with, in each phase of the step.

    ``rows`` holds owned rows ``data``, ``mesh`` and local source rows per edge set
    (``src_<role>``); ``edges`` local edges per edge set; ``act`` bytes per activation (2 for bf16
    autocast, 4 for fp32); ``rollout`` forward steps per sample, each kept until the backward.
    ``sizes`` (:class:`ModelSizes`) adds the gradients, autocast's weight copies and the tensors
    kept outside the blocks (None: activations of the blocks only); ``shard`` ranks the
    parameters and gradients are sharded over (FSDP: a block's parameters gathered in bf16 while
    it runs, its gradient whole until reduce-scattered); ``autocast`` (default ``act == 2``)
    whether weights are cast to bf16.

    Per block policy (:data:`squall.models.forecaster.CHECKPOINT_POLICIES`): ``none`` keeps its
    inner activations (and its bf16 weight copies) until its backward; ``mlp`` keeps them less
    the MLP part, which then exists for one block at a time during recomputation; ``full`` keeps
    only the block's inputs and its inner activations exist for one block at a time.

    Returns
    -------
    dict of str to int
        ``"forward"`` (its end, every kept tensor alive, autocast's cache of bf16 weights
        still held), ``"backward <block>"`` for each block of the first backward pass (and of
        the last rollout step's when ``rollout`` > 1), in backward order: kept tensors of the
        blocks not yet done, the block's transient, the gradients so far; ``"optimizer"``: every
        gradient.
    """
    c, b = mcfg.num_channels, batch
    layers = mcfg.processor_layers
    autocast = act == 2 if autocast is None else autocast
    z = sizes or ModelSizes.zero()
    blocks = [("encoder", 0), *(("processor", i) for i in range(layers)), ("decoder", 0)]
    sharded = shard > 1
    # Kept for the backward, per rollout step, by the block whose backward frees it (counted
    # tensor by tensor: profiling/results/parallel_memory.md, scaling_model_host.md). After the
    # decoder: its output in fp32 for the output layer norm, the head's input and the loss's
    # fp32 difference, freed before the decoder's backward.
    head_kept = rows["data"] * b * (4 * c + act * c + 4 * z.out_vars)
    inputs = _kept_inputs(mcfg, blocks, b, act, rows, edges, z, autocast)
    sizes_of = {role: _block_bytes(mcfg, b, act, _destinations(rows)[role], rows[f"src_{role}"],
                                   edges[role], role != "processor", z.edge_dims[role], autocast)
                for role in ROLES}  # fmt: skip
    cast_w = autocast and not sharded
    held, trans, copies = _block_memory(mcfg, blocks, sizes_of, z, cast_w)
    step_kept = head_kept + sum(inputs.values()) + sum(held.values())
    out = {}
    # end of the forward: autocast's cache still holds the bf16 copy of every weight cast in
    # eager code (the blocks run whole without keeping them, and the rest of the model); with
    # sharding the decoder stays gathered for the backward
    cache = (sum(copies[k] for k in blocks if mcfg.block_policy(*k) == "full")
             if cast_w and not mcfg.compile else 0)  # fmt: skip
    cache += BF16_BYTES * z.cast_rest if cast_w else 0
    gathered = BF16_BYTES * z.block["decoder"] if sharded else 0
    out["forward"] = rollout * step_kept + cache + gathered
    grad_b = GRAD_BYTES / shard

    def block_grads(role):
        return z.block[role] * grad_b

    all_grads = int(z.params * grad_b)
    for k in range(min(rollout, 2)):
        # first backward pass, and (rollout > 1) the last one, where every gradient exists
        last = k == 1
        alive = (1 if last else rollout) * step_kept - head_kept
        grads = all_grads if last else int(z.first * grad_b)
        for role, layer in reversed(blocks):
            key = (role, layer)
            now = z.block[role] * (GRAD_BYTES + BF16_BYTES + 2 * BF16_BYTES) if sharded else 0
            own = 0 if (last or sharded) else int(block_grads(role))
            name = f"backward {role}" + (f" {layer}" if role == "processor" else "")
            out[name + (" (last rollout pass)" if last else "")] = int(
                alive + trans[key] + copies[key] + grads + own + now
            )
            alive -= inputs[key] + held[key]
            if not last:
                grads += int(block_grads(role))
                if role != "processor" or layer == 0:
                    grads += int(z.edge_features[role] * grad_b)
    out["optimizer"] = all_grads
    return out


def activation_bytes(mcfg: ModelConfig, batch: int, rows: dict, edges: dict, act: int,
                     rollout: int = 1, sizes: ModelSizes | None = None, shard: int = 1,
                     autocast: bool | None = None) -> int:  # fmt: skip
    """Peak bytes a step adds to the state it starts with: the largest of
    :func:`step_phases` (same arguments)."""
    return max(step_phases(mcfg, batch, rows, edges, act, rollout, sizes, shard,
                           autocast).values())  # fmt: skip


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


# The planner keeps this far below the budget: about the estimate's largest underestimate among
# the configurations measured (profiling/results/scaling_model.md: o96_l6, no checkpointing,
# compiled, one H200: 28.27 GiB measured against 26.44 GiB estimated; o320_l7 with a 60 GiB
# plan, compiled: 55.64 against 54.48).
PLAN_HEADROOM_GIB = 1.0


def plan_checkpointing(mcfg: ModelConfig, budget_gib: float, static_gib: float, batch: int,
                       rows: dict, edges: dict, edge_dims: dict, act: int = 2, rollout: int = 1,
                       fixed_mappers: bool = False, sizes: ModelSizes | None = None,
                       shard: int = 1) -> ModelConfig:  # fmt: skip
    """The checkpoint policies with the least recomputation whose estimated peak (static plus
    activations, :func:`activation_bytes`) fits ``budget_gib`` less :data:`PLAN_HEADROOM_GIB`.

    Searches every encoder and decoder policy and every count of ``full`` / ``mlp`` / ``none``
    processor layers (layers are alike, so which ones does not matter); ties go to less memory.
    ``fixed_mappers`` keeps the encoder's and decoder's policies (chunked mappers always
    recompute); ``sizes`` and ``shard`` as :func:`step_phases`. Raises :class:`~squall.errors.ConfigError` with the smallest estimate when
    nothing fits.
    """
    # the optimizer step holds the state and every gradient, whatever is recomputed
    floor = static_gib + (sizes.params * GRAD_BYTES / shard / GIB if sizes else 0.0)
    if floor + PLAN_HEADROOM_GIB > budget_gib:
        raise ConfigError(f"checkpoint.budget_gib={budget_gib:g}: parameters, gradients and AdamW "
                          f"state alone (with the graph and the batch) take {floor:.2f} GiB per "
                          f"GPU (+ {PLAN_HEADROOM_GIB} GiB headroom) and model-parallel ranks each "
                          "hold all of them; raise the budget")  # fmt: skip
    plans = _plans(mcfg, budget_gib, static_gib, batch, rows, edges, act, rollout, fixed_mappers,
                   sizes, shard)  # fmt: skip
    fitting = [(recompute_flops(cand, batch, rows, edges, edge_dims, rollout), gib, cand)
               for gib, cand in plans if gib <= budget_gib - PLAN_HEADROOM_GIB]  # fmt: skip
    if not fitting:
        smallest, least = min(plans, key=lambda p: p[0])
        raise ConfigError(f"checkpoint.budget_gib={budget_gib:g}: the smallest estimate "
                          f"({describe_checkpointing(least)}) is {smallest:.2f} GiB per GPU "
                          f"(static {static_gib:.2f}), so the budget must be at least "
                          f"{smallest + PLAN_HEADROOM_GIB:.2f} (with {PLAN_HEADROOM_GIB} GiB "
                          "headroom); raise it or add model-parallel ranks")  # fmt: skip
    return min(fitting, key=lambda f: f[:2])[2]


def _plans(mcfg: ModelConfig, budget_gib: float | None, static_gib: float, batch: int,
           rows: dict, edges: dict, act: int, rollout: int, fixed_mappers: bool,
           sizes: ModelSizes | None, shard: int) -> list[tuple[float, ModelConfig]]:  # fmt: skip
    """Every checkpoint plan :func:`plan_checkpointing` searches, with its estimated peak (GiB)."""
    layers, out = mcfg.processor_layers, []
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
                    peak = activation_bytes(cand, batch, rows, edges, act, rollout, sizes, shard)
                    out.append((static_gib + peak / GIB, cand))
    return out


def smallest_plan(mcfg: ModelConfig, static_gib: float, batch: int, rows: dict, edges: dict,
                  act: int = 2, rollout: int = 1, fixed_mappers: bool = False,
                  sizes: ModelSizes | None = None,
                  shard: int = 1) -> tuple[float, ModelConfig]:  # fmt: skip
    """The least estimated peak (GiB) of any checkpoint plan and that plan (arguments as
    :func:`plan_checkpointing`). Not always every block recomputed: under autocast an eager
    block that keeps its activations keeps its layer norms' fp32 copies instead of its input
    rows, so at the phase of the peak it may hold less than one recomputed whole."""
    return min(_plans(mcfg, None, static_gib, batch, rows, edges, act, rollout, fixed_mappers,
                      sizes, shard), key=lambda p: p[0])  # fmt: skip


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
    msizes = ModelSizes.of(model, graph)
    edge_dims = msizes.edge_dims
    shard = world_size if pcfg.shard_parameters and world_size > 1 else 1
    state = state_bytes(params, world_size, shard > 1, pcfg.grad_bucket_mb)
    ring = 2 * (world_size - 1) / world_size if world_size > 1 else 0.0
    sizes = _sizes(graph, mcfg, pcfg)

    def static_of(rows, edges):  # state, the graph's part and the batch, for the whole step
        return (state + msizes.graph_bytes(rows, edges, pcfg.model_parallel)
                + input_bytes(samples, rows, num_vars, input_steps, rollout))  # fmt: skip

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
        mcfg = plan_checkpointing(mcfg, mcfg.checkpoint_budget_gib,
                                  static_of(largest_rows, largest_edges) / GIB, batch,
                                  largest_rows, largest_edges, edge_dims, act_bytes, rollout,
                                  fixed_mappers=chunked, sizes=msizes, shard=shard)  # fmt: skip
    uses = {"encoder": 1, "processor": mcfg.processor_layers, "decoder": 1}
    out = []
    for r, size in enumerate(sizes):
        halo_bytes = sum(2 * uses[k] * v * batch * mcfg.num_channels * act_bytes
                         for k, v in size.halo.items())  # fmt: skip
        phases = step_phases(mcfg, batch, size.rows, size.edges, act_bytes, rollout, msizes,
                             shard)  # fmt: skip
        peak_phase = max(phases, key=phases.get)
        act = phases[peak_phase]
        static = static_of(size.rows, size.edges)
        gather = 0
        if (members or 1) > 1:
            # one output value per member, grid point of this part and output variable
            values = samples * size.rows["data"] * num_vars[1] * rollout
            gather = (ensemble - 1) * local_members * values * act_bytes
            act += members * values * (act_bytes + SCORE_FP32_COPIES * 4)
        out.append(RankEstimate(r, size.rows, size.edges, size.halo, size.peers, static / GIB,
                                act / GIB, int(halo_bytes), int(ring * 4 * params),
                                local_members, int(gather), peak_phase))  # fmt: skip
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
        "memory per rank: static = parameters, AdamW moments, gradient buckets in flight, the "
        "graph's part and the batch (the whole step); act = what the step adds at its peak "
        f"(activations, gradients so far, bf16 weight copies), in the phase "
        f"'{max(ranks, key=lambda r: r.total_gib).peak_phase}' on the largest rank",
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

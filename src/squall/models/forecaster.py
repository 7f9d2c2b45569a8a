"""Encoder-processor-decoder GraphTransformer forecaster (single device; never imports
torch.distributed: parallelism is applied afterwards by ``squall.parallel``).

Data flow for input ``x [B, T_in, G, V_in]`` (normalised), with ``C`` channels::

    data latent   z_g = W_in [x_g (T_in * V_in values), node attributes]       [B, G, C]
    mesh latent   z_m = W_mesh [mesh node attributes]                            [B, M, C]
    encoder       z_m <- GT block over data -> mesh edges (z_g as sources)
    processor     z_m <- L GT blocks over mesh -> mesh edges
    decoder       z_g <- GT block over mesh -> data edges (z_m as sources, z_g as destinations)
    output        y = W_out LN(z_g)                                              [B, G, V_out]
    prognostic variables are predicted as a residual on the last input step.

Decoder destinations (``model.decoder_target``): with ``latent`` (the default, Anemoi's
``encoded_data``) the decoder updates the data latent ``z_g`` above, so each grid point's own
input states reach its output directly. With ``static`` (Anemoi's ``coordinates`` +
``forcings`` target features) the destinations start from ``W_t [f_g, node attributes]``, where
``f_g`` are the last input step's non-prognostic columns (forcings and, for a driven LAM, the
driver's lookahead columns): the decoder knows where and when, not the state, so every change of
the prognostic variables has to come through the mesh. With ``latent``, the grid point's own
inputs reach its output about 10^3 times more strongly than its neighbours' at initialisation
(the mesh path averages ~12 grid points per mesh node and is layer-normed against the mesh
embedding), and training on lam_alps settles in a pointwise forecast whose decoder output does
not change when the mesh latents are replaced by their mean (profiling/lam_sensitivity.py,
profiling/lam_mesh_use.py).

Ensemble mode (``model.ensemble.noise_channels = K > 0``): the model is stochastic. After the
encoder, each mesh node of each sample gets ``K`` fresh standard-normal noise channels, drawn at
every call (so per member and per step of a rollout) and carried through the processor, whose
blocks condition their layer norms on them (:class:`~squall.layers.graph_transformer.
NoiseConditioning`; AIFS-CRPS, Lang et al. 2024, arXiv:2412.15832, conditions its processor the
same way). The noise is white on the mesh: the processor's attention gives it the spatial
structure the loss asks for. Members are batch rows that share their input and differ only by
their noise: an ensemble of ``M`` members of a batch of ``B`` runs as one batch of ``B * M``
(member-fastest), which the blocks fold into their heads like any batch. With ``K = 0`` (the
default) the model holds no noise parameters and is the deterministic forecaster, bit for bit.

Edge features are each edge set's geometric attributes (length, direction) plus optional
trainable per-edge features.

How the blocks run is the business of ``model.runner`` (a :class:`BlockRunner`): by default each
block updates every destination of its edge set on this device. Activation checkpointing,
``torch.compile``, graph sharding and sequential chunking are applied afterwards, in one place, by
:func:`squall.parallel.parallelize.parallelize`, which installs its own runner and graph view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from squall.config import (
    CHECKPOINT_POLICIES,
    DECODER_TARGETS,
    ENSEMBLE_LOSSES,
    as_flag,
    to_container,
)
from squall.errors import ConfigError
from squall.graphs import Graph
from squall.kernels.edge_index import EdgeIndex
from squall.layers.graph_transformer import GraphTransformerBlock

ROLES = ("encoder", "processor", "decoder")


def checkpoint_policy(value, what: str = "checkpoint") -> str:
    """``none | mlp | full`` from a policy name or a bool (``true`` = ``full``)."""
    if value is None or isinstance(value, bool):
        return "full" if value else "none"
    if str(value) not in CHECKPOINT_POLICIES:
        raise ConfigError(
            f"{what}: {value!r} is not one of {', '.join(CHECKPOINT_POLICIES)} or a bool"
        )
    return str(value)


@dataclass(frozen=True)
class ModelConfig:
    """Model sizes, attention backend, and how the blocks are run (checkpointing, compile).

    The ``checkpoint_*`` policies and ``compile`` do not change the model's maths: the model
    ignores them and :func:`squall.parallel.parallelize.parallelize` applies them.
    ``checkpoint_processor`` is one policy for every processor layer or a tuple of one per layer;
    ``checkpoint_budget_gib`` (when set) asks :func:`squall.planning.estimate.plan_checkpointing`
    to choose all three under that much memory per GPU.
    """

    num_channels: int = 32
    num_heads: int = 4
    processor_layers: int = 2
    mlp_ratio: int = 2
    trainable_edge_features: int = 0
    attention_backend: str = "torch"
    checkpoint_encoder: str = "none"
    checkpoint_processor: str | tuple[str, ...] = "none"
    checkpoint_decoder: str = "none"
    checkpoint_budget_gib: float | None = None
    compile: bool = False  # blocks under torch.compile (the estimate counts what the compiled
    # backward recomputes)
    # ensemble (model.ensemble): members per sample in training, noise channels per mesh node
    # (0: deterministic), the training score (afcrps | fair_crps | energy) and afCRPS's alpha
    ensemble_members: int = 1
    noise_channels: int = 0
    ensemble_loss: str = "afcrps"
    crps_alpha: float = 0.95
    decoder_target: str = "latent"

    def __post_init__(self):
        for role in ("encoder", "decoder"):
            key = f"checkpoint_{role}"
            object.__setattr__(
                self, key, checkpoint_policy(getattr(self, key), f"checkpoint.{role}")
            )
        proc = self.checkpoint_processor
        if isinstance(proc, (list, tuple)):
            if len(proc) != self.processor_layers:
                raise ConfigError(f"checkpoint.processor lists {len(proc)} policies for "
                                 f"{self.processor_layers} processor layers")  # fmt: skip
            proc = tuple(checkpoint_policy(p, "checkpoint.processor") for p in proc)
        else:
            proc = checkpoint_policy(proc, "checkpoint.processor")
        object.__setattr__(self, "checkpoint_processor", proc)
        if self.ensemble_members < 1 or self.noise_channels < 0:
            raise ConfigError(f"model.ensemble: members={self.ensemble_members} must be >= 1 and "
                              f"noise_channels={self.noise_channels} >= 0")  # fmt: skip
        if self.ensemble_members > 1 and not self.noise_channels:
            raise ConfigError(f"model.ensemble.members={self.ensemble_members} needs "
                              "noise_channels > 0: without noise every member is the same")
        if self.ensemble_loss not in ENSEMBLE_LOSSES:
            raise ConfigError(f"model.ensemble.loss={self.ensemble_loss!r}: choose one of "
                              f"{', '.join(ENSEMBLE_LOSSES)}")  # fmt: skip
        if not 0.0 <= self.crps_alpha <= 1.0:
            raise ConfigError(f"model.ensemble.alpha={self.crps_alpha} must lie in [0, 1]")
        if self.decoder_target not in DECODER_TARGETS:
            raise ConfigError(f"model.decoder_target={self.decoder_target!r}: choose one of "
                              f"{', '.join(DECODER_TARGETS)}")  # fmt: skip

    @property
    def ensemble(self) -> bool:
        """Whether the model is stochastic (noise-conditioned)."""
        return self.noise_channels > 0

    def architecture(self) -> dict:
        """The settings that give the weights their shapes and meaning (not how they are run:
        backend, recomputation and compile are left out)."""
        arch = {
            "num_channels": self.num_channels, "num_heads": self.num_heads,
            "processor_layers": self.processor_layers, "mlp_ratio": self.mlp_ratio,
            "trainable_edge_features": self.trainable_edge_features,
        }  # fmt: skip
        if self.noise_channels:  # absent for deterministic models, as in their older checkpoints
            arch["noise_channels"] = self.noise_channels
        if self.decoder_target != "latent":  # absent when default, as in older checkpoints
            arch["decoder_target"] = self.decoder_target
        return arch

    def block_policy(self, role: str, layer: int = 0) -> str:
        """Checkpoint policy of the encoder, processor layer ``layer`` or decoder."""
        policy = getattr(self, f"checkpoint_{role}")
        return policy[layer] if isinstance(policy, tuple) else policy

    @classmethod
    def from_cfg(cls, cfg) -> ModelConfig:
        ckpt = cfg.get("checkpoint", {}) or {}
        proc = to_container(ckpt.get("processor", False))
        budget = ckpt.get("budget_gib")
        ens = cfg.get("ensemble", None) or {}
        return cls(
            num_channels=int(cfg.num_channels),
            num_heads=int(cfg.num_heads),
            processor_layers=int(cfg.processor_layers),
            mlp_ratio=int(cfg.get("mlp_ratio", 4)),
            trainable_edge_features=int(cfg.get("trainable_edge_features", 0)),
            attention_backend=str(cfg.get("attention_backend", "torch")),
            checkpoint_encoder=ckpt.get("encoder", False),
            checkpoint_processor=tuple(proc) if isinstance(proc, list) else proc,
            checkpoint_decoder=ckpt.get("decoder", False),
            checkpoint_budget_gib=None if budget is None else float(budget),
            compile=as_flag(cfg.get("compile", False), "model.compile"),
            ensemble_members=int(ens.get("members", 1)),
            noise_channels=int(ens.get("noise_channels", 0)),
            ensemble_loss=str(ens.get("loss", "afcrps")),
            crps_alpha=float(ens.get("alpha", 0.95)),
            decoder_target=str(cfg.get("decoder_target", "latent")),
        )


class GraphInputs(nn.Module):
    """The graph as the model sees it: edge indices, edge and node attributes, as buffers.

    ``EdgeIndex`` objects are not tensors, so they follow the module's device by hand.
    """

    def __init__(self, graph: Graph, data: str = "data", mesh: str = "hidden"):
        super().__init__()
        for role in ROLES:
            if role not in graph.edges:
                raise ValueError(f"graph {graph.name!r} has no {role!r} edge set")
        self.data_name, self.mesh_name = data, mesh
        self.num_data, self.num_mesh = len(graph.nodes[data]), len(graph.nodes[mesh])
        self.register_buffer(
            "data_attrs", torch.from_numpy(graph.node_attributes(data)), persistent=False
        )
        self.register_buffer(
            "mesh_attrs", torch.from_numpy(graph.node_attributes(mesh)), persistent=False
        )
        self.register_buffer(
            "area", torch.from_numpy(graph.nodes[data].area.astype(np.float32)), persistent=False
        )
        self.indices: dict[str, EdgeIndex] = {}
        for role in ROLES:
            e = graph.edges[role]
            self.register_buffer(f"{role}_attrs", torch.from_numpy(e.attrs), persistent=False)
            self.indices[role] = EdgeIndex(
                e.num_src, e.num_dst,
                *(torch.from_numpy(a) for a in (e.colptr, e.row, e.dst_index, e.rowptr, e.csr_perm)),
            )  # fmt: skip
        self.num_edges = {role: graph.edges[role].num_edges for role in ROLES}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.area.device
        if next(iter(self.indices.values())).colptr.device != device:
            self.indices = {k: v.to(device) for k, v in self.indices.items()}
        return self

    def edge_rows(self, role: str, per_edge: torch.Tensor) -> torch.Tensor:
        """The rows of a per-edge tensor ``[E, ...]`` of edge set ``role`` that this view holds
        (here every edge, in order)."""
        return per_edge


class BlockRunner:
    """Runs one block over one edge set of the model's graph view: every destination at once,
    on this device, recomputing the activations of the blocks in ``recompute`` in backward.

    The model's default runner has no block to recompute.

    Parameters
    ----------
    recompute : iterable of nn.Module
        Blocks run under ``torch.utils.checkpoint`` (the ``full`` checkpoint policy).
    """

    def __init__(self, recompute=()):
        self.recompute = frozenset(recompute)

    def __call__(self, graph, role: str, block, x_src, x_dst, edge_attr) -> torch.Tensor:
        """``block``'s new destinations ``[B, N_dst, C]`` over edge set ``role`` of ``graph``."""
        index = graph.indices[role]
        if block in self.recompute and torch.is_grad_enabled():
            return checkpoint(block, x_src, x_dst, edge_attr, index, use_reentrant=False)
        return block(x_src, x_dst, edge_attr, index)


class GraphForecaster(nn.Module):
    """Predict the next state from ``input_steps`` past states on one graph."""

    def __init__(
        self,
        graph: Graph,
        cfg: ModelConfig,
        num_input_vars: int,
        num_output_vars: int,
        input_steps: int,
        residual_map: list[tuple[int, int]] | None = None,
        residual_scale: list[float] | None = None,
    ):
        super().__init__()
        self.cfg, self.input_steps = cfg, input_steps
        self.graph_name, self.graph_hash = graph.name, graph.spec_hash
        self.graph = GraphInputs(graph)
        # the whole graph's sizes (the FLOP count), whatever part of it ``self.graph`` holds
        self.sizes = {"data": self.graph.num_data, "mesh": self.graph.num_mesh,
                      **self.graph.num_edges}  # fmt: skip
        self.runner = BlockRunner()
        # noise_source(rows) -> [rows, N_mesh, K] replaces the global generator's draws (members
        # spread over ranks: squall.parallel.ensemble.SharedNoise)
        self.noise_source = None
        # observations -> mesh after the grid encoder (squall.models.obs_encoder; set by
        # attach_observations when model.observations is configured)
        self.obs_encoder = None
        c = cfg.num_channels
        node_dim = self.graph.data_attrs.shape[1]
        self.embed_data = nn.Linear(input_steps * num_input_vars + node_dim, c)
        self.embed_mesh = nn.Linear(node_dim, c)
        edge_dim = {}
        self.edge_features = nn.ParameterDict()
        for role in ROLES:
            edge_dim[role] = (
                getattr(self.graph, f"{role}_attrs").shape[1] + cfg.trainable_edge_features
            )
            if cfg.trainable_edge_features:
                self.edge_features[role] = nn.Parameter(
                    0.01 * torch.randn(self.graph.num_edges[role], cfg.trainable_edge_features)
                )

        def block(role, bipartite, noise=0):
            return GraphTransformerBlock(c, cfg.num_heads, edge_dim[role], cfg.mlp_ratio,
                                         bipartite, cfg.attention_backend,
                                         noise_channels=noise)  # fmt: skip

        self.encoder = block("encoder", True)
        self.processor = nn.ModuleList(
            block("processor", False, cfg.noise_channels) for _ in range(cfg.processor_layers)
        )
        self.decoder = block("decoder", True)
        # the input columns that carry no prognostic state (forcings, lookahead): the ``static``
        # decoder target's inputs
        res_in = {p[1] for p in residual_map or []}
        self.register_buffer("static_in", torch.tensor(
            [i for i in range(num_input_vars) if i not in res_in], dtype=torch.long),
            persistent=False)  # fmt: skip
        self.embed_target = (nn.Linear(len(self.static_in) + node_dim, c)
                             if cfg.decoder_target == "static" else None)  # fmt: skip
        self.norm_out = nn.LayerNorm(c)
        self.head = nn.Linear(c, num_output_vars)
        # Start as persistence (zero tendency): training then only has to learn the change.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # (output column, input column) pairs predicted as a residual on the last input step
        pairs = residual_map or []
        self.register_buffer(
            "res_out", torch.tensor([p[0] for p in pairs], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "res_in", torch.tensor([p[1] for p in pairs], dtype=torch.long), persistent=False
        )
        # Typical size of one step's change of each output (1 for diagnostics): the head predicts
        # tendencies in units of their own spread, so its outputs are O(1) whatever the time step.
        scale = torch.ones(num_output_vars)
        if residual_scale is not None:
            scale[self.res_out] = torch.as_tensor(residual_scale, dtype=torch.float32)
        self.register_buffer("output_scale", scale)

    def edge_inputs(self, role: str) -> torch.Tensor:
        """Features ``[E, d_e]`` of the edges of ``role`` in the graph view: geometric
        attributes, then the trainable ones."""
        attrs = getattr(self.graph, f"{role}_attrs")
        if role in self.edge_features:
            trained = self.graph.edge_rows(role, self.edge_features[role])
            return torch.cat([attrs, trained], dim=1)
        return attrs

    @property
    def members(self) -> int:
        """Ensemble members per sample in training (1: deterministic)."""
        return self.cfg.ensemble_members

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh noise ``[batch, N_mesh, K]`` for the mesh rows of this graph view (standard
        normal, fp32, on the model's device)."""
        rows = self.graph.mesh_attrs.shape[0]
        return torch.randn(batch, rows, self.cfg.noise_channels, generator=generator,
                           device=self.graph.mesh_attrs.device)  # fmt: skip

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                obs=None) -> torch.Tensor:  # fmt: skip
        """``x [B, T_in, G, V_in]`` normalised -> next state ``[B, G, V_out]`` normalised.

        ``obs`` (models with an observation encoder): this step's observations, an
        :class:`~squall.data.observations.ObsBatch` of ``B`` samples on the model's device; None
        skips the observation encoder.

        ``noise [B, N_mesh, K]`` (ensemble models only): the processor's noise; None draws it
        from :attr:`noise_source` when set, else (:meth:`sample_noise`) from torch's global
        generator.
        """
        b, t, g, v = x.shape
        if t != self.input_steps or g != self.graph.num_data:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected {self.input_steps} steps on "
                f"{self.graph.num_data} grid points"
            )
        gi, run = self.graph, self.runner
        data_in = torch.cat(
            [
                x.permute(0, 2, 1, 3).reshape(b, g, t * v),
                gi.data_attrs.expand(b, -1, -1).to(x.dtype),
            ],
            -1,
        )
        z_data = self.embed_data(data_in)
        z_mesh = self.embed_mesh(gi.mesh_attrs).expand(b, -1, -1)
        enc, proc, dec = (self.edge_inputs(r) for r in ROLES)
        z_mesh = run(gi, "encoder", self.encoder, z_data, z_mesh, enc)
        if obs is not None:
            if self.obs_encoder is None:
                raise ValueError("observations given to a model without an observation encoder "
                                 "(model.observations)")  # fmt: skip
            z_mesh = self.obs_encoder(z_mesh, obs, getattr(gi, "mesh_ids", None))
        k = self.cfg.noise_channels
        if k:
            if noise is None:
                noise = self.sample_noise(b) if self.noise_source is None else self.noise_source(b)
            if noise.shape != (b, z_mesh.shape[1], k):
                raise ValueError(f"noise of shape {tuple(noise.shape)}: expected "
                                 f"{(b, z_mesh.shape[1], k)} (batch, mesh rows, noise channels)")
            z_mesh = torch.cat([z_mesh, noise.to(z_mesh.dtype)], -1)
        elif noise is not None:
            raise ValueError("noise given to a deterministic model "
                             "(model.ensemble.noise_channels=0)")
        for layer in self.processor:
            z_mesh = run(gi, "processor", layer, z_mesh, z_mesh, proc)
        if k:
            z_mesh = z_mesh[..., :-k]
        if self.embed_target is not None:  # destinations know where and when, not the state
            z_data = self.embed_target(torch.cat(
                [x[:, -1].index_select(-1, self.static_in), gi.data_attrs.expand(b, -1, -1).to(x.dtype)],
                -1))  # fmt: skip
        z_data = run(gi, "decoder", self.decoder, z_mesh, z_data, dec)
        y = self.head(self.norm_out(z_data)) * self.output_scale.to(x.dtype)
        if self.res_out.numel():
            last = x[:, -1].index_select(-1, self.res_in).to(y.dtype)
            y = y.index_add(-1, self.res_out, last)
        return y

    def identity(self) -> dict:
        """What a checkpoint of this model was trained on: the graph (name and spec hash, see
        :func:`squall.graphs.store.spec_hash`) and the architecture."""
        return {"graph": {"name": self.graph_name, "spec_hash": self.graph_hash},
                "model": self.cfg.architecture()}  # fmt: skip

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> int:
        """Analytic forward FLOPs of one sample on the whole graph (a training step costs about
        3x this)."""
        s, c = self.sizes, self.cfg.num_channels
        total = (
            2 * self.embed_data.in_features * c * s["data"]
            + 2 * self.embed_mesh.in_features * c * s["mesh"]
        )
        total += self.encoder.flops_per_sample(s["data"], s["mesh"], s["encoder"])
        total += sum(
            layer.flops_per_sample(s["mesh"], s["mesh"], s["processor"]) for layer in self.processor
        )
        if self.embed_target is not None:
            total += 2 * self.embed_target.in_features * c * s["data"]
        total += self.decoder.flops_per_sample(s["mesh"], s["data"], s["decoder"])
        return total + 2 * c * self.head.out_features * s["data"]


def compile_blocks(model: GraphForecaster) -> GraphForecaster:
    """``torch.compile`` every GraphTransformer block in place (state-dict keys unchanged); called
    by :func:`squall.parallel.parallelize.parallelize` when ``model.cfg.compile``.

    Fuses each block's layer norms, bias adds, GELU, residual adds and casts around the attention
    custom op; shapes are static per graph, so ``dynamic=False``.
    """
    for block in (model.encoder, *model.processor, model.decoder):
        block.compile(dynamic=False)
    return model

"""Observation encoder: a GraphTransformer mapper from this batch's observations to the mesh.

Where it sits (a choice: *alongside* the grid encoder, not instead of it)::

    z_m <- grid encoder (data -> mesh, static graph)
    z_m <- observation encoder (observations -> mesh, built for this batch)     [this module]
    z_m <- processor ...

The grid encoder's mesh latents are the destinations of one more bipartite GraphTransformer
block (:class:`squall.layers.graph_transformer.GraphTransformerBlock`, the mappers' block and
attention) whose sources are the observations. A mesh node with no observation in reach keeps
its latent up to the block's residual MLP, so a sample with no observations at all is a valid
input, and the model without observations (``obs=None``, e.g. a forecast) skips the block.

Observation features (``2 C_obs + 4`` per observation): the values with missing channels set to
0 (``where``, so a NaN never reaches the model), the mask (1 observed, 0 missing), and sin/cos of
latitude and longitude as for grid nodes. An observation that misses every channel still carries
its place and its mask.

The batch is packed into one graph (:mod:`squall.graphs.dynamic`): ``N`` observations of all
samples as sources and ``B * M`` mesh rows as destinations, so the block runs once with batch 1
(samples never share edges). Edges are built on the mesh's device every call: every mesh node
gathers the observations within ``cutoff_factor`` times the mesh's largest nearest-neighbour
spacing (0.6: the static encoder's factor; it reaches every point of the sphere from some mesh
node on meshes of level 4 and finer, whose largest triangle circumradius is 0.583 (level 4) to
0.577 (level 7) times that spacing; levels 1-2 need 0.67), the nearest ``max_neighbours`` of
them. On a model-parallel rank the destinations are the
rank's own mesh rows (``graph.mesh_ids``), so each rank builds the edges of its partition only
and no halo is needed: every rank holds every observation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from squall.config import to_container
from squall.errors import ConfigError
from squall.graphs.dynamic import ObsGraph, mesh_frames, observation_edges
from squall.graphs.edges import nearest_neighbour_spacing
from squall.graphs.grids import NodeSet
from squall.layers.graph_transformer import GraphTransformerBlock

#: Position features per observation (sin/cos latitude, sin/cos longitude).
POSITION_FEATURES = 4


@dataclass(frozen=True)
class ObsEncoderConfig:
    """``model.observations``: cutoff and neighbour cap of the observation-to-mesh edges.

    Attributes
    ----------
    cutoff_factor : float
        Radius in units of the mesh's largest nearest-neighbour spacing (0.6 covers the sphere
        from level-4 meshes up).
    max_neighbours : int or None
        Observations per mesh node and sample at most (nearest first; None: all in reach).
    """

    cutoff_factor: float = 0.6
    max_neighbours: int | None = 64

    def __post_init__(self):
        if not self.cutoff_factor > 0:
            raise ConfigError(f"model.observations.cutoff_factor={self.cutoff_factor} must be > 0")
        if self.max_neighbours is not None and self.max_neighbours < 1:
            raise ConfigError(f"model.observations.max_neighbours={self.max_neighbours} must be "
                              ">= 1 or null")  # fmt: skip

    @classmethod
    def from_cfg(cls, cfg) -> ObsEncoderConfig:
        d = dict(to_container(cfg) or {})
        cap = d.get("max_neighbours", 64)
        return cls(float(d.get("cutoff_factor", 0.6)), None if cap is None else int(cap))


def observation_features(values: torch.Tensor, mask: torch.Tensor,
                         latlon: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``[N, 2 C + 4]`` float32: masked values, mask, sin/cos lat/lon (module docstring)."""
    mask = mask.to(torch.bool)
    vals = torch.where(mask, values.float(), torch.zeros((), device=values.device))
    lat, lon = latlon[:, 0], latlon[:, 1]
    pos = torch.stack([torch.sin(lat), torch.cos(lat), torch.sin(lon), torch.cos(lon)], 1)
    return torch.cat([vals, mask.float(), pos.float()], 1)


class ObservationEncoder(nn.Module):
    """Observations -> mesh latents (module docstring).

    Parameters
    ----------
    mesh : NodeSet
        The graph's mesh (``hidden``) nodes, in the model's mesh order.
    obs_channels : int
        Observed channels ``C_obs``.
    channels, heads, mlp_ratio : int
        The model's latent width, heads and MLP ratio.
    backend : str
        Attention backend of the block.
    config : ObsEncoderConfig
    """

    def __init__(self, mesh: NodeSet, obs_channels: int, channels: int, heads: int,
                 mlp_ratio: int, backend: str = "torch",
                 config: ObsEncoderConfig | None = None):  # fmt: skip
        super().__init__()
        if obs_channels < 1:
            raise ConfigError("observation encoder: need at least one observed channel")
        self.config = config or ObsEncoderConfig()
        self.obs_channels = int(obs_channels)
        self.chord = float(self.config.cutoff_factor * nearest_neighbour_spacing(mesh).max())
        if self.chord > 2:
            raise ConfigError(
                f"model.observations.cutoff_factor={self.config.cutoff_factor}: the "
                f"radius (chord {self.chord:.3g}) exceeds the sphere's diameter"
            )
        latlon = torch.from_numpy(np.ascontiguousarray(mesh.latlon, dtype=np.float64))
        xyz = torch.from_numpy(np.ascontiguousarray(mesh.xyz, dtype=np.float64))
        self.register_buffer("mesh_latlon", latlon, persistent=False)
        self.register_buffer("mesh_frame", mesh_frames(xyz), persistent=False)
        self.embed = nn.Linear(2 * obs_channels + POSITION_FEATURES, channels)
        self.block = GraphTransformerBlock(channels, heads, 3, mlp_ratio, bipartite=True,
                                           backend=backend)  # fmt: skip
        self._rows: tuple | None = None  # (mesh ids array, device, tensor) of the last view

    def _mesh_rows(self, mesh_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Lat/lon and frames of the mesh rows of the model's graph view (all when ``None``)."""
        if mesh_ids is None:
            return self.mesh_latlon, self.mesh_frame
        device = self.mesh_latlon.device
        if self._rows is None or self._rows[0] is not mesh_ids or self._rows[1] != device:
            self._rows = (mesh_ids, device, torch.as_tensor(np.asarray(mesh_ids), device=device))
        rows = self._rows[2]
        return self.mesh_latlon.index_select(0, rows), self.mesh_frame.index_select(0, rows)

    def build_graph(self, obs, mesh_ids=None) -> ObsGraph:
        """The batch's observation-to-mesh edges (:func:`squall.graphs.dynamic.
        observation_edges`) into the mesh rows ``mesh_ids`` (global ids; None: every node)."""
        latlon, frame = self._mesh_rows(mesh_ids)
        return observation_edges(obs.latlon, obs.offsets, latlon, frame, self.chord,
                                 self.config.max_neighbours,
                                 offsets_host=obs.offsets.tolist())  # fmt: skip

    def forward(self, z_mesh: torch.Tensor, obs, mesh_ids=None) -> torch.Tensor:
        """``z_mesh [B, M_view, C]`` updated from ``obs`` (an :class:`squall.data.observations.
        ObsBatch` of ``B`` samples on this device); ``mesh_ids`` are the global ids of the rows
        (a model-parallel rank's own mesh nodes), None for the whole mesh."""
        b, m, c = z_mesh.shape
        if obs.num_samples != b:
            raise ValueError(f"observations of {obs.num_samples} samples for a batch of {b}")
        if obs.values.shape[1:] != (self.obs_channels,):
            raise ValueError(f"observations with values of shape {tuple(obs.values.shape)}: the "
                             f"encoder takes {self.obs_channels} channels")  # fmt: skip
        graph = self.build_graph(obs, mesh_ids)
        if graph.num_mesh != m:
            raise ValueError(f"mesh latents of {m} rows for {graph.num_mesh} mesh nodes")
        feats = observation_features(obs.values, obs.mask, obs.latlon)
        x_src = self.embed(feats).unsqueeze(0)
        x_dst = z_mesh.reshape(1, b * m, c)
        if graph.num_edges:
            out = self.block(x_src, x_dst, graph.attrs, graph.index)
        else:
            out = self._without_edges(x_src, x_dst)
        return out.reshape(b, m, c)

    def _without_edges(self, x_src: torch.Tensor, x_dst: torch.Tensor) -> torch.Tensor:
        """The block when no observation reaches the mesh: every attention sum is empty (0), so
        each row gets the output bias and the residual MLP. Every parameter stays on the autograd
        path (times 0), so data-parallel replicas reduce the same set of gradients."""
        blk = self.block
        x = x_dst + blk.out(torch.zeros_like(x_dst))
        unused = sum(p.sum() for p in self.parameters()) + x_src.sum()
        return blk.mlp_residual(x) + 0 * unused.to(x.dtype)


def attach_observations(model, cfg, graph):
    """Give ``model`` (a :class:`~squall.models.forecaster.GraphForecaster`) an observation encoder
    when ``cfg.model.observations`` is set; both it and ``cfg.data.observations`` or neither.

    Returns the model.
    """
    model_obs = cfg.model.get("observations")
    data_obs = cfg.data.get("observations")
    if model_obs is None and data_obs is None:
        return model
    if model_obs is None or data_obs is None:
        have, lack = ("model", "data") if model_obs is not None else ("data", "model")
        hint = "data=obs_synthetic" if lack == "data" else "model=obs_tiny"
        raise ConfigError(f"{have}.observations is set but {lack}.observations is not: train an "
                          f"observation model with both (e.g. {hint})")  # fmt: skip
    if model.cfg.ensemble:
        raise ConfigError("model.observations: observation encoders are deterministic only "
                          "(model.ensemble.noise_channels must be 0)")  # fmt: skip
    channels = list(to_container(data_obs.get("channels")) or [])
    mcfg = model.cfg
    model.obs_encoder = ObservationEncoder(
        graph.nodes[model.graph.mesh_name], len(channels), mcfg.num_channels, mcfg.num_heads,
        mcfg.mlp_ratio, mcfg.attention_backend, ObsEncoderConfig.from_cfg(model_obs),
    )  # fmt: skip
    return model

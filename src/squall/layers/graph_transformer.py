"""GraphTransformer block: multi-head attention over each destination's incoming edges, then an MLP.

Per destination node ``i`` with features ``x_i`` and source features ``s_j`` (``s = x`` on the
mesh), with ``LN`` layer norms and per-head channels ``c = C / H``::

    q_i = W_q LN(x_i),  k_j = W_k LN(s_j),  v_j = W_v LN(s_j),  e_ij = W_e a_ij + b_e
    h_i = sum_j softmax_j(q_i . (k_j + e_ij) / sqrt(c)) (v_j + e_ij)        (per head)
    x_i <- x_i + W_o h_i
    x_i <- x_i + MLP(LN(x_i))

``a_ij`` are the low-dimensional edge features (geometric attributes plus optional trainable
ones); the edge projection ``W_e`` is handed to the attention kernel, which forms ``e_ij`` itself
(``triton`` backend) or materialises it (``torch`` backend).

Batches are folded into the head dimension: the graph is shared by every sample, so ``[B, N, C]``
features become ``[N, B * H, c]`` and the edge projection is tiled ``B`` times.

Noise conditioning (ensemble models, ``noise_channels = K > 0``): the node rows carry ``K`` noise
channels after their ``C`` features, ``[B, N, C + K]``, and the two destination layer norms become
noise-conditioned (:class:`ConditionalLayerNorm`, as in AIFS-CRPS, Lang et al. 2024,
arXiv:2412.15832)::

    [s_a, t_a, s_m, t_m] = W_2 GELU(W_1 n_i)                      (per node, from its noise n_i)
    LN_a(x_i) -> LN_a(x_i) (1 + s_a) + t_a,   LN_m(x_i) -> LN_m(x_i) (1 + s_m) + t_m

``W_2`` starts at zero, so a fresh block is the deterministic one whatever the noise. The noise
channels pass through unchanged (the block returns ``[B, N_dst, C + K]``), so runners, halo
exchanges and activation checkpointing carry them with the features without knowing of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from squall.errors import ConfigError
from squall.kernels.edge_index import EdgeIndex
from squall.kernels.gt_attention import gt_attention_fused


class MLP(nn.Sequential):
    def __init__(self, channels: int, ratio: int):
        super().__init__(
            nn.Linear(channels, ratio * channels), nn.GELU(), nn.Linear(ratio * channels, channels)
        )


class NoiseConditioning(nn.Module):
    """Per-node scale and shift of a block's layer norms from its noise, ``[B, N, K] -> 2 x
    ([B, N, C], [B, N, C])``: ``W_2 GELU(W_1 n)`` with hidden width ``4 K`` (the MLP ratio of the
    GraphTransformer family; not tuned) and ``W_2`` zero at start."""

    def __init__(self, noise_channels: int, channels: int, norms: int = 2):
        super().__init__()
        hidden = 4 * noise_channels
        self.norms = norms
        self.net = nn.Sequential(nn.Linear(noise_channels, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2 * norms * channels))  # fmt: skip
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, noise: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = self.net(noise).chunk(2 * self.norms, dim=-1)
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(self.norms)]


def conditioned(norm: nn.LayerNorm, x: torch.Tensor, scale_shift) -> torch.Tensor:
    """``norm(x) (1 + scale) + shift``; plain ``norm(x)`` when ``scale_shift`` is None."""
    if scale_shift is None:
        return norm(x)
    scale, shift = scale_shift
    return norm(x) * (1 + scale.to(x.dtype)) + shift.to(x.dtype)


class GraphTransformerBlock(nn.Module):
    """One pre-norm GraphTransformer block.

    Parameters
    ----------
    channels, heads : int
        Node width ``C`` and number of heads ``H`` (``C % H == 0``; any ``H``, power of two or not).
    edge_dim : int
        Width of the low-dimensional edge features ``a_ij``.
    mlp_ratio : int
        Hidden width of the MLP over ``C``.
    bipartite : bool
        Whether sources and destinations are different node sets (mappers) or the same (processor).
    backend : str
        Attention backend, ``"torch"`` or ``"triton"``.
    recompute_mlp : bool
        Keep only the MLP's input for backward and recompute its layer norm, first matrix product
        and GELU (``(2 mlp_ratio + 1) C`` activations per destination row fewer for one extra
        ``C x mlp_ratio C`` product per row); the ``mlp`` checkpoint policy, set by
        :func:`squall.parallel.parallelize.parallelize`.
    noise_channels : int
        ``K > 0``: the rows carry ``K`` trailing noise channels that condition the layer norms
        of the destinations (processor blocks of an ensemble model; not for mappers).
    """

    def __init__(self, channels, heads, edge_dim, mlp_ratio=4, bipartite=False, backend="torch",
                 recompute_mlp=False, noise_channels=0):  # fmt: skip
        super().__init__()
        self.recompute_mlp = recompute_mlp
        if noise_channels and bipartite:
            raise ConfigError("noise conditioning is for processor (non-bipartite) blocks")
        self.noise_channels = int(noise_channels)
        self.noise = (NoiseConditioning(noise_channels, channels) if noise_channels
                      else None)  # fmt: skip
        if channels % heads:
            raise ConfigError(f"channels {channels} must be divisible by heads {heads}")
        self.heads, self.head_dim, self.bipartite, self.backend = (
            heads,
            channels // heads,
            bipartite,
            backend,
        )
        self.norm_dst = nn.LayerNorm(channels)
        self.norm_src = nn.LayerNorm(channels) if bipartite else None
        if bipartite:
            self.q = nn.Linear(channels, channels)
            self.kv = nn.Linear(channels, 2 * channels)
        else:
            self.qkv = nn.Linear(channels, 3 * channels)
        self.edge_weight = nn.Parameter(torch.empty(edge_dim, channels))
        self.edge_bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.edge_weight, std=1.0 / math.sqrt(edge_dim))
        self.out = nn.Linear(channels, channels)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = MLP(channels, mlp_ratio)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[N, B * H, c]``."""
        b, n, _ = x.shape
        return (
            x.reshape(b, n, self.heads, self.head_dim)
            .transpose(0, 1)
            .reshape(n, b * self.heads, self.head_dim)
        )

    def forward(self, x_src, x_dst, edge_attr: torch.Tensor, index: EdgeIndex) -> torch.Tensor:
        """New destination features ``[B, N_dst, C]`` from sources ``x_src [B, N_src, C]``.

        Parameters
        ----------
        x_src : torch.Tensor
            Source rows ``[B, N_src, C]`` (``index`` numbers them).
        x_dst : torch.Tensor
            Destination rows ``[B, N_dst, C]``. For the processor the destinations are the first
            ``N_dst`` source rows (the same tensor as ``x_src`` on a whole graph): keys, values and
            queries then come from one projection of ``x_src``.
        edge_attr : torch.Tensor
            ``[E, d_e]`` low-dimensional features of the edges of ``index``.
        index : EdgeIndex
            The edges, ``N_src`` sources into ``N_dst`` destinations.
        """
        num_dst = x_dst.shape[1]
        cond_src = cond_mlp = noise_dst = None
        if self.noise is not None:
            k_noise = self.noise_channels
            noise_dst = x_dst[..., -k_noise:]
            x_dst = x_dst[..., :-k_noise]
            # destinations are the first num_dst source rows: one conditioning for both norms
            cond_src, cond_mlp = self.noise(x_src[..., -k_noise:])
            cond_mlp = tuple(t[:, :num_dst] for t in cond_mlp)
            x_src = x_src[..., :-k_noise]
        if self.bipartite:
            q = self.q(self.norm_dst(x_dst))
            k, v = self.kv(self.norm_src(x_src)).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(conditioned(self.norm_dst, x_src, cond_src)).chunk(3, dim=-1)
            if num_dst != x_src.shape[1]:
                q = q[:, :num_dst]
        batch, _, channels = q.shape
        weight, bias = self.edge_weight, self.edge_bias
        if batch > 1:
            weight, bias = weight.repeat(1, batch), bias.repeat(batch)
        dtype = q.dtype
        attn = gt_attention_fused(
            self._heads(q), self._heads(k), self._heads(v),
            edge_attr.to(dtype), weight.to(dtype), bias.to(dtype), index, self.backend,
        )  # fmt: skip
        x = x_dst + self.out(attn.reshape(num_dst, batch, channels).transpose(0, 1))
        if self.recompute_mlp and torch.is_grad_enabled():
            out = checkpoint(self.mlp_residual, x, cond_mlp, use_reentrant=False)
        else:
            out = self.mlp_residual(x, cond_mlp)
        return out if noise_dst is None else torch.cat([out, noise_dst.to(out.dtype)], -1)

    def mlp_residual(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return x + self.mlp(conditioned(self.norm_mlp, x, cond))

    def flops_per_sample(self, num_src: int, num_dst: int, num_edges: int) -> int:
        """Forward multiply-adds x 2 of one sample: projections, edge term, attention, MLP."""
        flops = block_flops(self.out.in_features, self.mlp[0].out_features // self.out.in_features,
                            self.edge_weight.shape[0], num_src, num_dst, num_edges)  # fmt: skip
        if self.noise is not None:
            first, last = self.noise.net[0], self.noise.net[2]
            flops += 2 * (first.in_features * first.out_features
                          + last.in_features * last.out_features) * num_src
        return flops


def block_flops(channels: int, mlp_ratio: int, edge_dim: int, num_src: int, num_dst: int,
                num_edges: int) -> int:  # fmt: skip
    """Forward FLOPs (multiply-adds x 2) of one block for one sample."""
    c = channels
    proj = 2 * c * c * (num_dst + 2 * num_src + num_dst)  # q, k, v, out
    mlp = 2 * 2 * c * mlp_ratio * c * num_dst
    edge = 2 * edge_dim * c * num_edges
    attention = num_edges * c * (2 + 2 + 2)  # q.(k+e), a*(v+e), and the two edge additions
    return proj + mlp + edge + attention

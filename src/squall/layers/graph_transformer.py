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
    """

    def __init__(self, channels, heads, edge_dim, mlp_ratio=4, bipartite=False, backend="torch",
                 recompute_mlp=False):  # fmt: skip
        super().__init__()
        self.recompute_mlp = recompute_mlp
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
        if self.bipartite:
            q = self.q(self.norm_dst(x_dst))
            k, v = self.kv(self.norm_src(x_src)).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(self.norm_dst(x_src)).chunk(3, dim=-1)
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
            return checkpoint(self.mlp_residual, x, use_reentrant=False)
        return self.mlp_residual(x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm_mlp(x))

    def flops_per_sample(self, num_src: int, num_dst: int, num_edges: int) -> int:
        """Forward multiply-adds x 2 of one sample: projections, edge term, attention, MLP."""
        return block_flops(self.out.in_features, self.mlp[0].out_features // self.out.in_features,
                           self.edge_weight.shape[0], num_src, num_dst, num_edges)  # fmt: skip


def block_flops(channels: int, mlp_ratio: int, edge_dim: int, num_src: int, num_dst: int,
                num_edges: int) -> int:  # fmt: skip
    """Forward FLOPs (multiply-adds x 2) of one block for one sample."""
    c = channels
    proj = 2 * c * c * (num_dst + 2 * num_src + num_dst)  # q, k, v, out
    mlp = 2 * 2 * c * mlp_ratio * c * num_dst
    edge = 2 * edge_dim * c * num_edges
    attention = num_edges * c * (2 + 2 + 2)  # q.(k+e), a*(v+e), and the two edge additions
    return proj + mlp + edge + attention

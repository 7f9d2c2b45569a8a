"""Launch tuning of the attention kernels: which design runs, the autotune candidates of each, the
grids, and the output buffers.

Two launch designs compute the same passes (:data:`KERNEL_DESIGN`, environment
``SQUALL_GT_KERNEL``):

* ``"flat"`` (default): one launch per pass for any degree distribution. One program per node
  holds all its heads; programs take the degree-class schedule from its end, so the highest
  degrees start first. Autotuned over ``(BLOCK_E, num_warps)`` keyed on ``(H, C)`` and the mean
  degree (:func:`flat_configs`).
* ``"classes"``: nodes launched per degree class (:mod:`squall.kernels.edge_index`), each class
  with its own autotuned edge block ``BLOCK_E``, nodes per program ``DPP``, heads per program
  ``BLOCK_H`` and warps, keyed on ``(H, C)``; up to 14 launches a call (:func:`class_configs`).

The module-level switches (:data:`KERNEL_DESIGN`, :data:`FORCE_CANDIDATE`,
:data:`POISON_OUTPUTS`) are read at every call, so tests and benchmarks set them on this module.
"""

from __future__ import annotations

import contextlib
import os

import torch

from squall.kernels.edge_index import DEGREE_CLASS_CAPS

try:
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

# Largest edge tile (BLOCK_E * BLOCK_H * C_pad fp32 elements) per program: k, v and e tiles of
# this size stay in registers at 4 to 8 warps (sm_90 compile of the H=16, C=64 tiles with triton
# 3.9: 80 to 143 registers, no spills; the autotuner's H100 choices are all <= 2048 elements).
MAX_TILE_ELEMS = 8192
# Rows of q / dO per chunk of the deterministic dW reduction: N_dst / 512 chunks x H programs keeps
# the grid above a few thousand programs on the o96 / o320 meshes (40,962 / 163,842 rows).
DW_ROWS_PER_CHUNK = 512

# Kernel design: "flat" (one launch per pass: one node and all heads per program, the highest
# degrees first; the default: on one H200, 2.4x / 2.0x faster than "classes" materialised / fused
# on the o96 encoder in the same call, 1.2 to 2.7x below the classes times on the other AIFS
# graphs; profiling/results/attention_vs_anemoi.md) or "classes" (per degree class launches, head
# blocks, autotuned per class). Both designs save the same state (base-2 lse).
KERNEL_DESIGNS = ("classes", "flat")
KERNEL_DESIGN = os.environ.get("SQUALL_GT_KERNEL", "flat")

# Fused flat design: blocks of destinations with the W_aug products as tensor-core products per
# block (True) or, per destination, W_aug applied row by row (False); see NOTES_attention.md for
# the measurements of both.
FUSED_BLOCKS = os.environ.get("SQUALL_GT_FUSED_BLOCKS", "1") == "1"

# Run one candidate of every kernel instead of autotuning (tests; ncu runs through the environment).
FORCE_CANDIDATE: int | None = (
    int(os.environ["SQUALL_FORCE_CANDIDATE"]) if "SQUALL_FORCE_CANDIDATE" in os.environ else None
)

# Tests set this to fill every kernel output with NaN before launch, so an element a kernel fails
# to write shows up as NaN (never left on in production: it costs one extra write per output).
POISON_OUTPUTS = False

# Autotuned wrappers: (kernel name, degree class or -1 for flat, candidates, fused) -> wrapper.
TUNED: dict = {}


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_design() -> str:
    """The design the Triton backend launches now (``SQUALL_GT_KERNEL`` or ``KERNEL_DESIGN``).

    Raises
    ------
    ValueError
        If the design is not one of :data:`KERNEL_DESIGNS`.
    """
    if KERNEL_DESIGN not in KERNEL_DESIGNS:
        raise ValueError(
            f"unknown attention kernel design {KERNEL_DESIGN!r}; choose one of {KERNEL_DESIGNS}"
        )
    return KERNEL_DESIGN


# ----------------------------------------------------------------------------------------------
# "classes" design: candidates per degree class
# ----------------------------------------------------------------------------------------------
def class_configs(cls: int, h_pad: int, c_pad: int) -> list:
    """Candidate ``(BLOCK_E, DPP, BLOCK_H, num_warps, SINGLE, STAGES)`` for one degree class.

    The class cap (4, 8, 16 edges; 32 for the open class) bounds the edge block; ``MAX_TILE_ELEMS``
    bounds ``BLOCK_E * BLOCK_H * C_pad``. Candidates: all, half or a quarter of the heads per
    program (H100 v1 run: all-heads tiles at 8 warps left 2 programs per SM and h_to_h at 2.4x the
    no-reuse gather time; v2 autotune on o96 era_to_h chose a quarter or half of the heads, 4
    warps, 4 nodes per program in class 0; v3: a quarter of the heads, 8-edge blocks, 4 warps
    in classes 1 to 3 on every graph). Classes 0 and 1 (degree <= cap) also get ``SINGLE``
    programs: many destinations per program in a software-pipelined loop, one edge block each
    (v2 ncu on o96 h_to_h: 12 to 25 % occupancy, DRAM 10 to 29 % busy: the schedule -> source ids
    -> rows chain of dependent loads is exposed; pipelining issues the next nodes' chains early).
    profiling/NOTES_attention.md lists what the autotuner chose per graph.
    """
    cap = DEGREE_CLASS_CAPS[cls] if cls < len(DEGREE_CLASS_CAPS) else 2 * DEGREE_CLASS_CAPS[-1]
    quarter, half = max(1, h_pad // 4), max(1, h_pad // 2)
    cands = []
    # all heads per program: never chosen above class 0 on the H100 (v3), so only offered there
    for bh in dict.fromkeys([h_pad, quarter, half] if cls == 0 else [quarter, half]):
        fit = max(2, MAX_TILE_ELEMS // (bh * c_pad))
        be = min(cap, 1 << (fit.bit_length() - 1))
        warps = 4 if be * bh * c_pad <= 4096 else 8
        for dpp in (2, 4) if cls == 0 else (1,) if bh != quarter else (1, 2):
            cands.append((be, dpp, bh, warps, False, 1))
        if cls <= 1 and be >= cap and bh != h_pad:
            # 16 nodes, 3 stages: chosen on H100 for o96 h_to_era and o320 classes 0 and 1 (v3
            # autotune); 32 nodes / 4 stages was never chosen and was dropped
            cands.append((be, 16, bh, warps, True, 3))
    if cls >= 2:
        # high-degree classes: the class-1 tile looping over more blocks (H100 v2 ncu, o96 h_to_h:
        # the 32-edge 8-warp tile ran 1 program per SM, 12.5% occupancy, class 3 at 525 us)
        be = min(8, max(2, MAX_TILE_ELEMS // (quarter * c_pad)))
        cands.append((be, 1, quarter, 4, False, 1))
    # One- and two-warp programs: no cross-warp reduction, so no barrier in a node's chain (sm_90
    # SASS of the H16 C64 8-edge tile: 17 BAR at 4 warps, 13 at 2, 0 at 1 warp with 2 heads, 80
    # registers), and ~4x the independent node chains per SM.
    for bh, warps in ((max(1, h_pad // 8), 1), (quarter, 2)):
        fit = max(2, 32 * 32 * warps // (bh * c_pad))  # <= 32 fp32 per thread and tile
        be = min(cap, 8, 1 << (fit.bit_length() - 1))
        cands.append((be, 2 if cls == 0 else 1, bh, warps, False, 1))
    if FORCE_CANDIDATE is not None:
        return [cands[FORCE_CANDIDATE % len(cands)]]
    if interpreting() or os.environ.get("SQUALL_AUTOTUNE", "1") == "0":
        return cands[:1]  # the interpreter cannot time; SQUALL_AUTOTUNE=0 skips tuning compiles
    return cands


def head_blocks_max(h: int, h_pad: int, c_pad: int) -> int:
    """Most head blocks any "classes" candidate launches (slices of the d edge_attr buffer)."""
    return max(
        triton.cdiv(h, cand[2])
        for cls in range(len(DEGREE_CLASS_CAPS) + 1)
        for cand in class_configs(cls, h_pad, c_pad)
    )


def class_tuned(fn, name: str, cls: int, h_pad: int, c_pad: int, fused: bool):
    """Autotuned wrapper of kernel ``fn`` for one degree class (candidates fixed per class)."""
    cands = tuple(class_configs(cls, h_pad, c_pad))
    key = (name, cls, cands, fused)
    if key not in TUNED:
        configs = [
            triton.Config(
                {"BLOCK_E": be, "DPP": dpp, "BLOCK_H": bh, "SINGLE": one, "STAGES": st},
                num_warps=w,
            )
            for be, dpp, bh, w, one, st in cands
        ]
        TUNED[key] = triton.autotune(configs=configs, key=["H", "C"])(fn)
    return TUNED[key]


def class_launches(counts: list[int]):
    """Yield ``(class, first slot, one-past-last slot)`` for every non-empty degree class."""
    start = 0
    for cls, n in enumerate(counts):
        if n:
            yield cls, start, start + n
        start += n


def class_grid(n: int, h: int):
    """Grid of one class launch: ``n`` slots in programs of ``DPP`` nodes and ``BLOCK_H`` heads."""
    return lambda meta: (triton.cdiv(n, meta["DPP"]), triton.cdiv(h, meta["BLOCK_H"]))


# ----------------------------------------------------------------------------------------------
# "flat" design: one candidate list for every pass
# ----------------------------------------------------------------------------------------------
def offered(cands: list[tuple]) -> list[tuple]:
    """The candidates (``BLOCK_E`` first) the autotuner is given: ``FORCE_CANDIDATE``'s alone,
    under the interpreter the widest edge block up to 4 (one run covers the multi-edge paths),
    with ``SQUALL_AUTOTUNE=0`` the first, else all."""
    if FORCE_CANDIDATE is not None:
        return [cands[FORCE_CANDIDATE % len(cands)]]
    if interpreting():
        return [max((c for c in cands if c[0] <= 4), key=lambda c: c[0])]
    if os.environ.get("SQUALL_AUTOTUNE", "1") == "0":
        return cands[:1]
    return cands


def flat_configs(h_pad: int, c_pad: int) -> list[tuple[int, int]]:
    """Candidate ``(BLOCK_E, num_warps)`` of the flat kernels (one list for every pass).

    A block's k, v and e tiles are ``3 BLOCK_E H_pad C_pad`` fp32 values spread over the
    program's threads; ``MAX_TILE_ELEMS`` keeps them in registers. H200 autotune over the six
    AIFS graphs, bf16 and fp16 (profiling/results/attention_vs_anemoi_run2.log): one edge per step
    in 64 of 72 choices (2 warps in 43), two edges in the rest: more programs per SM beat more
    gathers per program. Larger blocks stay for graphs where they win. The interpreter takes
    blocks of 4 (a quarter of the interpreted loop steps; same arithmetic).
    """
    tile = h_pad * c_pad
    cands = [
        (be, w) for be, w in ((1, 4), (2, 4), (4, 4), (1, 2), (8, 8)) if be * tile <= MAX_TILE_ELEMS
    ]
    if not cands:  # one [H, C] row alone exceeds the tile budget: one edge at a time
        cands = [(1, 8)]
    return offered(cands)


def flat_tuned(fn, name: str, h_pad: int, c_pad: int, fused: bool):
    """Autotuned flat kernel ``fn``, keyed on ``(H, C, deg_key)`` (see :func:`deg_key`)."""
    cands = tuple(flat_configs(h_pad, c_pad))
    key = ("flat_" + name, -1, cands, fused)
    if key not in TUNED:
        configs = [triton.Config({"BLOCK_E": be}, num_warps=w) for be, w in cands]
        TUNED[key] = triton.autotune(configs=configs, key=["H", "C", "deg_key"])(fn)
    return TUNED[key]


def block_configs(h_pad: int, c_pad: int) -> list[tuple[int, int, int]]:
    """Candidate ``(BLOCK_E, num_warps, BLOCK_N)`` of the fused flat kernels (blocks of
    ``BLOCK_N`` destinations, see :func:`block_grid`).

    ``BLOCK_N = 16`` is the smallest row count of a tensor-core product; 32 halves the W tile
    loads per destination again at half the programs. The edge blocks and warps are those of
    :func:`flat_configs` that the H200 autotune chose for the per-destination pass (1 edge, 2 or
    4 warps; 2 edges, 4 warps).
    """
    tile = h_pad * c_pad
    cands = [
        (be, w, bn)
        for be, w, bn in ((1, 4, 16), (1, 2, 16), (2, 4, 16), (1, 4, 32), (4, 4, 16))
        if be * tile <= MAX_TILE_ELEMS
    ] or [(1, 8, 16)]
    return offered(cands)


def block_tuned(fn, name: str, h_pad: int, c_pad: int):
    """Autotuned fused flat kernel ``fn``, keyed on ``(H, C, deg_key)``."""
    cands = tuple(block_configs(h_pad, c_pad))
    key = ("block_" + name, -1, cands, True)
    if key not in TUNED:
        configs = [
            triton.Config({"BLOCK_E": be, "BLOCK_N": bn}, num_warps=w) for be, w, bn in cands
        ]
        TUNED[key] = triton.autotune(configs=configs, key=["H", "C", "deg_key"])(fn)
    return TUNED[key]


def block_grid(n: int):
    """Grid of a fused flat launch: ``n`` schedule slots in blocks of ``BLOCK_N``."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)


def dot_pad(n: int) -> int:
    """Power of two >= ``n`` and >= 16 (the smallest dimension of a ``tl.dot``)."""
    return max(16, triton.next_power_of_2(n))


def deg_key(n_edges: int, n_nodes: int) -> int:
    """Mean degree, rounded: graphs of different degree get their own tuning (no host sync)."""
    return max(1, round(n_edges / max(1, n_nodes)))


# ----------------------------------------------------------------------------------------------
# Shapes and buffers shared by the host launchers
# ----------------------------------------------------------------------------------------------
def pads(h: int, c: int) -> tuple[int, int]:
    """Power-of-two tile sizes covering ``H`` heads and ``C`` channels."""
    return triton.next_power_of_2(h), triton.next_power_of_2(c)


def new(shape, dtype, device) -> torch.Tensor:
    """An output buffer (NaN-filled while :data:`POISON_OUTPUTS` is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS and t.is_floating_point() else t


def new_like(x: torch.Tensor) -> torch.Tensor:
    return new(x.shape, x.dtype, x.device)


def on_device(x: torch.Tensor):
    """Launch on the tensors' GPU whatever the current device is (one process, several GPUs)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

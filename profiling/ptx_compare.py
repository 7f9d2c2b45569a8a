"""Compile the attention kernels for sm_90 without a GPU and compare two versions' PTX.

    python profiling/ptx_compare.py OLD.py NEW.py     # e.g. OLD.py from `git show REV:src/...`
    python profiling/ptx_compare.py OLD.py package    # against squall.kernels.gt_attention

For each kernel (forward, backward per destination, backward per source) in materialised and
fused mode, with and without the pipelined ``SINGLE`` loop (H 16, C 64, bf16, 4 warps), and each
flat kernel at 1 edge / 2 warps and 2 edges / 4 warps, prints
the number of PTX instructions and a hash of their multiset (registers and immediates
normalised). Equal hashes mean a change (a refactor, say) left the generated code the same up to
instruction order, checked on a machine without a GPU. Compiling is also the check that the
kernels pass Triton's front end, which the interpreter (``TRITON_INTERPRET=1``) does not apply.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import inspect
import re
import sys
import types

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = ("_fwd_kernel", "_bwd_dst_kernel", "_bwd_src_kernel")
FLAT_KERNELS = ("_flat_fwd_kernel", "_flat_bwd_dst_kernel", "_flat_bwd_src_kernel")
BLOCK_KERNELS = ("_block_fused_fwd_kernel", "_block_fused_bwd_dst_kernel")
BF16 = {"q", "k", "v", "e", "attr", "w", "b", "out", "do", "dq", "dk", "dv", "de"}
FP32 = {"lse", "dattr", "sa", "sb", "p", "pdp", "delta", "part", "qw", "gw", "pa"}


def load(path: str, tag: str):
    """The kernels of one version: a single-file ``gt_attention.py`` (the layout before the
    package) or ``package`` for the importable :mod:`squall.kernels.gt_attention`."""
    if path == "package":
        from squall.kernels.gt_attention import backward, forward

        return types.SimpleNamespace(
            **{k: v for m in (forward, backward) for k, v in vars(m).items() if k[:2] != "__"}
        )
    spec = importlib.util.spec_from_file_location(f"gt_attention_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        stem = name.removesuffix("_ptr")
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if stem in BF16 else "*fp32" if stem in FP32 else "*i32"
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    return sig


def _ptx_hash(fn, base: dict, warps: int) -> tuple[int, str]:
    """Instruction count and multiset hash of ``fn`` compiled for sm_90 with constexprs ``base``."""
    params = list(inspect.signature(fn.fn).parameters)
    const = {k: v for k, v in base.items() if k in params}
    src = ASTSource(fn, signature(fn, const),
                    constexprs={(params.index(k),): v for k, v in const.items()})  # fmt: skip
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps}).asm["ptx"]  # fmt: skip
    ins = []
    for line in ptx.splitlines():
        t = line.strip()
        if not t or t.startswith((".", "//", "{", "}", ")", "$")):
            continue
        ins.append(re.sub(r"\d+", "N", re.sub(r"%[a-z]+\d+", "%R", t.split(",")[0])))
    multiset = sorted(collections.Counter(ins).items())
    return len(ins), hashlib.sha1(repr(multiset).encode()).hexdigest()[:12]


def ptx_stats(module) -> dict:
    """``{(kernel, fused, variant): (instructions, multiset hash)}``; variant: ``single`` /
    ``blocks`` (per-class kernels) or ``E<edges>w<warps>`` (flat kernels, where present)."""
    out = {}
    for fused in (False, True):
        common = {"H": 16, "C": 64, "D_E": 11 if fused else 0, "D_PAD": 16 if fused else 1,
                  "C_PAD": 64, "FUSED": fused, "WRITE_DE": not fused}  # fmt: skip
        for single, dpp in ((True, 16), (False, 1)):
            base = dict(common, BLOCK_H=4, BLOCK_E=8, DPP=dpp, SINGLE=single,
                        STAGES=3 if single else 1)  # fmt: skip
            for name in KERNELS:
                variant = "single" if single else "blocks"
                out[(name, fused, variant)] = _ptx_hash(getattr(module, name), base, 4)
        for be, warps in ((1, 2), (2, 4)):  # the H200 autotuner's usual flat choices
            base = dict(common, H_PAD=16, BLOCK_E=be, D_AUG=12 if fused else 1, D_PAD_DW=16,
                        C_PAD_DW=64, DW=fused)  # fmt: skip
            for name in FLAT_KERNELS:
                if hasattr(module, name):
                    out[(name, fused, f"E{be}w{warps}")] = _ptx_hash(
                        getattr(module, name), base, warps
                    )
    return out


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    old, new = ptx_stats(load(sys.argv[1], "old")), ptx_stats(load(sys.argv[2], "new"))
    same = 0
    for key, (n_old, h_old) in old.items():
        if key not in new:
            continue
        n_new, h_new = new[key]
        same += h_old == h_new
        print(f"{key[0]:<20} fused={key[1]!s:<5} {key[2]:<6} {n_old:>5} -> {n_new:>5} "
              f"instructions  {'same multiset' if h_old == h_new else 'DIFFERENT'}")  # fmt: skip
    print(f"{same}/{len(old)} kernels with the same instruction multiset")


if __name__ == "__main__":
    main()

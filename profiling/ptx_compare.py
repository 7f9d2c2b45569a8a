"""Compile the attention kernels for sm_90 without a GPU and compare two versions' PTX.

    python profiling/ptx_compare.py OLD.py NEW.py     # e.g. OLD.py from `git show REV:src/...`
    python profiling/ptx_compare.py OLD.py package    # against squall.kernels.gt_attention

For each kernel (forward, backward per destination, backward per source) in materialised and
fused mode, with and without the pipelined ``SINGLE`` loop (H 16, C 64, bf16, 4 warps), prints
the number of PTX instructions and a hash of their multiset (registers and immediates
normalised). Equal hashes mean a change (a refactor, say) left the generated code the same up to
instruction order, checked on a machine without a GPU.
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
BF16 = {"q", "k", "v", "e", "attr", "w", "out", "do", "dq", "dk", "dv", "de"}
FP32 = {"lse", "dattr", "sa", "sb", "p", "pdp", "delta", "part"}


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


def ptx_stats(module) -> dict:
    """``{(kernel, fused, single): (instructions, multiset hash)}``."""
    out = {}
    for fused in (False, True):
        for single, dpp in ((True, 16), (False, 1)):
            base = {"H": 16, "C": 64, "D_E": 11 if fused else 0, "D_PAD": 16 if fused else 1,
                    "C_PAD": 64, "BLOCK_H": 4, "BLOCK_E": 8, "DPP": dpp, "SINGLE": single,
                    "STAGES": 3 if single else 1, "FUSED": fused, "WRITE_DE": not fused}  # fmt: skip
            for name in KERNELS:
                fn = getattr(module, name)
                params = list(inspect.signature(fn.fn).parameters)
                const = {k: v for k, v in base.items() if k in params}
                src = ASTSource(fn, signature(fn, const),
                                constexprs={(params.index(k),): v for k, v in const.items()})  # fmt: skip
                ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": 4}).asm["ptx"]  # fmt: skip
                ins = []
                for line in ptx.splitlines():
                    t = line.strip()
                    if not t or t.startswith((".", "//", "{", "}", ")", "$")):
                        continue
                    ins.append(re.sub(r"\d+", "N", re.sub(r"%[a-z]+\d+", "%R", t.split(",")[0])))
                multiset = sorted(collections.Counter(ins).items())
                digest = hashlib.sha1(repr(multiset).encode()).hexdigest()[:12]
                out[(name, fused, single)] = (len(ins), digest)
    return out


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    old, new = ptx_stats(load(sys.argv[1], "old")), ptx_stats(load(sys.argv[2], "new"))
    same = 0
    for key, (n_old, h_old) in old.items():
        n_new, h_new = new[key]
        same += h_old == h_new
        print(f"{key[0]:<16} fused={key[1]!s:<5} single={key[2]!s:<5} {n_old:>5} -> {n_new:>5} "
              f"instructions  {'same multiset' if h_old == h_new else 'DIFFERENT'}")  # fmt: skip
    print(f"{same}/{len(old)} kernels with the same instruction multiset")


if __name__ == "__main__":
    main()

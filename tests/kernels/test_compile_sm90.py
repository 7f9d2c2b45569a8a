"""The flat kernels pass Triton's compiler for sm_90 (no GPU needed).

The interpreter (``TRITON_INTERPRET=1``, what the CPU tests run) executes the kernels' Python and
never applies the compiler's front-end rules (for example a loop-carried variable must keep its
type), so a kernel can pass every interpreted test and still fail to compile on the GPU. This test
compiles each flat kernel materialised and the default fused kernels (blocks of destinations and
the fused source pass) in a child process with the interpreter off, through the same path as
``profiling/ptx_compare.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys
sys.path.insert(0, "profiling")
from ptx_compare import BLOCK_KERNELS, FLAT_KERNELS, _ptx_hash
from squall.kernels.gt_attention import backward, forward

for fused in (False, True):
    base = {"H": 16, "C": 64, "D_E": 11 if fused else 0, "D_PAD": 16 if fused else 1,
            "H_PAD": 16, "C_PAD": 64, "FUSED": fused, "WRITE_DE": not fused, "BLOCK_E": 1,
            "D_AUG": 12 if fused else 1, "D_PAD_DW": 16, "C_PAD_DW": 64, "DW": fused,
            "IEEE": False, "D_DOT": 16, "C_DOT": 64, "BLOCK_N": 16}
    # fused: the default blocks of destinations, then the fused source pass
    names = (*BLOCK_KERNELS, FLAT_KERNELS[2]) if fused else FLAT_KERNELS
    for name in names:
        fn = getattr(forward, name, None) or getattr(backward, name)
        n, _ = _ptx_hash(fn, base, 2)
        assert n > 100, (name, fused, n)
        print(name, fused, n, flush=True)
"""


@pytest.mark.slow  # six sm_90 compiles: about 75 s on 2 cores with a cold Triton cache
def test_flat_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 6, proc.stdout

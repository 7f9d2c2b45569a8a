"""Kernel tests run the Triton kernels through the interpreter on CPU when no GPU is present.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e. before
``squall.kernels.gt_attention`` is first imported; a conftest is collected before the test modules.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

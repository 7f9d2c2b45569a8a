"""Which attention backend runs where: the fact a scaling point records and its report shows."""

from __future__ import annotations

import pytest

from squall.kernels import gt_attention
from squall.kernels.gt_attention import resolve_backend


def test_torch_always_runs_as_asked():
    assert resolve_backend("torch", "cpu") == ("torch", "")


@pytest.mark.skipif(not gt_attention.HAS_TRITON, reason="triton not installed")
def test_triton_on_cpu_falls_back_and_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("triton", "cpu") == ("torch", "tensors are on cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == ("triton", "")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        resolve_backend("cuda", "cpu")

"""Fixtures of the scaling-job tests."""

from __future__ import annotations

import pytest
from _scale_helpers import TINY


@pytest.fixture
def tiny() -> list[str]:
    """Overrides of a tiny, fast problem (see _scale_helpers.TINY)."""
    return list(TINY)

"""Shared fixtures: a tiny two-level hierarchy (C_f = 4 fine classes in C_c = 2 groups)."""

import pytest
import torch

from hmil.data.hierarchy import Hierarchy


@pytest.fixture
def tiny_hierarchy() -> Hierarchy:
    """Fine a1, a2 → coarse A; fine b1, b2 → coarse B."""
    return Hierarchy.from_mapping(
        {"name": "tiny", "coarse": ["A", "B"], "fine": {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}}
    )


@pytest.fixture
def tiny_membership(tiny_hierarchy: Hierarchy) -> torch.Tensor:
    """M [4, 2]: rows 0, 1 → column 0; rows 2, 3 → column 1."""
    return tiny_hierarchy.membership_tensor()

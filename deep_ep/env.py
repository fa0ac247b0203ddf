"""The environment variables DeepEP-Ascend reads, one function each (read at call time).

Every function validates its variable and raises ValueError naming it, the expected form and
the value found.
"""
from __future__ import annotations

import os
from typing import Optional


def _int(name: str, default: int, low: int, high: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    text = value.strip()
    if not text.lstrip("-").isdigit() or int(text) < low or (high is not None and int(text) > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(text)


def shared_expert_rank_num() -> int:
    """MOE_SHARED_EXPERT_RANK_NUM: how many leading ranks hold shared experts (default 0)."""
    return _int("MOE_SHARED_EXPERT_RANK_NUM", 0, 0)

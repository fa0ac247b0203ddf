"""Shared pieces of the multi-rank tests: deterministic inputs, gathering every rank's
inputs for the reference, comparisons and a shared-memory leak check."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


def make_topk_idx(
    num_tokens: int,
    num_experts: int,
    topk: int,
    generator: torch.Generator,
    pattern: str = "random",
    num_ranks: int = 1,
) -> torch.Tensor:
    """int64 [T, K] with some -1 entries; the experts of a row are distinct except with "repeat".

    pattern: "random"; "one_rank" (every token's experts sit on one rank); "one_expert"
    (every token picks expert 0 first, the rest -1); "repeat" (drawn with replacement, as
    DeepEP-Ascend's --active-ranks scripts do; every other row names its first expert twice).
    """
    if pattern == "repeat":
        idx = torch.randint(0, num_experts, (num_tokens, topk), generator=generator)
        if topk > 1:
            idx[::2, 1] = idx[::2, 0]
        drop = torch.rand(num_tokens, topk, generator=generator) < 0.1
        return torch.where(drop, torch.full_like(idx, -1), idx)
    if pattern == "one_expert":
        idx = torch.full((num_tokens, topk), -1, dtype=torch.int64)
        idx[:, 0] = 0
        return idx
    if pattern == "one_rank":
        local = num_experts // num_ranks
        rank_of_token = torch.randint(0, num_ranks, (num_tokens,), generator=generator)
        scores = torch.rand(num_tokens, local, generator=generator)
        chosen = scores.topk(min(topk, local), dim=1).indices + (rank_of_token * local).unsqueeze(1)
        idx = torch.full((num_tokens, topk), -1, dtype=torch.int64)
        idx[:, : chosen.shape[1]] = chosen
        return idx
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    idx = scores.topk(topk, dim=1).indices
    drop = torch.rand(num_tokens, topk, generator=generator) < 0.1
    return torch.where(drop, torch.full_like(idx, -1), idx)


def skip_unless_device(device: str, num_ranks: int) -> None:
    """Skips an NPU run (with the reason) unless torch_npu and `num_ranks` NPUs are available."""
    if device == "npu":
        from deep_ep.testing import npu_skip_reason

        reason = npu_skip_reason(num_ranks)
        if reason:
            import pytest

            pytest.skip(reason)


def to_device(obj, device: Optional[torch.device] = None):
    """Tensors (also inside tuples/lists) moved to the rank's device: the same objects on CPU."""
    from deep_ep.testing import rank_device

    device = device or rank_device()
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def to_host(obj):
    """Tensors (also inside tuples/lists) moved to the CPU for the checks: the same objects on CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_host(o) for o in obj)
    return obj


def gather_objects(obj, group) -> list:
    """Every rank's `obj`, in rank order (the reference needs all ranks' inputs)."""
    out: List[Optional[object]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity measure: 0 for identical tensors."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def our_segments() -> List[str]:
    """Every deep_ep segment name in /dev/shm (including other jobs' short-lived ones)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("deep_ep_"))


def leaked_segments() -> List[str]:
    """Segments whose creating process has exited: a leak. (A live process's segment exists
    for a moment between its creation and its unlink, and may belong to another job.)"""
    return [n for n in our_segments() if not os.path.exists(f"/proc/{n.split('_')[2]}")]


@dataclass
class Inputs:
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def make_inputs(
    rank: int,
    num_tokens: int,
    hidden: int,
    num_experts: int,
    topk: int,
    num_ranks: int,
    dtype: torch.dtype = torch.bfloat16,
    pattern: str = "random",
    seed: int = 0,
) -> Inputs:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    if num_tokens:
        x[0, :] = 0  # an all-zero row exercises the int8 zero-scale path
    topk_idx = make_topk_idx(num_tokens, num_experts, topk, generator, pattern, num_ranks)
    weights = torch.rand(num_tokens, topk, generator=generator)
    return Inputs(x, topk_idx, weights)


def reference_of(everyone: List[Inputs], num_experts: int, rank: int, alignment: int = 1) -> dict:
    """deep_ep.reference.reference_dispatch of every rank's Inputs: what `rank` must receive."""
    # Imported here: some tests install a torch_npu stand-in before deep_ep is first imported.
    from deep_ep.reference import reference_dispatch

    return reference_dispatch(
        [i.x for i in everyone],
        [i.topk_idx for i in everyone],
        [i.topk_weights for i in everyone],
        num_experts,
        rank,
        alignment,
    )

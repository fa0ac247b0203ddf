"""An independent pure-torch reference for dispatch and combine, built from every
rank's inputs. Deliberately simple: loops over ranks and experts, boolean masks,
no shared code with the library's routing."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def reference_dispatch(
    xs: Sequence[torch.Tensor],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    num_experts: int,
    rank: int,
    alignment: int = 1,
    experts_per_rank: Optional[int] = None,
):
    """What `rank` receives. xs[s]: [T_s, H]; topk_idxs[s]: int64 [T_s, K]; weights float32.
    `rank` holds experts [rank * L, (rank + 1) * L), L = experts_per_rank or E / R.

    One row per (token, k) selection of a local expert: a token that names the same expert twice
    arrives twice, in k order.
    Returns dict with x [N, H], topk_idx (local ids) [N, K], weights [N, K], src_rank [N],
    src_idx [N] and src_k [N] (the selection's top-k column; -1 for padding), rows_per_expert
    (list, padded).
    """
    num_ranks = len(xs)
    local_experts = experts_per_rank or num_experts // num_ranks
    hidden, topk = xs[0].shape[1], topk_idxs[0].shape[1]
    parts = {"x": [], "topk_idx": [], "weights": [], "src_rank": [], "src_idx": [], "src_k": []}
    rows_per_expert: List[int] = []
    for local in range(local_experts):
        expert = rank * local_experts + local
        count = 0
        for source in range(num_ranks):
            selections = (topk_idxs[source] == expert).nonzero()  # row-major: (token, k) order
            tokens = selections[:, 0]
            idx = topk_idxs[source][tokens]
            mine = (idx >= rank * local_experts) & (idx < (rank + 1) * local_experts)
            parts["x"].append(xs[source][tokens])
            parts["topk_idx"].append(torch.where(mine, idx - rank * local_experts, torch.full_like(idx, -1)))
            parts["weights"].append(topk_weights[source][tokens])
            parts["src_rank"].append(torch.full((len(tokens),), source, dtype=torch.int64))
            parts["src_idx"].append(tokens)
            parts["src_k"].append(selections[:, 1])
            count += len(tokens)
        pad = (-count) % alignment
        parts["x"].append(torch.zeros(pad, hidden, dtype=xs[0].dtype))
        parts["topk_idx"].append(torch.full((pad, topk), -1, dtype=torch.int64))
        parts["weights"].append(torch.zeros(pad, topk, dtype=torch.float32))
        parts["src_rank"].append(torch.full((pad,), -1, dtype=torch.int64))
        parts["src_idx"].append(torch.full((pad,), -1, dtype=torch.int64))
        parts["src_k"].append(torch.full((pad,), -1, dtype=torch.int64))
        rows_per_expert.append(count + pad)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["rows_per_expert"] = rows_per_expert
    return out


def reference_shared_dispatch(
    xs: Sequence[torch.Tensor],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    num_experts: int,
    rank: int,
    num_shared_ranks: int,
):
    """What `rank` receives in low-latency mode with S = num_shared_ranks shared-expert ranks:
    ranks [0, S) hold the shared expert and get every token of the sources s with s % S == rank,
    in source then token order; rank S + j holds routed experts [j * L, (j + 1) * L),
    L = E / (R - S). Same dict as reference_dispatch, plus rows_per_source [R] (rows from each source)."""
    num_ranks = len(xs)
    if rank >= num_shared_ranks:
        ref = reference_dispatch(
            xs,
            topk_idxs,
            topk_weights,
            num_experts,
            rank - num_shared_ranks,
            experts_per_rank=num_experts // (num_ranks - num_shared_ranks),
        )
        ref["rows_per_source"] = [int((ref["src_rank"] == s).sum()) for s in range(num_ranks)]
        return ref
    sources = [s for s in range(num_ranks) if s % num_shared_ranks == rank]
    counts = [xs[s].shape[0] if s in sources else 0 for s in range(num_ranks)]
    return {
        "x": torch.cat([xs[s] for s in sources]),
        "src_rank": torch.cat([torch.full((xs[s].shape[0],), s, dtype=torch.int64) for s in sources]),
        "src_idx": torch.cat([torch.arange(xs[s].shape[0]) for s in sources]),
        "src_k": torch.cat([torch.full((xs[s].shape[0],), topk_idxs[s].shape[1], dtype=torch.int64) for s in sources]),
        "rows_per_expert": [sum(counts)],
        "rows_per_source": counts,
    }


def reference_combine(
    selection_outputs: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """float64 [T, H]: sum over k of topk_weights[t, k] * selection_outputs[t, k] where
    topk_idx[t, k] != -1. selection_outputs [T, K, H]: the expert output of every selection."""
    valid = (topk_idx >= 0).unsqueeze(2)
    terms = selection_outputs.double() * topk_weights.double().unsqueeze(2)
    return torch.where(valid, terms, torch.zeros((), dtype=torch.float64)).sum(1)


def quantize_reference(x: torch.Tensor):
    """Per-token int8 as the spec defines it, in float64 for the reference."""
    xd = x.double()
    scale = xd.abs().amax(1) / 127
    q = torch.where(
        scale.unsqueeze(1) > 0, torch.round(xd / scale.clamp_min(1e-300).unsqueeze(1)), torch.zeros_like(xd)
    )
    return q.clamp(-127, 127).to(torch.int8), scale

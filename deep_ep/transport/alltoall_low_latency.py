"""Low-latency mode over torch.distributed all_to_all_single (strategy "alltoall", and more than one
node): the collective transport's row exchange plus a fixed-size header exchange, so that ranks that
disagree on E (and so on the number of counts) still exchange equal sizes and fail with a clear error.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from . import collective
from .shm_low_latency import HEADER_WORDS, MAX_LOCAL_EXPERTS

META_WORDS = HEADER_WORDS + MAX_LOCAL_EXPERTS


def exchange_headers(group: dist.ProcessGroup, header: List[int], counts_to: torch.Tensor, what: str) -> torch.Tensor:
    """Sends `header` and counts_to[d] (int64 [R, L], L <= MAX_LOCAL_EXPERTS) to every rank d.
    Returns int64 [R, HEADER_WORDS + MAX_LOCAL_EXPERTS]: what every source sent here."""
    num_ranks = dist.get_world_size(group)
    meta = torch.zeros(num_ranks, META_WORDS, dtype=torch.int64)
    meta[:, :HEADER_WORDS] = torch.tensor(header, dtype=torch.int64)
    meta[:, HEADER_WORDS : HEADER_WORDS + counts_to.shape[1]] = counts_to
    ones = [1] * num_ranks
    return collective.exchange_rows(group, meta.view(torch.uint8), ones, ones, what).view(torch.int64)


def exchange(
    group: dist.ProcessGroup, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], what: str
) -> torch.Tensor:
    """uint8 rows [sum(send_counts), b] out, [sum(recv_counts), b] in, rank by rank."""
    return collective.exchange_rows(group, rows, send_counts, recv_counts, what)

"""The Buffer's static helpers, Config size hints, EventOverlap and node queries."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deep_ep  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402
from deep_ep.transport import shm  # noqa: E402


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 5, 8, 24, 160])
def test_configs_for_any_rank_count(num_ranks: int) -> None:
    for config in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)):
        assert isinstance(config, deep_ep.Config)
        assert config.num_sms == deep_ep.Buffer.num_sms


@pytest.mark.parametrize("num_ranks", [0, -1, 2.0])
def test_config_rank_count_errors(num_ranks) -> None:
    with pytest.raises(ValueError, match="num_ranks"):
        deep_ep.Buffer.get_dispatch_config(num_ranks)
    with pytest.raises(ValueError, match="num_ranks"):
        deep_ep.Buffer.get_combine_config(num_ranks)


def test_size_hints_hold_their_tokens_in_one_round() -> None:
    config = deep_ep.Config()
    for hidden_bytes, num_ranks in ((2 * 7168, 8), (2 * 1000, 3)):
        rows = config.num_max_nvl_chunked_recv_tokens * num_ranks
        hint = config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
        assert shm.window_rows(hint, hidden_bytes, 1) == rows
        assert shm.window_rows(hint - 1, hidden_bytes, 1) == rows - 1
        rdma = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
        assert shm.window_rows(rdma, hidden_bytes, 1) == config.num_max_rdma_chunked_recv_tokens * num_ranks


def test_set_num_sms() -> None:
    before = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.num_sms == 24 and deep_ep.Buffer.get_dispatch_config(2).num_sms == 24
        for bad in (3, 0, -2):
            with pytest.raises(ValueError, match="num_sms"):
                deep_ep.Buffer.set_num_sms(bad)
        assert deep_ep.Buffer.num_sms == 24
    finally:
        deep_ep.Buffer.set_num_sms(before)


def test_event_overlap_is_complete() -> None:
    event = deep_ep.Buffer.capture()
    assert isinstance(event, deep_ep.EventOverlap)
    event.current_stream_wait()
    with deep_ep.EventOverlap(extra_tensors=(torch.ones(1),)) as entered:
        assert entered.extra_tensors[0].item() == 1


def node_queries(rank: int, num_ranks: int, group, ranks_per_node: int) -> None:
    os.environ["DEEP_EP_RANKS_PER_NODE"] = str(ranks_per_node)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 16)
    assert buffer.get_num_rdma_ranks() == -(-num_ranks // ranks_per_node)
    assert buffer.get_rdma_rank() == rank // ranks_per_node
    view = buffer.get_local_buffer_tensor(torch.int32, size=torch.Size([4, 2]))
    view.fill_(rank)
    assert view.shape == (4, 2) and bool((view == rank).all())
    buffer.destroy()


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(3, 2), (4, 1), (2, 2)])
def test_node_queries(num_ranks: int, ranks_per_node: int) -> None:
    spawn_ranks(node_queries, num_ranks, ranks_per_node)

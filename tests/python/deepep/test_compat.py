"""DeepEP-Ascend's API as its scripts call it: handles unpacked by position / key, combine with
handle[7] (or handle["topk_weights"]) as weights, cost-stats tensors, strategies built on
buffer.runtime and swapped on one Buffer, the environment variables; checked against the
independent reference (deep_ep/reference.py) on several world sizes."""

from __future__ import annotations

import os

import pytest
import torch
from common import calc_diff, gather_objects, make_topk_idx

import deep_ep
from deep_ep import env
from deep_ep.ep_strategy import get_low_latency_strategy, register_normal_strategy
from deep_ep.reference import reference_combine
from deep_ep.strategies import AlltoAllNormalCommStrategy, DefaultNormalCommStrategy
from deep_ep.testing import spawn_ranks

HIDDEN, EXPERTS_PER_RANK, TOPK, TOKENS = 64, 2, 2, 24


def inputs(rank: int, num_experts: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    topk_idx = make_topk_idx(TOKENS, num_experts, min(TOPK, num_experts), g)
    topk_weights = torch.rand(topk_idx.shape, generator=g)
    return x, topk_idx, topk_weights


def normal_round(rank, num_ranks, group, buffer, num_experts, x, topk_idx, topk_weights):
    """One layout + dispatch + combine exactly as upstream's scripts write it."""
    (num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _) = buffer.get_dispatch_layout(
        topk_idx, num_experts
    )
    wait_stats = torch.zeros(num_ranks, dtype=torch.int32)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x=x,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        config=deep_ep.Config(24, 8, 256),
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        dispatch_wait_recv_cost_stats=wait_stats,
        quant_mode=None,
    )
    if isinstance(handle, dict):
        weights = handle["topk_weights"]
    elif buffer.get_num_rdma_ranks() > 1:  # upstream's internode handle
        (
            recv_src_idx,
            in_rank,
            send_head,
            handle_topk_idx,
            weights,
            offset_inner,
            offset_outer,
            count_outer,
            expand_scales,
        ) = handle
        assert torch.equal(handle_topk_idx, topk_idx) and torch.equal(in_rank, is_token_in_rank)
    else:
        weights = handle[7]
        (
            rank_prefix_matrix,
            channel_prefix_matrix,
            recv_channel_prefix_matrix,
            recv_src_idx,
            in_rank,
            send_head,
            handle_topk_idx,
            handle_topk_weights,
        ) = handle
        assert torch.equal(handle_topk_idx, topk_idx) and torch.equal(in_rank, is_token_in_rank)
    assert torch.equal(weights, topk_weights)
    send_stats = torch.zeros(num_ranks, dtype=torch.int32)
    combined_x, combined_topk_weights, _ = buffer.combine(
        x=recv_x,
        handle=handle,
        topk_weights=weights,
        config=None,
        async_finish=False,
        combine_send_cost_stats=send_stats,
    )
    # A copy of the handle's items, as code that rebuilds handles passes them, stands for the handle.
    rebuilt = dict(handle) if isinstance(handle, dict) else list(handle)
    again = buffer.combine(recv_x, rebuilt, topk_weights=weights)[0]
    assert torch.equal(again.view(torch.int16), combined_x.view(torch.int16))
    # Measured microseconds: non-negative, and some rank's rows took time to arrive / leave.
    assert bool((wait_stats >= 0).all()) and bool((send_stats >= 0).all())
    assert int(send_stats.sum()) > 0
    # Experts return their rows unchanged: combined = x * sum of the kept weights (upstream's check).
    everyone = gather_objects((x, topk_idx, topk_weights), group)
    selection = x.float().unsqueeze(1).expand(-1, topk_idx.shape[1], -1)
    expected = reference_combine(selection, topk_idx, topk_weights)
    assert calc_diff(combined_x.float(), expected.float()) < 1e-5
    assert len(everyone) == num_ranks and sum(counts) == recv_x.shape[0]
    return combined_x


def compat_rank(rank: int, num_ranks: int, group) -> None:
    num_experts = EXPERTS_PER_RANK * num_ranks
    x, topk_idx, topk_weights = inputs(rank, num_experts)
    nmax = TOKENS
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(nmax, HIDDEN, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, int(2e8), rdma, True, num_experts // num_ranks, True, False, "default", "default")
    normal_default = DefaultNormalCommStrategy(runtime=buffer.runtime, group=group)
    normal_alltoall = AlltoAllNormalCommStrategy(runtime=buffer.runtime, group=group)
    ll_default = get_low_latency_strategy("default")(runtime=buffer.runtime, group=group)
    ll_alltoall = get_low_latency_strategy("alltoall")(runtime=buffer.runtime, group=group)
    results = []
    for normal, ll in ((normal_default, ll_default), (normal_alltoall, ll_alltoall), (normal_default, ll_default)):
        buffer.normal_strategy = normal
        buffer.low_latency_strategy = ll
        combined = normal_round(rank, num_ranks, group, buffer, num_experts, x, topk_idx, topk_weights)
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            x,
            topk_idx,
            nmax,
            num_experts,
            cumulative_local_expert_recv_stats=None,
            use_fp8=False,
            round_scale=False,
            use_ue8m0=False,
            use_mxfp4=False,
            async_finish=False,
            return_recv_hook=False,
            topk_weights=topk_weights,
            quant_mode=None,
        )
        hook()  # always callable
        (
            src_info,
            layout_range,
            num_max_dispatch_tokens_per_rank,
            hidden,
            n_experts,
            packed_recv_count,
            expand_scales,
        ) = handle
        assert (num_max_dispatch_tokens_per_rank, hidden, n_experts) == (nmax, HIDDEN, num_experts)
        ll_combined, _, hook = buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle)
        hook()
        expected = reference_combine(x.float().unsqueeze(1).expand(-1, topk_idx.shape[1], -1), topk_idx, topk_weights)
        assert calc_diff(ll_combined.float(), expected.float()) < 1e-5
        results.append((combined, ll_combined))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)  # the strategies agree bit for bit
    # Upstream reads handles by position: a tuple or list of the handle's items stands for it (the same
    # bits); one with an item replaced, or a format we cannot move, is a clear error.
    _, _, per_expert, _, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_expert=per_expert
    )
    combined = buffer.combine(recv_x, handle)[0]
    for rebuilt in (tuple(handle), list(handle)):
        assert torch.equal(buffer.combine(recv_x, rebuilt)[0].view(torch.int16), combined.view(torch.int16))
    with pytest.raises(TypeError, match="item 7 .* is not the handle's own"):
        buffer.combine(recv_x, tuple(handle[:7]) + (topk_weights.clone(),))
    with pytest.raises(TypeError, match="length"):
        buffer.combine(recv_x, tuple(handle[:7]))
    ll_recv, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, nmax, num_experts, use_fp8=False)
    ll_combined = buffer.low_latency_combine(ll_recv, topk_idx, topk_weights, ll_handle)[0]
    ll_again = buffer.low_latency_combine(ll_recv, topk_idx, topk_weights, list(ll_handle))[0]
    assert torch.equal(ll_again.view(torch.int16), ll_combined.view(torch.int16))
    with pytest.raises(ValueError, match="mx_fp4_e2m1"):
        buffer.low_latency_dispatch(x, topk_idx, nmax, num_experts, use_mxfp4=True)
    with pytest.raises(ValueError, match="mx_fp8_e4m3"):
        buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_expert=per_expert, quant_mode="mx_fp8_e4m3"
        )
    # What upstream's Buffer keeps and its tests call on the runtime object.
    assert (buffer.num_nvl_bytes, buffer.num_rdma_bytes, buffer.moe_all_to_all_group_name) == (int(2e8), rdma, "")
    buffer.runtime.begin_profile(1, 2, "")
    buffer.runtime.end_profile()
    buffer.destroy()
    # Without low_latency_mode, clean_low_latency_buffer has nothing to reset: it returns at once,
    # also when only one rank calls it (upstream's is a no-op too).
    normal = deep_ep.Buffer(group, int(2e8))
    if rank == 0:
        normal.clean_low_latency_buffer(nmax, HIDDEN, num_experts)
    normal.destroy()


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_upstream_calls(num_ranks: int) -> None:
    spawn_ranks(compat_rank, num_ranks)


def env_rank(rank: int, num_ranks: int, group) -> None:
    """MOE_EXPERT_TOKEN_NUMS_TYPE=0 (prefix sums, both modes) and the long-sequence rounds."""
    num_experts = EXPERTS_PER_RANK * num_ranks
    x, topk_idx, topk_weights = inputs(rank, num_experts)
    buffer = deep_ep.Buffer(
        group,
        low_latency_mode=True,
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, num_ranks, num_experts),
    )
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    assert per_expert.shape == (2 * num_experts,)  # DEEPEP_NORMAL_LONG_SEQ_ROUND=2
    first = torch.bincount(topk_idx[:32][topk_idx[:32] >= 0], minlength=num_experts)
    assert torch.equal(per_expert[:num_experts].long(), first)
    recv_x, _, _, counts, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_expert=per_expert
    )
    rows = torch.diff(torch.tensor([0] + counts)).tolist()
    assert counts[-1] == recv_x.shape[0] and all(r >= 0 for r in rows)  # prefix sums
    _, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, TOKENS, num_experts, use_fp8=False)
    assert torch.equal(recv_count, handle.state.recv_count.cumsum(0))
    # Read at call time: set through os.environ between calls (a framework overriding it around one
    # forward pass), a variable counts from the next call on, and unset it stops counting.
    os.environ["DEEP_NORMAL_MODE_USE_INT8_QUANT"] = "1"
    quantized = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_expert=per_expert)[0]
    del os.environ["DEEP_NORMAL_MODE_USE_INT8_QUANT"]
    plain = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_expert=per_expert)[0]
    assert isinstance(quantized, tuple) and quantized[0].dtype == torch.int8 and quantized[1].shape == (len(plain),)
    assert torch.equal(plain, recv_x)
    buffer.destroy()


@register_normal_strategy("counting")
class CountingNormalStrategy(AlltoAllNormalCommStrategy):
    """A backend a caller adds: one class and one registry line (here: all_to_all_single rows, with
    its dispatch calls counted). Registered on import, so in every spawned rank too."""

    def __init__(self, runtime, group) -> None:
        super().__init__(runtime, group)
        self.dispatches = 0

    def get_name(self) -> str:
        return "counting"

    def dispatch(self, *args, **kwargs):
        self.dispatches += 1
        return super().dispatch(*args, **kwargs)


def registered_backend_rank(rank: int, num_ranks: int, group) -> None:
    num_experts = EXPERTS_PER_RANK * num_ranks
    x, topk_idx, topk_weights = inputs(rank, num_experts)
    with pytest.raises(ValueError, match="normal_strategy must be one of .*'counting'.*got 'unregistered'"):
        deep_ep.Buffer(group, normal_strategy="unregistered")
    buffer = deep_ep.Buffer(group, normal_strategy="counting")
    assert isinstance(buffer.normal_strategy, CountingNormalStrategy) and buffer.normal_strategy == "counting"
    combined = normal_round(rank, num_ranks, group, buffer, num_experts, x, topk_idx, topk_weights)
    assert buffer.normal_strategy.dispatches == 1
    buffer.normal_strategy = "default"
    assert torch.equal(normal_round(rank, num_ranks, group, buffer, num_experts, x, topk_idx, topk_weights), combined)
    buffer.normal_strategy = CountingNormalStrategy(runtime=buffer.runtime, group=group)
    assert torch.equal(normal_round(rank, num_ranks, group, buffer, num_experts, x, topk_idx, topk_weights), combined)
    assert buffer.normal_strategy.dispatches == 1
    buffer.destroy()


def test_registered_backend() -> None:
    """A strategy registered by the caller is a backend like the built-in ones, by name or instance."""
    spawn_ranks(registered_backend_rank, 2)


def test_environment_is_read_at_call_time(monkeypatch) -> None:
    """deep_ep.env reads the process environment on every call, as os.environ sees it: set, changed
    or removed through os.environ, and decoded as os.environ decodes undecodable bytes."""
    for name in env.NORMAL_MODE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert env.normal_int8_quant() is False
    assert env.normal_settings() == env.NormalSettings(False, 1, env.ONE_ROUND)
    monkeypatch.setenv("DEEP_NORMAL_MODE_USE_INT8_QUANT", "1")
    assert env.normal_int8_quant() is True
    assert env.normal_settings() == env.NormalSettings(True, 1, env.ONE_ROUND)
    monkeypatch.setenv("DEEPEP_NORMAL_LONG_SEQ_ROUND", "2")
    monkeypatch.setenv("DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS", "32")
    assert env.long_seq_rounds() == env.LongSeqRounds(2, 32, True)
    monkeypatch.setenv("MOE_EXPERT_TOKEN_NUMS_TYPE", "0")
    assert env.normal_settings() == env.NormalSettings(True, 0, env.LongSeqRounds(2, 32, True))
    monkeypatch.delenv("DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS")
    with pytest.raises(ValueError, match="set or unset together"):
        env.long_seq_rounds()
    with pytest.raises(ValueError, match="set or unset together"):
        env.normal_settings()
    monkeypatch.setenv("DEEP_NORMAL_MODE_USE_INT8_QUANT", "")  # set, empty: read as unset
    monkeypatch.delenv("DEEPEP_NORMAL_LONG_SEQ_ROUND")
    monkeypatch.delenv("MOE_EXPERT_TOKEN_NUMS_TYPE")
    assert env.normal_settings() == env.NormalSettings(False, 1, env.ONE_ROUND)
    monkeypatch.setenv("MOE_EXPERT_TOKEN_NUMS_TYPE", "2")
    with pytest.raises(ValueError, match="MOE_EXPERT_TOKEN_NUMS_TYPE must be an integer in \\[0, 1\\], got '2'"):
        env.expert_token_nums_type()
    monkeypatch.setenv("DEEP_USE_MODE", "x")  # registers the variable for monkeypatch to restore
    os.environb[b"DEEP_USE_MODE"] = b"ops\xff"
    with pytest.raises(ValueError, match="DEEP_USE_MODE") as raised:
        env.use_mode()
    assert repr(os.environ["DEEP_USE_MODE"]) in str(raised.value)


def test_environment_variables() -> None:
    spawn_ranks(
        env_rank,
        2,
        env={
            "MOE_EXPERT_TOKEN_NUMS_TYPE": "0",
            "DEEPEP_NORMAL_LONG_SEQ_ROUND": "2",
            "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "32",
        },
    )


def sglang_rank(rank: int, num_ranks: int, group) -> None:
    """SGLang's DeepEP dispatcher: keyword calls with events, expert_alignment=128, num_rdma_bytes=0 in
    low-latency mode; a handle of another Buffer is a clear error."""
    num_experts = EXPERTS_PER_RANK * num_ranks
    x, topk_idx, topk_weights = inputs(rank, num_experts)
    buffer = deep_ep.Buffer(
        group, num_nvl_bytes=1 << 22, num_rdma_bytes=0, low_latency_mode=True, num_qps_per_rank=num_experts // num_ranks
    )
    previous_event = deep_ep.Buffer.capture()
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event) = (
        buffer.get_dispatch_layout(
            topk_idx, num_experts, previous_event=previous_event, async_finish=True, allocate_on_comm_stream=True
        )
    )
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        previous_event=previous_event,
        async_finish=True,
        allocate_on_comm_stream=True,
        expert_alignment=128,
        config=deep_ep.Buffer.get_dispatch_config(num_ranks),
    )
    event.current_stream_wait()
    assert all(c % 128 == 0 for c in counts) and sum(counts) == recv_x.shape[0]
    combined_x, _, event = buffer.combine(
        recv_x,
        handle,
        async_finish=True,
        previous_event=event,
        allocate_on_comm_stream=True,
        config=deep_ep.Buffer.get_combine_config(num_ranks),
    )
    expected = reference_combine(x.float().unsqueeze(1).expand(-1, topk_idx.shape[1], -1), topk_idx, topk_weights)
    assert calc_diff(combined_x.float(), expected.float()) < 1e-5
    buffer.clean_low_latency_buffer(TOKENS, HIDDEN, num_experts)
    recv_x, recv_count, ll_handle, event, hook = buffer.low_latency_dispatch(
        x,
        topk_idx,
        TOKENS,
        num_experts,
        use_fp8=True,
        async_finish=False,
        return_recv_hook=True,
        round_scale=False,
        use_ue8m0=False,
    )
    hook()
    q, scale = recv_x
    values = (q.float() * scale.unsqueeze(1)).to(torch.bfloat16)
    ll_combined, event, hook = buffer.low_latency_combine(
        values, topk_idx, topk_weights, ll_handle, async_finish=False, return_recv_hook=True, zero_copy=False
    )
    hook()
    assert calc_diff(ll_combined.float(), expected.float()) < 1e-3  # int8 rows
    other = deep_ep.Buffer(group, num_nvl_bytes=1 << 22)
    with pytest.raises(ValueError, match="another Buffer"):
        other.combine(combined_x, handle)
    other.destroy()
    buffer.destroy()


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_sglang_dispatcher_calls(num_ranks: int) -> None:
    spawn_ranks(sglang_rank, num_ranks)


def internode_rank(rank: int, num_ranks: int, group) -> None:
    """Two nodes (one rank each): the 9-entry handle, handle[4] as combine weights, cost statistics."""
    num_experts = EXPERTS_PER_RANK * num_ranks
    x, topk_idx, topk_weights = inputs(rank, num_experts)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 22)
    assert buffer.get_num_rdma_ranks() == num_ranks
    normal_round(rank, num_ranks, group, buffer, num_experts, x, topk_idx, topk_weights)
    buffer.destroy()


def test_internode_handle() -> None:
    spawn_ranks(internode_rank, 2, env={"DEEP_EP_RANKS_PER_NODE": "1"})

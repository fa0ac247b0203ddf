"""PLUMBING tests of deep_ep.npu.operators on CPU, against a stand-in for torch_npu. NOT hardware coverage.

No NPU, CANN or torch_npu exists on the development machines. ``npu_stand_in.FakeTorchNpu``
plays one rank of an R-rank group on the documented behaviour of one torch_npu release
(7.1.0, 7.2.0, 7.3.0) and SoC: signatures, what the release rejects, what it ignores, and
outputs built from the documented tables (see its module doc). These tests show how
deep_ep maps its shapes onto the operators per release and mode, and that it stays inside
what each release documents. What they cannot show (that the operators really behave as
documented, HCCL, timing, memory) is listed in docs/npu.md; tests/python/deepep/npu_smoke.py
is the script for a machine with NPUs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from npu_stand_in import RELEASE_DOCS, SOC_DEVICE_NAMES, FakeTorchNpu, OperatorRejected, quantize_rows, remote_scale  # noqa: E402

from deep_ep.npu import operators as npu_ops  # noqa: E402
from deep_ep.npu import versions  # noqa: E402
from deep_ep.transport import groups  # noqa: E402

pytestmark = pytest.mark.plumbing
HIERARCHY_ENV = {"HCCL_INTRA_PCIE_ENABLE": "1", "HCCL_INTRA_ROCE_ENABLE": "0"}


@pytest.fixture
def fake_npu(monkeypatch):
    """Installs a FakeTorchNpu as torch_npu / torch.npu and fakes the HCCL group plumbing.
    Defaults: an unknown NPU ("FakeNPU": no SoC limits), release 7.3.0."""

    def install(**kwargs) -> FakeTorchNpu:
        kwargs.setdefault("device_name", "FakeNPU")
        fake = FakeTorchNpu(**kwargs)
        monkeypatch.setitem(sys.modules, "torch_npu", fake.module)
        monkeypatch.setattr(torch, "npu", fake.torch_npu_namespace, raising=False)
        monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: group.global_ranks)
        monkeypatch.setattr(dist, "new_group", fake.new_group)
        monkeypatch.setattr(groups, "torch_group_helper", lambda: None)  # groups come from new_group
        monkeypatch.setattr(npu_ops, "_npu_device", lambda: torch.device("cpu"))
        return fake

    monkeypatch.delenv("HCCL_INTRA_PCIE_ENABLE", raising=False)
    monkeypatch.delenv("HCCL_INTRA_ROCE_ENABLE", raising=False)
    return install


def _make_ll(global_ranks=(0,), num_experts=None, rank=0) -> npu_ops.NpuLowLatency:
    group = types.SimpleNamespace(global_ranks=list(global_ranks))
    return npu_ops.NpuLowLatency(group, rank, len(global_ranks), num_experts)


def _routing(num_tokens, num_topk, num_experts, seed=0, hidden=32):
    """Random distinct top-k rows plus a -1 in row 0 and an all -1 row 1."""
    gen = torch.Generator().manual_seed(seed)
    idx = (
        torch.stack([torch.randperm(num_experts, generator=gen)[:num_topk] for _ in range(num_tokens)])
        if num_tokens
        else torch.zeros(0, num_topk, dtype=torch.int64)
    )
    if num_tokens >= 2:
        idx[0, -1] = -1
        idx[1, :] = -1
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    return x, idx, weights


def _reference_rows(x, idx, num_local_experts, rank=0):
    """What `rank` receives from its own tokens: rows of local expert 0, then 1, ... in token order."""
    first = rank * num_local_experts
    rows = [x[t] for e in range(first, first + num_local_experts) for t in range(idx.shape[0]) if (idx[t] == e).any()]
    counts = torch.tensor([int((idx == e).sum()) for e in range(first, first + num_local_experts)], dtype=torch.int64)
    return (torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])), counts


def _reference_layout(counts, num_ranks, rank):
    """int64 [L * R]: inclusive prefix at e * R + r when only `rank` sends rows."""
    blocks = torch.zeros(counts.numel(), num_ranks, dtype=torch.int64)
    blocks[:, rank] = counts
    return blocks.reshape(-1).cumsum(0)


def _weighted_sum(idx, weights, hidden, expert_output):
    """float64 [T, H]: per token the sum over k with idx >= 0 of weights[t, k] * expert_output(t, idx[t, k])."""
    out = torch.zeros(idx.shape[0], hidden, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if int(idx[t, k]) >= 0:
                out[t] += float(weights[t, k]) * expert_output(t, int(idx[t, k]))
    return out


def _reference_combine(x, idx, weights, num_local_experts, rank):
    """Local experts return 2x (what the tests apply to recv_x); the simulated other ranks' experts
    return x * remote_scale(their rank, their local index)."""

    def output(t, expert):
        owner, slot = divmod(expert, num_local_experts)
        return (2.0 if owner == rank else remote_scale(owner, slot)) * x[t].double()

    return _weighted_sum(idx, weights, x.shape[1], output)


# (device, mode, release) cases: R and H inside each mode's documented limits
def _case_sizes(mode, release):
    if mode == "A3":
        return 4, 1024
    if mode == "A2-hierarchy":
        return 16, 64
    return (16 if release == "7.1.0" else 8), 64


CASES = [(mode, release) for release in RELEASE_DOCS for mode in ("A3", "A2-fullmesh", "A2-hierarchy")]


# --------------------------------------------------------------------------- tests


def test_plumbing_import_without_torch_npu():
    source = Path(npu_ops.__file__).read_text()
    top_level = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all("torch_npu" not in ast.dump(node) for node in top_level)
    code = (
        "import sys; sys.modules['torch_npu'] = None\n"  # makes `import torch_npu` fail
        "import deep_ep.npu.operators as m\n"
        "assert m.torch_npu_available() is False\n"
        "assert m.detect_soc() is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("mode,release", CASES)
def test_plumbing_mask_and_sinks_follow_the_release(fake_npu, monkeypatch, mode, release):
    """Per release and mode: the x_active_mask form the release documents (2-D where it does, else 1-D,
    None on A2 hierarchy), no comm_alg, and -1 entries and padding rows that never show up in
    recv_count, the received rows or the layout, while the combine still sums the right experts."""
    soc = mode[:2]
    if mode == "A2-hierarchy":
        for name, value in HIERARCHY_ENV.items():
            monkeypatch.setenv(name, value)
    fake = fake_npu(device_name=SOC_DEVICE_NAMES[soc], release=release)
    num_ranks, hidden = _case_sizes(mode, release)
    rank, num_local, num_topk, nmax, num_tokens = 1, 2, 3, 6, 4  # T < Nmax
    num_experts = num_local * num_ranks
    x, idx, weights = _routing(num_tokens, num_topk, num_experts, seed=7, hidden=hidden)
    idx[2] = torch.tensor([rank * num_local + 1, rank * num_local, -1])  # local experts and a -1
    idx[3] = torch.tensor([rank * num_local + 1, -1, (rank + 1) * num_local])  # a remote expert too
    ll = _make_ll(tuple(range(num_ranks)), rank=rank)
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, nmax, num_experts, False, None)

    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    expected_rank = max(RELEASE_DOCS[release].masks[mode], default=0)
    mask = args["x_active_mask"]
    if expected_rank == 0:
        assert mask is None
    else:
        assert mask.dtype == torch.bool and mask.dim() == expected_rank
    assert args.get("comm_alg", "") == "" and ("comm_alg" in args) == RELEASE_DOCS[release].comm_alg
    assert (args["expert_scales"] is not None) == (soc == "A2")
    ref_rows, ref_counts = _reference_rows(x, idx, num_local, rank)
    assert torch.equal(recv_count, ref_counts)  # no phantom rows from -1 entries or padding
    assert torch.equal(recv_x[: ref_rows.shape[0]], ref_rows)
    assert tuple(recv_x.shape) == (nmax * num_ranks * min(num_local, num_topk), hidden)
    assert torch.equal(handle.recv_layout_prefix, _reference_layout(ref_counts, num_ranks, rank))

    expert_out = (recv_x.float() * 2).to(torch.bfloat16)
    expert_out[int(recv_count.sum()) :] = float("nan")  # rows past the real ones may hold anything
    combined = ll.combine(expert_out, idx, weights, handle)
    cargs = fake.args_of("npu_moe_distribute_combine_v2")
    if soc == "A2":  # the dispatch's expand_scales, passed through
        assert cargs["expand_scales"] is fake.dispatch_state["expand_scales"]
    expected = _reference_combine(x, idx, weights, num_local, rank)
    torch.testing.assert_close(combined.double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    assert ll.release.name == release and ll.mode == mode


@pytest.mark.parametrize(
    "mode,release,num_shared,rank",
    [("A3", "7.3.0", 1, 0), ("A3", "7.3.0", 1, 2), ("A2-fullmesh", "7.2.0", 2, 1), ("A2-fullmesh", "7.2.0", 2, 5)],
)
def test_plumbing_shared_expert_ranks(fake_npu, mode, release, num_shared, rank):
    """S shared-expert ranks (MOE_SHARED_EXPERT_RANK_NUM): both operators get shared_expert_num=1 and
    shared_expert_rank_num=S; the routed experts (and the sink experts of a 1-D mask) live on ranks [S, R)
    only; a shared rank receives every token with one local expert; the combine adds the shared output."""
    fake = fake_npu(device_name=SOC_DEVICE_NAMES[mode[:2]], release=release)
    num_ranks, hidden = _case_sizes(mode, release)
    num_local, num_topk, nmax, num_tokens = 2, 3, 6, 4
    num_experts = num_local * (num_ranks - num_shared)
    x, idx, weights = _routing(num_tokens, num_topk, num_experts, seed=5, hidden=hidden)
    own = (rank - num_shared) * num_local  # the first routed expert of this rank (if it is a routed one)
    if rank >= num_shared:
        idx[2] = torch.tensor([own + 1, own, -1])
    # Whether a row of only -1 entries still reaches the shared expert under a 2-D mask is not documented
    # (docs/npu.md): every row here keeps one routed expert.
    idx[1, 0] = num_experts - 1
    ll = _make_ll(tuple(range(num_ranks)), rank=rank)
    recv_x, recv_count, handle = ll.dispatch(
        x, idx, weights, nmax, num_experts, False, None, num_shared_ranks=num_shared
    )

    sinks = 0 if max(RELEASE_DOCS[release].masks[mode]) == 2 else -(-num_topk // (num_ranks - num_shared))
    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert (args["shared_expert_num"], args["shared_expert_rank_num"]) == (1, num_shared)
    assert args["moe_expert_num"] == (num_ranks - num_shared) * (num_local + sinks)
    if rank < num_shared:  # every real token, in token order
        assert recv_count.tolist() == [num_tokens] and handle.num_shared_ranks == num_shared
        assert torch.equal(recv_x[:num_tokens], x)
        assert tuple(recv_x.shape) == (nmax * -(-num_ranks // num_shared), hidden)
        ref_counts = torch.tensor([num_tokens])
    else:
        ref_rows, ref_counts = _reference_rows(x, idx, num_local, rank - num_shared)
        assert torch.equal(recv_count, ref_counts) and torch.equal(recv_x[: ref_rows.shape[0]], ref_rows)
        assert tuple(recv_x.shape) == (nmax * num_ranks * min(num_local, num_topk), hidden)
    assert torch.equal(handle.recv_layout_prefix, _reference_layout(ref_counts, num_ranks, rank))

    combined = ll.combine((recv_x.float() * 2).to(torch.bfloat16), idx, weights, handle)
    cargs = fake.args_of("npu_moe_distribute_combine_v2")
    assert (cargs["shared_expert_num"], cargs["shared_expert_rank_num"]) == (1, num_shared)
    assert cargs["moe_expert_num"] == args["moe_expert_num"]

    def output(t, expert):
        owner, slot = divmod(expert, num_local)
        owner += num_shared
        return (2.0 if owner == rank else remote_scale(owner, slot)) * x[t].double()

    expected = _weighted_sum(idx, weights, hidden, output)
    holder = rank % num_shared
    expected += (2.0 if holder == rank else remote_scale(holder, 0)) * x.double()
    torch.testing.assert_close(combined.double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_plumbing_hccl_buffsize_with_shared_expert_ranks():
    """A3, torch_npu 7.3.0 (2-D mask: no sink experts), Nmax 128, H 7168, R 16, K 8, by hand:
    S = 1, E = 240: L = 240 / 15 = 16; row Align512(Align32(14336) + 64) = 14848;
    2 * (128 * 16 * 16 * 14848 + 128 * 9 * 14336) = 1006108672 B = 959.5 MB -> 960.
    S = 0, E = 240: L = 15: 2 * (128 * 16 * 15 * 14848 + 128 * 9 * 14336) = 945291264 B -> 902."""
    release = versions.release_for_cann("8.5.0")
    assert npu_ops.hccl_buffsize_mb(128, 7168, 16, 240, 8, "A3", release, num_shared_ranks=1) == 960
    assert npu_ops.hccl_buffsize_mb(128, 7168, 16, 240, 8, "A3", release) == 902
    with pytest.raises(ValueError, match="MOE_SHARED_EXPERT_RANK_NUM"):  # 256 is no multiple of 15
        npu_ops.hccl_buffsize_mb(128, 7168, 16, 256, 8, "A3", release, num_shared_ranks=1)


def test_plumbing_hierarchy_is_a2_only(fake_npu, monkeypatch):
    """The environment pair selects hierarchical mode on A2 (comm_alg left empty); on A3 it changes nothing."""
    for name, value in HIERARCHY_ENV.items():
        monkeypatch.setenv(name, value)
    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A3"], release="7.2.0")
    x, idx, weights = _routing(4, 2, 8, hidden=1024)
    ll = _make_ll((0, 1, 2, 3))
    ll.dispatch(x, idx, None, 6, 8, False, None)  # no topk_weights needed: not hierarchical
    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert args["comm_alg"] == "" and args["x_active_mask"].dim() == 2 and args["expert_scales"] is None
    assert ll.mode == "A3"


@pytest.mark.parametrize(
    "ranks,hidden,with_weights,match",
    [
        (8, 64, True, "num_ranks in 16, 32, 64"),
        (16, 10272, True, "hidden <= 10240"),
        (16, 64, False, "topk_weights is required"),
        (16, 100, True, "multiple of 32"),
    ],
)
def test_plumbing_hierarchy_limits_before_the_call(fake_npu, monkeypatch, ranks, hidden, with_weights, match):
    for name, value in HIERARCHY_ENV.items():
        monkeypatch.setenv(name, value)
    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A2"], release="7.3.0")
    x, idx, weights = _routing(4, 2, 2 * ranks, hidden=hidden)
    with pytest.raises(ValueError, match=match):
        _make_ll(tuple(range(ranks))).dispatch(x, idx, weights if with_weights else None, 6, 2 * ranks, False, None)
    assert fake.calls == []  # nothing reached the operator


@pytest.mark.parametrize(
    "soc,release,ranks,hidden,bs,topk,experts,match",
    [
        ("A2", "7.3.0", 9, 64, 8, 2, 18, "num_ranks"),
        ("A2", "7.3.0", 4, 64, 8, 2, 8, "num_ranks"),
        ("A2", "7.1.0", 8, 64, 8, 2, 16, "num_ranks"),
        ("A2", "7.3.0", 8, 7200, 8, 2, 16, "hidden <= 7168"),
        ("A2", "7.3.0", 8, 64, 257, 2, 16, "256 tokens"),
        ("A2", "7.3.0", 8, 48, 8, 2, 16, "multiple of 32"),
        ("A2", "7.3.0", 8, 64, 8, 2, 200, "24 experts per rank"),
        ("A2", "7.2.0", 8, 64, 8, 2, 192, "24 experts"),
        ("A2", "7.3.0", 32, 64, 8, 2, 544, "512 experts"),
        ("A3", "7.3.0", 769, 1024, 8, 2, 769, "num_ranks"),
        ("A3", "7.3.0", 4, 512, 8, 2, 8, "hidden in 1024..8192"),
        ("A3", "7.3.0", 4, 8448, 8, 2, 8, "hidden"),
        ("A3", "7.3.0", 4, 1024, 513, 2, 8, "512 tokens"),
        ("A3", "7.3.0", 4, 1024, 8, 17, 72, "num_topk"),
    ],
)
def test_plumbing_limits_of_soc_and_release(fake_npu, soc, release, ranks, hidden, bs, topk, experts, match):
    """Limits are checked per SoC, mode and release before any operator call (7.2.0's 1-D mask on A2
    adds a sink expert per rank, which counts against the 24 experts per rank)."""
    fake = fake_npu(device_name=SOC_DEVICE_NAMES[soc], release=release)
    ll = _make_ll(tuple(range(ranks)))
    with pytest.raises(ValueError, match=match):
        ll.check_limits(hidden, bs, topk, experts, True)
    assert fake.calls == []


def test_plumbing_limits_ok_at_the_edges(fake_npu):
    fake_npu(device_name=SOC_DEVICE_NAMES["A2"], release="7.3.0")
    _make_ll(tuple(range(8))).check_limits(7168, 256, 8, 8 * 24, True)
    fake_npu(device_name=SOC_DEVICE_NAMES["A3"], release="7.3.0")
    _make_ll(tuple(range(2))).check_limits(8192, 512, 16, 4, True)
    fake_npu(device_name="FakeNPU")  # unknown device: nothing is checked
    _make_ll(tuple(range(3))).check_limits(99999, 9999, 16, 3, False)


@pytest.mark.parametrize(
    "cann,release",
    [
        ("8.2.RC1", "7.1.0"),
        ("8.3.RC1", "7.2.0"),
        ("8.3.0", "7.2.0"),
        ("8.4.0", "7.2.0"),
        ("8.5.0", "7.3.0"),
        ("8.5.1", "7.3.0"),
        ("9.0.0", "newer"),
        ("8.1.RC1", "7.1.0"),
        (None, "7.1.0"),
        ("", "7.1.0"),
        ("unknown", "7.1.0"),
    ],
)
def test_plumbing_release_from_cann_version(cann, release):
    assert versions.release_for_cann(cann).name == release


def test_plumbing_version_table_agrees_with_the_documentation():
    """deep_ep's table against the stand-in's own copy of the documented facts."""
    for name, doc in RELEASE_DOCS.items():
        release = versions.release_for_cann(doc.cann)
        assert release.name == name
        assert bool(release.comm_alg) == doc.comm_alg
        assert release.a2_ranks == frozenset(doc.a2_ranks)
        assert (release.a2_max_local_experts is not None) == doc.older_a2_limits
        for mode, ranks in doc.masks.items():
            assert release.mask_rank[mode] == max(ranks, default=0), (name, mode)


def test_plumbing_release_read_from_torch_npu(fake_npu):
    for release in RELEASE_DOCS:
        fake_npu(release=release)
        assert npu_ops.detect_release().name == release
        assert _make_ll().release.name == release


def test_plumbing_stand_in_rejects_what_the_release_rejects(fake_npu, monkeypatch):
    """The stand-in is strict where the documentation is: a 2-D mask before it is documented, comm_alg on
    7.1.0, "hierarchy" on A3."""
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)

    def args(ids, ranks):  # x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num
        return torch.zeros(2, 1024, dtype=torch.bfloat16), ids, "comm", ranks, 0, 2 * ranks

    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A3"], release="7.1.0")
    with pytest.raises(OperatorRejected, match="one-dimensional"):
        fake.module.npu_moe_distribute_dispatch_v2(*args(ids, 4), x_active_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="comm_alg"):
        fake.module.npu_moe_distribute_dispatch_v2(*args(ids, 4), comm_alg="")
    fake.module.npu_moe_distribute_dispatch_v2(*args(ids, 4), x_active_mask=torch.ones(2, dtype=torch.bool))
    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A3"], release="7.2.0")
    with pytest.raises(OperatorRejected, match="hierarchy"):
        fake.module.npu_moe_distribute_dispatch_v2(*args(ids, 4), comm_alg="hierarchy")
    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A2"], release="7.2.0")
    x64 = (torch.zeros(2, 64, dtype=torch.bfloat16), ids, "comm", 8, 0, 16)
    with pytest.raises(OperatorRejected, match="one-dimensional"):
        fake.module.npu_moe_distribute_dispatch_v2(*x64, x_active_mask=torch.ones(2, 2, dtype=torch.bool))
    monkeypatch.setenv("HCCL_INTRA_PCIE_ENABLE", "1")
    monkeypatch.setenv("HCCL_INTRA_ROCE_ENABLE", "0")
    with pytest.raises(OperatorRejected, match="limit on R"):  # hierarchical mode: R in 16, 32, 64
        fake.module.npu_moe_distribute_dispatch_v2(*x64, expert_scales=torch.ones(2, 2))


def test_plumbing_ep_recv_counts_layout_change_is_an_error(fake_npu):
    """A CANN that writes ep_recv_counts differently is caught where deep_ep reads it."""
    fake_npu(device_name=SOC_DEVICE_NAMES["A3"], release="7.3.0", ep_recv_layout="counts")
    x, idx, weights = _routing(4, 2, 8, hidden=1024)
    idx[2:] = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(RuntimeError, match="ep_recv_counts .* changed its layout"):
        _make_ll((0, 1, 2, 3)).dispatch(x, idx, weights, 6, 8, False, None)


# Worked by hand (MB = 2**20 B, bf16 rows of 2H B, Align512/Align32 round up):
# A2 fullmesh, Nmax 128, H 7168, R 16, E 256, K 8: L = 16, min(L + sinks, K) = 8
#   128 * 16 * 8 rows * 14336 B = 234,881,024 B = 224 MB; 2 * (224 + 2) = 452 MB
# A3 with the 2-D mask (7.2.0 on): Align512(Align32(14336) + 64) = Align512(14400) = 14848
#   128 * 16 * 16 * 14848 = 486,539,264; 128 * (8 + 1) * Align512(14336) = 16,515,072
#   2 * (486,539,264 + 16,515,072) = 1,006,108,672 B = 959.5 MB -> 960
# A3 on 7.1.0 (1-D mask: ceil(8 / 16) = 1 sink expert per rank, L' = 17):
#   128 * 16 * 17 * 14848 = 516,947,968; 2 * (516,947,968 + 16,515,072) = 1,066,926,080 B = 1017.5 MB -> 1018
# A2 hierarchy (no mask: sinks, E' = 16 * 17 = 272): Align8(8) = 8, 2H + 4 * 8 * 4 = 14464,
#   128 * 14464 = 1,851,392 = 3616 * 512; (272 + 16 / 4) * 1,851,392 + 8 MB = 519,372,800 B = 495.3 MB -> 496
# Small sizes: Nmax 1, H 128, R 2, E 4, K 2 -> a few MB in every mode -> HCCL's default, 200
@pytest.mark.parametrize(
    "mode,cann,expected",
    [
        ("A2-fullmesh", "8.3.RC1", 452),
        ("A3", "8.3.RC1", 960),
        ("A3", "8.5.0", 960),
        ("A3", "8.2.RC1", 1018),
        ("A2-hierarchy", "8.3.RC1", 496),
        ("A2-hierarchy", "8.2.RC1", 496),
    ],
)
def test_plumbing_hccl_buffsize_worked_examples(mode, cann, expected):
    release = versions.release_for_cann(cann)
    assert npu_ops.hccl_buffsize_mb(128, 7168, 16, 256, 8, mode, release) == expected
    assert npu_ops.hccl_buffsize_mb(1, 128, 2, 4, 2, mode, release) == 200
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        npu_ops.hccl_buffsize_mb(8, 128, 3, 4, 2, mode, release)


def test_plumbing_hccl_buffsize_needs_a_mode_without_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(ValueError, match="give the mode"):
        npu_ops.hccl_buffsize_mb(128, 7168, 16, 256, 8)


@pytest.mark.parametrize(
    "name,soc",
    [
        ("Ascend910B1", "A2"),
        ("Ascend910B4", "A2"),
        ("Ascend910_9391", "A3"),
        ("Ascend910_9362", "A3"),
        ("Ascend310P3", None),
        (None, None),
    ],
)
def test_plumbing_detect_soc(fake_npu, name, soc):
    fake_npu(device_name=name)
    assert npu_ops.detect_soc() == soc


def test_plumbing_detect_soc_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert npu_ops.torch_npu_available() is False
    assert npu_ops.detect_soc() is None
    assert npu_ops.detect_release() is versions.OLDEST


def test_plumbing_dedicated_hccl_group(fake_npu):
    fake = fake_npu()
    ll = _make_ll(global_ranks=(5,))
    # the group's global ranks, in group order, on the HCCL backend, made by the group's ranks only
    assert fake.new_group_calls == [dict(ranks=[5], backend="hccl", use_local_synchronization=True)]
    assert fake.comm_name_calls == [(torch.device("cpu"), 0)]
    assert ll.comm_name == "fake_hccl_comm_0"


def test_plumbing_constructor_checks_num_experts_hint(fake_npu):
    fake_npu()
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        _make_ll(global_ranks=(0, 1), num_experts=3)


@pytest.mark.parametrize("num_tokens", [5, 8])
def test_plumbing_dispatch_combine_unknown_device(fake_npu, num_tokens):
    """An NPU that is neither A2 nor A3: no mask (sink experts take -1 entries and padding), one rank."""
    fake = fake_npu()
    nmax, num_experts, num_topk = 8, 4, 2
    x, idx, weights = _routing(num_tokens, num_topk, num_experts)
    stats = torch.ones(num_experts, dtype=torch.int32)
    ll = _make_ll()
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, nmax, num_experts, False, stats)

    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert tuple(args["x"].shape) == (nmax, 32)  # padded to Nmax
    assert torch.equal(args["x"][:num_tokens], x) and not args["x"][num_tokens:].any()
    assert args["x_active_mask"] is None and args["expert_scales"] is None
    assert args["moe_expert_num"] == num_experts + num_topk  # R = 1: K sink experts
    assert args["global_bs"] == nmax * 1
    assert args["quant_mode"] == 0 and args["expert_token_nums_type"] == 1
    assert (args["group_ep"], args["ep_world_size"], args["ep_rank_id"]) == ("fake_hccl_comm_0", 1, 0)

    rows_m = nmax * 1 * min(num_topk, num_experts)
    ref_rows, ref_counts = _reference_rows(x, idx, num_experts)
    assert recv_x.dtype == torch.bfloat16 and tuple(recv_x.shape) == (rows_m, 32)
    assert recv_count.dtype == torch.int64 and torch.equal(recv_count, ref_counts)
    assert torch.equal(recv_x[: ref_rows.shape[0]], ref_rows)
    assert stats.dtype == torch.int32 and torch.equal(stats, 1 + ref_counts.int())
    assert handle.num_max_dispatch_tokens_per_rank == nmax and handle.hidden == 32
    assert handle.num_experts == num_experts and handle.recv_count is recv_count
    assert torch.equal(handle.recv_layout_prefix, ref_counts.cumsum(0))

    expert_out = (recv_x.float() * 2).to(torch.bfloat16)  # "expert": y = 2x
    out = torch.empty(num_tokens, 32, dtype=torch.bfloat16)
    combined = ll.combine(expert_out, idx, weights, handle, out=out)
    assert combined is out
    scales = fake.args_of("npu_moe_distribute_combine_v2")["expert_scales"]
    assert torch.equal(scales[:num_tokens], torch.where(idx >= 0, weights, 0.0)) and not scales[num_tokens:].any()
    torch.testing.assert_close(out.double(), _reference_combine(x, idx, weights, num_experts, 0), rtol=2e-2, atol=2e-2)
    assert tuple(ll.combine(expert_out, idx, weights, handle).shape) == (num_tokens, 32)


def test_plumbing_dispatch_int8_pair(fake_npu):
    fake = fake_npu()
    x, idx, weights = _routing(6, 3, 4, seed=1)
    ll = _make_ll()
    recv_x, recv_count, _ = ll.dispatch(x, idx, None, 8, 4, True, None)
    assert fake.args_of("npu_moe_distribute_dispatch_v2")["quant_mode"] == 2
    assert isinstance(recv_x, tuple) and len(recv_x) == 2
    q, scale = recv_x
    rows_m = 8 * min(3, 4)
    assert q.dtype == torch.int8 and tuple(q.shape) == (rows_m, 32)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (rows_m,)
    ref_rows, ref_counts = _reference_rows(x, idx, 4)
    n = int(ref_counts.sum())
    assert torch.equal(recv_count, ref_counts)
    deq = q[:n].float() * scale[:n].unsqueeze(1)
    assert bool((deq - ref_rows.float()).abs().le(scale[:n].unsqueeze(1) / 2 + 1e-6).all())


def test_plumbing_zero_tokens(fake_npu):
    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A3"], release="7.1.0")
    x = torch.zeros(0, 1024, dtype=torch.bfloat16)
    idx = torch.zeros(0, 2, dtype=torch.int64)
    weights = torch.zeros(0, 2)
    ll = _make_ll((0, 1))
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, 4, 4, False, None)
    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert tuple(args["x"].shape) == (4, 1024) and tuple(args["x_active_mask"].shape) == (4,)
    assert not args["x_active_mask"].any()
    assert tuple(recv_x.shape) == (16, 1024) and not recv_count.any()
    assert tuple(ll.combine(recv_x, idx, weights, handle).shape) == (0, 1024)


def test_plumbing_argument_errors(fake_npu):
    fake_npu()
    x, idx, weights = _routing(5, 2, 4)
    ll = _make_ll()
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        ll.dispatch(x, idx, weights, 4, 4, False, None)
    with pytest.raises(TypeError, match="bfloat16"):
        ll.dispatch(x.float(), idx, weights, 8, 4, False, None)
    recv_x, _, handle = ll.dispatch(x, idx, weights, 8, 4, False, None)
    with pytest.raises(ValueError, match="topk_weights"):
        ll.combine(recv_x, idx, weights[:4], handle)
    with pytest.raises(ValueError, match="H=32"):
        ll.combine(recv_x[:, :16], idx, weights, handle)


def test_plumbing_v1_fallback_when_v2_missing(fake_npu):
    """v1 operators reserve x_active_mask: no mask, sink experts (the stand-in dispatches what it is given)."""
    fake = fake_npu(device_name=SOC_DEVICE_NAMES["A3"], with_v2=False)
    x, idx, weights = _routing(5, 2, 8, hidden=1024)
    ll = _make_ll((0, 1))
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, 8, 8, False, None)
    combined = ll.combine((recv_x.float() * 2).to(torch.bfloat16), idx, weights, handle)
    assert fake.names_called() == ["npu_moe_distribute_dispatch", "npu_moe_distribute_combine"]
    assert fake.args_of("npu_moe_distribute_dispatch")["x_active_mask"] is None
    ref_rows, ref_counts = _reference_rows(x, idx, 4)
    assert torch.equal(recv_count, ref_counts) and torch.equal(recv_x[: ref_rows.shape[0]], ref_rows)
    expected = _reference_combine(x, idx, weights, 4, 0)
    torch.testing.assert_close(combined.double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def _interleave_gate_up(w13: torch.Tensor, s13: torch.Tensor):
    """gmm1_permuted_weight layout from gate-then-up weights [L, 2I, H] / scales [L, 2I] (test's own version)."""
    num_local, two_i, _ = w13.shape
    inter = two_i // 2
    cols = []
    for j in range(0, inter, 64):
        cols += list(range(j, j + 64)) + list(range(inter + j, inter + j + 64))
    cols = torch.tensor(cols)
    return w13.transpose(1, 2)[:, :, cols].contiguous(), s13[:, cols].contiguous()


def _fused_reference(x, idx, weights, w13, s13, w2, s2):
    """fused_deep_moe for one rank (quantize, gmm1, SwiGLU, requantize, gmm2, weighted sum), with
    gate-then-up w13 [L, 2I, H]."""
    inter = w13.shape[1] // 2
    xq, sx = quantize_rows(x)

    def output(t, e):
        h = (xq[t].double() @ w13[e].double().T) * sx[t].double() * s13[e].double()
        a = F.silu(h[:inter]) * h[inter:]
        aq, sa = quantize_rows(a.unsqueeze(0))
        return (aq[0].double() @ w2[e].double()) * sa[0].double() * s2[e].double()

    return _weighted_sum(idx, weights, x.shape[1], output)


def test_plumbing_fused_deep_moe(fake_npu):
    fake = fake_npu()
    gen = torch.Generator().manual_seed(3)
    num_local, hidden, inter, num_topk, num_tokens, nmax = 2, 32, 128, 2, 5, 6
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.tensor([[0, 1], [1, -1], [1, 0], [0, -1], [-1, -1]])
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    w13 = torch.randint(-127, 128, (num_local, 2 * inter, hidden), generator=gen, dtype=torch.int8)
    s13 = torch.rand(num_local, 2 * inter, generator=gen) * 1e-2
    w2 = torch.randint(-127, 128, (num_local, inter, hidden), generator=gen, dtype=torch.int8)
    s2 = torch.rand(num_local, hidden, generator=gen) * 1e-2
    w1, s1 = _interleave_gate_up(w13, s13)
    ll = _make_ll()
    w2_out_in = w2.transpose(1, 2).contiguous()  # gmm2_weight [L, H, I], as DeepEP-Ascend's callers pass it

    out, ep_recv_count = ll.fused_deep_moe(x, idx, weights, w1, s1, w2_out_in, s2, nmax, num_local)
    assert fake.names_called() == [
        "npu_moe_distribute_dispatch_v2",
        "npu_grouped_matmul",
        "npu_dequant_swiglu_quant",
        "npu_grouped_matmul",
        "npu_moe_distribute_combine_v2",
    ]
    assert fake.args_of("npu_moe_distribute_dispatch_v2")["quant_mode"] == 2
    gmm1, gmm2 = fake.args_of("npu_grouped_matmul", 0), fake.args_of("npu_grouped_matmul", 1)
    assert gmm1["output_dtype"] == torch.int32 and gmm2["output_dtype"] == torch.bfloat16
    assert torch.equal(gmm1["weight"][0], w13.transpose(1, 2))  # gate | up halves
    assert torch.equal(gmm2["weight"][0], w2)  # [L, I, H] for npu_grouped_matmul
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (num_tokens, hidden)
    ref = _fused_reference(x, idx, weights, w13, s13, w2, s2)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))
    # ep_recv_count[e * R + r]: rows local expert e received from rank r (R = 1)
    assert ep_recv_count.dtype == torch.int32
    assert ep_recv_count.tolist() == [int((idx == e).sum()) for e in range(num_local)]

    # the [gate | up] conversion is cached per weight tensor, and redone after in-place updates
    ll.fused_deep_moe(x, idx, weights, w1, s1, w2_out_in, s2, nmax, num_local)
    assert fake.args_of("npu_grouped_matmul", 2)["weight"][0] is gmm1["weight"][0]
    assert fake.args_of("npu_grouped_matmul", 3)["weight"][0] is gmm2["weight"][0]
    w1.add_(0)
    ll.fused_deep_moe(x, idx, weights, w1, s1, w2_out_in, s2, nmax, num_local)
    assert fake.args_of("npu_grouped_matmul", 4)["weight"][0] is not gmm1["weight"][0]


def test_plumbing_fused_deep_moe_weight_errors(fake_npu):
    fake_npu()
    x, idx, weights = _routing(3, 2, 2)
    ll = _make_ll()
    w1 = torch.zeros(2, 32, 96, dtype=torch.int8)  # 2I = 96 is not whole 64-column tiles
    with pytest.raises(ValueError, match="multiple of 128"):
        ll.fused_deep_moe(
            x, idx, weights, w1, torch.ones(2, 96), torch.zeros(2, 48, 32, dtype=torch.int8), torch.ones(2, 32), 4, 2
        )
    w1 = torch.zeros(2, 32, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="gmm2_weight"):
        ll.fused_deep_moe(
            x, idx, weights, w1, torch.ones(2, 128), torch.zeros(2, 32, 32, dtype=torch.int8), torch.ones(2, 32), 4, 2
        )
    with pytest.raises(ValueError, match=r"gmm2_weight must be \[2, 32, 64\]"):  # [L, I, H] instead of [L, H, I]
        ll.fused_deep_moe(
            x, idx, weights, w1, torch.ones(2, 128), torch.zeros(2, 64, 32, dtype=torch.int8), torch.ones(2, 32), 4, 2
        )


def test_plumbing_npu_smoke_script_skips_cleanly_here():
    """The device script says why it cannot run and exits 0; pytest does not collect it (no test_ prefix)."""
    script = REPO_ROOT / "tests" / "python" / "deepep" / "npu_smoke.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "torch_npu" in result.stdout

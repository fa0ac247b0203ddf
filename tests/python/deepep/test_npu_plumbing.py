"""PLUMBING tests of deep_ep.transport.npu_ops, on CPU. They are NOT NPU correctness tests.

No NPU, CANN or torch_npu exists on the development machines. These tests install
a recording stand-in ``torch_npu`` module whose operators

* bind every call against the signature NPU.md documents (``inspect.Signature``
  built from NPU.md's text), so a misspelt or undocumented parameter fails;
* check the documented dtypes/shapes/values of the arguments (``expert_ids`` int32
  ``[BS, K]`` without -1, ``x_active_mask`` bool, ``global_bs``, ``quant_mode``,
  ``expert_token_nums_type``, ...);
* return outputs of the documented shapes, computed by a single-rank (R = 1) CPU
  simulation (dispatch groups rows by local expert, combine weights them back),

so that the mapping between the SPEC's shapes and the operators' can be asserted.
Whether the real operators behave like the simulation is exactly what these tests
cannot show; ``test_real_npu_dispatch_combine_round_trip`` does that on an NPU host.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[3]
try:
    from deep_ep.npu import operators as npu_ops
except ImportError:  # run from another directory without an installed package
    sys.path.insert(0, str(REPO_ROOT))
    from deep_ep.npu import operators as npu_ops

# --------------------------------------------------------------------------- signatures

# Parameter lists copied from NPU.md.
_DISPATCH_V2_TEXT = """x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
x_active_mask=None, expert_scales=None, elastic_info=None, performance_info=None,
group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0, shared_expert_num=1,
shared_expert_rank_num=0, quant_mode=0, global_bs=0, expert_token_nums_type=1,
comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0"""
_COMBINE_V2_TEXT = """expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0,
tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
global_bs=0, comm_quant_mode=0, comm_alg="", zero_expert_num=0,
copy_expert_num=0, const_expert_num=0"""
# NPU.md describes v1 only as "expand_idx instead of assist_info_for_combine"; the full
# lists are those of torch_npu's documentation of npu_moe_distribute_dispatch/_combine.
_DISPATCH_V1_TEXT = """x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
x_active_mask=None, expert_scales=None, group_tp="", tp_world_size=0, tp_rank_id=0,
expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0,
global_bs=0, expert_token_nums_type=1"""
_COMBINE_V1_TEXT = """expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep,
ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None,
activation_scale=None, weight_scale=None, group_list=None, expand_scales=None,
shared_expert_x=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, out_dtype=0,
comm_quant_mode=0, group_list_type=0"""
# NPU.md gives the names with example values (x=[tokens], group_list=counts, split_item=2|3,
# output_dtype=...); the defaults below are placeholders, only the names matter.
_GROUPED_MATMUL_TEXT = """x, weight, *, bias=None, scale=None, per_token_scale=None, group_list=None,
group_type=0, split_item=0, group_list_type=0, output_dtype=None"""
_DYNAMIC_QUANT_TEXT = "x, smooth_scales=None"
# NPU.md: (x_int32, weight_scale=..., activation_scale=..., group_index=counts,
# activate_left=True, quant_mode=1); the first parameter is torch_npu's `x`.
_DEQUANT_SWIGLU_QUANT_TEXT = """x, *, weight_scale=None, activation_scale=None, group_index=None,
activate_left=False, quant_mode=0"""


def _signature(text: str) -> inspect.Signature:
    """An ``inspect.Signature`` from an NPU.md-style parameter list."""
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for item in " ".join(text.split()).split(","):
        item = item.strip()
        if item == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        name, eq, default = item.partition("=")
        value = ast.literal_eval(default) if eq else inspect.Parameter.empty
        params.append(inspect.Parameter(name.strip(), kind, default=value))
    return inspect.Signature(params)


SIGNATURES = {
    "npu_moe_distribute_dispatch_v2": _signature(_DISPATCH_V2_TEXT),
    "npu_moe_distribute_combine_v2": _signature(_COMBINE_V2_TEXT),
    "npu_moe_distribute_dispatch": _signature(_DISPATCH_V1_TEXT),
    "npu_moe_distribute_combine": _signature(_COMBINE_V1_TEXT),
    "npu_grouped_matmul": _signature(_GROUPED_MATMUL_TEXT),
    "npu_dynamic_quant": _signature(_DYNAMIC_QUANT_TEXT),
    "npu_dequant_swiglu_quant": _signature(_DEQUANT_SWIGLU_QUANT_TEXT),
}
_COMM_ALGS = ("", "fullmesh", "hierarchy", "fullmesh_v1", "fullmesh_v2")

# --------------------------------------------------------------------------- stand-in torch_npu


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC int8: scale = max|row| / 127, q = round(x / scale)."""
    xf = x.float()
    scale = xf.abs().amax(dim=1) / 127.0
    q = torch.round(xf / scale.clamp(min=1e-30).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def _group_of_rows(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Group id of each of `rows` rows for per-group counts; -1 past the counted rows."""
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return torch.cat([group, torch.full((rows - group.numel(),), -1, dtype=torch.int64)])


class FakeTorchNpu:
    """Recording stand-in for torch_npu: signature/argument checks plus an R = 1 simulation."""

    def __init__(self, device_name: str | None = "FakeNPU", with_v2: bool = True,
                 extra_expand_rows: int = 2) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.device_name = device_name
        # the operators may return A > global_bs * min(L, K) rows; make the code cope
        self.extra_expand_rows = extra_expand_rows
        self.dispatch_state: dict | None = None
        self.module = types.ModuleType("torch_npu")
        names = ["npu_moe_distribute_dispatch", "npu_moe_distribute_combine",
                 "npu_grouped_matmul", "npu_dynamic_quant", "npu_dequant_swiglu_quant"]
        if with_v2:
            names += ["npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2"]
        for name in names:
            setattr(self.module, name, self._recorder(name))
        # torch.npu as torch_npu registers it
        self.torch_npu_namespace = types.SimpleNamespace(
            is_available=lambda: self.device_name is not None,
            get_device_name=lambda *a: self.device_name)
        self.new_group_calls: list[dict] = []
        self.comm_name_calls: list[tuple] = []

    def names_called(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args_of(self, name: str, index: int = -1) -> dict:
        return [args for n, args in self.calls if n == name][index]

    def _recorder(self, name: str):
        sig = SIGNATURES[name]
        impl = getattr(self, "_" + name.removesuffix("_v2"))

        def op(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)  # TypeError for names NPU.md does not list
            bound.apply_defaults()
            self.calls.append((name, dict(bound.arguments)))
            return impl(bound.arguments, v2=name.endswith("_v2"))

        op.__name__ = name
        return op

    # ---- torch.distributed stand-ins

    def new_group(self, ranks=None, backend=None, **kwargs):
        self.new_group_calls.append(dict(ranks=list(ranks), backend=backend, **kwargs))
        fake = self

        class _Backend:
            def get_hccl_comm_name(self, rank_in_group):
                fake.comm_name_calls.append((self.device, rank_in_group))
                return f"fake_hccl_comm_{rank_in_group}"

        class _Group:
            def _get_backend(self, device):
                backend_obj = _Backend()
                backend_obj.device = device
                return backend_obj

        return _Group()

    # ---- MC2 operators

    def _npu_moe_distribute_dispatch(self, p: dict, v2: bool):
        x, ids, mask = p["x"], p["expert_ids"], p["x_active_mask"]
        bs, hidden = x.shape
        num_ranks, num_experts = p["ep_world_size"], p["moe_expert_num"]
        assert num_ranks == 1 and p["ep_rank_id"] == 0, "the simulation is single-rank"
        assert isinstance(p["group_ep"], str) and p["group_ep"]
        assert x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2 and bs > 0
        assert ids.dtype == torch.int32 and ids.dim() == 2 and ids.shape[0] == bs
        num_topk = ids.shape[1]
        assert bool(((ids >= 0) & (ids < num_experts)).all()), "expert_ids must not hold -1"
        sorted_ids = ids.sort(dim=1).values
        assert bool((sorted_ids[:, 1:] != sorted_ids[:, :-1]).all()), "ids of a row must be distinct"
        assert mask is None or (mask.dtype == torch.bool and tuple(mask.shape) in ((bs,), (bs, num_topk)))
        assert p["global_bs"] in (0, bs * num_ranks)
        assert p["quant_mode"] in (0, 2)
        assert p["expert_token_nums_type"] in (0, 1)
        assert p["scales"] is None
        if v2:
            assert p["comm_alg"] in _COMM_ALGS
        scales_in = p["expert_scales"]
        assert scales_in is None or (scales_in.dtype == torch.float32
                                     and tuple(scales_in.shape) == (bs, num_topk))

        num_local = num_experts // num_ranks
        rows_a = (p["global_bs"] or bs * num_ranks) * min(num_local, num_topk) + self.extra_expand_rows
        active = torch.ones(bs, num_topk, dtype=torch.bool) if mask is None else (
            mask if mask.dim() == 2 else mask.unsqueeze(1).expand(bs, num_topk))
        # rows grouped by local expert, then by token (one source rank)
        order = [(t, k) for e in range(num_local) for t in range(bs) for k in range(num_topk)
                 if active[t, k] and ids[t, k] == e]
        tok = torch.tensor([t for t, _ in order], dtype=torch.int64)
        kk = torch.tensor([k for _, k in order], dtype=torch.int64)
        counts = torch.bincount(ids[active].long(), minlength=num_local)
        n = len(order)
        if p["quant_mode"] == 2:
            expand_x = torch.zeros(rows_a, hidden, dtype=torch.int8)
            dynamic_scales = torch.zeros(rows_a, dtype=torch.float32)
            q, s = _quantize_rows(x[tok])
            expand_x[:n], dynamic_scales[:n] = q, s
        else:
            expand_x = torch.zeros(rows_a, hidden, dtype=x.dtype)
            expand_x[:n] = x[tok]
            dynamic_scales = torch.zeros(0, dtype=torch.float32)
        if v2:  # (rank, token, k) triples, row stride 128
            assist = torch.zeros(rows_a * 128, dtype=torch.int32)
            triples = assist.view(rows_a, 128)[:n]
            triples[:, 1], triples[:, 2] = tok.int(), kk.int()
        else:  # expand_idx [BS * K]
            assist = torch.full((bs * num_topk,), -1, dtype=torch.int32)
            assist[tok * num_topk + kk] = torch.arange(n, dtype=torch.int32)
        expert_token_nums = counts if p["expert_token_nums_type"] == 1 else counts.cumsum(0)
        # inclusive prefix per (e, r) at [e * R + r], then an A2-like tail the combine reads
        tail = torch.full((2 * p["global_bs"] * num_topk,), -7, dtype=torch.int32)
        ep_recv_counts = torch.cat([counts.cumsum(0).to(torch.int32), tail])
        tp_recv_counts = torch.zeros(1, dtype=torch.int32)
        expand_scales = torch.zeros(rows_a, dtype=torch.float32)
        if scales_in is not None:
            expand_scales[:n] = scales_in[tok, kk]
        self.dispatch_state = dict(
            ids=ids, mask=mask, assist=assist, ep_recv_counts=ep_recv_counts,
            tp_recv_counts=tp_recv_counts, expand_scales=expand_scales, tok=tok, kk=kk,
            rows_a=rows_a, bs=bs, hidden=hidden, global_bs=p["global_bs"],
            num_experts=num_experts, group_ep=p["group_ep"],
            comm_alg=p["comm_alg"] if v2 else None)
        return (expand_x, dynamic_scales, assist, expert_token_nums.to(torch.int64),
                ep_recv_counts, tp_recv_counts, expand_scales)

    def _npu_moe_distribute_combine(self, p: dict, v2: bool):
        st = self.dispatch_state
        assert st is not None, "combine without dispatch"
        expand_x, weights = p["expand_x"], p["expert_scales"]
        # everything from the dispatch passes through unchanged
        assert p["assist_info_for_combine" if v2 else "expand_idx"] is st["assist"]
        assert p["ep_send_counts"] is st["ep_recv_counts"]
        assert p["tp_send_counts"] is st["tp_recv_counts"]
        assert p["expert_ids"] is st["ids"]
        assert p["x_active_mask"] is st["mask"]
        assert p["global_bs"] == st["global_bs"]
        assert p["moe_expert_num"] == st["num_experts"] and p["group_ep"] == st["group_ep"]
        assert (p["ep_world_size"], p["ep_rank_id"]) == (1, 0)
        if v2:
            assert p["comm_alg"] == st["comm_alg"]
        if st["comm_alg"] == "hierarchy":
            assert p["expand_scales"] is st["expand_scales"]
        assert expand_x.dtype in (torch.bfloat16, torch.float16)
        assert tuple(expand_x.shape) == (st["rows_a"], st["hidden"])
        assert weights.dtype == torch.float32 and tuple(weights.shape) == tuple(st["ids"].shape)
        tok, kk = st["tok"], st["kk"]
        out = torch.zeros(st["bs"], st["hidden"], dtype=torch.float32)
        out.index_add_(0, tok, expand_x[:tok.numel()].float() * weights[tok, kk].unsqueeze(1))
        return out.to(expand_x.dtype)

    # ---- compute operators

    def _npu_grouped_matmul(self, p: dict, v2: bool):
        (x,), (w,) = p["x"], p["weight"]
        num_groups, k_dim, n_dim = w.shape
        counts = p["group_list"]
        assert x.dim() == 2 and x.shape[1] == k_dim
        assert counts.dtype == torch.int64 and tuple(counts.shape) == (num_groups,)
        assert p["group_list_type"] == 1 and p["group_type"] == 0 and p["split_item"] in (2, 3)
        assert x.dtype == torch.int8 and w.dtype == torch.int8
        group = _group_of_rows(counts, x.shape[0])
        valid = group >= 0
        acc = torch.zeros(x.shape[0], n_dim, dtype=torch.float64)
        acc[valid] = torch.bmm(x[valid].double().unsqueeze(1), w[group[valid]].double()).squeeze(1)
        if p["output_dtype"] == torch.int32:
            assert p["scale"] is None and p["per_token_scale"] is None
            return [acc.to(torch.int32)]
        assert p["output_dtype"] == torch.bfloat16
        (scale,), (per_token_scale,) = p["scale"], p["per_token_scale"]
        assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (num_groups, n_dim)
        assert per_token_scale.dtype == torch.float32 and tuple(per_token_scale.shape) == (x.shape[0],)
        acc[valid] *= per_token_scale[valid].double().unsqueeze(1) * scale[group[valid]].double()
        return [acc.to(torch.bfloat16)]

    def _npu_dynamic_quant(self, p: dict, v2: bool):
        assert p["smooth_scales"] is None
        return _quantize_rows(p["x"])

    def _npu_dequant_swiglu_quant(self, p: dict, v2: bool):
        x, weight_scale, act_scale, counts = (p["x"], p["weight_scale"], p["activation_scale"],
                                              p["group_index"])
        assert x.dtype == torch.int32 and x.dim() == 2 and x.shape[1] % 2 == 0
        assert weight_scale.dtype == torch.float32 and tuple(weight_scale.shape) == (counts.numel(), x.shape[1])
        assert act_scale.dtype == torch.float32 and tuple(act_scale.shape) == (x.shape[0],)
        assert counts.dtype == torch.int64
        assert p["activate_left"] is True and p["quant_mode"] == 1
        half = x.shape[1] // 2
        group = _group_of_rows(counts, x.shape[0])
        valid = group >= 0
        h = torch.zeros(x.shape, dtype=torch.float64)
        h[valid] = x[valid].double() * act_scale[valid].double().unsqueeze(1) * weight_scale[group[valid]].double()
        a = F.silu(h[:, :half]) * h[:, half:]  # activate_left: silu on the left half
        q, s = _quantize_rows(a)
        return q, s


@pytest.fixture
def fake_npu(monkeypatch):
    """Installs a FakeTorchNpu as torch_npu / torch.npu and fakes the HCCL group plumbing."""

    def install(**kwargs) -> FakeTorchNpu:
        fake = FakeTorchNpu(**kwargs)
        monkeypatch.setitem(sys.modules, "torch_npu", fake.module)
        monkeypatch.setattr(torch, "npu", fake.torch_npu_namespace, raising=False)
        monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: group.global_ranks)
        monkeypatch.setattr(dist, "new_group", fake.new_group)
        monkeypatch.setattr(npu_ops, "_npu_device", lambda: torch.device("cpu"))
        return fake

    monkeypatch.delenv("HCCL_INTRA_PCIE_ENABLE", raising=False)
    monkeypatch.delenv("HCCL_INTRA_ROCE_ENABLE", raising=False)
    return install


def _make_ll(global_ranks=(0,), num_experts=None) -> npu_ops.NpuLowLatency:
    group = types.SimpleNamespace(global_ranks=list(global_ranks))
    return npu_ops.NpuLowLatency(group, 0, len(global_ranks), num_experts)


def _routing(num_tokens, num_topk, num_experts, seed=0):
    """Random distinct top-k rows plus a -1 in row 0 and an all -1 row 1."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:num_topk]
                       for _ in range(num_tokens)]) if num_tokens else torch.zeros(0, num_topk, dtype=torch.int64)
    if num_tokens >= 2:
        idx[0, -1] = -1
        idx[1, :] = -1
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    x = torch.randn(num_tokens, 32, generator=gen).to(torch.bfloat16)
    return x, idx, weights


def _reference_rows(x, idx, num_local_experts):
    """SPEC packed layout for one rank: rows of local expert 0, then 1, ... in token order."""
    rows = [x[t] for e in range(num_local_experts) for t in range(idx.shape[0]) if (idx[t] == e).any()]
    counts = torch.tensor([int((idx == e).sum()) for e in range(num_local_experts)], dtype=torch.int64)
    return (torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])), counts


# --------------------------------------------------------------------------- tests


def test_plumbing_import_without_torch_npu():
    source = Path(npu_ops.__file__).read_text()
    top_level = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all("torch_npu" not in ast.dump(node) for node in top_level)
    code = ("import sys; sys.modules['torch_npu'] = None\n"  # makes `import torch_npu` fail
            "import deep_ep.npu.operators as m\n"
            "assert m.torch_npu_available() is False\n"
            "assert m.detect_soc() is None\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("nmax,hidden,ranks,experts,topk", [
    (128, 7168, 16, 256, 8), (100, 7000, 16, 128, 8), (1, 128, 2, 4, 2), (256, 4096, 8, 16, 8)])
def test_plumbing_hccl_buffsize_mb(nmax, hidden, ranks, experts, topk):
    window = nmax * ranks * min(experts // ranks, topk) * hidden * 2
    expected = max(200, math.ceil(2 * (window + 2 * 2**20) / 2**20))
    assert npu_ops.hccl_buffsize_mb(nmax, hidden, ranks, experts, topk) == expected


def test_plumbing_hccl_buffsize_mb_numbers():
    assert npu_ops.hccl_buffsize_mb(128, 7168, 16, 256, 8) == 452  # 2 * (224 MB + 2 MB)
    assert npu_ops.hccl_buffsize_mb(100, 7000, 16, 128, 8) == 346  # 345.8 MB rounded up
    assert npu_ops.hccl_buffsize_mb(1, 128, 2, 4, 2) == 200  # HCCL's default is the floor
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        npu_ops.hccl_buffsize_mb(8, 128, 3, 4, 2)


@pytest.mark.parametrize("name,soc", [
    ("Ascend910B1", "A2"), ("Ascend910B4", "A2"), ("Ascend910_9391", "A3"),
    ("Ascend910_9362", "A3"), ("Ascend310P3", None), (None, None)])
def test_plumbing_detect_soc(fake_npu, name, soc):
    fake_npu(device_name=name)
    assert npu_ops.detect_soc() == soc


def test_plumbing_detect_soc_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert npu_ops.torch_npu_available() is False
    assert npu_ops.detect_soc() is None


def test_plumbing_dedicated_hccl_group(fake_npu):
    fake = fake_npu()
    ll = _make_ll(global_ranks=(5,))
    # the group's global ranks, in group order, on the HCCL backend
    assert fake.new_group_calls == [dict(ranks=[5], backend="hccl")]
    assert fake.comm_name_calls == [(torch.device("cpu"), 0)]
    assert ll.comm_name == "fake_hccl_comm_0"


def test_plumbing_constructor_checks_num_experts_hint(fake_npu):
    fake_npu()
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        _make_ll(global_ranks=(0, 1), num_experts=3)


@pytest.mark.parametrize("num_tokens", [5, 8])
def test_plumbing_dispatch_combine_bf16(fake_npu, num_tokens):
    fake = fake_npu()
    nmax, num_experts, num_topk = 8, 4, 2
    x, idx, weights = _routing(num_tokens, num_topk, num_experts)
    stats = torch.ones(num_experts, dtype=torch.int32)
    ll = _make_ll()
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, nmax, num_experts, False, stats)

    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert tuple(args["x"].shape) == (nmax, 32)  # padded to Nmax
    assert torch.equal(args["x"][:num_tokens], x) and not args["x"][num_tokens:].any()
    mask = args["x_active_mask"]
    assert mask.dtype == torch.bool and tuple(mask.shape) == (nmax, num_topk)
    assert torch.equal(mask[:num_tokens], idx >= 0) and not mask[num_tokens:].any()
    assert torch.equal(args["expert_ids"][:num_tokens][idx >= 0], idx[idx >= 0].int())
    assert args["global_bs"] == nmax * 1
    assert args["quant_mode"] == 0 and args["expert_token_nums_type"] == 1
    assert args["comm_alg"] == "" and args["expert_scales"] is None
    assert (args["group_ep"], args["ep_world_size"], args["ep_rank_id"], args["moe_expert_num"]) == \
        ("fake_hccl_comm_0", 1, 0, num_experts)

    rows_m = nmax * 1 * min(num_topk, num_experts)
    ref_rows, ref_counts = _reference_rows(x, idx, num_experts)
    assert recv_x.dtype == torch.bfloat16 and tuple(recv_x.shape) == (rows_m, 32)
    assert recv_count.dtype == torch.int64 and torch.equal(recv_count, ref_counts)
    assert torch.equal(recv_x[:ref_rows.shape[0]], ref_rows)
    assert stats.dtype == torch.int32 and torch.equal(stats, 1 + ref_counts.int())
    assert handle.num_max_dispatch_tokens_per_rank == nmax and handle.hidden == 32
    assert handle.num_experts == num_experts and handle.recv_count is recv_count
    assert torch.equal(handle.recv_layout_prefix, ref_counts.cumsum(0).int())

    expert_out = (recv_x.float() * 2).to(torch.bfloat16)  # "expert": y = 2x
    out = torch.empty(num_tokens, 32, dtype=torch.bfloat16)
    combined = ll.combine(expert_out, idx, weights, handle, out=out)
    assert combined is out
    cargs = fake.args_of("npu_moe_distribute_combine_v2")
    scales = cargs["expert_scales"]
    assert torch.equal(scales[:num_tokens], torch.where(idx >= 0, weights, 0.0))
    assert not scales[num_tokens:].any()
    ref = x.float() * 2 * torch.where(idx >= 0, weights, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
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
    fake = fake_npu()
    x = torch.zeros(0, 32, dtype=torch.bfloat16)
    idx = torch.zeros(0, 2, dtype=torch.int64)
    weights = torch.zeros(0, 2)
    ll = _make_ll()
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, 4, 4, False, None)
    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert tuple(args["x"].shape) == (4, 32) and not args["x_active_mask"].any()
    assert tuple(recv_x.shape) == (8, 32) and not recv_count.any()
    assert tuple(ll.combine(recv_x, idx, weights, handle).shape) == (0, 32)


def test_plumbing_hierarchy_env(fake_npu, monkeypatch):
    fake = fake_npu()
    monkeypatch.setenv("HCCL_INTRA_PCIE_ENABLE", "1")
    monkeypatch.setenv("HCCL_INTRA_ROCE_ENABLE", "0")
    x, idx, weights = _routing(5, 2, 4)
    ll = _make_ll()
    with pytest.raises(ValueError, match="topk_weights"):
        ll.dispatch(x, idx, None, 8, 4, False, None)
    recv_x, _, handle = ll.dispatch(x, idx, weights, 8, 4, False, None)
    args = fake.args_of("npu_moe_distribute_dispatch_v2")
    assert args["comm_alg"] == "hierarchy"
    scales = args["expert_scales"]
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (8, 2)
    assert torch.equal(scales[:5], torch.where(idx >= 0, weights, 0.0)) and not scales[5:].any()
    ll.combine(recv_x, idx, weights, handle)
    cargs = fake.args_of("npu_moe_distribute_combine_v2")
    assert cargs["comm_alg"] == "hierarchy" and cargs["expand_scales"] is not None


def test_plumbing_no_hierarchy_when_roce_enabled(fake_npu, monkeypatch):
    fake = fake_npu()
    monkeypatch.setenv("HCCL_INTRA_PCIE_ENABLE", "1")
    monkeypatch.setenv("HCCL_INTRA_ROCE_ENABLE", "1")
    x, idx, _ = _routing(5, 2, 4)
    _make_ll().dispatch(x, idx, None, 8, 4, False, None)
    assert fake.args_of("npu_moe_distribute_dispatch_v2")["comm_alg"] == ""


@pytest.mark.parametrize("soc,ranks,hidden,bs,topk,match", [
    ("A2", 9, 4096, 128, 8, "num_ranks"), ("A2", 1, 4096, 128, 8, "num_ranks"),
    ("A2", 512, 4096, 128, 8, "num_ranks"), ("A2", 8, 7200, 128, 8, "hidden"),
    ("A2", 8, 4096, 257, 8, "256 tokens"), ("A3", 1, 4096, 128, 8, "num_ranks"),
    ("A3", 769, 4096, 128, 8, "num_ranks"), ("A3", 16, 512, 128, 8, "hidden"),
    ("A3", 16, 8448, 128, 8, "hidden"), ("A3", 16, 4096, 513, 8, "512 tokens"),
    ("A3", 16, 4096, 128, 17, "num_topk")])
def test_plumbing_check_limits_errors(soc, ranks, hidden, bs, topk, match):
    with pytest.raises(ValueError, match=match):
        npu_ops.NpuLowLatency.check_limits(soc, ranks, hidden, bs, topk)


@pytest.mark.parametrize("soc,ranks,hidden,bs,topk", [
    ("A2", 2, 7168, 256, 8), ("A2", 8, 32, 1, 1), ("A2", 16, 4096, 128, 8), ("A2", 256, 4096, 128, 8),
    ("A3", 2, 1024, 512, 16), ("A3", 768, 8192, 1, 1), (None, 1, 99999, 9999, 99)])
def test_plumbing_check_limits_ok(soc, ranks, hidden, bs, topk):
    npu_ops.NpuLowLatency.check_limits(soc, ranks, hidden, bs, topk)


def test_plumbing_dispatch_checks_limits_of_detected_soc(fake_npu):
    fake = fake_npu(device_name="Ascend910B3")
    x, idx, _ = _routing(5, 2, 4)
    with pytest.raises(ValueError, match="num_ranks"):  # R = 1 is below A2's minimum of 2
        _make_ll().dispatch(x, idx, None, 8, 4, False, None)
    assert fake.calls == []  # nothing reached the operator


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
    fake = fake_npu(with_v2=False)
    x, idx, weights = _routing(5, 2, 4)
    ll = _make_ll()
    recv_x, recv_count, handle = ll.dispatch(x, idx, weights, 8, 4, False, None)
    combined = ll.combine(recv_x, idx, weights, handle)
    assert fake.names_called() == ["npu_moe_distribute_dispatch", "npu_moe_distribute_combine"]
    ref_rows, ref_counts = _reference_rows(x, idx, 4)
    assert torch.equal(recv_count, ref_counts) and torch.equal(recv_x[:ref_rows.shape[0]], ref_rows)
    ref = x.float() * torch.where(idx >= 0, weights, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(combined.float(), ref, rtol=2e-2, atol=2e-2)


def _interleave_gate_up(w13: torch.Tensor, s13: torch.Tensor):
    """SPEC gmm1 layout from gate-then-up weights [L, 2I, H] / scales [L, 2I] (test's own version)."""
    num_local, two_i, _ = w13.shape
    inter = two_i // 2
    cols = []
    for j in range(0, inter, 64):
        cols += list(range(j, j + 64)) + list(range(inter + j, inter + j + 64))
    cols = torch.tensor(cols)
    return w13.transpose(1, 2)[:, :, cols].contiguous(), s13[:, cols].contiguous()


def _fused_reference(x, idx, weights, w13, s13, w2, s2):
    """SPEC fused_deep_moe steps 1-6 for one rank, with gate-then-up w13 [L, 2I, H]."""
    inter = w13.shape[1] // 2
    xq, sx = _quantize_rows(x)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            h = (xq[t].double() @ w13[e].double().T) * sx[t].double() * s13[e].double()
            a = F.silu(h[:inter]) * h[inter:]
            aq, sa = _quantize_rows(a.unsqueeze(0))
            y = (aq[0].double() @ w2[e].double()) * sa[0].double() * s2[e].double()
            out[t] += float(weights[t, k]) * y
    return out


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

    out, ep_recv_count = ll.fused_deep_moe(x, idx, weights, w1, s1, w2, s2, nmax, num_local)
    assert fake.names_called() == ["npu_moe_distribute_dispatch_v2", "npu_grouped_matmul",
                                   "npu_dequant_swiglu_quant", "npu_grouped_matmul",
                                   "npu_moe_distribute_combine_v2"]
    assert fake.args_of("npu_moe_distribute_dispatch_v2")["quant_mode"] == 2
    gmm1, gmm2 = fake.args_of("npu_grouped_matmul", 0), fake.args_of("npu_grouped_matmul", 1)
    assert gmm1["output_dtype"] == torch.int32 and gmm2["output_dtype"] == torch.bfloat16
    assert torch.equal(gmm1["weight"][0], w13.transpose(1, 2))  # gate | up halves
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (num_tokens, hidden)
    ref = _fused_reference(x, idx, weights, w13, s13, w2, s2)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))
    # ep_recv_count[e * R + r]: rows local expert e received from rank r (R = 1)
    assert ep_recv_count.dtype == torch.int32
    assert ep_recv_count.tolist() == [int((idx == e).sum()) for e in range(num_local)]

    # the [gate | up] conversion is cached per weight tensor, and redone after in-place updates
    ll.fused_deep_moe(x, idx, weights, w1, s1, w2, s2, nmax, num_local)
    assert fake.args_of("npu_grouped_matmul", 2)["weight"][0] is gmm1["weight"][0]
    w1.add_(0)
    ll.fused_deep_moe(x, idx, weights, w1, s1, w2, s2, nmax, num_local)
    assert fake.args_of("npu_grouped_matmul", 4)["weight"][0] is not gmm1["weight"][0]


def test_plumbing_fused_deep_moe_weight_errors(fake_npu):
    fake_npu()
    x, idx, weights = _routing(3, 2, 2)
    ll = _make_ll()
    w1 = torch.zeros(2, 32, 96, dtype=torch.int8)  # 2I = 96 is not whole 64-column tiles
    with pytest.raises(ValueError, match="multiple of 128"):
        ll.fused_deep_moe(x, idx, weights, w1, torch.ones(2, 96), torch.zeros(2, 48, 32, dtype=torch.int8),
                          torch.ones(2, 32), 4, 2)
    w1 = torch.zeros(2, 32, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="gmm2_weight"):
        ll.fused_deep_moe(x, idx, weights, w1, torch.ones(2, 128), torch.zeros(2, 32, 32, dtype=torch.int8),
                          torch.ones(2, 32), 4, 2)


# --------------------------------------------------------------------------- real NPU (skipped here)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_npu_round_trip_worker(rank: int, world_size: int, port: int) -> None:
    import torch_npu  # noqa: F401  (registers the npu device and torch.npu)

    nmax, hidden, num_topk = 8, 1024, 2
    num_experts = 4 * world_size
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HCCL_BUFFSIZE=str(
        npu_ops.hccl_buffsize_mb(nmax, hidden, world_size, num_experts, num_topk)))
    torch.npu.set_device(rank)
    dist.init_process_group("hccl", rank=rank, world_size=world_size)
    try:
        device = torch.device(f"npu:{rank}")
        ll = npu_ops.NpuLowLatency(dist.group.WORLD, rank, world_size, num_experts)
        gen = torch.Generator().manual_seed(rank)
        num_tokens = nmax - rank  # uneven T
        x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:num_topk] for _ in range(num_tokens)])
        idx[0, 1] = -1
        weights = torch.rand(num_tokens, num_topk, generator=gen)
        recv_x, recv_count, handle = ll.dispatch(x.to(device), idx.to(device), weights.to(device),
                                                 nmax, num_experts, False, None)
        padded = torch.full((nmax, num_topk), -1, dtype=torch.int64)
        padded[:num_tokens] = idx
        gathered = [torch.empty_like(padded, device=device) for _ in range(world_size)]
        dist.all_gather(gathered, padded.to(device))
        all_idx = torch.cat([g.cpu() for g in gathered])
        num_local = num_experts // world_size
        mine = all_idx[(all_idx >= rank * num_local) & (all_idx < (rank + 1) * num_local)] - rank * num_local
        assert torch.equal(recv_count.cpu(), torch.bincount(mine, minlength=num_local))
        assert tuple(recv_x.shape) == (nmax * world_size * min(num_local, num_topk), hidden)
        # identity experts: combine must give sum_k w_k * x
        combined = ll.combine(recv_x, idx.to(device), weights.to(device), handle)
        ref = x.float() * torch.where(idx >= 0, weights, 0.0).sum(1, keepdim=True)
        torch.testing.assert_close(combined.float().cpu(), ref, rtol=2e-2, atol=2e-2)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not npu_ops.torch_npu_available(), reason="torch_npu not importable")
def test_real_npu_dispatch_combine_round_trip():
    """Real MC2 dispatch/combine round trip. Two ranks: the operators need ep_world_size >= 2."""
    import torch_npu  # noqa: F401

    if torch.npu.device_count() < 2:
        pytest.skip("the MC2 operators need at least 2 NPUs (ep_world_size >= 2)")
    torch.multiprocessing.spawn(_real_npu_round_trip_worker, args=(2, _free_port()), nprocs=2)

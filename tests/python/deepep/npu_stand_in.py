"""A stand-in for torch_npu, for the PLUMBING tests of the NPU path on CPU. Not hardware coverage.

No NPU, CANN or torch_npu exists on the development machines. ``FakeTorchNpu`` plays one rank
of an R-rank expert-parallel group on the documented behaviour of one torch_npu release:

* every call is bound against that release's documented signature (``inspect.Signature`` from
  the documentation's parameter list), so an undocumented parameter (``comm_alg`` on 7.1.0) is a
  TypeError as in torch_npu;
* what the release's documentation rejects, the stand-in rejects (RuntimeError, as the operator
  would fail): a 2-D ``x_active_mask`` where only the 1-D form is documented, ``comm_alg=
  "hierarchy"`` on A3, sizes past the documented limits, hierarchy without ``expert_scales``;
* what the documentation says is ignored is ignored: on A2 hierarchy (and where no mask is
  documented, and by the v1 operators) ``x_active_mask`` does not stop a row or entry from
  being dispatched;
* the outputs follow the documented tables: rows grouped by the operators' local expert,
  ``expert_token_nums`` per local expert, ``ep_recv_counts`` the inclusive prefix at
  ``e * R + r`` followed by more entries, ``expand_scales`` on A2.

The other ranks of the group are simulated: they send this rank nothing, and an entry routed
to operator expert ``g`` on another rank comes back as ``x * remote_scale(S + g // L', g % L')``
(``L'`` = the operators' experts per routed rank), weighted in the combine like any other.
With ``shared_expert_rank_num = S > 0`` (one shared expert, ``shared_expert_num = 1``) ranks
``[0, S)`` hold the shared expert and ranks ``[S, R)`` the ``moe_expert_num`` routed ones (the
documented placement); every dispatched token of source ``s`` also goes to shared rank ``s % S``,
and its output there is added to the token's combine result with weight 1 (another rank's comes
back as ``x * remote_scale(s % S, 0)``). The
documented facts are this module's own copy (from the op-plugin documentation of each
release), deliberately not deep_ep's table: a wrong reading in deep_ep shows as a failure.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import types

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- documented signatures

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
# The compute operators: only the names matter, the defaults are placeholders.
_GROUPED_MATMUL_TEXT = """x, weight, *, bias=None, scale=None, per_token_scale=None, group_list=None,
group_type=0, split_item=0, group_list_type=0, output_dtype=None"""
_DYNAMIC_QUANT_TEXT = "x, smooth_scales=None"
_DEQUANT_SWIGLU_QUANT_TEXT = """x, *, weight_scale=None, activation_scale=None, group_index=None,
activate_left=False, quant_mode=0"""


def signature_of(text: str, without: tuple = ()) -> inspect.Signature:
    """An ``inspect.Signature`` from a documentation-style parameter list, minus the names in ``without``."""
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for item in " ".join(text.split()).split(","):
        item = item.strip()
        if item == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        name, eq, default = item.partition("=")
        if name.strip() in without:
            continue
        value = ast.literal_eval(default) if eq else inspect.Parameter.empty
        params.append(inspect.Parameter(name.strip(), kind, default=value))
    return inspect.Signature(params)


# --------------------------------------------------------------------------- documented tables


@dataclasses.dataclass(frozen=True)
class ReleaseDoc:
    """One torch_npu release as its op-plugin documentation (and the CANN it pairs with) describes it."""

    cann: str
    comm_alg: bool  # the v2 operators have a comm_alg parameter
    masks: dict  # mode -> x_active_mask ranks documented (empty: none; the operator ignores it)
    a2_ranks: tuple  # R in A2 fullmesh
    older_a2_limits: bool  # A2 L <= 24 (fullmesh), E <= 512, H % 32 == 0


_A2_RANKS_MULTIPLE_OF_8 = (8, 16, 32, 64, 128, 256)
RELEASE_DOCS = {
    "7.1.0": ReleaseDoc("8.2.RC1", False, {"A3": (1,), "A2-fullmesh": (), "A2-hierarchy": ()}, (16, 32, 64), True),
    "7.2.0": ReleaseDoc(
        "8.3.RC1", True, {"A3": (1, 2), "A2-fullmesh": (1,), "A2-hierarchy": ()}, _A2_RANKS_MULTIPLE_OF_8, True
    ),
    "7.3.0": ReleaseDoc(
        "8.5.0", True, {"A3": (1, 2), "A2-fullmesh": (1, 2), "A2-hierarchy": ()}, _A2_RANKS_MULTIPLE_OF_8, True
    ),
}
COMM_ALGS = {"A2": ("", "fullmesh", "hierarchy"), "A3": ("", "fullmesh_v1", "fullmesh_v2")}
SOC_DEVICE_NAMES = {"A2": "Ascend910B3", "A3": "Ascend910_9391"}


def remote_scale(rank: int, slot: int) -> float:
    """What the simulated expert ``slot`` of another rank ``rank`` multiplies its rows by."""
    return 1.0 + rank + slot / 4


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8: scale = max|row| / 127, q = round(x / scale)."""
    xf = x.float()
    scale = xf.abs().amax(dim=1) / 127.0
    q = torch.round(xf / scale.clamp(min=1e-30).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def _group_of_rows(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Group id of each of `rows` rows for per-group counts; -1 past the counted rows."""
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return torch.cat([group, torch.full((rows - group.numel(),), -1, dtype=torch.int64)])


def _soc_of(device_name: str | None) -> str | None:
    if device_name and device_name.startswith("Ascend910B"):
        return "A2"
    if device_name and device_name.startswith("Ascend910_93"):
        return "A3"
    return None


class OperatorRejected(RuntimeError):
    """What the real operator would fail with (tiling or argument check)."""


class FakeTorchNpu:
    """Recording stand-in for torch_npu of one release on one device (see the module doc).

    ``ep_recv_layout``: "prefix" (documented) or "counts" (a hypothetical later CANN that writes
    per-block counts instead), to check that deep_ep notices.
    """

    def __init__(
        self,
        device_name: str | None = "Ascend910_9391",
        release: str = "7.3.0",
        with_v2: bool = True,
        extra_expand_rows: int = 2,
        ep_recv_layout: str = "prefix",
    ) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.device_name = device_name
        self.soc = _soc_of(device_name)
        self.release = release
        self.doc = RELEASE_DOCS[release]
        self.extra_expand_rows = extra_expand_rows  # the operators may return more rows than needed
        self.ep_recv_layout = ep_recv_layout
        self.dispatch_state: dict | None = None
        self.module = types.ModuleType("torch_npu")
        self.module.__version__ = "2.6.0.fake"
        self.module.npu = types.SimpleNamespace(
            utils=types.SimpleNamespace(
                get_cann_version=lambda module="CANN": self.doc.cann if module == "CANN" else ""
            )
        )
        no_comm_alg = () if self.doc.comm_alg else ("comm_alg",)
        self.signatures = {
            "npu_moe_distribute_dispatch": signature_of(_DISPATCH_V1_TEXT),
            "npu_moe_distribute_combine": signature_of(_COMBINE_V1_TEXT),
            "npu_grouped_matmul": signature_of(_GROUPED_MATMUL_TEXT),
            "npu_dynamic_quant": signature_of(_DYNAMIC_QUANT_TEXT),
            "npu_dequant_swiglu_quant": signature_of(_DEQUANT_SWIGLU_QUANT_TEXT),
        }
        if with_v2:
            self.signatures["npu_moe_distribute_dispatch_v2"] = signature_of(_DISPATCH_V2_TEXT, no_comm_alg)
            self.signatures["npu_moe_distribute_combine_v2"] = signature_of(_COMBINE_V2_TEXT, no_comm_alg)
        for name in self.signatures:
            setattr(self.module, name, self._recorder(name))
        # torch.npu as torch_npu registers it
        self.torch_npu_namespace = types.SimpleNamespace(
            is_available=lambda: self.device_name is not None, get_device_name=lambda *a: self.device_name
        )
        self.new_group_calls: list[dict] = []
        self.comm_name_calls: list[tuple] = []

    def names_called(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args_of(self, name: str, index: int = -1) -> dict:
        return [args for n, args in self.calls if n == name][index]

    def _recorder(self, name: str):
        sig = self.signatures[name]
        impl = getattr(self, "_" + name.removesuffix("_v2"))

        def op(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)  # TypeError for names the release does not document
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

    # ---- the documented rules

    def _mode(self, comm_alg: str) -> str | None:
        if self.soc is None:
            return None
        if comm_alg not in COMM_ALGS[self.soc]:
            raise OperatorRejected(f"comm_alg {comm_alg!r} is not supported on {self.soc}")
        if self.soc == "A3":
            return "A3"
        env_pair = os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"
        return "A2-hierarchy" if comm_alg == "hierarchy" or (comm_alg == "" and env_pair) else "A2-fullmesh"

    def _check_limits(
        self, mode: str | None, ranks: int, hidden: int, bs: int, topk: int, experts: int, local: int
    ) -> None:
        rules = {
            "A3": [(2 <= ranks <= 768, "R"), (1024 <= hidden <= 8192, "H"), (bs <= 512, "BS"), (topk <= 16, "K")],
            "A2-fullmesh": [(ranks in self.doc.a2_ranks, "R"), (hidden <= 7168, "H"), (bs <= 256, "BS")],
            "A2-hierarchy": [(ranks in (16, 32, 64), "R"), (hidden <= 10240, "H"), (bs <= 256, "BS")],
        }.get(mode, [])
        if mode and mode.startswith("A2") and self.doc.older_a2_limits:
            rules += [(experts <= 512, "E"), (hidden % 32 == 0, "H % 32")]
            if mode == "A2-fullmesh":
                rules.append((local <= 24, "L"))
        for ok, what in rules:
            if not ok:
                raise OperatorRejected(
                    f"{mode} limit on {what} (R={ranks}, H={hidden}, BS={bs}, K={topk}, E={experts})"
                )

    def _active(self, mask, mode: str | None, v2: bool, bs: int, topk: int) -> torch.Tensor:
        """bool [BS, K]: the entries the operator dispatches."""
        everything = torch.ones(bs, topk, dtype=torch.bool)
        if mask is None:
            return everything
        assert mask.dtype == torch.bool and tuple(mask.shape) in ((bs,), (bs, topk))
        documented = self.doc.masks[mode] if (v2 and mode) else ((1, 2) if v2 else ())
        if not documented:  # ignored by this kernel
            return everything
        if mask.dim() not in documented:
            raise OperatorRejected("x_active_mask needs to be one-dimensional")
        if mask.dim() == 1:
            prefix = int(mask.sum())
            assert bool(mask[:prefix].all()), "x_active_mask [BS]: true rows first"
            return mask.unsqueeze(1).expand(bs, topk)
        return mask

    # ---- MC2 operators

    def _npu_moe_distribute_dispatch(self, p: dict, v2: bool):
        x, ids, mask = p["x"], p["expert_ids"], p["x_active_mask"]
        bs, hidden = x.shape
        ranks, me, experts = p["ep_world_size"], p["ep_rank_id"], p["moe_expert_num"]
        mode = self._mode(p["comm_alg"] if v2 and self.doc.comm_alg else "")
        assert isinstance(p["group_ep"], str) and p["group_ep"] and 0 <= me < ranks
        assert x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2 and bs > 0
        assert ids.dtype == torch.int32 and ids.dim() == 2 and ids.shape[0] == bs
        topk = ids.shape[1]
        shared_ranks = p["shared_expert_rank_num"]
        assert 0 <= shared_ranks < ranks and (shared_ranks == 0 or p["shared_expert_num"] == 1)
        assert experts % (ranks - shared_ranks) == 0, "moe_expert_num must be a multiple of the routed ranks"
        per_rank = experts // (ranks - shared_ranks)  # routed experts of a routed rank
        on_shared = me < shared_ranks
        local, first = (1, 0) if on_shared else (per_rank, (me - shared_ranks) * per_rank)
        assert bool(((ids >= 0) & (ids < experts)).all()), "expert_ids must not hold -1"
        sorted_ids = ids.sort(dim=1).values
        assert bool((sorted_ids[:, 1:] != sorted_ids[:, :-1]).all()), "ids of a row must be distinct"
        assert p["global_bs"] in (0, bs * ranks)
        assert p["quant_mode"] in (0, 2) and p["expert_token_nums_type"] in (0, 1) and p["scales"] is None
        self._check_limits(mode, ranks, hidden, bs, topk, experts, per_rank)
        scales_in = p["expert_scales"]
        if mode == "A2-hierarchy" and scales_in is None:
            raise OperatorRejected("expert_scales is required in hierarchical mode")
        assert scales_in is None or (scales_in.dtype == torch.float32 and tuple(scales_in.shape) == (bs, topk))
        active = self._active(mask, mode, v2, bs, topk)

        # this rank receives only its own rows (the simulated other ranks send nothing); on a shared
        # rank (me % S == me) every dispatched token, as entry (t, -1)
        if on_shared:
            order = [(t, -1) for t in range(bs) if active[t].any()]
            counts = torch.tensor([len(order)], dtype=torch.int64)
        else:
            order = [
                (t, k)
                for e in range(local)
                for t in range(bs)
                for k in range(topk)
                if active[t, k] and int(ids[t, k]) == first + e
            ]
            counts = torch.zeros(local, dtype=torch.int64)
            for t, k in order:
                counts[int(ids[t, k]) - first] += 1
        tok = torch.tensor([t for t, _ in order], dtype=torch.int64)
        kk = torch.tensor([k for _, k in order], dtype=torch.int64)
        n = len(order)
        global_bs = p["global_bs"] or bs * ranks
        rows_a = (-(-global_bs // shared_ranks) if on_shared else global_bs * min(local, topk)) + self.extra_expand_rows
        if p["quant_mode"] == 2:
            expand_x = torch.zeros(rows_a, hidden, dtype=torch.int8)
            dynamic_scales = torch.zeros(rows_a, dtype=torch.float32)
            q, s = quantize_rows(x[tok])
            expand_x[:n], dynamic_scales[:n] = q, s
        else:
            expand_x = torch.zeros(rows_a, hidden, dtype=x.dtype)
            expand_x[:n] = x[tok]
            dynamic_scales = torch.zeros(0, dtype=torch.float32)
        if v2:  # (rank, token, k) triples, row stride 128
            assist = torch.zeros(rows_a * 128, dtype=torch.int32)
            triples = assist.view(rows_a, 128)[:n]
            triples[:, 0], triples[:, 1], triples[:, 2] = me, tok.int(), kk.int()
        else:  # expand_idx [BS * K]
            assist = torch.full((bs * topk,), -1, dtype=torch.int32)
            assist[tok * topk + kk] = torch.arange(n, dtype=torch.int32)
        expert_token_nums = counts if p["expert_token_nums_type"] == 1 else counts.cumsum(0)
        blocks = torch.zeros(local, ranks, dtype=torch.int64)  # rows per (local expert, source rank)
        blocks[:, me] = counts
        head = blocks.reshape(-1) if self.ep_recv_layout == "counts" else blocks.reshape(-1).cumsum(0)
        tail = torch.full((2 * (p["global_bs"] or bs * ranks) * topk,), -7, dtype=torch.int64)  # read by combine
        ep_recv_counts = torch.cat([head, tail]).to(torch.int32)
        tp_recv_counts = torch.zeros(1, dtype=torch.int32)
        expand_scales = torch.zeros(rows_a if self.soc == "A2" else 0, dtype=torch.float32)
        if self.soc == "A2" and scales_in is not None:
            expand_scales[:n] = 1.0 if on_shared else scales_in[tok, kk]
        self.dispatch_state = dict(
            x=x,
            ids=ids,
            mask=mask,
            active=active,
            assist=assist,
            ep_recv_counts=ep_recv_counts,
            tp_recv_counts=tp_recv_counts,
            expand_scales=expand_scales,
            order=order,
            rows_a=rows_a,
            bs=bs,
            hidden=hidden,
            global_bs=p["global_bs"],
            experts=experts,
            ranks=ranks,
            me=me,
            group_ep=p["group_ep"],
            comm_alg=p.get("comm_alg"),
            shared=(p["shared_expert_num"], shared_ranks),
            per_rank=per_rank,
        )
        return (
            expand_x,
            dynamic_scales,
            assist,
            expert_token_nums.to(torch.int64),
            ep_recv_counts,
            tp_recv_counts,
            expand_scales,
        )

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
        assert p["global_bs"] == st["global_bs"] and p.get("comm_alg") == st["comm_alg"]
        assert p["moe_expert_num"] == st["experts"] and p["group_ep"] == st["group_ep"]
        assert (p["ep_world_size"], p["ep_rank_id"]) == (st["ranks"], st["me"])
        assert (p["shared_expert_num"], p["shared_expert_rank_num"]) == st["shared"]
        if self.soc == "A2" and p["expand_scales"] is not st["expand_scales"]:
            raise OperatorRejected("expand_scales is required on A2: pass the dispatch's")
        assert expand_x.dtype in (torch.bfloat16, torch.float16)
        assert tuple(expand_x.shape) == (st["rows_a"], st["hidden"])
        assert weights.dtype == torch.float32 and tuple(weights.shape) == tuple(st["ids"].shape)
        per_rank, shared_ranks = st["per_rank"], st["shared"][1]
        out = torch.zeros(st["bs"], st["hidden"], dtype=torch.float64)
        row_of = {entry: row for row, entry in enumerate(st["order"])}

        def output(t: int, k: int, owner: int, slot: int) -> torch.Tensor:
            if (t, k) in row_of:
                return expand_x[row_of[(t, k)]].double()
            return st["x"][t].double() * remote_scale(owner, slot)

        for t, k in zip(*torch.nonzero(st["active"], as_tuple=True)):
            t, k = int(t), int(k)
            expert = int(st["ids"][t, k])
            out[t] += float(weights[t, k]) * output(t, k, shared_ranks + expert // per_rank, expert % per_rank)
        if shared_ranks:  # the shared expert's output, weight 1
            for t in range(st["bs"]):
                if st["active"][t].any():
                    out[t] += output(t, -1, st["me"] % shared_ranks, 0)
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
        return quantize_rows(p["x"])

    def _npu_dequant_swiglu_quant(self, p: dict, v2: bool):
        x, weight_scale, act_scale, counts = (p["x"], p["weight_scale"], p["activation_scale"], p["group_index"])
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
        return quantize_rows(a)

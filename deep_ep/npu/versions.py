"""What each torch_npu / CANN release allows for CANN's MC2 dispatch/combine operators.

The one place of the NPU code that knows versions: which ``x_active_mask`` rank a release
documents per mode, whether its v2 operators take ``comm_alg`` (and which values), and the
size limits that are checked before any operator runs. ``docs/npu.md`` gives the sources.

Modes (how the operators move rows):

* ``"A3"``: Atlas A3 (Ascend910_93).
* ``"A2-fullmesh"``: Atlas A2 (Ascend910B), the default.
* ``"A2-hierarchy"``: Atlas A2 with ``HCCL_INTRA_PCIE_ENABLE=1`` and ``HCCL_INTRA_ROCE_ENABLE=0``,
  which is how the operators select hierarchical mode when ``comm_alg`` is left empty.

torch_npu's own ``__version__`` follows torch (e.g. ``2.6.0.post3``), so the release is
found from the CANN version it runs on (CANN 8.2 <-> torch_npu 7.1.0, 8.3 <-> 7.2.0,
8.5 <-> 7.3.0). An unknown CANN gets the rules of the oldest release with v2 operators.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping, Optional, Tuple

A3, A2_FULLMESH, A2_HIERARCHY = "A3", "A2-fullmesh", "A2-hierarchy"
MODES = (A3, A2_FULLMESH, A2_HIERARCHY)
# x_active_mask ranks: 0 = pass None, 1 = bool [BS] (true rows first), 2 = bool [BS, K]
MASK_NONE, MASK_ROWS, MASK_ENTRIES = 0, 1, 2

_A2_V2_RANKS = frozenset(range(2, 9)) | {16, 32, 64, 128, 256}


@dataclasses.dataclass(frozen=True)
class Release:
    """What one torch_npu release (and the CANN it pairs with) documents for the MC2 operators."""

    name: str  # torch_npu (Ascend Extension for PyTorch) release, e.g. "7.2.0"
    cann: Tuple[int, int]  # CANN major.minor it pairs with
    comm_alg: Mapping[str, Tuple[str, ...]]  # SoC -> values the v2 operators take; empty: no comm_alg argument
    mask_rank: Mapping[str, int]  # mode -> highest x_active_mask rank documented
    a2_ranks: frozenset  # R allowed in A2 fullmesh
    a2_max_local_experts: Optional[int]  # A2 fullmesh L (None: no limit documented)
    a2_max_experts: Optional[int]  # A2 E
    a2_hidden_multiple: int  # A2: H must be a multiple of this


_OLDER_A2 = dict(a2_max_local_experts=24, a2_max_experts=512, a2_hidden_multiple=32)
_COMM_ALG = {"A2": ("", "fullmesh", "hierarchy"), "A3": ("", "fullmesh_v1", "fullmesh_v2")}

RELEASES = (
    Release(
        "7.1.0",
        (8, 2),
        comm_alg={},
        mask_rank={A3: MASK_ROWS, A2_FULLMESH: MASK_NONE, A2_HIERARCHY: MASK_NONE},
        a2_ranks=frozenset({16, 32, 64}),
        **_OLDER_A2,
    ),
    Release(
        "7.2.0",
        (8, 3),
        comm_alg=_COMM_ALG,
        mask_rank={A3: MASK_ENTRIES, A2_FULLMESH: MASK_ROWS, A2_HIERARCHY: MASK_NONE},
        a2_ranks=frozenset(r for r in _A2_V2_RANKS if r % 8 == 0),
        **_OLDER_A2,
    ),
    Release(
        "7.3.0",
        (8, 5),
        comm_alg=_COMM_ALG,
        mask_rank={A3: MASK_ENTRIES, A2_FULLMESH: MASK_ENTRIES, A2_HIERARCHY: MASK_NONE},
        a2_ranks=frozenset(r for r in _A2_V2_RANKS if r % 8 == 0),
        **_OLDER_A2,
    ),
    # CANN after 8.5: the master documentation, without the older A2 limits
    Release(
        "newer",
        (9, 0),
        comm_alg=_COMM_ALG,
        mask_rank={A3: MASK_ENTRIES, A2_FULLMESH: MASK_ENTRIES, A2_HIERARCHY: MASK_NONE},
        a2_ranks=_A2_V2_RANKS,
        a2_max_local_experts=None,
        a2_max_experts=None,
        a2_hidden_multiple=1,
    ),
)
OLDEST = RELEASES[0]


def release_for_cann(version: Optional[str]) -> Release:
    """The release whose rules apply on CANN ``version`` ("8.3.RC1", "8.5.0", "9.0.0"; None or
    unparsable: the oldest release, whose rules are the most conservative)."""
    match = re.match(r"\s*(\d+)\.(\d+)", version or "")
    if not match:
        return OLDEST
    found = (int(match.group(1)), int(match.group(2)))
    chosen = OLDEST
    for release in RELEASES:  # the newest release whose CANN is not newer than the installed one
        if release.cann <= found:
            chosen = release
    return chosen


def cann_version(torch_npu) -> Optional[str]:
    """The CANN version as torch_npu reports it (``get_cann_version``), None when it cannot say."""
    for holder in (getattr(torch_npu, "utils", None), getattr(getattr(torch_npu, "npu", None), "utils", None)):
        getter = getattr(holder, "get_cann_version", None)
        if getter is None:
            continue
        try:
            version = getter(module="CANN")
        except Exception:  # an odd install: fall back to the conservative rules
            return None
        return version or None
    return None


def hierarchy_env() -> bool:
    """The environment pair that selects A2 hierarchical mode."""
    return os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"


def mc2_mode(soc: Optional[str]) -> Optional[str]:
    """The mode for SoC "A2" / "A3" and the current environment; None for another device. On A3 the
    environment pair changes nothing: hierarchical mode is A2 only."""
    if soc == "A3":
        return A3
    if soc == "A2":
        return A2_HIERARCHY if hierarchy_env() else A2_FULLMESH
    return None


def mask_rank(release: Release, mode: Optional[str], use_v2: bool) -> int:
    """The x_active_mask rank to pass. v1 operators reserve the argument; an unknown device gets None."""
    if not use_v2 or mode is None:
        return MASK_NONE
    return release.mask_rank[mode]


def sinks_per_rank(mask: int, num_ranks: int, num_topk: int) -> int:
    """Extra operator experts per rank that take the -1 entries of topk_idx when the mask cannot
    drop them (mask rank below 2): a row has at most K such entries, spread over the ranks."""
    return 0 if mask == MASK_ENTRIES else math.ceil(num_topk / num_ranks)


def check_limits(
    release: Release,
    mode: Optional[str],
    num_ranks: int,
    hidden: int,
    bs: int,
    num_topk: int,
    op_local_experts: int,
    op_experts: int,
    has_weights: bool,
) -> None:
    """ValueError naming the operator limit these sizes break (nothing is checked for an unknown device).

    ``bs`` is the per-rank batch passed to the operators (Nmax); ``op_local_experts`` / ``op_experts``
    count the experts the operators see, including sink experts.
    """
    if mode is None:
        return
    where = f"NPU {mode} MC2 operators (torch_npu {release.name})"

    def fail(what: str) -> None:
        raise ValueError(f"{where} support {what}")

    if mode == A3:
        if not 2 <= num_ranks <= 768:
            fail(f"num_ranks in 2..768; got num_ranks={num_ranks}")
        if not 1024 <= hidden <= 8192:
            fail(f"hidden in 1024..8192; got hidden={hidden}")
        if bs > 512:
            fail(f"at most 512 tokens per rank (num_max_dispatch_tokens_per_rank); got {bs}")
        if num_topk > 16:
            fail(f"num_topk <= 16; got num_topk={num_topk}")
        return
    if mode == A2_HIERARCHY:
        if num_ranks not in (16, 32, 64):
            fail(
                f"num_ranks in 16, 32, 64 (HCCL_INTRA_PCIE_ENABLE=1, HCCL_INTRA_ROCE_ENABLE=0 selects "
                f"hierarchical mode); got num_ranks={num_ranks}"
            )
        if hidden > 10240:
            fail(f"hidden <= 10240; got hidden={hidden}")
        if not has_weights:
            raise ValueError(
                "topk_weights is required in A2 hierarchical mode (HCCL_INTRA_PCIE_ENABLE=1, "
                "HCCL_INTRA_ROCE_ENABLE=0): the operators take them at dispatch (expert_scales)"
            )
    else:
        if num_ranks not in release.a2_ranks:
            fail(f"num_ranks in {sorted(release.a2_ranks)}; got num_ranks={num_ranks}")
        if hidden > 7168:
            fail(f"hidden <= 7168; got hidden={hidden}")
        if release.a2_max_local_experts is not None and op_local_experts > release.a2_max_local_experts:
            fail(
                f"at most {release.a2_max_local_experts} experts per rank; got {op_local_experts} (the local "
                "experts plus the sink experts that take -1 entries of topk_idx)"
            )
    if bs > 256:
        fail(f"at most 256 tokens per rank (num_max_dispatch_tokens_per_rank); got {bs}")
    if hidden % release.a2_hidden_multiple:
        fail(f"hidden a multiple of {release.a2_hidden_multiple}; got hidden={hidden}")
    if release.a2_max_experts is not None and op_experts > release.a2_max_experts:
        fail(
            f"at most {release.a2_max_experts} experts; got {op_experts} (num_experts plus the sink experts that "
            "take -1 entries of topk_idx)"
        )


def describe(release: Release) -> str:
    """One line per fact of a release, for ``python -m deep_ep.npu.env --report``."""
    masks = ", ".join(f"{mode}: {('None', '[BS]', '[BS, K]')[release.mask_rank[mode]]}" for mode in MODES)
    algs = "; ".join(f"{soc}: {list(values)}" for soc, values in release.comm_alg.items()) or "no comm_alg argument"
    older = (
        f"A2 L <= {release.a2_max_local_experts}, E <= {release.a2_max_experts}, H % {release.a2_hidden_multiple} == 0"
        if release.a2_max_local_experts
        else "no older A2 limits"
    )
    return (
        f"rules of torch_npu {release.name} (CANN {release.cann[0]}.{release.cann[1]}): x_active_mask {masks}; "
        f"comm_alg {algs} (deep_ep passes none); A2 fullmesh R in {sorted(release.a2_ranks)}; {older}"
    )

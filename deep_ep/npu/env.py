"""HCCL_BUFFSIZE for CANN's MC2 operators, and a report of the Ascend environment.

    python -m deep_ep.npu.env --mode A3 --num-max-dispatch-tokens-per-rank 128 --hidden 7168 \\
        --num-ranks 16 --num-experts 256 --num-topk 8
    # prints: HCCL_BUFFSIZE=960     (so: export $(python -m deep_ep.npu.env ...))

    python -m deep_ep.npu.env --report     # torch / torch_npu / CANN / SoC / build target / HCCL variables

(`python -m deep_ep.npu_env` is the same program.) The value follows the mode's requirement
(A2 fullmesh, A2 hierarchy or A3; by default this machine's, from the NPU and HCCL's environment)
and counts the sink experts that the release's x_active_mask rules need (by default the installed
CANN's; --cann gives another), in MB rounded up and never below HCCL's default of 200. Set it
before the process group is created: HCCL sizes its window when the communicator is made.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..env import shared_expert_rank_num
from . import versions
from .backend import build_target_soc, soc_mismatch
from .operators import detect_release, detect_soc, hccl_buffsize_mb, torch_npu_available

__all__ = ["hccl_buffsize_mb", "report", "main"]

ENV_VARIABLES = (
    "HCCL_BUFFSIZE",
    "HCCL_INTRA_PCIE_ENABLE",
    "HCCL_INTRA_ROCE_ENABLE",
    "HCCL_CONNECT_TIMEOUT",
    "HCCL_EXEC_TIMEOUT",
    "ASCEND_RT_VISIBLE_DEVICES",
    "DEEP_USE_MODE",
)


def report() -> List[str]:
    """Lines describing the Ascend environment as deep_ep sees it (imports torch_npu if present)."""
    import torch

    lines = [f"torch {torch.__version__}"]
    if torch_npu_available():
        import torch_npu

        lines.append(
            f"torch_npu {getattr(torch_npu, '__version__', 'unknown')}, "
            f"CANN {versions.cann_version(torch_npu) or 'unknown'}"
        )
        detected = detect_soc()
        if torch.npu.is_available():
            lines.append(
                f"NPUs: {torch.npu.device_count()} x {torch.npu.get_device_name()} "
                f"(SoC: {detected or 'other'}, mode: {versions.mc2_mode(detected) or 'none'})"
            )
        else:
            lines.append("NPUs: none visible")
    else:
        detected = None
        lines.append("torch_npu: not importable (CPU ranks only)")
    lines.append(versions.describe(detect_release()))
    recorded = build_target_soc()
    lines.append(f"deep_ep built for: {recorded} (deep_ep/_build_info.py TARGET_SOC)")
    mismatch = soc_mismatch(recorded, detected)
    if mismatch:
        lines.append(f"WARNING: {mismatch}")
    for name in ENV_VARIABLES:
        lines.append(f"{name}={os.environ.get(name, '(unset)')}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deep_ep.npu.env", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num-max-dispatch-tokens-per-rank", "--nmax", type=int, dest="nmax", help="Nmax (the BS every rank pads to)"
    )
    parser.add_argument("--hidden", type=int, help="H")
    parser.add_argument("--num-ranks", type=int, help="R, ranks of the expert-parallel group")
    parser.add_argument("--num-experts", type=int, help="E, a multiple of R")
    parser.add_argument("--num-topk", type=int, help="K")
    parser.add_argument(
        "--num-shared-ranks",
        type=int,
        default=None,
        help="S, shared-expert ranks (default: MOE_SHARED_EXPERT_RANK_NUM, else 0); E is then a multiple of R - S",
    )
    parser.add_argument(
        "--mode",
        choices=versions.MODES,
        help="the MC2 mode (default: this machine's, from the NPU and HCCL_INTRA_*_ENABLE)",
    )
    parser.add_argument("--cann", help="CANN version whose rules apply, e.g. 8.3.RC1 (default: the installed one)")
    parser.add_argument("--report", action="store_true", help="print the environment report")
    args = parser.parse_args(argv)
    sizes = (args.nmax, args.hidden, args.num_ranks, args.num_experts, args.num_topk)
    if not args.report and any(v is None for v in sizes):
        parser.error(
            "give all of --num-max-dispatch-tokens-per-rank, --hidden, --num-ranks, --num-experts, "
            "--num-topk (or --report)"
        )
    if args.report:
        print("\n".join(report()), file=sys.stderr if all(v is not None for v in sizes) else sys.stdout)
    if all(v is not None for v in sizes):
        if any(v <= 0 for v in sizes):
            parser.error("all sizes must be positive")
        release = versions.release_for_cann(args.cann) if args.cann else None
        try:
            shared = shared_expert_rank_num() if args.num_shared_ranks is None else args.num_shared_ranks
            mb = hccl_buffsize_mb(*sizes, mode=args.mode, release=release, num_shared_ranks=shared)
            print(f"HCCL_BUFFSIZE={mb}")
        except ValueError as error:
            parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Everything torch_npu: the Buffer's NPU (Atlas A2/A3) backend, CANN's MC2 operators and the
environment helpers.

    backend.py     backend choice, strategy mapping, SoC checks, the Buffer's low-latency and
                   fused_deep_moe calls on an HCCL group
    operators.py   CANN's fused MoE communication operators through torch_npu
    env.py         HCCL_BUFFSIZE and the environment report (python -m deep_ep.npu.env)

Nothing here imports torch_npu at module level: ``import deep_ep`` works on any machine.
"""

from .backend import (
    LOW_LATENCY_ON_NPU,
    NORMAL_ON_NPU,
    NPU_BACKEND,
    build_target_soc,
    check_build_soc,
    clean_low_latency_buffer,
    create_low_latency,
    current_device,
    destroy_low_latency,
    fused_deep_moe,
    group_comm_name,
    init_backend,
    low_latency_combine,
    low_latency_dispatch,
    require_torch_npu,
    resolve_strategies,
    soc_mismatch,
)

__all__ = [
    "LOW_LATENCY_ON_NPU",
    "NORMAL_ON_NPU",
    "NPU_BACKEND",
    "build_target_soc",
    "check_build_soc",
    "clean_low_latency_buffer",
    "create_low_latency",
    "current_device",
    "destroy_low_latency",
    "fused_deep_moe",
    "group_comm_name",
    "init_backend",
    "low_latency_combine",
    "low_latency_dispatch",
    "require_torch_npu",
    "resolve_strategies",
    "soc_mismatch",
]

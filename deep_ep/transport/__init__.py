"""Transports move rows between ranks along a RoutingPlan; they never decide routes.

shm:        CPU ranks of one node, through shared memory (deep_ep_cpp kernels).
collective: torch.distributed all_to_all_single (gloo on CPU, hccl on NPU).
npu_ops:    CANN's fused MoE communication operators through torch_npu.
"""

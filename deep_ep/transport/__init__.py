"""Transports move rows between ranks along a RoutingPlan; they never decide routes.

shm:        CPU ranks of one node, through shared memory (deep_ep_cpp kernels).
collective: torch.distributed all_to_all_single (gloo on CPU, hccl on NPU).
(CANN's fused MoE communication operators live in deep_ep/npu/operators.py.)
"""

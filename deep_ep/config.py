"""Config: DeepEP's per-call tuning knobs, plus the buffer size hints."""

from __future__ import annotations

from dataclasses import dataclass

from .transport.shm import data_bytes_needed


@dataclass
class Config:
    """Accepted for API compatibility with DeepEP(-Ascend). The CPU transport sizes
    its rounds from the Buffer's byte budget, so only the size hints depend on it."""

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of `num_nvl_bytes` that move `num_max_nvl_chunked_recv_tokens` tokens of
        `hidden_bytes` per peer in one round (more data simply takes more rounds)."""
        return data_bytes_needed(self.num_max_nvl_chunked_recv_tokens * num_ranks, hidden_bytes)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of `num_rdma_bytes` for the same, across nodes."""
        return data_bytes_needed(self.num_max_rdma_chunked_recv_tokens * num_ranks, hidden_bytes)

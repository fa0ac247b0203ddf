"""Row math shared by every transport: per-token int8 quantization and the weighted
combine reduction. CPU tensors use deep_ep_cpp; other devices (NPU) use torch ops
with the same definition."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .utils import NATIVE_DTYPE_CODES, num_threads


def _native():
    import deep_ep_cpp  # imported lazily: only CPU tensors need it

    return deep_ep_cpp


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic int8: `scale = max|x_row| / 127`, `q = round_half_even(x / scale)`.

    Args: x [T, H] float32/bfloat16/float16.
    Returns: (q int8 [T, H], scale float32 [T]); an all-zero row gets scale 0 and q 0.
    """
    x = x.contiguous()
    rows, hidden = x.shape
    if x.device.type == "cpu":
        q = torch.empty(rows, hidden, dtype=torch.int8)
        scale = torch.empty(rows, dtype=torch.float32)
        _native().quantize_int8(x.data_ptr(), NATIVE_DTYPE_CODES[x.dtype], rows, hidden, q.data_ptr(),
                                scale.data_ptr(), num_threads())
        return q, scale
    xf = x.float()
    scale = xf.abs().amax(1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q int8 [N, H] * scale float32 [N] -> [N, H] of `dtype`."""
    return (q.float() * scale.unsqueeze(1)).to(dtype)


def weighted_reduce(out: torch.Tensor, sources: List[torch.Tensor], src_dtype: torch.dtype, src_rank: torch.Tensor,
                    src_row: torch.Tensor, weights: torch.Tensor,
                    biases: Sequence[Optional[torch.Tensor]] = ()) -> torch.Tensor:
    """out[t] = sum over k ascending of weights[t, k] * row(t, k) (+ biases), in float32.

    Args:
        out: [T, H] float32/bfloat16/float16, written in place.
        sources: uint8 [rows_i, H * itemsize] row tensors holding values of `src_dtype`.
        src_rank: int32 [T, K], index into `sources`, -1 where the selection has no row.
        src_row: int64 [T, K], row in that source.
        weights: float32 [T, K].
        biases: up to two [T, H] tensors added at the end.
    """
    tokens, topk = src_rank.shape
    hidden = out.shape[1]
    biases = [b.contiguous() for b in biases if b is not None]
    if out.device.type == "cpu":
        bias_args = []
        for i in range(2):
            bias_args += [biases[i].data_ptr(), NATIVE_DTYPE_CODES[biases[i].dtype]] if i < len(biases) else [0, 0]
        _native().combine_reduce(out.data_ptr(), NATIVE_DTYPE_CODES[out.dtype], tokens, topk, hidden,
                                 [s.data_ptr() for s in sources], [s.shape[0] for s in sources],
                                 NATIVE_DTYPE_CODES[src_dtype], src_rank.contiguous().numpy(),
                                 src_row.contiguous().numpy(), weights.contiguous().numpy(), *bias_args,
                                 num_threads())
        return out
    acc = torch.zeros(tokens, hidden, dtype=torch.float32, device=out.device)
    values = [s.view(src_dtype) for s in sources]
    for k in range(topk):
        for index, source in enumerate(values):
            mask = src_rank[:, k] == index
            if bool(mask.any()):
                rows = source.index_select(0, src_row[:, k][mask]).float()
                acc[mask] += weights[:, k][mask].unsqueeze(1) * rows
    for bias in biases:
        acc += bias.float()
    out.copy_(acc)
    return out

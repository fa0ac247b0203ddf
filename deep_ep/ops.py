"""Row math shared by every transport: per-token int8 quantization and the weighted
combine reduction. CPU tensors use deep_ep_cpp; other devices (NPU) use torch ops
with the same definition."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch

import deep_ep_cpp

from .utils import NATIVE_DTYPE_CODES, num_threads


def torch_ops_forced() -> bool:
    """Env DEEP_EP_FORCE_TORCH_OPS=1: a Buffer made now takes the device path (collective transport,
    plain torch allocations, the torch branches below) on CPU too. For tests and debugging: it runs on
    CPU exactly the code the NPU path runs. Read once, by the Runtime (its `device_path`)."""
    return os.environ.get("DEEP_EP_FORCE_TORCH_OPS", "0").strip() in ("1", "true", "True")


def native_ok(tensor: torch.Tensor, device_path: bool = False) -> bool:
    """Whether deep_ep_cpp's kernels handle `tensor`: a CPU tensor, unless the caller's runtime takes
    the device path (`Runtime.device_path`), whose torch branches then run on CPU as well."""
    return not device_path and tensor.device.type == "cpu"


def copy_into(dst: torch.Tensor, src: torch.Tensor, threads: int) -> None:
    """dst.copy_(src) for tensors of the same shape and dtype. Contiguous CPU tensors move on `threads`
    threads of deep_ep_cpp rather than torch's intra-op pool: with torch's default thread count in
    every rank, that pool's idle OpenMP workers keep spinning on cores the other ranks need."""
    if (
        native_ok(dst)
        and src.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.is_contiguous()
        and src.is_contiguous()
    ):
        deep_ep_cpp.copy_bytes(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size(), threads)
    else:
        dst.copy_(src)


def quantize_int8(
    x: torch.Tensor, threads: Optional[int] = None, device_path: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic int8: `scale = max|x_row| / 127`, `q = round_half_even(x / scale)`.

    Args: x [T, H] float32/bfloat16/float16; threads: of the native kernel (default: every usable core,
        see `deep_ep.utils.num_threads`; a Buffer passes its rank's share); device_path: the torch
        branch even for CPU tensors (see native_ok).
    Returns: (q int8 [T, H], scale float32 [T]); an all-zero row gets scale 0 and q 0, a row
    holding inf / NaN a non-finite scale (inf / NaN), so the problem stays visible downstream.
    The one quantizer of the package; `deep_ep.fused.quantize_per_token_int8` is its checked face.
    """
    x = x.contiguous()
    rows, hidden = x.shape
    if native_ok(x, device_path):
        q = torch.empty(rows, hidden, dtype=torch.int8)
        scale = torch.empty(rows, dtype=torch.float32)
        deep_ep_cpp.quantize_int8(
            x.data_ptr(),
            NATIVE_DTYPE_CODES[x.dtype],
            rows,
            hidden,
            q.data_ptr(),
            scale.data_ptr(),
            threads or num_threads(),
        )
        return q, scale
    xf = x.float()
    scale = xf.abs().amax(1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def source_dtypes(src_dtype: Union[torch.dtype, Sequence[torch.dtype]], count: int) -> List[torch.dtype]:
    """The dtype of each of `count` sources: `src_dtype` for all, or one per source."""
    return [src_dtype] * count if isinstance(src_dtype, torch.dtype) else list(src_dtype)


def native_reduce(
    out: torch.Tensor,
    sources: List[int],
    source_rows: List[int],
    dtypes: Sequence[torch.dtype],
    src_rank: np.ndarray,
    src_row: np.ndarray,
    weights: torch.Tensor,
    biases: Sequence[torch.Tensor],
    threads: Optional[int],
    sums: torch.dtype = torch.float64,
) -> None:
    """weighted_reduce's CPU kernel on raw rows: `sources` are the addresses of contiguous
    [source_rows[i], H] rows of dtypes[i]; src_rank int32 / src_row int64 numpy [T, C]; weights:
    float32 [T, C]; biases: up to two CPU [T, H] tensors; threads: None for every usable core;
    sums: the dtype of the sums, as in weighted_reduce."""
    # Kept in names: the kernel reads them by address, so contiguous copies must outlive the call.
    weights = weights.contiguous()
    biases = [b.contiguous() for b in biases]
    bias_args = []
    for i in range(2):
        bias_args += [biases[i].data_ptr(), NATIVE_DTYPE_CODES[biases[i].dtype]] if i < len(biases) else [0, 0]
    tokens, columns = src_rank.shape
    deep_ep_cpp.combine_reduce(
        out.data_ptr(),
        NATIVE_DTYPE_CODES[out.dtype],
        tokens,
        columns,
        out.shape[1],
        sources,
        source_rows,
        [NATIVE_DTYPE_CODES[d] for d in dtypes],
        src_rank,
        src_row,
        weights.data_ptr(),
        *bias_args,
        NATIVE_DTYPE_CODES[sums],
        threads or num_threads(),
    )


def weighted_reduce(
    out: torch.Tensor,
    sources: List[torch.Tensor],
    src_dtype: Union[torch.dtype, Sequence[torch.dtype]],
    src_rank: torch.Tensor,
    src_row: torch.Tensor,
    weights: torch.Tensor,
    biases: Sequence[Optional[torch.Tensor]] = (),
    threads: Optional[int] = None,
    device_path: bool = False,
    sums: torch.dtype = torch.float64,
) -> torch.Tensor:
    """out[t] = sum over columns c ascending of weights[t, c] * row(t, c) (+ biases).

    Accumulates in `sums`. float64 (normal mode): every product of a float32 weight and a
    16/32-bit value is exact there, so the same sum split differently (per node in internode
    combine) rounds to the same output but in vanishingly rare cases. float32 (low-latency
    mode, 16/32-bit rows and outputs): every product and every add rounds to float32, as a
    float32 loop over c does. The order is fixed, so repeated calls and every strategy of a
    mode give the same bits.

    Args:
        out: [T, H] float32/bfloat16/float16 (float64 for partial sums), written in place.
        sources: uint8 [rows_i, H * itemsize] row tensors.
        src_dtype: the dtype of the values in every source, or one dtype per source.
        src_rank: int32 [T, C], index into `sources`, -1 where the column has no row.
        src_row: int64 [T, C], row in that source.
        weights: float32 [T, C].
        biases: up to two [T, H] tensors added at the end.
        threads: of the native kernel, as in `quantize_int8`.
        device_path: the torch branch even for CPU tensors (see native_ok).
        sums: torch.float64 or torch.float32, the dtype of the sums.
    """
    dtypes = source_dtypes(src_dtype, len(sources))
    biases = [b.contiguous() for b in biases if b is not None]
    if native_ok(out, device_path):
        native_reduce(
            out,
            [s.data_ptr() for s in sources],
            [s.shape[0] for s in sources],
            dtypes,
            src_rank.contiguous().numpy(),
            src_row.contiguous().numpy(),
            weights,
            biases,
            threads,
            sums,
        )
        return out
    tokens, columns = src_rank.shape
    hidden = out.shape[1]
    # Device (NPU) branch: no host syncs, index tensors moved to the rows' device. Ascend NPUs have no
    # fast float64, so there the sum is float32 (within the documented float32 tolerance); on CPU (forced)
    # `sums` as above.
    device = out.device
    acc_dtype = sums if device.type == "cpu" or out.dtype == torch.float64 else torch.float32
    acc = torch.zeros(tokens, hidden, dtype=acc_dtype, device=device)
    values = [s.view(d) for s, d in zip(sources, dtypes)]
    src_rank, src_row, weights = src_rank.to(device), src_row.to(device), weights.to(device)
    for c in range(columns):
        for index, source in enumerate(values):
            take = src_rank[:, c] == index
            if not source.shape[0]:
                continue
            rows = source.index_select(0, torch.where(take, src_row[:, c], 0)).to(acc_dtype)
            acc += torch.where(take.unsqueeze(1), weights[:, c].to(acc_dtype).unsqueeze(1) * rows, 0.0)
    for bias in biases:
        acc += bias.to(device).float().to(acc_dtype)
    out.copy_(acc.float() if out.dtype != torch.float64 else acc)
    return out


class RowReduction(Protocol):
    """A combine's reduction, run by the transport once the expert outputs are readable."""

    def run(self, sources: List[torch.Tensor], src_rank: torch.Tensor, src_row: torch.Tensor) -> None:
        """Sums the rows of `sources` (uint8 [rows_i, H * itemsize]) named by src_rank int32 /
        src_row int64 [T, C] (src_rank -1: no row)."""


@dataclass
class Reduction:
    """A combine's weighted reduction, waiting for its rows: `run` is `weighted_reduce` into `out`
    with these weights and biases (the transports call it once the rows are readable)."""

    out: torch.Tensor  # [T, H], written
    src_dtype: Union[torch.dtype, Sequence[torch.dtype]]
    weights: torch.Tensor  # float32 [T, C]
    biases: Sequence[torch.Tensor] = field(default_factory=list)
    threads: Optional[int] = None
    device_path: bool = False  # the runtime's: torch branches on CPU too

    def run_rows(self, sources: List[int], source_rows: List[int], src_rank: np.ndarray, src_row: np.ndarray) -> None:
        """Reduces, on CPU, the rows at the addresses `sources` (contiguous [source_rows[i], H] rows of
        src_dtype) named by src_rank int32 / src_row int64 numpy [T, C]: the shared-memory transport's
        reduction, straight from the holders' data areas."""
        native_reduce(
            self.out,
            sources,
            source_rows,
            source_dtypes(self.src_dtype, len(sources)),
            src_rank,
            src_row,
            self.weights,
            self.biases,
            self.threads,
        )

    def run(self, sources: List[torch.Tensor], src_rank: torch.Tensor, src_row: torch.Tensor) -> None:
        """Reduces the rows of `sources` (uint8 [rows_i, H * itemsize]) named by src_rank int32 /
        src_row int64 [T, C]."""
        weighted_reduce(
            self.out,
            sources,
            self.src_dtype,
            src_rank,
            src_row,
            self.weights,
            self.biases,
            self.threads,
            self.device_path,
        )

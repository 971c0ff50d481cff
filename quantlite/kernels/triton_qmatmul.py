"""Triton fused dequant-matmul: y (M, N) = x (M, K) @ dequant(W).T, NF4 codes + block scales + CSR outliers.

One kernel, two specialisations chosen by the host from M (one file because both share every phase
except the inner product, and a twin of the dequantisation would drift):
  * decode  (M <= 4, memory-bound GEMV): the inner product is an FMA-and-reduce in fp32 registers;
    split-K when the N tiles alone cannot fill the device, so every SM streams weight bytes.
  * prefill (M > 4; a compute-bound GEMM for long prompts): the dequantised tile is cast to x's
    dtype and fed to tl.dot (tensor cores); K is split for narrow outputs as in decode.

Layouts (the compute layout of quantlite.kernels.prepared.prepare):
    x        (M, K)        fp16 / bf16 / fp32, row stride stride_xm, unit column stride
    codes    (N, Kp // 2)  uint8, two codes per byte, low nibble = even column (Kp = K padded to B)
    scales   (N, Kp // B)  float32, one per block of B columns
    codebook (16,)         float32, level of each code
    row_ptr  (N + 1,)      int32, CSR row pointers; cols (nnz,) int32; vals (nnz,) float32
    y        (M, N)        x's dtype; when K is split also (SPLIT_K, M, N) float32 partial sums

Tiling and work partition: program (pid_n, pid_m, pid_k) owns the output tile
y[pid_m*BLOCK_M : +BLOCK_M, pid_n*BLOCK_N : +BLOCK_N] over its K range (the whole of K unless split):

            K  --->   split 0          split 1          split 2
         +----------------+----------------+----------------+
    N    | pid_k = 0      | pid_k = 1      | pid_k = 2      |   one BLOCK_N x (K / SPLIT_K) strip of
    |    | BLOCK_K steps  |                |                |   packed bytes per program: every weight
    v    +----------------+----------------+----------------+   byte is read by exactly one program
                                                                (per M tile; decode has one M tile).
Each BLOCK_K step reads a (BLOCK_N, BLOCK_K // 2) tile of bytes and splits it into the even-column
(low nibble) and odd-column (high nibble) halves; x is read as the matching even and odd halves, so no
interleave shuffle is needed: y += x_even @ w_even.T + x_odd @ w_odd.T.

    for k0 in my K range, step BLOCK_K:                           # main loop
        bytes  = codes[n_tile, k0/2 + j], j < BLOCK_K/2           # fetch
        w_even = codebook[bytes & 15] * scale[n, (k0 + 2j) // B]  # dequant (both nibbles of a byte
        w_odd  = codebook[bytes >> 4] * scale[n, (k0 + 2j) // B]  #   share one block: B is even)
        acc   += x_even @ w_even.T + x_odd @ w_odd.T              # multiply
    for e in my share of the tile rows' CSR entries, CHUNK at a time:  # outliers, same launch
        acc += (x[:, cols[e]] * vals[e]) @ onehot(row of e)
    if split: store acc as a float32 partial; the tile's last split to arrive   # write
              (atomic counter) sums the partials in split order into y
    else:     store acc cast to x's dtype

Outliers never become a dense matrix: the CSR entries of the BLOCK_N rows of a tile are one
contiguous range of cols/vals; each K split of the tile takes an equal share of it, CHUNK entries
per step, gathers the x columns they name and scatters the products into acc's columns through a
(CHUNK, BLOCK_N) one-hot matrix (tl.dot in prefill). A step per entry of the longest row instead
would put ~20 dependent load rounds (K = 4096 at 0.5% outliers) on every program's critical path.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from quantlite.kernels.dispatch import KernelInputError
from quantlite.kernels.prepared import PreparedWeight

# tl.dot works on tiles of at least 16 rows: for M <= 4 most of that would multiply padding, so
# decode reduces with FMAs instead (a reasoned choice, not yet timed: benchmarks.gpu_kernels --sweep)
DECODE_MAX_M = 4
# Split-K aims for this many programs per SM so that enough loads are in flight to cover DRAM latency
# (a decode program has 2 KB of weight bytes in flight per step; not yet timed: gpu_kernels --sweep)
PROGRAMS_PER_SM = 8


@triton.jit
def _dequantize_tile(codes_ptr, scales_ptr, codebook_ptr, offs_n, offs_byte, N, half_kp, stride_cn, stride_sn,
                     B: tl.constexpr):
    """(BLOCK_N, BLOCK_K // 2) bytes -> even-column and odd-column weights, float32."""
    mask = (offs_n[:, None] < N) & (offs_byte[None, :] < half_kp)
    packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_byte[None, :], mask=mask, other=0)
    scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + (2 * offs_byte[None, :]) // B, mask=mask, other=0.0)
    w_even = tl.load(codebook_ptr + (packed & 15).to(tl.int32)) * scale
    w_odd = tl.load(codebook_ptr + (packed >> 4).to(tl.int32)) * scale
    return w_even, w_odd


@triton.jit
def _add_outliers(acc, x_ptr, row_ptr_ptr, cols_ptr, vals_ptr, offs_m, offs_n, M, N, stride_xm, part, n_parts,
                  USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNK: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32 += x[m, col] * val over the CSR entries of rows offs_n.

    The entries of consecutive rows are one contiguous range of cols/vals; program `part` of
    `n_parts` (the K splits) takes an equal share of it, CHUNK entries per step: few dependent
    load rounds per program, not one per entry of the longest row."""
    big = 2**31 - 1  # row bounds of rows past N: no entry falls inside
    row_start = tl.load(row_ptr_ptr + offs_n, mask=offs_n < N, other=big)        # (BLOCK_N,)
    row_end = tl.load(row_ptr_ptr + offs_n + 1, mask=offs_n < N, other=big)      # (BLOCK_N,)
    tile_start = tl.min(row_start, axis=0)
    tile_end = tl.max(tl.where(offs_n < N, row_end, 0), axis=0)
    share = tl.cdiv(tile_end - tile_start, n_parts)
    first = tile_start + part * share
    last = tl.minimum(first + share, tile_end)
    for e0 in range(first, last, CHUNK):
        offs_e = e0 + tl.arange(0, CHUNK)
        live = offs_e < last
        col = tl.load(cols_ptr + offs_e, mask=live, other=0)                                   # (CHUNK,)
        val = tl.load(vals_ptr + offs_e, mask=live, other=0.0)                                 # (CHUNK,)
        x_col = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :],
                        mask=(offs_m[:, None] < M) & live[None, :], other=0.0)                 # (BLOCK_M, CHUNK)
        contribution = x_col.to(tl.float32) * val[None, :]                                     # (BLOCK_M, CHUNK)
        # which tile row each entry belongs to: (CHUNK, BLOCK_N) one-hot, so a product scatters
        in_row = ((offs_e[:, None] >= row_start[None, :]) & (offs_e[:, None] < row_end[None, :])).to(tl.float32)
        if USE_DOT:
            acc += tl.dot(contribution, in_row, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(contribution[:, :, None] * in_row[None, :, :], axis=1)
    return acc


@triton.jit
def _qmatmul_kernel(
    # pointers
    x_ptr,          # (M, K) fp16 / bf16 / fp32, unit column stride
    codes_ptr,      # (N, Kp // 2) uint8, low nibble = even column
    scales_ptr,     # (N, Kp // B) float32
    codebook_ptr,   # (16,) float32
    row_ptr_ptr,    # (N + 1,) int32, CSR over rows
    cols_ptr,       # (nnz,) int32
    vals_ptr,       # (nnz,) float32
    y_ptr,          # (M, N) x's dtype
    partial_ptr,    # (SPLIT_K, M, N) float32 partial sums, when SPLIT
    counters_ptr,   # (tiles,) int32, zero between launches: splits of each tile that have finished
    # sizes
    M, N, K,
    half_kp,        # Kp // 2: bytes per row of codes
    k_per_split,    # columns per K split, a multiple of BLOCK_K
    # strides (elements)
    stride_xm, stride_cn, stride_sn, stride_ym, stride_pk, stride_pm,
    # meta-parameters
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    OUTLIER_CHUNK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_half = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # ---------------------------------------------------------------- main loop over my K range
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, 2 * half_kp)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_byte = k0 // 2 + offs_half
        # fetch + dequant
        w_even, w_odd = _dequantize_tile(codes_ptr, scales_ptr, codebook_ptr, offs_n, offs_byte, N, half_kp,
                                         stride_cn, stride_sn, B)
        x_rows = x_ptr + offs_m[:, None] * stride_xm + 2 * offs_byte[None, :]
        m_mask = offs_m[:, None] < M
        x_even = tl.load(x_rows, mask=m_mask & (2 * offs_byte[None, :] < K), other=0.0)
        x_odd = tl.load(x_rows + 1, mask=m_mask & (2 * offs_byte[None, :] + 1 < K), other=0.0)
        # multiply
        if USE_DOT:
            acc += tl.dot(x_even.to(DOT_DTYPE), tl.trans(w_even.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            acc += tl.dot(x_odd.to(DOT_DTYPE), tl.trans(w_odd.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x_even.to(tl.float32)[:, None, :] * w_even[None, :, :], axis=2)
            acc += tl.sum(x_odd.to(tl.float32)[:, None, :] * w_odd[None, :, :], axis=2)

    # ---------------------------------------------------------------- outliers (shared by the splits)
    acc = _add_outliers(acc, x_ptr, row_ptr_ptr, cols_ptr, vals_ptr, offs_m, offs_n, M, N, stride_xm,
                        pid_k, tl.num_programs(2), USE_DOT, DOT_PRECISION, OUTLIER_CHUNK)

    # ---------------------------------------------------------------- write
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_tile = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT:
        # Split-K in one launch: park this split's partial sum; the split of the tile that arrives
        # last adds all of them in split order (the result does not depend on timing) and writes y.
        partial_tile = partial_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(partial_tile + pid_k * stride_pk, acc, mask=y_mask)
        tl.debug_barrier()  # all threads' partials are stored before the arrival is counted (release)
        counter = counters_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == tl.num_programs(2) - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(0, tl.num_programs(2)):
                # .cg: from L2, where the other SMs' partials are; this SM's L1 may hold stale lines
                total += tl.load(partial_tile + split * stride_pk, mask=y_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_tile, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(counter, 0)  # every split has arrived: reset for the next launch on this stream
    else:
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then run on CPU
# tensors through Triton's interpreter (slow, for tests) and need no GPU.
INTERPRETED = isinstance(_qmatmul_kernel, InterpretedFunction)


def _tile_config(m: int, block_size: int, x_dtype: torch.dtype) -> dict:
    """Meta-parameters for M rows of x, chosen without a GPU from what ptxas reports for sm_90
    (`python -m benchmarks.gpu_kernels --compile-only`): no spills, and for decode few registers, so
    that many programs, each with its loads in flight, share an SM. `--sweep` times others on a GPU."""
    if m <= DECODE_MAX_M:
        # 8 x 512 at M = 1: 48 registers per thread (16 x 256 took 128). BLOCK_N shrinks as BLOCK_M
        # grows so the FMA-and-reduce product keeps one size (48-56 registers at M = 2 and 4).
        block_m = triton.next_power_of_2(m)
        return dict(BLOCK_M=block_m, BLOCK_N=max(8 // block_m, 2), BLOCK_K=max(512, block_size), USE_DOT=False,
                    OUTLIER_CHUNK=64, num_warps=4)
    if x_dtype == torch.float32:
        # tl.dot in "ieee" float32 runs on FMA units: 64 x 64 spilled 816 bytes per thread, 32 x 32 on 8 warps none
        return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=32, BLOCK_K=max(64, block_size), USE_DOT=True,
                    OUTLIER_CHUNK=32, num_warps=8)
    # outliers 32 entries per step: 64 spilled 96 bytes per thread at M = 64
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=max(64, block_size), USE_DOT=True,
                OUTLIER_CHUNK=32, num_warps=4)


def _dtype_parameters(x_dtype: torch.dtype) -> dict:
    """tl.dot's operand type and precision. The operands take x's type, except bf16 in the
    interpreter, whose tl.dot (Triton 3.9, interpreter.py create_dot) multiplies the raw uint16
    storage of bf16 and returns garbage. float32 stays exact ("ieee"), not TF32's 10-bit mantissa."""
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[x_dtype]
    if x_dtype == torch.bfloat16 and INTERPRETED:
        dot_dtype = tl.float32
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if x_dtype == torch.float32 else "tf32")


def _default_split(x: torch.Tensor, n_tiles: int, k_steps: int) -> int:
    """Split K only on a GPU, and only when the output tiles alone give an SM fewer than
    PROGRAMS_PER_SM programs (decode of most layers: 8B q_proj at M = 1 has 512 tiles of 8 rows)."""
    if x.device.type != "cuda":
        return 1
    wanted = -(-PROGRAMS_PER_SM * _sm_count(x.device) // n_tiles)
    return max(1, min(wanted, k_steps // 2))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def qmatmul_triton(x: torch.Tensor, weight: PreparedWeight, *, out: torch.Tensor | None = None,
                   split_k: int | None = None, tile: dict | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32, contiguous rows -> y (M, N) in x's dtype (written into `out` if given).
    `split_k` overrides the number of K splits (tests use it to cover the split path on the CPU);
    `tile` overrides meta-parameters of _tile_config (BLOCK_N, BLOCK_K, num_warps: for tuning sweeps)."""
    # 1. check
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise KernelInputError(f"triton qmatmul: x must be 2-D fp16/bf16/fp32, got {tuple(x.shape)} {x.dtype}")
    if (weight.scales.dtype, weight.cols.dtype, weight.vals.dtype) != (torch.float32, torch.int32, torch.float32):
        raise KernelInputError("triton qmatmul takes the widened layout (float32 scales, int32 columns, float32 "
                               "values): prepare(qw, device, widened=True)")
    m, k = x.shape
    n = weight.n
    if k != weight.k:
        raise KernelInputError(f"triton qmatmul: x has K={k} but the weight is (N={n}, K={weight.k})")
    if x.stride(1) != 1:
        raise KernelInputError(f"triton qmatmul: x must have unit column stride, got strides {x.stride()}")
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1):
        raise KernelInputError(f"triton qmatmul: out must be ({m}, {n}) {x.dtype} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype}")
    largest = max(x.shape[0] * x.stride(0), weight.codes.numel(), weight.scales.numel(), m * n * (split_k or 1))
    if largest >= 2**31:
        raise KernelInputError(f"triton qmatmul: x ({m}, {k}) with a ({n}, {k}) weight needs offsets beyond the "
                               f"kernel's 32-bit indexing ({largest} elements)")
    config = _tile_config(m, weight.block_size, x.dtype) | (tile or {})
    half_kp = weight.codes.shape[1]
    k_steps = triton.cdiv(2 * half_kp, config["BLOCK_K"])
    grid_mn = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
    split = split_k or _default_split(x, grid_mn[0] * grid_mn[1], k_steps)
    split = max(1, min(split, k_steps))
    k_per_split = triton.cdiv(k_steps, split) * config["BLOCK_K"]
    split = triton.cdiv(2 * half_kp, k_per_split)  # a rounded-up K range can leave the last split empty

    # 2. allocate (partials: the caching allocator, no launch; counters: kept zeroed by the kernel)
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    counters = _split_counters(x.device, grid_mn[0] * grid_mn[1]) if split > 1 else weight.row_ptr

    # 3. launch
    _qmatmul_kernel[(*grid_mn, split)](
        x, weight.codes, weight.scales, weight.codebook, weight.row_ptr, weight.cols, weight.vals, y, partials,
        counters,
        m, n, k, half_kp, k_per_split,
        x.stride(0), weight.codes.stride(0), weight.scales.stride(0), y.stride(0),
        partials.stride(0) if split > 1 else 0, partials.stride(-2),
        B=weight.block_size, **_dtype_parameters(x.dtype), SPLIT=split > 1, **config,
    )
    return y


_counters: dict[tuple, torch.Tensor] = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """(>= tiles,) int32 zeros for the split-K arrivals, one buffer per device and stream: the kernel
    resets each counter it uses, so the buffer is zeroed once, not per launch (a memset is a launch)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _counters or _counters[key].numel() < tiles:
        _counters[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return _counters[key]


def compile_for_gpu(m: int, x_dtype: torch.dtype, block_size: int, split: bool, capability: int = 90,
                    tile: dict | None = None):
    """Compile the specialisation that qmatmul_triton would launch for M rows, for a CUDA GPU of this
    compute capability, on any machine (no GPU needed: Triton's bundled ptxas builds the cubin).
    `tile` overrides meta-parameters as in qmatmul_triton. Returns Triton's CompiledKernel (.asm["cubin"])."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_for_gpu needs the compiled kernel: unset TRITON_INTERPRET before importing")
    x_type = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[x_dtype]
    signature = {"x_ptr": f"*{x_type}", "codes_ptr": "*u8", "scales_ptr": "*fp32", "codebook_ptr": "*fp32",
                 "row_ptr_ptr": "*i32", "cols_ptr": "*i32", "vals_ptr": "*fp32",
                 "y_ptr": f"*{x_type}", "partial_ptr": "*fp32", "counters_ptr": "*i32"}
    signature |= {name: "i32" for name in ("M", "N", "K", "half_kp", "k_per_split", "stride_xm", "stride_cn",
                                            "stride_sn", "stride_ym", "stride_pk", "stride_pm")}
    config = _tile_config(m, block_size, x_dtype) | (tile or {})
    options = {"num_warps": config.pop("num_warps")}
    constants = dict(B=block_size, SPLIT=split, **_dtype_parameters(x_dtype), **config)
    signature |= {name: "constexpr" for name in constants}
    source = ASTSource(fn=_qmatmul_kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)

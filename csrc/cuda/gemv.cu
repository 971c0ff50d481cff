// GEMV-style fused dequant-matmul for small M (decode): y (M, N) = x (M, K) @ W^T.
//
// Work partition: a block of 4 warps; warp w of block b owns output row n = 4 b + w and up to
// GEMV_MAX_M rows of x (grid.y walks M in chunks of GEMV_MAX_M). The weights are read exactly once
// per chunk of x rows, so at M = 1 the kernel is bound by reading 0.53 bytes per weight.
//
//   row n of codes: Kp/2 bytes  |lane0 VEC|lane1 VEC| ... |lane31 VEC|lane0 VEC| ...
//                               '---------- one warp step: 32 * VEC bytes ---------'
//
//   for each warp step:                                       (VEC = 16: a 16-byte load per lane)
//       load VEC bytes of codes = 2 * VEC codes
//       for each 8-byte group (16 columns, always inside one block since B % 16 == 0):
//           levels = ql_group_levels(group)                  16 shared-memory lookups
//           for each x row m: acc[m] += scales[n, col / B] * ql_group_dot(levels, x[m], col)
//   acc[m] += this lane's share of row n's CSR outliers (every 32nd entry)
//   warp-reduce acc[m]; lane 0 writes y[m, n]
//
// The codebook sits in shared memory (16 floats: at most 16 distinct addresses per load, no bank
// conflicts). Decode, outliers and dtype conversions are the functions of quantlite_decode.h that
// the CPU tests exercise.
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

constexpr int GEMV_WARPS = 4;
constexpr int GEMV_MAX_M = 8;

template <int DTYPE, int VEC>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_kernel(const ql_weight w,  // compute layout, device pointers
            const void *__restrict__ x, int64_t m, int64_t x_row_stride,  // (M, K) rows
            void *__restrict__ y, int64_t y_row_stride) {                // (M, N) rows
    __shared__ float codebook[16];
    if (threadIdx.x < 16) codebook[threadIdx.x] = w.codebook[threadIdx.x];
    __syncthreads();

    const int lane = threadIdx.x % 32;
    const int64_t n = (int64_t)blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
    const int64_t m0 = (int64_t)blockIdx.y * GEMV_MAX_M;
    if (n >= w.n) return;
    const int m_count = (int)(m - m0 < GEMV_MAX_M ? m - m0 : GEMV_MAX_M);
    const int64_t padded_k = (w.k + w.block_size - 1) / w.block_size * w.block_size;
    const int64_t row_bytes = padded_k / 2;
    const uint8_t *code_row = w.codes + n * row_bytes;                   // (Kp / 2,)
    const float *scale_row = (const float *)w.scales + n * (padded_k / w.block_size);   // (Kp / B,)
    const char *x_rows = (const char *)x + m0 * x_row_stride * ql_dtype_size(DTYPE);

    float acc[GEMV_MAX_M];
#pragma unroll
    for (int mm = 0; mm < GEMV_MAX_M; ++mm) acc[mm] = 0.0f;

    // ---- main loop: VEC bytes of codes per lane per step, 8 bytes (16 columns) per group
    for (int64_t byte = (int64_t)lane * VEC; byte < row_bytes; byte += 32 * VEC) {
        uint32_t words[VEC / 4];  // little-endian words of the codes: column 2 * byte + i is nibble i
        if constexpr (VEC == 16) {
            const uint4 loaded = __ldg((const uint4 *)(code_row + byte));  // row_bytes % 16 == 0 here
            words[0] = loaded.x, words[1] = loaded.y, words[2] = loaded.z, words[3] = loaded.w;
        } else {
            const uint2 loaded = __ldg((const uint2 *)(code_row + byte));
            words[0] = loaded.x, words[1] = loaded.y;
        }
#pragma unroll
        for (int group = 0; group < VEC / 8; ++group) {
            const int64_t col0 = 2 * byte + 16 * group;
            float levels[16];
            ql_group_levels(words[2 * group], words[2 * group + 1], codebook, levels);
            const float scale = scale_row[col0 / w.block_size];
#pragma unroll
            for (int mm = 0; mm < GEMV_MAX_M; ++mm)
                if (mm < m_count)
                    acc[mm] += scale * ql_group_dot(levels, x_rows + mm * x_row_stride * ql_dtype_size(DTYPE), DTYPE, col0, w.k);
        }
    }

    // ---- outliers: every 32nd CSR entry of the row per lane (unrolled: acc stays in registers)
#pragma unroll
    for (int mm = 0; mm < GEMV_MAX_M; ++mm)
        if (mm < m_count)
                acc[mm] += ql_outlier_partial(w.row_ptr, w.cols, QL_COLS_I32, w.vals, QL_VALS_F32, n, x_rows + mm * x_row_stride * ql_dtype_size(DTYPE),
                                          DTYPE, lane, 32);

    // ---- warp reduction, write
#pragma unroll
    for (int mm = 0; mm < GEMV_MAX_M; ++mm) {
        float value = acc[mm];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
        if (lane == 0 && mm < m_count) ql_store(y, DTYPE, (m0 + mm) * y_row_stride + n, value);
    }
}

}  // namespace

template <int DTYPE>
cudaError_t ql_launch_gemv(const ql_weight &w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                           int64_t y_row_stride, cudaStream_t stream) {
    const dim3 grid((unsigned)((w.n + GEMV_WARPS - 1) / GEMV_WARPS), (unsigned)((m + GEMV_MAX_M - 1) / GEMV_MAX_M));
    const int64_t row_bytes = (w.k + w.block_size - 1) / w.block_size * w.block_size / 2;
    // 16-byte loads need every row start 16-byte aligned; rows are a multiple of 8 bytes always
    const bool wide = row_bytes % 16 == 0 && (uintptr_t)w.codes % 16 == 0;
    if (wide) gemv_kernel<DTYPE, 16><<<grid, GEMV_WARPS * 32, 0, stream>>>(w, x, m, x_row_stride, y, y_row_stride);
    else gemv_kernel<DTYPE, 8><<<grid, GEMV_WARPS * 32, 0, stream>>>(w, x, m, x_row_stride, y, y_row_stride);
    return cudaGetLastError();
}

template cudaError_t ql_launch_gemv<QL_F32>(const ql_weight &, const void *, int64_t, int64_t, void *, int64_t, cudaStream_t);
template cudaError_t ql_launch_gemv<QL_F16>(const ql_weight &, const void *, int64_t, int64_t, void *, int64_t, cudaStream_t);
template cudaError_t ql_launch_gemv<QL_BF16>(const ql_weight &, const void *, int64_t, int64_t, void *, int64_t, cudaStream_t);

// Tensor-core fused dequant-matmul for large M (prefill): y (M, N) = x (M, K) @ W^T, x and y in
// float16 or bfloat16, float32 accumulation (WMMA m16n16k16; sm_80+ for bfloat16).
//
// Work partition: one block of 4 warps per 64 x 64 tile of y; warps in a 2 x 2 grid, each owning a
// 32 x 32 sub-tile = 2 x 2 WMMA accumulators.
//
//            K ->  (TILE_K = 32 per step)
//   x tile   [64 x 32]  ---- fetch: 16 elements per thread, zero past M / K
//   w tile   [64 x 32]  ---- fetch 8 code bytes per thread, dequantize (ql_group_levels * scale)
//                            into x's dtype in shared memory: the weights are read once per tile
//   acc[2][2] += x_sub (32 x 16) . w_sub^T (16 x 32), twice per step
//
//   for k0 in 0, 32, ..., Kp:
//       fetch x tile; fetch + dequantize w tile            (phase 1: fetch / dequant)
//       __syncthreads
//       2 x (load 2 A + 2 B fragments, 4 mma_sync)         (phase 2: mma)
//       __syncthreads
//   store accumulators to shared memory; each thread adds row n's CSR outliers to its outputs and
//   writes y in x's dtype                                   (phase 3: epilogue)
//
// Dequantized weights are rounded to x's dtype before the mma (as every fp16/bf16 tensor-core
// kernel does): relative error 2^-11 (fp16) or 2^-8 (bf16) per weight, on top of x's own rounding.
// No cp.async pipelining yet: this is the straightforward tile loop, correct first.
#include <cuda_runtime.h>
#include <mma.h>

#include "common.cuh"

namespace {

constexpr int TILE_M = 64, TILE_N = 64, TILE_K = 32;
constexpr int THREADS = 128;             // 4 warps, 2 x 2
constexpr int PAD = 8;                   // elements of padding per shared row: fewer bank conflicts,
                                         // rows stay 16-byte multiples as WMMA requires
constexpr int OUT_PAD = 4;

template <int DTYPE>
__global__ void __launch_bounds__(THREADS)
mma_kernel(const ql_weight w,  // compute layout, device pointers
           const void *__restrict__ x, int64_t m, int64_t x_row_stride,  // (M, K) rows
           void *__restrict__ y, int64_t y_row_stride) {                // (M, N) rows
    using T = typename ql_element<DTYPE>::type;
    namespace wmma = nvcuda::wmma;
    __shared__ float codebook[16];
    __shared__ __align__(32) T x_tile[TILE_M][TILE_K + PAD];         // (64, 32) of x
    __shared__ __align__(32) T w_tile[TILE_N][TILE_K + PAD];         // (64, 32) of W, dequantized
    __shared__ __align__(32) float out_tile[TILE_M][TILE_N + OUT_PAD];

    const int tid = threadIdx.x, warp = tid / 32;
    const int warp_m = warp / 2, warp_n = warp % 2;
    const int64_t m0 = (int64_t)blockIdx.y * TILE_M, n0 = (int64_t)blockIdx.x * TILE_N;
    const int64_t padded_k = (w.k + w.block_size - 1) / w.block_size * w.block_size;
    const int64_t n_blocks = padded_k / w.block_size;
    if (tid < 16) codebook[tid] = w.codebook[tid];

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    __syncthreads();

    // this thread's share of each fetch: one row, 16 consecutive columns
    const int row = tid / 2, col = (tid % 2) * 16;
    for (int64_t k0 = 0; k0 < padded_k; k0 += TILE_K) {
        // ---- phase 1a: x tile, zero outside (M, K)
        const int64_t x_row = m0 + row;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int64_t k = k0 + col + i;
            const float value = x_row < m && k < w.k ? ql_load(x, DTYPE, x_row * x_row_stride + k) : 0.0f;
            x_tile[row][col + i] = T(value);
        }
        // ---- phase 1b: w tile, 8 code bytes -> 16 weights (zero past N and past Kp)
        const int64_t n = n0 + row, group_col = k0 + col;
        float levels[16];
        float scale = 0.0f;
        if (n < w.n && group_col < padded_k) {
            const uint2 words = __ldg((const uint2 *)(w.codes + n * (padded_k / 2) + group_col / 2));
            ql_group_levels(words.x, words.y, codebook, levels);
            scale = ((const float *)w.scales)[n * n_blocks + group_col / w.block_size];
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) levels[i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) w_tile[row][col + i] = T(levels[i] * scale);
        __syncthreads();

        // ---- phase 2: tensor cores
#pragma unroll
        for (int kk = 0; kk < TILE_K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];  // W rows = B's columns
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &x_tile[warp_m * 32 + i * 16][kk], TILE_K + PAD);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &w_tile[warp_n * 32 + j * 16][kk], TILE_K + PAD);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    // ---- phase 3: epilogue: outliers, conversion, coalesced writes along N
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&out_tile[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], TILE_N + OUT_PAD,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int index = tid; index < TILE_M * TILE_N; index += THREADS) {
        const int r = index / TILE_N, c = index % TILE_N;
        const int64_t out_m = m0 + r, out_n = n0 + c;
        if (out_m >= m || out_n >= w.n) continue;
        const void *x_row_ptr = (const char *)x + out_m * x_row_stride * ql_dtype_size(DTYPE);
        const float value = out_tile[r][c] + ql_outlier_partial(w.row_ptr, w.cols, QL_COLS_I32, w.vals, QL_VALS_F32, out_n, x_row_ptr, DTYPE, 0, 1);
        ql_store(y, DTYPE, out_m * y_row_stride + out_n, value);
    }
}

}  // namespace

template <int DTYPE>
cudaError_t ql_launch_mma(const ql_weight &w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                          int64_t y_row_stride, cudaStream_t stream) {
    const dim3 grid((unsigned)((w.n + TILE_N - 1) / TILE_N), (unsigned)((m + TILE_M - 1) / TILE_M));
    mma_kernel<DTYPE><<<grid, THREADS, 0, stream>>>(w, x, m, x_row_stride, y, y_row_stride);
    return cudaGetLastError();
}

template cudaError_t ql_launch_mma<QL_F16>(const ql_weight &, const void *, int64_t, int64_t, void *, int64_t, cudaStream_t);
template cudaError_t ql_launch_mma<QL_BF16>(const ql_weight &, const void *, int64_t, int64_t, void *, int64_t, cudaStream_t);

/* AVX-512 prefill GEMM, y (M, N) = x (M, K) @ W^T for M >= QL_GEMM_MIN_M (kernels.h), BLIS-style,
 * with the 4-bit weight decoded in the packing step (this file alone is compiled with -mavx512f;
 * api.c calls it only when cpuid reports AVX-512 F). Every instruction used is AVX-512 F.
 *
 * Computed as y^T = W x^T, so that the weight is the broadcast operand and x the vector one:
 *   x_packed  (G, Kp, 16) float32, G = ceil(M / 16): group g holds rows 16g .. 16g + 15 of x side by
 *             side per column (ql_gemm_x_position; rows past M and columns past K zero), packed once
 *             per call by api.c. A group's K_C columns are one contiguous run (8 KiB at K_C = 128).
 *   panel     (PANEL_ROWS, K_C) float32 per thread: 256 weight rows, columns [k0, k0 + K_C), decoded
 *             and scaled (ql_avx512_levels16 * the block's scale: the float32 product of
 *             QWeight.dequantize) with the row's outliers in those columns added (as dequantize
 *             does), natural column order; 128 KiB, in L2. Each weight is decoded once per call and
 *             then used by every group of x: at M = 64 one decode (a load, 3 shuffles, a shift, a
 *             multiply and a store per 16 weights) feeds 64 FMAs. Scales as float32 (chunk.h's
 *             ql_chunk_scales: the stored array, or its float16 / double-quantized form decoded).
 *   acc       (G, PANEL_ROWS, 16) float32 per thread: lane j of (g, r) = y[16g + j, n0 + r] so far,
 *             carried from one K_C slice to the next, rounded to x's dtype when written out.
 * Micro-kernel: MR = 8 weight rows x V = 1..3 groups of 16 x rows (8 x 3 = 24 zmm accumulators, 3 x
 * vectors, 1 broadcast); per column k: V vector loads of x, 8 vbroadcastss of panel[r][k] (a load
 * port each, no shuffle) and 8 V FMAs. From V = 2 on the two FMA ports bound it, not the loads (11
 * loads per 24 FMAs at V = 3); 4 x 6 tiles (10 loads per 24) measured the same.
 * Loop nest per block of up to PANEL_ROWS weight rows (a thread's rows of y come in api.c's chunks,
 * row_grain: about N / (4 threads) rows rounded up to 32, or all N for a small call, so a block is
 * min(256, the chunk) rows and x is read once per block: ~6 times a call at SmolLM2's N = 576):
 * for each K_C slice: decode the panel; for each block of V groups of x: for each MR rows of the
 * panel: K_C columns of FMAs. A block's x (V x 8 KiB) stays in L1 over the panel's 32 micro-tiles;
 * the panel and acc (M x 1 KiB) in L2; all of x (M x K floats) is read once per block.
 * Blocks of 32 rows (x read 8 times as often) measured 0.74-0.78x torch fp32 at 4096 x 11008, M =
 * 128, against 1.04-1.05x with 128; 256 rows gained another 0-4 % over 128 (M = 64-512, one and
 * two threads, A/B in one process); K_C = 64 and 256 no better (one thread, loaded machine).
 * Outliers: each row's CSR entries are walked with a cursor as the slices pass (columns ascend, as
 * the format requires): a column is added only inside [k0, K) and the slice, a column below the
 * slice or past K fails the call, and so does an entry not added by the row's end (QL_ERR_BAD_OUTLIERS,
 * as chunk.h reports): a malformed table can neither index outside the panel nor be dropped.
 * Numerics: every output is one float32 FMA chain over k = 0 .. Kp - 1 in order, of the dequantized
 * float32 weights: nothing depends on M, the block or the thread count (bitwise equal for any). */
#include <immintrin.h>
#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "levels_avx512.h"
#include "quantlite_decode.h"

#define PANEL_ROWS 256          /* weight rows decoded together, at most (a chunk may hold fewer) */
#define K_C 128                 /* columns per panel slice */
#define MR 8                    /* weight rows per micro-tile */
#define MAX_GROUPS 3            /* x groups per micro-tile: 8 x 3 accumulators + 3 x = 27 zmm */
#define GROUP QL_GEMM_X_GROUP

static int64_t groups_of(const ql_matmul_job *job) { return (job->m + GROUP - 1) / GROUP; }

/* Per thread: the panel (64-byte aligned), acc, the decoded scales (chunk.h). */
int64_t ql_gemm_avx512_scratch_floats(const ql_matmul_job *job) {
    return 16 + PANEL_ROWS * K_C + groups_of(job) * PANEL_ROWS * GROUP + PANEL_ROWS * (job->padded_k / job->w->block_size);
}

/* Weight rows [n0, n0 + rows) x columns [k0, k0 + kc) decoded, scaled and their outliers added into
 * panel (rows, K_C); next[r] = row r's first CSR entry not yet added. 0 on a malformed column. */
static int decode_panel(const ql_weight *w, int64_t padded_k, const float *scales, __m512 codebook, int64_t n0,
                        int64_t rows, int64_t k0, int64_t kc, int64_t *next, float *panel) {
    const int64_t row_bytes = padded_k / 2, n_blocks = padded_k / w->block_size, block = w->block_size;
    const int64_t k1 = k0 + kc < w->k ? k0 + kc : w->k;
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *codes = w->codes + (n0 + r) * row_bytes;
        const float *row_scales = scales + r * n_blocks;
        float *out = panel + r * K_C;  /* column c at out[c - k0] */
        for (int64_t b0 = k0; b0 < k0 + kc; b0 = (b0 / block + 1) * block) {  /* per block in the slice: one scale */
            const __m512 scale = _mm512_set1_ps(row_scales[b0 / block]);
            const int64_t b1 = (b0 / block + 1) * block < k0 + kc ? (b0 / block + 1) * block : k0 + kc;
            for (int64_t c = b0; c < b1; c += 16) /* 16 divides B and K_C */ _mm512_store_ps(out + (c - k0), _mm512_mul_ps(ql_avx512_levels16(codes + c / 2, codebook), scale));
        }
        int64_t e = next[r];
        for (const int64_t end = w->row_ptr[n0 + r + 1]; e < end; ++e) {
            const int64_t col = ql_outlier_col(w->cols, w->col_kind, e);
            if (col >= k1 && col < w->k) break;  /* a later slice's */
            if (col < k0 || col >= w->k) return 0;
            out[col - k0] += ql_outlier_val(w->vals, w->val_kind, e);
        }
        next[r] = e;
    }
    return 1;
}

/* acc[v][r] += panel[r][0 .. kc) . x group v's columns, r < MR, v < V (x: group 0 at the slice's first
 * column, groups x_group_stride floats apart; acc: group v's rows at acc + v * PANEL_ROWS * 16). */
static inline __attribute__((always_inline)) void micro_tile(const float *panel, const float *x, int64_t x_group_stride,
                                                             int64_t kc, float *acc, const int V) {
    __m512 c[MR][MAX_GROUPS];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < V; ++v) c[r][v] = _mm512_load_ps(acc + (v * PANEL_ROWS + r) * GROUP);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
        __m512 b[MAX_GROUPS];
        for (int v = 0; v < V; ++v) b[v] = _mm512_load_ps(x + v * x_group_stride + k * GROUP);
        for (int r = 0; r < MR; ++r) {
            const __m512 a = _mm512_set1_ps(panel[r * K_C + k]);
            for (int v = 0; v < V; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < V; ++v) _mm512_store_ps(acc + (v * PANEL_ROWS + r) * GROUP, c[r][v]);
}

/* Groups per micro-tile for the `left` groups still to do: 3, but 4 as 2 + 2 (never a lone 1
 * after 3s: one group is load-bound, 8 broadcasts + 1 load per 8 FMAs). */
static int block_groups(int64_t left) { return left >= MAX_GROUPS ? (left == 4 ? 2 : MAX_GROUPS) : (int)left; }

/* y[m, n0 + r] = acc's lane m % 16 of (m / 16, r), r < rows: per x row, 16 weight rows at a time
 * gathered (stride 16 floats) and stored as one vector (float32) or rounded by ql_store. */
static void store_outputs(const ql_matmul_job *job, const float *acc, int64_t n0, int64_t rows) {
    const __m512i row_lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(GROUP));
    for (int64_t m = 0; m < job->m; ++m) {
        const float *lanes = acc + (m / GROUP) * PANEL_ROWS * GROUP + m % GROUP;
        const int64_t y_row = m * job->y_row_stride + n0;
        for (int64_t r0 = 0; r0 < rows; r0 += 16) {
            const __mmask16 real = lanes_below(rows - r0);
            const __m512 values = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, row_lanes, lanes + r0 * GROUP, 4);
            if (job->dtype == QL_F32) {
                _mm512_mask_storeu_ps((float *)job->y + y_row + r0, real, values);
                continue;
            }
            float rounded[16];
            _mm512_storeu_ps(rounded, values);
            for (int64_t i = 0; i < 16 && r0 + i < rows; ++i) ql_store(job->y, job->dtype, y_row + r0 + i, rounded[i]);
        }
    }
}

/* acc (G, PANEL_ROWS, 16) = weight rows [n0, n0 + rows) against every group of x, over all of K:
 * slice by slice, the panel decoded, then every block of V groups over it. 0 on a malformed
 * outlier table. */
static int block_product(const ql_matmul_job *job, const float *scales, __m512 codebook, int64_t n0, int64_t rows,
                         float *panel, float *acc) {
    const ql_weight *w = job->w;
    const int64_t kp = job->padded_k, groups = groups_of(job);
    const int64_t tile_rows = (rows + MR - 1) / MR * MR;  /* rows past `rows`: zero, never stored */
    int64_t next[PANEL_ROWS];
    for (int64_t r = 0; r < rows; ++r) next[r] = w->row_ptr[n0 + r];
    memset(panel + rows * K_C, 0, sizeof(float) * (size_t)((tile_rows - rows) * K_C));
    memset(acc, 0, sizeof(float) * (size_t)(groups * PANEL_ROWS * GROUP));
    for (int64_t k0 = 0; k0 < kp; k0 += K_C) {
        const int64_t kc = kp - k0 < K_C ? kp - k0 : K_C;
        if (!decode_panel(w, kp, scales, codebook, n0, rows, k0, kc, next, panel)) return 0;
        for (int64_t g0 = 0; g0 < groups; g0 += block_groups(groups - g0)) {
            const float *x = job->x_packed + (g0 * kp + k0) * GROUP;
            float *block_acc = acc + g0 * PANEL_ROWS * GROUP;
            for (int64_t r0 = 0; r0 < tile_rows; r0 += MR) {
                switch (block_groups(groups - g0)) {  /* a constant V keeps the accumulators in registers */
                    case 1: micro_tile(panel + r0 * K_C, x, kp * GROUP, kc, block_acc + r0 * GROUP, 1); break;
                    case 2: micro_tile(panel + r0 * K_C, x, kp * GROUP, kc, block_acc + r0 * GROUP, 2); break;
                    default: micro_tile(panel + r0 * K_C, x, kp * GROUP, kc, block_acc + r0 * GROUP, 3); break;
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r)
        if (next[r] != w->row_ptr[n0 + r + 1]) return 0;  /* an entry out of order was never added */
    return 1;
}

void ql_gemm_rows_avx512(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const ql_weight *w = job->w;
    float *scratch = job->scratch + thread_index * job->scratch_floats_per_thread;
    float *panel = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *acc = panel + PANEL_ROWS * K_C, *scale_scratch = acc + groups_of(job) * PANEL_ROWS * GROUP;
    const __m512 codebook = _mm512_loadu_ps(w->codebook);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += PANEL_ROWS) {
        const int64_t rows = n_end - n0 < PANEL_ROWS ? n_end - n0 : PANEL_ROWS;
        const float *scales = ql_chunk_scales(w, job->padded_k, n0, rows, scale_scratch);
        if (!ql_chunk_row_ptr_ok(w, n0, rows) || !block_product(job, scales, codebook, n0, rows, panel, acc)) {
            ql_chunk_fail(job, QL_ERR_BAD_OUTLIERS);
            return;
        }
        store_outputs(job, acc, n0, rows);
    }
}

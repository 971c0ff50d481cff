/* The prefill GEMM's plan, y (M, N) = x (M, K) @ W^T, BLIS-style with the 4-bit weight decoded in
 * the packing step: everything but the vector code, shared by gemm_avx512.c and gemm_avx2.c, which
 * each define the vector hooks declared below and include this header (so it is compiled with each
 * file's instruction set). api.c calls a GEMM from QL_GEMM_MIN_M rows of x on (kernels.h).
 *
 * Computed as y^T = W x^T, so that the weight is the broadcast operand and x the vector one; a
 * vector holds GEMM_GROUP floats (16 with AVX-512, 8 with AVX2):
 *   x_packed  (G, Kp, GEMM_GROUP) float32, G = ceil(M / GEMM_GROUP): group g holds rows
 *             GEMM_GROUP g .. GEMM_GROUP (g + 1) - 1 of x side by side per column
 *             (ql_gemm_x_position; rows past M and columns past K zero), packed once per call by
 *             api.c, every thread a chunk of groups (a pool job before the GEMM's). A group's K_C
 *             columns are one contiguous run (8 / 4 KiB at K_C = 128).
 *   panel     (ACC_ROWS, K_C) float32 per thread: 256 weight rows, columns [k0, k0 + K_C), decoded
 *             and scaled (the level times the block's scale: the float32 product of
 *             QWeight.dequantize) with the row's outliers in those columns added (as dequantize
 *             does), natural column order; 128 KiB, in L2. Each weight is decoded once per call and
 *             then used by every group of x: at M = 64 one decode feeds 64 FMA lanes. Scales as
 *             float32 (chunk.h's ql_chunk_scales: the stored array, or its float16 / double-quantized
 *             form decoded). ACC_ROWS = 256 rounded up to whole micro-tiles (rows past a block's
 *             end zero, never stored).
 *   acc       (G, ACC_ROWS, GEMM_GROUP) float32 per thread: lane j of (g, r) = y[GEMM_GROUP g + j,
 *             n0 + r] so far, carried from one K_C slice to the next, rounded to x's dtype when
 *             written out.
 * Micro-kernel (micro_tile, in the vector file's operations): GEMM_MR weight rows x V = 1..GEMM_MAX_GROUPS
 * groups of x rows; per column k: V vector loads of x, GEMM_MR broadcasts of panel[r][k] (a load
 * port each, no shuffle) and GEMM_MR V FMAs into registers held over the whole slice.
 * Loop nest per block of up to PANEL_ROWS weight rows (a thread's rows of y come in the pool's
 * shrinking chunks, kernels.h's ql_row_grain: at least 256 rows, or N / (4 threads) rounded up to 32
 * if less, or all N for a small call, so a block is min(256, the chunk) rows and x is read once per
 * block: ~6 times a call at SmolLM2's N = 576):
 * for each K_C slice: decode the panel; for each block of V groups of x: for each GEMM_MR rows of the
 * panel: K_C columns of FMAs. A block's x (V x 8 KiB or 4 KiB) stays in L1 over the panel's
 * micro-tiles; the panel and acc (M x 1 KiB) in L2; all of x (M x K floats) is read once per block.
 * Software prefetch: while a slice's panel is decoded, each row's codes and scales of the next
 * slice (the rows are 2 KiB apart at K = 4096, a stride the hardware prefetchers do not follow:
 * without it the AVX2 GEMM forced down to M = 1, where the decode is most of the call, took 22 ms
 * at 4096 x 4096, with it 14; one thread); while
 * a block of groups runs, the next block's x slice, a few lines per micro-tile (1-7 % at M =
 * 64-512, both instruction sets, one thread, A/B in one process).
 * Blocks of 32 rows (x read 8 times as often) measured 0.74-0.78x torch fp32 at 4096 x 11008, M =
 * 128, against 1.04-1.05x with 128; 256 rows gained another 0-4 % over 128 (AVX-512, M = 64-512,
 * one and two threads, A/B in one process); K_C = 64 and 256 no better (one thread, loaded machine).
 * Outliers: each row's CSR entries are walked with a cursor as the slices pass (columns ascend, as
 * the format requires): a column is added only inside [k0, K) and the slice, a column below the
 * slice or past K fails the call, and so does an entry not added by the row's end (QL_ERR_BAD_OUTLIERS,
 * as chunk.h reports): a malformed table can neither index outside the panel nor be dropped.
 * Numerics: every output is one float32 FMA chain over k = 0 .. Kp - 1 in order, of the dequantized
 * float32 weights: nothing depends on M, the block, the thread count or the instruction set (bitwise
 * equal for any). */
#ifndef QL_CPU_GEMM_H
#define QL_CPU_GEMM_H

#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "quantlite_decode.h"

#define PANEL_ROWS QL_GEMM_PANEL_ROWS  /* weight rows decoded together, at most (a chunk may hold fewer) */
#define K_C 128                 /* columns per panel slice */
#define ACC_ROWS ((PANEL_ROWS + GEMM_MR - 1) / GEMM_MR * GEMM_MR)  /* the panel's and acc's rows: whole micro-tiles */
_Static_assert(GEMM_MAX_GROUPS == 2 || GEMM_MAX_GROUPS == 3, "block_product instantiates V = 1 .. 3");

/* What the vector file defines before it includes this header (its instruction set's code):
 *   GEMM_GROUP, GEMM_MR, GEMM_MAX_GROUPS (above), the gemm_codebook type (the 16 levels held in
 *   registers) and the gemm_vector type (GEMM_GROUP floats);
 *   gemm_load_codebook   the 16 float32 levels into registers;
 *   gemm_levels16        16 consecutive columns' levels (code bytes at `bytes`, low nibble = even
 *                        column) times `scale`, stored at out (64-byte aligned);
 *   gemm_load, gemm_broadcast, gemm_fmadd, gemm_store   an aligned vector load, *p in every lane,
 *                        a * b + c fused, an aligned vector store (the micro-kernel's operations);
 *   gemm_gather_lanes    out[i] = lanes[i * GEMM_GROUP] for i < count <= GEMM_GROUP (one gather and
 *                        one masked store: the outputs of `count` weight rows for one row of x). */

static int64_t gemm_groups(const ql_matmul_job *job) { return (job->m + GEMM_GROUP - 1) / GEMM_GROUP; }

/* Per thread: the panel (64-byte aligned), acc, the decoded scales (chunk.h). */
static int64_t gemm_scratch_floats(const ql_matmul_job *job) {
    return 16 + ACC_ROWS * K_C + gemm_groups(job) * ACC_ROWS * GEMM_GROUP +
           PANEL_ROWS * (job->padded_k / job->w->block_size);
}

/* Weight rows [n0, n0 + rows) x columns [k0, k0 + kc) decoded, scaled and their outliers added into
 * panel (rows, K_C); next[r] = row r's first CSR entry not yet added. 0 on a malformed column. */
static int decode_panel(const ql_weight *w, int64_t padded_k, const float *scales, gemm_codebook codebook, int64_t n0,
                        int64_t rows, int64_t k0, int64_t kc, int64_t *next, float *panel) {
    const int64_t row_bytes = padded_k / 2, n_blocks = padded_k / w->block_size, block = w->block_size;
    const int64_t k1 = k0 + kc < w->k ? k0 + kc : w->k, first_block = k0 / block;
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *codes = w->codes + (n0 + r) * row_bytes;
        const float *row_scales = scales + r * n_blocks;
        float *out = panel + r * K_C;  /* column c at out[c - k0] */
        if (k0 + K_C < padded_k) {  /* the row's codes and scales of the next slice, a slice's work ahead */
            _mm_prefetch((const char *)(codes + (k0 + K_C) / 2), _MM_HINT_T0);
            _mm_prefetch((const char *)(codes + (k0 + K_C) / 2 + K_C / 2 - 1), _MM_HINT_T0);
            _mm_prefetch((const char *)(row_scales + (k0 + K_C) / block), _MM_HINT_T0);
        }
        for (int64_t b = first_block, c = k0; c < k0 + kc; ++b) {  /* per block in the slice: one scale */
            const float scale = row_scales[b];
            const int64_t block_end = (b + 1) * block < k0 + kc ? (b + 1) * block : k0 + kc;
            for (; c < block_end; c += 16) /* 16 divides B and K_C */ gemm_levels16(codes + c / 2, codebook, scale, out + (c - k0));
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

/* acc[v][r] += panel[r][0 .. kc) . x group v's columns, r < GEMM_MR, v < V (x: group 0 at the
 * slice's first column, groups x_group_stride floats apart; acc: group v's rows at
 * acc + v * ACC_ROWS * GEMM_GROUP). GEMM_MR x V accumulators held in registers over the slice. */
static inline __attribute__((always_inline)) void micro_tile(const float *panel, const float *x, int64_t x_group_stride,
                                                             int64_t kc, float *acc, const int V) {
    gemm_vector c[GEMM_MR][GEMM_MAX_GROUPS];
    for (int r = 0; r < GEMM_MR; ++r)
        for (int v = 0; v < V; ++v) c[r][v] = gemm_load(acc + (v * ACC_ROWS + r) * GEMM_GROUP);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
        gemm_vector b[GEMM_MAX_GROUPS];
        for (int v = 0; v < V; ++v) b[v] = gemm_load(x + v * x_group_stride + k * GEMM_GROUP);
        for (int r = 0; r < GEMM_MR; ++r) {
            const gemm_vector a = gemm_broadcast(panel + r * K_C + k);
            for (int v = 0; v < V; ++v) c[r][v] = gemm_fmadd(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < GEMM_MR; ++r)
        for (int v = 0; v < V; ++v) gemm_store(acc + (v * ACC_ROWS + r) * GEMM_GROUP, c[r][v]);
}

/* Groups per micro-tile for the `left` groups still to do: GEMM_MAX_GROUPS (3), but 4 as 2 + 2 (never
 * a lone 1 after 3s: one group is load-bound, GEMM_MR broadcasts + 1 load per GEMM_MR FMAs). */
static int block_groups(int64_t left) {
    return left >= GEMM_MAX_GROUPS ? (left == 4 ? 2 : GEMM_MAX_GROUPS) : (int)left;
}

/* acc (G, ACC_ROWS, GEMM_GROUP) = weight rows [n0, n0 + rows) against every group of x, over all
 * of K: slice by slice, the panel decoded, then every block of V groups over it. 0 on a malformed
 * outlier table. */
static int block_product(const ql_matmul_job *job, const float *scales, gemm_codebook codebook, int64_t n0, int64_t rows,
                         float *panel, float *acc) {
    const ql_weight *w = job->w;
    const int64_t kp = job->padded_k, groups = gemm_groups(job);
    const int64_t tile_rows = (rows + GEMM_MR - 1) / GEMM_MR * GEMM_MR;  /* rows past `rows`: zero, never stored */
    int64_t next[PANEL_ROWS];
    for (int64_t r = 0; r < rows; ++r) next[r] = w->row_ptr[n0 + r];
    memset(panel + rows * K_C, 0, sizeof(float) * (size_t)((tile_rows - rows) * K_C));
    memset(acc, 0, sizeof(float) * (size_t)(groups * ACC_ROWS * GEMM_GROUP));
    for (int64_t k0 = 0; k0 < kp; k0 += K_C) {
        const int64_t kc = kp - k0 < K_C ? kp - k0 : K_C;
        if (!decode_panel(w, kp, scales, codebook, n0, rows, k0, kc, next, panel)) return 0;
        for (int64_t g0 = 0; g0 < groups; g0 += block_groups(groups - g0)) {
            const float *x = job->x_packed + (g0 * kp + k0) * GEMM_GROUP;
            float *block_acc = acc + g0 * ACC_ROWS * GEMM_GROUP;
            /* the x slice the next block of groups reads (or the first of the next K slice), brought
             * into L1 a few lines per micro-tile while this block runs: 1-7 % faster at M = 64-512 */
            const int64_t next_g0 = g0 + block_groups(groups - g0) < groups ? g0 + block_groups(groups - g0) : 0;
            const int64_t next_k0 = next_g0 ? k0 : k0 + K_C;
            const int64_t next_groups = next_k0 < kp ? block_groups(groups - next_g0) : 0;
            const char *next_x = (const char *)(job->x_packed + (next_g0 * kp + (next_groups ? next_k0 : 0)) * GEMM_GROUP);
            const int64_t lines = next_groups ? (kp - next_k0 < K_C ? kp - next_k0 : K_C) * GEMM_GROUP * 4 / 64 : 0;
            const int64_t lines_per_tile = (lines + tile_rows / GEMM_MR - 1) / (tile_rows / GEMM_MR);
            for (int64_t r0 = 0, line = 0; r0 < tile_rows; r0 += GEMM_MR) {
                for (const int64_t end = line + lines_per_tile < lines ? line + lines_per_tile : lines; line < end; ++line)
                    for (int64_t v = 0; v < next_groups; ++v) _mm_prefetch(next_x + (v * kp * GEMM_GROUP) * 4 + line * 64, _MM_HINT_T0);
                switch (block_groups(groups - g0)) {  /* a constant V keeps the accumulators in registers */
                    case 1: micro_tile(panel + r0 * K_C, x, kp * GEMM_GROUP, kc, block_acc + r0 * GEMM_GROUP, 1); break;
#if GEMM_MAX_GROUPS == 3
                    case 3: micro_tile(panel + r0 * K_C, x, kp * GEMM_GROUP, kc, block_acc + r0 * GEMM_GROUP, 3); break;
#endif
                    default: micro_tile(panel + r0 * K_C, x, kp * GEMM_GROUP, kc, block_acc + r0 * GEMM_GROUP, 2); break;
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r)
        if (next[r] != w->row_ptr[n0 + r + 1]) return 0;  /* an entry out of order was never added */
    return 1;
}

/* y[m, n0 + r] = acc's lane m % GEMM_GROUP of (m / GEMM_GROUP, r), r < rows: per x row, GEMM_GROUP
 * weight rows at a time gathered and stored as one vector (float32) or rounded by ql_store (3-4 %
 * faster at M = 64-128 than one by one, AVX-512). */
static void store_outputs(const ql_matmul_job *job, const float *acc, int64_t n0, int64_t rows) {
    for (int64_t m = 0; m < job->m; ++m) {
        const float *lanes = acc + (m / GEMM_GROUP) * ACC_ROWS * GEMM_GROUP + m % GEMM_GROUP;
        const int64_t y_row = m * job->y_row_stride + n0;
        for (int64_t r0 = 0; r0 < rows; r0 += GEMM_GROUP) {
            const int64_t count = rows - r0 < GEMM_GROUP ? rows - r0 : GEMM_GROUP;
            if (job->dtype == QL_F32) {
                gemm_gather_lanes(lanes + r0 * GEMM_GROUP, count, (float *)job->y + y_row + r0);
                continue;
            }
            float values[GEMM_GROUP];
            gemm_gather_lanes(lanes + r0 * GEMM_GROUP, count, values);
            for (int64_t i = 0; i < count; ++i) ql_store(job->y, job->dtype, y_row + r0 + i, values[i]);
        }
    }
}

/* Output rows [n_begin, n_end) (one pool chunk), block by block. */
static void gemm_rows(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const ql_weight *w = job->w;
    float *scratch = job->scratch + thread_index * job->scratch_floats_per_thread;
    float *panel = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *acc = panel + ACC_ROWS * K_C, *scale_scratch = acc + gemm_groups(job) * ACC_ROWS * GEMM_GROUP;
    const gemm_codebook codebook = gemm_load_codebook(w->codebook);
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

#endif

/* What the int8-activation GEMV kernels (qmatmul_q8act_avx512.c, qmatmul_q8act_avx2.c) do around
 * their register tile: per chunk of QL_ROW_GRAIN weight rows (chunk.h: its scales as float32 and its
 * outlier sums), every tile of up to X_TILE rows of x runs over the chunk's rows in tiles of 4 weight
 * rows (up to WIDE_TILE_MAX_X_ROWS rows of x), then 2, then 1, and the sums go to y with the outliers.
 * The including file defines first X_TILE, WIDE_TILE_MAX_X_ROWS, strip_scales and Q8ACT_TABLE (the
 * type of its level table), and afterwards its register tile, declared here:
 *     tile(job, table_of_strips, table, n0, scale0, m0, sums, R, x_rows)
 * which puts weight rows n0 .. n0 + R - 1 (R <= 4) against x rows m0 .. m0 + x_rows - 1 into sums
 * (R, x_rows), with tile_weight_rows below for where its rows are. */
#ifndef QL_CPU_Q8ACT_TILES_H
#define QL_CPU_Q8ACT_TILES_H

#include "chunk.h"
#include "kernels.h"

static inline __attribute__((always_inline)) void tile(const ql_q8act_job *job, const strip_scales *table_of_strips,
                                                       Q8ACT_TABLE table, int64_t n0, const float *scale0, int64_t m0,
                                                       float *sums, const int R, const int x_rows);

/* A tile's weight rows n0 .. n0 + R - 1: their codes ((Kp / 2,) uint8 each) and float32 scales (from
 * scale0, Kp / B apart). */
typedef struct {
    const uint8_t *codes[4];
    const float *scales[4];
} tile_weight_rows;

static inline __attribute__((always_inline)) tile_weight_rows weight_rows_of(const ql_q8act_job *job, int64_t n0,
                                                                             const float *scale0, const int R) {
    const ql_weight *w = job->base.w;
    tile_weight_rows rows;
    for (int r = 0; r < R; ++r) {
        rows.codes[r] = w->codes + (n0 + r) * (job->base.padded_k / 2);
        rows.scales[r] = scale0 + r * (job->base.padded_k / w->block_size);
    }
    return rows;
}

/* The chunk's rows [n0, n0 + rows) against x rows m0 .. m0 + x_rows - 1: sums (rows, x_rows). */
static inline __attribute__((always_inline)) void tile_rows(const ql_q8act_job *job, const strip_scales *table_of_strips,
                                                            Q8ACT_TABLE table, int64_t n0, int64_t rows, const float *chunk_scales,
                                                            int64_t m0, float *sums, const int x_rows) {
    const int64_t n_blocks = job->base.padded_k / job->base.w->block_size;
    int64_t r = 0;
    if (x_rows <= WIDE_TILE_MAX_X_ROWS)
        for (; r + 4 <= rows; r += 4)
            tile(job, table_of_strips, table, n0 + r, chunk_scales + r * n_blocks, m0, sums + r * x_rows, 4, x_rows);
    for (; r + 2 <= rows; r += 2)
        tile(job, table_of_strips, table, n0 + r, chunk_scales + r * n_blocks, m0, sums + r * x_rows, 2, x_rows);
    for (; r < rows; ++r) tile(job, table_of_strips, table, n0 + r, chunk_scales + r * n_blocks, m0, sums + r * x_rows, 1, x_rows);
}

/* Weight rows [n_begin, n_end) against every row of x, on thread thread_index's scratch. */
static inline void q8act_rows(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index,
                              const strip_scales *table_of_strips, Q8ACT_TABLE table) {
    const ql_matmul_job *base = &job->base;
    float *scratch = base->scratch + thread_index * base->scratch_floats_per_thread;
    float sums[QL_ROW_GRAIN * X_TILE];  /* (rows, x_rows) */
    for (int64_t n0 = n_begin, rows; n0 < n_end; n0 += rows) {
        ql_chunk chunk;
        if (!(rows = ql_chunk_next(base, n0, n_end, scratch, &chunk))) return;
        for (int64_t m0 = 0; m0 < base->m; m0 += X_TILE) {
            const int x_rows = base->m - m0 < X_TILE ? (int)(base->m - m0) : X_TILE;
            switch (x_rows) {  /* a constant row count keeps every accumulator in a register */
                case 1: tile_rows(job, table_of_strips, table, n0, rows, chunk.scales, m0, sums, 1); break;
                case 2: tile_rows(job, table_of_strips, table, n0, rows, chunk.scales, m0, sums, 2); break;
                case 3: tile_rows(job, table_of_strips, table, n0, rows, chunk.scales, m0, sums, 3); break;
                default: tile_rows(job, table_of_strips, table, n0, rows, chunk.scales, m0, sums, 4); break;
            }
            ql_chunk_store(base, &chunk, n0, rows, m0, x_rows, sums);
        }
    }
}

#endif

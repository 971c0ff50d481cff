/* AVX-512 kernels for y (M, N) = x (M, K) @ W^T (this file alone is compiled with -mavx512f; api.c
 * calls it only when cpuid reports AVX-512 F). Every instruction used is AVX-512 F.
 *
 * Layouts: the stored codes as they are, (N, Kp / 2) uint8, low nibble = even column (no repack, no
 * second copy of the weight); scales (N, Kp / B) as float32, per chunk of rows the stored array or
 * its decoded float16 / double-quantized form (chunk.h). K is walked in strips of 128 columns
 * (64 bytes of codes, one zmm); strips = ceil(Kp / 128), the last one may be short.
 *
 * Decode, 64 bytes -> 128 levels in 8 zmm, with no byte shuffles at all. vpermps reads only the
 * low 4 bits of each 32-bit index, so the 16 float32 levels sit in one register and a dword of
 * codes is already an index for the nibble in its low 4 bits:
 *     c_i   = the strip's 64 bytes loaded at byte offset i (i = 0..3): dword l holds byte 4l + i
 *     level vector v = 2i     = vpermps(c_i, codebook)            (low nibble of byte 4l + i)
 *     level vector v = 2i + 1 = vpermps(c_i >> 4, codebook)       (its high nibble)
 * so lane l of level vector v is column 8l + v of the strip: 4 loads (3 of them unaligned), 4
 * shifts and 8 vpermps per 128 weights. The short last strip loads its dwords once with a mask and
 * shifts by 8, 16, 24 instead of loading at an offset (no read past the row, and past the array).
 * x is stored once per call in the matching order (kernels.h: ql_avx512_x_position): per strip, 8
 * vectors v of 16 floats, lane l = column 8l + v, so every product lines up and nothing is shuffled
 * back. Lane l's 8 columns lie in one block (8 divides B), block (strip start + 8l) / B: the scale
 * vector of a strip is one masked load of the row's scales and one vpermps by a per-strip lane ->
 * block table, built once per chunk (any B, also B = 48 whose blocks straddle strips).
 *
 * Register tiles: 4 weight rows at a time against 1-2 rows of x, else 2 (each x load serves all of
 * them), against a tile of up to 8 rows of x:
 *     up to 4 x rows (decode, batched decode): per strip, sum level * x into a fresh accumulator per
 *       (weight row, x row), then total += accumulator * scale vector (the scale once per strip).
 *     5 to 8 x rows (larger batches, prefill): the 8 level vectors are scaled first (level * scale,
 *       the weight's one rounding) and FMAed straight into total (2 x 8 = 16 accumulators), so each
 *       decode serves up to 8 x rows.
 * Totals span the whole K: each output is reduced once (_mm512_reduce_add_ps), the chunk's outlier
 * sums (chunk.h, computed before the tiles) added.
 * Prefetch: per strip, each row of the tile prefetches its code line one tile ahead (the next tile's
 * row, same columns: R * Kp / 2 bytes on), so the line arrives while the R rows in between are
 * decoded, and no prefetch is spent on lines that a row of this tile reads itself. At M = 1 from DRAM
 * (one thread, CPU time, a C harness alternating builds on the loaded machine) this and the 4-row
 * tile took 1.11 ms for 4096 x 4096 against 1.43 with 2 rows and 1 KiB ahead in the row (1.28x),
 * and 2.61 against 4.54 ms for 4096 x 11008 (1.74x: x no longer fits L1 there, and 4 rows share
 * each x load).
 * From QL_GEMM_MIN_M rows of x on (prefill), api.c calls the GEMM of gemm_avx512.c instead: the
 * tiles above would decode each weight M / 8 times.
 * Work partition: api.c hands each thread chunks of QL_ROW_GRAIN output rows (all M for each); a
 * chunk runs its x tiles one after the other over the same weight rows (in L2 by then). */
#include <immintrin.h>
#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "quantlite_decode.h"

#define STRIP_COLUMNS QL_AVX512_STRIP /* columns per zmm of codes */
#define STRIP_BYTES (STRIP_COLUMNS / 2)
#define SUM_TILE_MAX_X_ROWS 4         /* x rows up to this: scale each strip's sums, not the levels */
#define TILE_WEIGHT_ROWS 2            /* weight rows decoded together: each x load serves both */
#define WIDE_TILE_WEIGHT_ROWS 4       /* .. 4 of them up to WIDE_TILE_MAX_X_ROWS rows of x (registers allow) */
#define WIDE_TILE_MAX_X_ROWS 2

/* Per strip: which scales its 16 lanes use. */
typedef struct {
    __m512i lane_block;   /* block of lane l minus first_block */
    int64_t first_block;  /* block of the strip's first column */
    __mmask16 blocks;     /* mask of the scales to load (first_block ..) */
} strip_scales;

/* Per thread: the strip table (64-byte aligned). */
static int64_t own_scratch_floats(const ql_matmul_job *job) {
    const int64_t strips = (job->padded_k + STRIP_COLUMNS - 1) / STRIP_COLUMNS;
    return strips * (int64_t)(sizeof(strip_scales) / sizeof(float)) + 16;  /* + 16: room to align */
}

/* ... then the chunk's (chunk.h). */
int64_t ql_avx512_scratch_floats(const ql_matmul_job *job) {
    return own_scratch_floats(job) + ql_chunk_scratch_floats(job);
}

/* The thread's strip table for this call, built at its first chunk (a thread takes several, and a
 * build costs 1-2 us at K = 4096: 2-3 % of a two-thread 4096 x 4096 M = 1 call if built per chunk). */
static _Thread_local uint64_t table_call;  /* the call whose table this thread built last (0: none) */

static const strip_scales *strip_scales_of_call(const ql_matmul_job *job, float *scratch) {
    strip_scales *table = (strip_scales *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    if (table_call == job->call) return table;  /* a thread's scratch stays the same through a call */
    const int64_t block = job->w->block_size, n_blocks = job->padded_k / block;
    const int64_t strips = (job->padded_k + STRIP_COLUMNS - 1) / STRIP_COLUMNS;
    int64_t b = 0;  /* the block of the lane at hand: lanes' columns rise, so it only moves forward */
    for (int64_t s = 0; s < strips; ++s) {
        int32_t lanes[16];
        int64_t first = 0;
        for (int l = 0; l < 16; ++l) {
            const int64_t column = s * STRIP_COLUMNS + 8 * l;
            while (b + 1 < n_blocks && column >= (b + 1) * block) ++b;  /* stays at the last block past Kp
                                                                           (a short strip: x is zero there) */
            if (l == 0) first = b;
            lanes[l] = (int32_t)(b - first);
        }
        table[s].lane_block = _mm512_loadu_si512(lanes);
        table[s].first_block = first;
        table[s].blocks = (__mmask16)((1u << (b - first + 1)) - 1);
    }
    table_call = job->call;
    return table;
}

/* The strip's scale vector for one weight row (lane l = the scale of columns 8l .. 8l + 7). */
static inline __attribute__((always_inline)) __m512 strip_scale(const strip_scales *entry, const float *scale_row) {
    return _mm512_permutexvar_ps(entry->lane_block, _mm512_maskz_loadu_ps(entry->blocks, scale_row + entry->first_block));
}

/* Level vector v (0..7) of a strip whose codes start at `bytes`: lane l = column 8l + v. */
static inline __attribute__((always_inline)) __m512i code_indices(const uint8_t *bytes, const int v, const int full,
                                                                  __m512i masked) {
    const int i = v >> 1;
    const __m512i c = full ? _mm512_loadu_si512(bytes + i) : (i ? _mm512_srli_epi32(masked, 8 * i) : masked);
    return (v & 1) ? _mm512_srli_epi32(c, 4) : c;
}

/* One strip (128 columns, code bytes from `byte0` of each row) of weight rows codes[0 .. R - 1]
 * against x_rows rows of x (x: the strip's 8 x x_rows vectors), added to total (R, x_rows). `full`
 * is a constant: every strip but the last loads its codes at byte offsets 0..3; the last, short
 * one loads the row's remaining dwords (tail_dwords) once and shifts. */
static inline __attribute__((always_inline)) void strip(const strip_scales *entry, __m512 codebook,
                                                        const uint8_t *const *codes, const float *const *scales,
                                                        int64_t byte0, int64_t prefetch_ahead, __mmask16 tail_dwords, const float *x,
                                                        __m512 total[][8], const int R, const int x_rows,
                                                        const int full) {
    const int scale_sums = x_rows <= SUM_TILE_MAX_X_ROWS;
    __m512 scale[WIDE_TILE_WEIGHT_ROWS], partial[WIDE_TILE_WEIGHT_ROWS][8];
    __m512i masked[WIDE_TILE_WEIGHT_ROWS];
    for (int r = 0; r < R; ++r) {
        _mm_prefetch((const char *)codes[r] + byte0 + prefetch_ahead, _MM_HINT_T0);
        scale[r] = strip_scale(entry, scales[r]);
        masked[r] = full ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi32(tail_dwords, codes[r] + byte0);
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
        __m512 level[WIDE_TILE_WEIGHT_ROWS];
        for (int r = 0; r < R; ++r) {
            level[r] = _mm512_permutexvar_ps(code_indices(codes[r] + byte0, v, full, masked[r]), codebook);
            if (!scale_sums) level[r] = _mm512_mul_ps(level[r], scale[r]);
        }
        for (int m = 0; m < x_rows; ++m) {
            const __m512 xv = _mm512_load_ps(x + (v * x_rows + m) * 16);
            for (int r = 0; r < R; ++r) {
                if (!scale_sums) total[r][m] = _mm512_fmadd_ps(level[r], xv, total[r][m]);
                else partial[r][m] = v ? _mm512_fmadd_ps(level[r], xv, partial[r][m]) : _mm512_mul_ps(level[r], xv);
            }
        }
    }
    if (scale_sums)
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < x_rows; ++m) total[r][m] = _mm512_fmadd_ps(partial[r][m], scale[r], total[r][m]);
}

/* Weight rows n0 .. n0 + R - 1 (their float32 scales from scale0, Kp / B apart) against one tile
 * of x_rows rows of x (x: the tile's first float in x_packed, (strips, 8, x_rows, 16)); sums
 * (R, x_rows) = the dense dot products. */
static inline __attribute__((always_inline)) void tile(const ql_matmul_job *job, const strip_scales *table,
                                                       __m512 codebook, int64_t n0, const float *scale0,
                                                       const float *x, float *sums, const int R, const int x_rows) {
    const ql_weight *w = job->w;
    const int64_t row_bytes = job->padded_k / 2, n_blocks = job->padded_k / w->block_size;
    const int64_t strips = (job->padded_k + STRIP_COLUMNS - 1) / STRIP_COLUMNS;
    const uint8_t *codes[WIDE_TILE_WEIGHT_ROWS];
    const float *scales[WIDE_TILE_WEIGHT_ROWS];
    for (int r = 0; r < R; ++r) {
        codes[r] = w->codes + (n0 + r) * row_bytes;
        scales[r] = scale0 + r * n_blocks;
    }
    __m512 total[WIDE_TILE_WEIGHT_ROWS][8];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < x_rows; ++m) total[r][m] = _mm512_setzero_ps();
    const int64_t x_per_strip = 8 * x_rows * 16;
    const int64_t ahead = R * row_bytes;  /* prefetch: the next tile's rows, same columns */
    int64_t s = 0;
    for (; s + 1 < strips; ++s)
        strip(table + s, codebook, codes, scales, s * STRIP_BYTES, ahead, 0, x + s * x_per_strip, total, R, x_rows, 1);
    const __mmask16 tail_dwords = (__mmask16)((1u << ((row_bytes - s * STRIP_BYTES) / 4)) - 1);
    strip(table + s, codebook, codes, scales, s * STRIP_BYTES, ahead, tail_dwords, x + s * x_per_strip, total, R, x_rows, 0);
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < x_rows; ++m) sums[r * x_rows + m] = _mm512_reduce_add_ps(total[r][m]);
}

/* The chunk's weight rows [n0, n0 + rows) against one x tile (rows m0 .. m0 + x_rows - 1 of x):
 * sums (rows, x_rows). */
static inline __attribute__((always_inline)) void tile_rows_pass(const ql_matmul_job *job, const strip_scales *table,
                                                                 __m512 codebook, int64_t n0, int64_t rows,
                                                                 const ql_chunk *chunk, const float *x, float *sums,
                                                                 const int x_rows) {
    const int64_t n_blocks = job->padded_k / job->w->block_size;
    int64_t r = 0;
    if (x_rows <= WIDE_TILE_MAX_X_ROWS)
        for (; r + WIDE_TILE_WEIGHT_ROWS <= rows; r += WIDE_TILE_WEIGHT_ROWS)
            tile(job, table, codebook, n0 + r, chunk->scales + r * n_blocks, x, sums + r * x_rows, WIDE_TILE_WEIGHT_ROWS, x_rows);
    for (; r + TILE_WEIGHT_ROWS <= rows; r += TILE_WEIGHT_ROWS)
        tile(job, table, codebook, n0 + r, chunk->scales + r * n_blocks, x, sums + r * x_rows, TILE_WEIGHT_ROWS, x_rows);
    for (; r < rows; ++r) tile(job, table, codebook, n0 + r, chunk->scales + r * n_blocks, x, sums + r * x_rows, 1, x_rows);
}

/* y[m0 + m, n0 + r] = sums[r, m] + the chunk's outlier sums of row r against x row m0 + m. */
void ql_qmatmul_rows_avx512(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    float *scratch = job->scratch + thread_index * job->scratch_floats_per_thread;
    const strip_scales *table = strip_scales_of_call(job, scratch);
    const __m512 codebook = _mm512_loadu_ps(job->w->codebook);
    float sums[QL_ROW_GRAIN * QL_AVX512_X_TILE];  /* (rows, x_rows) */
    float *chunk_scratch = scratch + own_scratch_floats(job);
    for (int64_t n0 = n_begin, rows; n0 < n_end; n0 += rows) {
        ql_chunk chunk;
        if (!(rows = ql_chunk_next(job, n0, n_end, chunk_scratch, &chunk))) return;
        for (int64_t m0 = 0; m0 < job->m; m0 += QL_AVX512_X_TILE) {
            const int x_rows = job->m - m0 < QL_AVX512_X_TILE ? (int)(job->m - m0) : QL_AVX512_X_TILE;
            const float *x = job->x_packed + ql_avx512_x_position(0, m0, job->m, job->padded_k);
            switch (x_rows) {  /* a constant row count lets the compiler keep every accumulator in a register */
                case 1: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 1); break;
                case 2: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 2); break;
                case 3: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 3); break;
                case 4: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 4); break;
                case 5: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 5); break;
                case 6: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 6); break;
                case 7: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 7); break;
                default: tile_rows_pass(job, table, codebook, n0, rows, &chunk, x, sums, 8); break;
            }
            ql_chunk_store(job, &chunk, n0, rows, m0, x_rows, sums);
        }
    }
}

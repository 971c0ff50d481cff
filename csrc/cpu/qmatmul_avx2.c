/* AVX2 + FMA kernels for y (M, N) = x (M, K) @ W^T (this file alone is compiled with -mavx2 -mfma;
 * api.c calls it only when cpuid reports both).
 *
 * Layouts: codes (N, Kp / 2) uint8, low nibble = even column; scales (N, Kp / B) as float32 (per
 * chunk of rows the stored array, or its float16 / double-quantized form decoded, chunk.h). api.c
 * makes two float32 copies of x per call (kernels.h): x_packed, each row's groups of 8 columns in
 * the order the decode produces weights (below); for M <= 8 (Kp / 8, M, 8), per group the M rows
 * side by side, so that every load of the register path is a fixed offset from one pointer and a
 * K-slice of x is one contiguous piece of memory; for M > 8 (M, Kp), row after row, for the GEMM
 * (interleaved, its M = 9..16 ran up to 30 % slower at K = 11008); and x_columns (K, M), x
 * transposed, for the outliers.
 * Work partition: api.c hands each thread chunks of QL_ROW_GRAIN output rows (all M for each).
 *
 * Decode: 32 codes (16 bytes) -> 32 floats with in-lane byte shuffles only. The 16 float32 levels
 * are cut into 4 byte planes (plane p = byte p of every level, 16 bytes, copied into both lanes);
 * the codes go in as one byte each (lane 0: the 16 low nibbles, lane 1: the 16 high nibbles);
 * vpshufb looks each code up in every plane, and two rounds of unpacks reassemble the 4 bytes of
 * each level: 12 single-cycle shuffles per 32 weights. A 4096 x 4096 GEMV took 2.0 ms of one
 * thread's CPU time this way against 2.8 ms with vpermps + vblendvps (two cross-lane permutes and
 * a blend per 8 weights), on Zen 3.
 * The unpacks leave each group of 8 columns in the order (0, 2, 4, 6, 1, 3, 5, 7). Rather than
 * shuffle the weights back, x is stored once per call in the same order, so the products line up.
 *
 * Two paths, by the number of input rows M:
 *   Register path, M <= 8 (decode, batched decode, short prefill chunks): 32 weights are decoded
 *   into 4 registers and multiplied into all M rows of x, one 8-lane accumulator per row.
 *     M <= 4: whole weight rows, one after the other (x, at most 4 x 44 KiB, streams from L2);
 *       for each block b of row n:
 *           partial[r] = sum over the block of level * x[r]      (r < M, FMA)
 *           total[r] += partial[r] * scale[n, b]
 *       The shuffles bound M = 1, not memory: with the decode replaced by a plain cast, the same
 *       C loop ran 2.2x faster.
 *     5 <= M <= 8: 2 M accumulators would not fit the 16 ymm registers, so the levels are scaled
 *       first (level * scale, the rounding the GEMM's weights get too) and FMAed straight into
 *       the row's total. Per chunk of QL_ROW_GRAIN weight rows, K is cut into slices whose
 *       piece of x (M x slice floats) is 32 KiB, the size of L1d; every row of the chunk passes
 *       over one slice before the next (else 32 x loads per 32 weights would come from L2 or,
 *       at K = 11008, L3). Half that (16 KiB) measured 5-15 % slower at M = 8: the codes come in
 *       shorter runs per row.
 *     The 8-lane totals go to a (rows, M, 8) buffer; per output row they are reduced to one vector
 *     (lane m = row m of x) with horizontal adds.
 *   GEMM, 8 < M < QL_GEMM_MIN_M (short prefill chunks): per chunk of QL_ROW_GRAIN weight rows and
 *       a slice of K, decode (and scale) the slice into a float buffer (L1/L2), then a 3 x 4
 *       register tile (3 rows of x, 4 weight rows, 12 accumulators) runs over it: each decoded
 *       weight is reused by all M rows. From QL_GEMM_MIN_M rows on api.c calls the prefill GEMM of
 *       gemm_avx2.c instead (it decodes each weight once per call, with a lower cost per row of x).
 * Outliers: per chunk, before the dense part, their sums against every row of x (chunk.h); each
 * output adds its row's. */
#include <immintrin.h>
#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "quantlite_decode.h"

#define LANES 8                      /* floats per ymm register */
#define REGISTER_MAX_M QL_PACKED_MAX_M /* M up to this: the register path (one vector of results per weight row) */
#define SCALED_SUM_MAX_M 4           /* M up to this: scale each block's sum, not the levels */
#define REGISTER_X_SLICE_BYTES 32768 /* x's K-slice in the register path (M > 4): the size of L1d */
#define GEMM_ROW_TILE 4     /* weight rows per register tile */
#define GEMM_X_TILE 3       /* x rows per register tile: 3 x 4 accumulators + 3 x + 1 weight = 16 ymm */
#define GEMM_K_SLICE 256    /* columns decoded at once: 32 rows x 256 x 4 B = 32 KiB, about L1 */

/* ---------------------------------------------------------------- decode */
typedef struct {
    __m256i plane[4];  /* plane[p] byte c (both lanes) = byte p of codebook[c]'s float32 */
} level_planes;

static level_planes make_planes(const float *codebook) {
    uint8_t bytes[4][32];
    for (int c = 0; c < 16; ++c) {
        uint32_t bits = ql_float_to_bits(codebook[c]);
        for (int p = 0; p < 4; ++p) bytes[p][c] = bytes[p][c + 16] = (uint8_t)(bits >> (8 * p));
    }
    level_planes planes;
    for (int p = 0; p < 4; ++p) planes.plane[p] = _mm256_loadu_si256((const __m256i *)bytes[p]);
    return planes;
}

/* 16 bytes of codes at `bytes` (columns 2j .. 2j + 31 of a row, j = byte offset) -> their levels:
 * out[i] = columns 2j + 8i + (0, 2, 4, 6, 1, 3, 5, 7). Only out[0..1] when `half_width` (8 bytes). */
static inline __attribute__((always_inline)) void decode32(const level_planes *planes, const uint8_t *bytes,
                                                           __m256 out[4], const int half_width) {
    const __m128i raw = half_width ? _mm_loadl_epi64((const __m128i *)bytes) : _mm_loadu_si128((const __m128i *)bytes);
    /* lane 0: low nibbles (even columns), lane 1: high nibbles (odd columns) */
    const __m256i codes = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_broadcastsi128_si256(raw), _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
        _mm256_set1_epi8(0x0F));
    const __m256i byte0 = _mm256_shuffle_epi8(planes->plane[0], codes);
    const __m256i byte1 = _mm256_shuffle_epi8(planes->plane[1], codes);
    const __m256i byte2 = _mm256_shuffle_epi8(planes->plane[2], codes);
    const __m256i byte3 = _mm256_shuffle_epi8(planes->plane[3], codes);
    const __m256i low01 = _mm256_unpacklo_epi8(byte0, byte1), low23 = _mm256_unpacklo_epi8(byte2, byte3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23));  /* code bytes 0-3 */
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23));  /* code bytes 4-7 */
    if (half_width) return;
    const __m256i high01 = _mm256_unpackhi_epi8(byte0, byte1), high23 = _mm256_unpackhi_epi8(byte2, byte3);
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23));  /* code bytes 8-11 */
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23));  /* code bytes 12-15 */
}

/* ---------------------------------------------------------------- outputs */
static inline float horizontal_sum(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* lane m = the sum of v[m]'s 8 lanes. */
static inline __m256 lane_sums(const __m256 v[LANES]) {
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 q0123 = _mm256_hadd_ps(h01, h23), q4567 = _mm256_hadd_ps(h45, h67);  /* per 128-bit half */
    return _mm256_add_ps(_mm256_permute2f128_ps(q0123, q4567, 0x20), _mm256_permute2f128_ps(q0123, q4567, 0x31));
}

/* y[m0 + m, n] = lane m of dense (m < x_rows) + the outliers of row n (the chunk's row r). */
static inline void store_outputs(const ql_matmul_job *job, const ql_chunk *chunk, int64_t n, int64_t r, int64_t m0,
                                 int x_rows, __m256 dense) {
    float values[LANES];
    _mm256_storeu_ps(values, dense);
    for (int m = 0; m < x_rows; ++m)
        ql_store(job->y, job->dtype, (m0 + m) * job->y_row_stride + n, values[m] + chunk->outliers[r * job->m + m0 + m]);
}

/* ---------------------------------------------------------------- register path (M <= 8) */
/* In this path x_rows is M, a compile-time constant in each copy the dispatch instantiates. */

/* acc[r][i % accs] += levels[i] * x row r's i-th group of 8 columns, for i < count; x points at
 * x_packed's first group (x_rows rows of 8 floats per group). */
static inline __attribute__((always_inline)) void accumulate(const __m256 levels[4], const int count, const float *x,
                                                             __m256 acc[REGISTER_MAX_M][4], const int x_rows,
                                                             const int accs) {
    for (int i = 0; i < count; ++i)
        for (int r = 0; r < x_rows; ++r)
            acc[r][i % accs] = _mm256_fmadd_ps(levels[i], _mm256_loadu_ps(x + (i * x_rows + r) * 8), acc[r][i % accs]);
}

/* Weight row n (float32 scales at scale_row), columns [k0, k0 + length) (whole blocks), against all
 * x_rows rows of x; the 8-lane partial sums are added to row_sums (x_rows, 8). */
static inline __attribute__((always_inline)) void row_slice(const ql_matmul_job *job, const level_planes *planes,
                                                            int64_t n, const float *scale_row, int64_t k0,
                                                            int64_t length, float *row_sums, const int x_rows) {
    /* Up to 4 rows: per block, sum level * x, then scale that sum once (total += scale * partial),
     * in `accs` independent chains per row (FMA latency is 4 cycles: one chain would stall at M = 1).
     * More rows: registers are short, so the levels are scaled (4 multiplies per 32 weights, the
     * rounding of the weights the GEMM path has too) and each row has one chain, its total. */
    const int scale_sums = x_rows <= SCALED_SUM_MAX_M;
    const int accs = x_rows == 1 ? 4 : x_rows == 2 ? 2 : 1;
    const ql_weight *w = job->w;
    const int64_t block = w->block_size, kp = job->padded_k;
    const int64_t wide_bytes = block / 2 / 16 * 16;       /* bytes per block in 16-byte steps */
    const uint8_t *bytes = w->codes + n * (kp / 2) + k0 / 2;
    const float *scales = scale_row + k0 / block;
    const float *x = job->x_packed + k0 * x_rows;         /* 1 byte of codes = 2 columns = 2 * x_rows floats */

    __m256 total[REGISTER_MAX_M], acc[REGISTER_MAX_M][4], levels[4];
    for (int r = 0; r < x_rows; ++r) {
        total[r] = _mm256_setzero_ps();
        for (int a = 0; a < accs; ++a) acc[r][a] = _mm256_setzero_ps();
    }
    for (int64_t start = 0; start < length; start += block, bytes += block / 2, x += block * x_rows) {
        const __m256 scale = _mm256_broadcast_ss(scales + start / block);
        if (scale_sums)
            for (int r = 0; r < x_rows; ++r)
                for (int a = 0; a < accs; ++a) acc[r][a] = _mm256_setzero_ps();
        for (int64_t j = 0; j < wide_bytes; j += 16) {
            decode32(planes, bytes + j, levels, 0);
            if (!scale_sums)
                for (int i = 0; i < 4; ++i) levels[i] = _mm256_mul_ps(levels[i], scale);
            accumulate(levels, 4, x + 2 * j * x_rows, acc, x_rows, accs);
        }
        if (wide_bytes < block / 2) {  /* B = 48, 80, ...: 8 bytes left */
            decode32(planes, bytes + wide_bytes, levels, 1);
            if (!scale_sums)
                for (int i = 0; i < 2; ++i) levels[i] = _mm256_mul_ps(levels[i], scale);
            accumulate(levels, 2, x + 2 * wide_bytes * x_rows, acc, x_rows, accs);
        }
        if (scale_sums)
            for (int r = 0; r < x_rows; ++r) {
                __m256 sum = acc[r][0];
                for (int a = 1; a < accs; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
                total[r] = _mm256_fmadd_ps(sum, scale, total[r]);
            }
    }
    for (int r = 0; r < x_rows; ++r) {
        float *sums = row_sums + r * 8;
        _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_loadu_ps(sums), scale_sums ? total[r] : acc[r][0]));
    }
}

/* Columns per K-slice. Up to 4 rows of x, whole rows: x streams from L2 (at most 16 loads per 32
 * weights) and the codes stream in order (slicing measured slower there). More: whole blocks, x's
 * slice (x_rows * slice * 4 B) within REGISTER_X_SLICE_BYTES, so that it stays close while the
 * chunk's weight rows pass over it. */
static int64_t register_slice_length(int64_t block, int64_t kp, int64_t x_rows) {
    if (x_rows <= SCALED_SUM_MAX_M) return kp;
    const int64_t fitting = REGISTER_X_SLICE_BYTES / (4 * x_rows) / block * block;
    return fitting < block ? block : fitting > kp ? kp : fitting;
}

/* The chunk's weight rows [n0, n0 + rows), rows <= QL_ROW_GRAIN, against all x_rows = M rows of x. */
static inline __attribute__((always_inline)) void register_rows(const ql_matmul_job *job, const level_planes *planes,
                                                                const ql_chunk *chunk, int64_t n0, int64_t rows,
                                                                float *sums, const int x_rows) {
    const int64_t kp = job->padded_k, slice = register_slice_length(job->w->block_size, kp, x_rows);
    const int64_t n_blocks = kp / job->w->block_size;
    memset(sums, 0, sizeof(float) * rows * x_rows * 8);  /* (rows, x_rows, 8) */
    for (int64_t k0 = 0; k0 < kp; k0 += slice) {
        const int64_t length = kp - k0 < slice ? kp - k0 : slice;
        for (int64_t r = 0; r < rows; ++r)
            row_slice(job, planes, n0 + r, chunk->scales + r * n_blocks, k0, length, sums + r * x_rows * 8, x_rows);
    }
    for (int64_t r = 0; r < rows; ++r) {
        __m256 row_sums[LANES];
        for (int m = 0; m < LANES; ++m)
            row_sums[m] = m < x_rows ? _mm256_loadu_ps(sums + (r * x_rows + m) * 8) : _mm256_setzero_ps();
        store_outputs(job, chunk, n0 + r, r, 0, x_rows, lane_sums(row_sums));
    }
}

/* ---------------------------------------------------------------- GEMM (8 < M < QL_GEMM_MIN_M) */
/* Weight row n (float32 scales at scale_row), columns [k0, k0 + length) (whole blocks), dequantized
 * and scaled into out, in x_packed's column order. */
static void decode_slice(const ql_weight *w, const level_planes *planes, int64_t kp, int64_t n,
                         const float *scale_row, int64_t k0, int64_t length, float *out) {
    const int64_t block = w->block_size, wide_bytes = block / 2 / 16 * 16;
    __m256 levels[4];
    for (int64_t start = 0; start < length; start += block) {
        const int64_t b = (k0 + start) / block;
        const __m256 scale = _mm256_broadcast_ss(scale_row + b);
        const uint8_t *bytes = w->codes + n * (kp / 2) + b * (block / 2);
        for (int64_t j = 0; j < wide_bytes; j += 16) {
            decode32(planes, bytes + j, levels, 0);
            for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + start + 2 * j + 8 * i, _mm256_mul_ps(levels[i], scale));
        }
        if (wide_bytes < block / 2) {
            decode32(planes, bytes + wide_bytes, levels, 1);
            for (int i = 0; i < 2; ++i) _mm256_storeu_ps(out + start + 2 * wide_bytes + 8 * i, _mm256_mul_ps(levels[i], scale));
        }
    }
}

/* sums (x_rows, 4) += x (x_rows, length) . weights (4, length)^T; x points into x_packed (M > 8:
 * rows Kp floats apart, groups of 8 columns one after the other), weights in its column order. */
static inline __attribute__((always_inline)) void register_tile(const float *x, int64_t x_stride,
                                                                const float *weights, int64_t w_stride,
                                                                int64_t length, float *sums,
                                                                int64_t sums_stride, const int x_rows) {
    __m256 acc[GEMM_X_TILE][GEMM_ROW_TILE];
    for (int i = 0; i < x_rows; ++i)
        for (int r = 0; r < GEMM_ROW_TILE; ++r) acc[i][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < length; k += 8) {
        __m256 xv[GEMM_X_TILE];
        for (int i = 0; i < x_rows; ++i) xv[i] = _mm256_loadu_ps(x + i * x_stride + k);
        for (int r = 0; r < GEMM_ROW_TILE; ++r) {
            const __m256 wv = _mm256_loadu_ps(weights + r * w_stride + k);
            for (int i = 0; i < x_rows; ++i) acc[i][r] = _mm256_fmadd_ps(xv[i], wv, acc[i][r]);
        }
    }
    for (int i = 0; i < x_rows; ++i)
        for (int r = 0; r < GEMM_ROW_TILE; ++r) sums[i * sums_stride + r] += horizontal_sum(acc[i][r]);
}

static int64_t gemm_slice_length(int64_t block) {
    return block >= GEMM_K_SLICE ? block : GEMM_K_SLICE / block * block;
}

static int64_t own_scratch_floats(const ql_matmul_job *job) {
    if (job->m <= REGISTER_MAX_M) return QL_ROW_GRAIN * job->m * LANES;
    return QL_ROW_GRAIN * gemm_slice_length(job->w->block_size) + job->m * QL_ROW_GRAIN;
}

/* ... then the chunk's (chunk.h). */
int64_t ql_avx2_scratch_floats(const ql_matmul_job *job) {
    return own_scratch_floats(job) + ql_chunk_scratch_floats(job);
}

/* The chunk's weight rows [n0, n0 + rows), rows <= QL_ROW_GRAIN, against all M rows of x. */
static void gemm_rows(const ql_matmul_job *job, const level_planes *planes, const ql_chunk *chunk, int64_t n0,
                      int64_t rows, float *scratch) {
    const ql_weight *w = job->w;
    const int64_t kp = job->padded_k, slice = gemm_slice_length(w->block_size);
    const int64_t tiles = (rows + GEMM_ROW_TILE - 1) / GEMM_ROW_TILE;
    float *weights = scratch;                          /* (tiles * 4, slice) float32, x_packed's column order */
    float *sums = scratch + QL_ROW_GRAIN * slice;      /* (M, QL_ROW_GRAIN) float32 */
    memset(sums, 0, sizeof(float) * job->m * QL_ROW_GRAIN);
    for (int64_t k0 = 0; k0 < kp; k0 += slice) {
        const int64_t length = kp - k0 < slice ? kp - k0 : slice;
        for (int64_t r = 0; r < tiles * GEMM_ROW_TILE; ++r) {
            if (r < rows) decode_slice(w, planes, kp, n0 + r, chunk->scales + r * (kp / w->block_size), k0, length, weights + r * slice);
            else memset(weights + r * slice, 0, sizeof(float) * length);  /* tile padding */
        }
        for (int64_t m0 = 0; m0 < job->m; m0 += GEMM_X_TILE) {
            const float *x = job->x_packed + m0 * kp + k0;
            for (int64_t t = 0; t < tiles; ++t) {
                const float *tile_weights = weights + t * GEMM_ROW_TILE * slice;
                float *tile_sums = sums + m0 * QL_ROW_GRAIN + t * GEMM_ROW_TILE;
                switch (job->m - m0 < GEMM_X_TILE ? job->m - m0 : GEMM_X_TILE) {
                    case 1: register_tile(x, kp, tile_weights, slice, length, tile_sums, QL_ROW_GRAIN, 1); break;
                    case 2: register_tile(x, kp, tile_weights, slice, length, tile_sums, QL_ROW_GRAIN, 2); break;
                    default: register_tile(x, kp, tile_weights, slice, length, tile_sums, QL_ROW_GRAIN, 3); break;
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t m0 = 0; m0 < job->m; m0 += LANES) {
            const int x_rows = job->m - m0 < LANES ? (int)(job->m - m0) : LANES;
            float dense[LANES] = {0};
            for (int m = 0; m < x_rows; ++m) dense[m] = sums[(m0 + m) * QL_ROW_GRAIN + r];
            store_outputs(job, chunk, n0 + r, r, m0, x_rows, _mm256_loadu_ps(dense));
        }
}

void ql_qmatmul_rows_avx2(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const level_planes planes = make_planes(job->w->codebook);
    float *scratch = job->scratch + thread_index * job->scratch_floats_per_thread;
    float *chunk_scratch = scratch + own_scratch_floats(job);
    for (int64_t n0 = n_begin, rows; n0 < n_end; n0 += rows) {
        ql_chunk chunk;
        if (!(rows = ql_chunk_next(job, n0, n_end, chunk_scratch, &chunk))) return;
        switch (job->m) {  /* a constant row count lets the compiler keep every accumulator in a register */
            case 1: register_rows(job, &planes, &chunk, n0, rows, scratch, 1); break;
            case 2: register_rows(job, &planes, &chunk, n0, rows, scratch, 2); break;
            case 3: register_rows(job, &planes, &chunk, n0, rows, scratch, 3); break;
            case 4: register_rows(job, &planes, &chunk, n0, rows, scratch, 4); break;
            case 5: register_rows(job, &planes, &chunk, n0, rows, scratch, 5); break;
            case 6: register_rows(job, &planes, &chunk, n0, rows, scratch, 6); break;
            case 7: register_rows(job, &planes, &chunk, n0, rows, scratch, 7); break;
            case 8: register_rows(job, &planes, &chunk, n0, rows, scratch, 8); break;
            default: gemm_rows(job, &planes, &chunk, n0, rows, scratch); break;
        }
    }
}

/* ---------------------------------------------------------------- the quantizer's encoder */
/* code = #{i : mid[i] < v}: 15 compares whose all-ones masks (-1) are subtracted from a counter. */
void ql_encode_rows_avx2(const ql_encode_job *job, int64_t n_begin, int64_t n_end) {
    const int64_t block = job->block_size, n_blocks = job->padded_k / block;
    float mid[15];
    ql_midpoints(job->codebook, mid);
    __m256 mid_vec[15];
    for (int i = 0; i < 15; ++i) mid_vec[i] = _mm256_set1_ps(mid[i]);
    uint8_t block_codes[4096];  /* one block's codes, unpacked; B <= 4096 is checked by the caller */
    int32_t lane_codes[8];
    for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t b = 0; b < n_blocks; ++b) {
            const float *w = job->blocks + n * job->padded_k + b * block;
            const float scale = job->scales[n * n_blocks + b];
            const __m256 reciprocal = _mm256_set1_ps(ql_block_reciprocal(scale));
            for (int64_t j = 0; j < block; j += 8) {
                const __m256 normalized = _mm256_mul_ps(_mm256_loadu_ps(w + j), reciprocal);
                __m256i count = _mm256_setzero_si256();
                for (int i = 0; i < 15; ++i)
                    count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(mid_vec[i], normalized, _CMP_LT_OQ)));
                _mm256_storeu_si256((__m256i *)lane_codes, count);
                for (int l = 0; l < 8; ++l) block_codes[j + l] = (uint8_t)lane_codes[l];
            }
            ql_finish_block(job, n, b, block_codes, w, scale);
        }
    }
}

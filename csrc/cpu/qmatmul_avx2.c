/* AVX2 + FMA kernels for y (M, N) = x (M, K) @ W^T (this file alone is compiled with -mavx2 -mfma;
 * api.c calls it only when cpuid reports both).
 *
 * Layouts: codes (N, Kp / 2) uint8, low nibble = even column; scales (N, Kp / B) float32; x_perm
 * (M, Kp) float32, x in the order the decode produces weights (below), made by api.c per call.
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
 *   GEMV, M <= 4 (decode): each weight row is streamed once and decoded in registers.
 *       for each block b of row n:
 *           partial[r] = sum over the block of level * x_perm[r]      (r < M, FMA)
 *           total[r] += partial[r] * scale[n, b]
 *       y[r, n] = sum(total[r]) + outliers
 *     The shuffles bound it, not memory: with the decode replaced by a plain cast, the same C loop
 *     ran 2.2x faster.
 *   GEMM, M > 4 (prefill): per chunk of QL_ROW_GRAIN weight rows and a slice of K, decode (and
 *       scale) the slice into a float buffer (L1/L2), then a 3 x 4 register tile (3 rows of x, 4
 *       weight rows, 12 accumulators) runs over it: each decoded weight is reused by all M rows.
 * Outliers are added per output element after the dense part. */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"
#include "quantlite_decode.h"

#define GEMV_MAX_ROWS 4     /* rows of x one GEMV pass serves */
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

/* ---------------------------------------------------------------- helpers */
static inline float horizontal_sum(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* Row n's outliers against one row of x_perm: 8 at a time with a gather (a scalar loop took
 * ~0.4 ms of a 2.2 ms 4096 x 4096 GEMV at 0.5 % outliers), then the rest one by one. */
static inline float outlier_sum(const ql_weight *w, int64_t n, const float *x_perm_row) {
    int64_t e = w->row_ptr[n];
    const int64_t end = w->row_ptr[n + 1];
    __m256 acc = _mm256_setzero_ps();
    for (; e + 8 <= end; e += 8) {
        const __m256i col = _mm256_loadu_si256((const __m256i *)(w->cols + e));
        /* ql_perm_position, 8 lanes: (k & ~7) + 4 * (k & 1) + (k & 7) / 2 */
        const __m256i position = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_and_si256(col, _mm256_set1_epi32(~7)),
                             _mm256_slli_epi32(_mm256_and_si256(col, _mm256_set1_epi32(1)), 2)),
            _mm256_srli_epi32(_mm256_and_si256(col, _mm256_set1_epi32(7)), 1));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w->vals + e), _mm256_i32gather_ps(x_perm_row, position, 4), acc);
    }
    float sum = horizontal_sum(acc);
    for (; e < end; ++e) sum += w->vals[e] * x_perm_row[ql_perm_position(w->cols[e])];
    return sum;
}

/* ---------------------------------------------------------------- GEMV (M <= 4) */
/* One weight row n against `rows` rows of x. Per block: sum level * x in ACCS independent
 * accumulators per row (FMA latency is 4 cycles; one chain per row would stall at M = 1), then
 * total += scale * that sum. */
static inline __attribute__((always_inline)) void gemv_row(const ql_matmul_job *job, const level_planes *planes,
                                                           int64_t n, const int rows) {
    const int ACCS = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    const ql_weight *w = job->w;
    const int64_t block = w->block_size, kp = job->padded_k, n_blocks = kp / block;
    const int64_t wide_bytes = block / 2 / 16 * 16;        /* bytes per block in 16-byte steps */
    const uint8_t *code_row = w->codes + n * (kp / 2);     /* (Kp / 2,) */
    const float *scale_row = w->scales + n * n_blocks;      /* (Kp / B,) */
    const float *x = job->x_perm;                          /* (rows, Kp) permuted order */

    __m256 total[GEMV_MAX_ROWS], partial[GEMV_MAX_ROWS][4], levels[4];
    for (int r = 0; r < rows; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        for (int r = 0; r < rows; ++r)
            for (int a = 0; a < ACCS; ++a) partial[r][a] = _mm256_setzero_ps();
        const uint8_t *bytes = code_row + b * (block / 2);
        const float *xb = x + b * block;
        for (int64_t j = 0; j < wide_bytes; j += 16) {
            decode32(planes, bytes + j, levels, 0);
            for (int i = 0; i < 4; ++i)
                for (int r = 0; r < rows; ++r)
                    partial[r][i % ACCS] = _mm256_fmadd_ps(levels[i], _mm256_loadu_ps(xb + r * kp + 2 * j + 8 * i), partial[r][i % ACCS]);
        }
        if (wide_bytes < block / 2) {  /* B = 48, 80, ...: 8 bytes left */
            decode32(planes, bytes + wide_bytes, levels, 1);
            for (int i = 0; i < 2; ++i)
                for (int r = 0; r < rows; ++r)
                    partial[r][i % ACCS] = _mm256_fmadd_ps(levels[i], _mm256_loadu_ps(xb + r * kp + 2 * wide_bytes + 8 * i), partial[r][i % ACCS]);
        }
        const __m256 scale = _mm256_broadcast_ss(scale_row + b);
        for (int r = 0; r < rows; ++r) {
            __m256 sum = partial[r][0];
            for (int a = 1; a < ACCS; ++a) sum = _mm256_add_ps(sum, partial[r][a]);
            total[r] = _mm256_fmadd_ps(sum, scale, total[r]);
        }
    }
    for (int r = 0; r < rows; ++r) {
        float value = horizontal_sum(total[r]) + outlier_sum(w, n, x + r * kp);
        ql_store(job->y, job->dtype, r * job->y_row_stride + n, value);
    }
}

/* ---------------------------------------------------------------- GEMM (M > 4) */
/* Weight row n, columns [k0, k0 + length) (whole blocks), dequantized and scaled into out, in
 * x_perm's order. */
static void decode_slice(const ql_weight *w, const level_planes *planes, int64_t kp, int64_t n, int64_t k0,
                         int64_t length, float *out) {
    const int64_t block = w->block_size, wide_bytes = block / 2 / 16 * 16;
    __m256 levels[4];
    for (int64_t start = 0; start < length; start += block) {
        const int64_t b = (k0 + start) / block;
        const __m256 scale = _mm256_broadcast_ss(w->scales + n * (kp / block) + b);
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

/* sums (x_rows, 4) += x (x_rows, length) . weights (4, length)^T, both in x_perm order. */
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

static int64_t slice_length(int64_t block) {
    return block >= GEMM_K_SLICE ? block : GEMM_K_SLICE / block * block;
}

int64_t ql_avx2_scratch_floats(const ql_matmul_job *job) {
    if (job->m <= GEMV_MAX_ROWS) return 0;
    return QL_ROW_GRAIN * slice_length(job->w->block_size) + job->m * QL_ROW_GRAIN;
}

/* Weight rows [n0, n0 + rows), rows <= QL_ROW_GRAIN, against all M rows of x. */
static void gemm_rows(const ql_matmul_job *job, const level_planes *planes, int64_t n0, int64_t rows, float *scratch) {
    const ql_weight *w = job->w;
    const int64_t kp = job->padded_k, slice = slice_length(w->block_size);
    const int64_t tiles = (rows + GEMM_ROW_TILE - 1) / GEMM_ROW_TILE;
    float *weights = scratch;                          /* (tiles * 4, slice) float32, x_perm order */
    float *sums = scratch + QL_ROW_GRAIN * slice;      /* (M, QL_ROW_GRAIN) float32 */
    memset(sums, 0, sizeof(float) * job->m * QL_ROW_GRAIN);
    for (int64_t k0 = 0; k0 < kp; k0 += slice) {
        const int64_t length = kp - k0 < slice ? kp - k0 : slice;
        for (int64_t r = 0; r < tiles * GEMM_ROW_TILE; ++r) {
            if (r < rows) decode_slice(w, planes, kp, n0 + r, k0, length, weights + r * slice);
            else memset(weights + r * slice, 0, sizeof(float) * length);  /* tile padding */
        }
        for (int64_t m0 = 0; m0 < job->m; m0 += GEMM_X_TILE) {
            const float *x = job->x_perm + m0 * kp + k0;
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
    for (int64_t m = 0; m < job->m; ++m)
        for (int64_t r = 0; r < rows; ++r) {
            float value = sums[m * QL_ROW_GRAIN + r] + outlier_sum(w, n0 + r, job->x_perm + m * kp);
            ql_store(job->y, job->dtype, m * job->y_row_stride + n0 + r, value);
        }
}

void ql_qmatmul_rows_avx2(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const level_planes planes = make_planes(job->w->codebook);
    if (job->m > GEMV_MAX_ROWS) {
        float *scratch = job->scratch + thread_index * job->scratch_floats_per_thread;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += QL_ROW_GRAIN)
            gemm_rows(job, &planes, n0, n_end - n0 < QL_ROW_GRAIN ? n_end - n0 : QL_ROW_GRAIN, scratch);
        return;
    }
    for (int64_t n = n_begin; n < n_end; ++n) {
        switch (job->m) {  /* a constant row count lets the compiler keep every accumulator in a register */
            case 1: gemv_row(job, &planes, n, 1); break;
            case 2: gemv_row(job, &planes, n, 2); break;
            case 3: gemv_row(job, &planes, n, 3); break;
            default: gemv_row(job, &planes, n, 4); break;
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

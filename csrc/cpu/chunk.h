/* What the vector kernels (qmatmul_avx2.c, qmatmul_avx512.c) do per chunk of at most QL_ROW_GRAIN
 * weight rows before their register tiles, on the weight as stored (quantlite.h: no widened copy
 * of any tensor exists):
 *
 *   scales    the chunk's (rows, Kp / B) scales as float32: the stored array itself when it is
 *             float32, else decoded into the thread's scratch, float16 with vcvtph2ps and double-
 *             quantized codes with one multiply and one add per vector (the format's float32
 *             arithmetic, so the same values as QWeight.block_scales()). 1 / B of the weights' work.
 *   outliers  the chunk's (rows, M) outlier sums, sum_e vals[e] * x[m, cols[e]] over each row's CSR
 *             entries. M = 1 (decode): all of the chunk's outliers at once in pieces of OUTLIER_PIECE,
 *             16 (8 with AVX2) per vector: columns widened from uint16 or loaded as int32, checked
 *             against K, x gathered at them, values widened from float16, multiplied, stored to a
 *             contiguous buffer; then each row's products are summed lane-wise with one masked load
 *             per 16, and 16 rows' lane vectors reduced together (a transposing fold: 15 folds for
 *             16 rows, not a horizontal reduction per row, which cost ~1 ns an outlier at SmolLM2's
 *             ~6 outliers a row). No dependent chain, no per-outlier branch (the per-row gather and
 *             reduction it replaces, after a scalar check of every column per call, cost 1.1-2.3 ns
 *             an outlier).
 *             M > 1: per outlier, its value times x_columns' row of its column (M floats).
 *
 * The CSR is checked here, where it is read, and not in a separate pass per call: row_ptr must
 * rise within [0, nnz] over the chunk's rows, and every column lie in [0, K) (a column outside is
 * never used as an index). A bad chunk returns QL_ERR_BAD_OUTLIERS and the call reports it.
 * The header is included by each vector file and compiled with its instruction set. */
#ifndef QL_CPU_CHUNK_H
#define QL_CPU_CHUNK_H

#include <immintrin.h>
#include <string.h>

#include "kernels.h"
#include "quantlite_decode.h"

#if defined(__AVX512F__)
#define CHUNK_LANES 16
#else
#define CHUNK_LANES 8
#endif
#define OUTLIER_PIECE 1024  /* products buffered at a time (4 KiB, L1) */

typedef struct {
    const float *scales;    /* (rows, Kp / B) float32: row r at scales + r * (Kp / B) */
    const float *outliers;  /* (rows, M) float32: row r's outliers against x row m */
} ql_chunk;

/* Scratch floats per thread for ql_chunk_begin, after the kernel's own: the decoded scales
 * (rows, Kp / B), the outlier sums (rows, M) + 16 (the fold stores 16 at a time), the products of a
 * piece + 16 (full vectors past its end), the rows' lane vectors (rows, CHUNK_LANES). */
static inline int64_t ql_chunk_scratch_floats(const ql_matmul_job *job) {
    return QL_ROW_GRAIN * (job->padded_k / job->w->block_size) + QL_ROW_GRAIN * job->m + 16 + OUTLIER_PIECE + 16 +
           QL_ROW_GRAIN * CHUNK_LANES;
}

/* Scales [first, first + count) of the row-major (N, Kp / B) scales, as float32, into out. */
static inline void ql_decode_scales(const ql_weight *w, int64_t first, int64_t count, float *out) {
    int64_t i = 0;
    if (w->scale_kind == QL_SCALES_F16) {
        const uint16_t *bits = (const uint16_t *)w->scales + first;
#if defined(__AVX512F__)
        for (; i + 16 <= count; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bits + i))));
#else
        for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bits + i))));
#endif
        for (; i < count; ++i) out[i] = _cvtsh_ss(bits[i]);
        return;
    }
    const uint8_t *codes = (const uint8_t *)w->scales + first;  /* QL_SCALES_DQ */
    while (i < count) {
        const int64_t group = (first + i) / QL_SCALE_GROUP;
        const int64_t group_end = (group + 1) * QL_SCALE_GROUP - first, end = group_end < count ? group_end : count;
        const float low = w->scale_group_min[group], step = w->scale_group_step[group];
#if defined(__AVX512F__)
        for (; i + 16 <= end; i += 16) {
            const __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i))));
            _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_set1_ps(low), _mm512_mul_ps(code, _mm512_set1_ps(step))));
        }
#else
        for (; i + 8 <= end; i += 8) {
            const __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i))));
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_set1_ps(low), _mm256_mul_ps(code, _mm256_set1_ps(step))));
        }
#endif
        for (; i < end; ++i) out[i] = low + (float)codes[i] * step;
    }
}

#if defined(__AVX512F__)
typedef __m512i chunk_index;
typedef __m512 chunk_floats;
typedef __mmask16 chunk_mask;
#else
typedef __m256i chunk_index;
typedef __m256 chunk_floats;
typedef __m256i chunk_mask;
#endif

/* The lanes [0, left) of a vector (left may exceed CHUNK_LANES). */
static inline chunk_mask lanes_below(int64_t left) {
#if defined(__AVX512F__)
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
#else
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left > 8 ? 8 : (int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#endif
}

/* CHUNK_LANES 16-bit elements from p on (`left` of them real; the rest zero, nothing read past them). */
#if defined(__AVX512F__)
typedef __m256i chunk_halves;
#else
typedef __m128i chunk_halves;
#endif
static inline chunk_halves load_halves(const uint16_t *p, int64_t left) {
    uint16_t tail[CHUNK_LANES] = {0};
    if (left < CHUNK_LANES) p = (const uint16_t *)memcpy(tail, p, sizeof(uint16_t) * (size_t)left);
#if defined(__AVX512F__)
    return _mm256_loadu_si256((const __m256i *)p);
#else
    return _mm_loadu_si128((const __m128i *)p);
#endif
}

/* Outliers e .. e + CHUNK_LANES: their columns as int32 and values as float32, each widened from 16
 * bits or loaded as stored (lanes at and past `left` zero). */
static inline void load_outliers(const ql_weight *w, int64_t e, int64_t left, chunk_index *cols, chunk_floats *vals) {
    const int cols_u16 = w->col_kind == QL_COLS_U16, vals_f16 = w->val_kind == QL_VALS_F16;
#if defined(__AVX512F__)
    *cols = cols_u16 ? _mm512_cvtepu16_epi32(load_halves((const uint16_t *)w->cols + e, left))
                     : _mm512_maskz_loadu_epi32(lanes_below(left), (const int32_t *)w->cols + e);
    *vals = vals_f16 ? _mm512_cvtph_ps(load_halves((const uint16_t *)w->vals + e, left))
                     : _mm512_maskz_loadu_ps(lanes_below(left), (const float *)w->vals + e);
#else
    *cols = cols_u16 ? _mm256_cvtepu16_epi32(load_halves((const uint16_t *)w->cols + e, left))
                     : _mm256_maskload_epi32((const int32_t *)w->cols + e, lanes_below(left));
    *vals = vals_f16 ? _mm256_cvtph_ps(load_halves((const uint16_t *)w->vals + e, left))
                     : _mm256_maskload_ps((const float *)w->vals + e, lanes_below(left));
#endif
}

/* products[i] = vals[p0 + i] * x[cols[p0 + i]] for i < count (x: K float32, M = 1). 0 when a
 * column lies outside [0, K) (that lane is not gathered). */
static inline int single_x_products(const ql_weight *w, const float *x, int64_t p0, int64_t count, float *products) {
    for (int64_t i = 0; i < count; i += CHUNK_LANES) {
        const int64_t left = count - i;
        chunk_index cols;
        chunk_floats vals;
        load_outliers(w, p0 + i, left, &cols, &vals);
#if defined(__AVX512F__)
        const __mmask16 real = lanes_below(left), valid = _mm512_mask_cmplt_epu32_mask(real, cols, _mm512_set1_epi32((int)w->k));
        if (valid != real) return 0;
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, cols, x, 4);
        _mm512_storeu_ps(products + i, _mm512_mul_ps(vals, xv));
#else
        const __m256i real = lanes_below(left);
        const __m256i inside = _mm256_and_si256(_mm256_cmpgt_epi32(cols, _mm256_set1_epi32(-1)),
                                                _mm256_cmpgt_epi32(_mm256_set1_epi32((int)w->k), cols));
        if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(inside, real)))) return 0;
        const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, cols, _mm256_castsi256_ps(real), 4);
        _mm256_storeu_ps(products + i, _mm256_mul_ps(vals, xv));
#endif
    }
    return 1;
}

/* The lane-wise sum of products[begin .. end) (end >= begin), one masked load per CHUNK_LANES. */
static inline chunk_floats products_vector(const float *products, int64_t begin, int64_t end) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_maskz_loadu_ps(lanes_below(end - begin), products + begin);
    for (int64_t e = begin + 16; e < end; e += 16) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(lanes_below(end - e), products + e));
#else
    __m256 acc = _mm256_maskload_ps(products + begin, lanes_below(end - begin));
    for (int64_t e = begin + 8; e < end; e += 8) acc = _mm256_add_ps(acc, _mm256_maskload_ps(products + e, lanes_below(end - e)));
#endif
    return acc;
}

#if defined(__AVX512F__)
/* One level of a transposing reduction: lane l of the result = p[l] + p[l ^ h] where bit h of l is
 * clear, q[l] + q[l ^ h] where it is set (mask = the lanes with bit h set, swap = the lanes l ^ h). */
#define FOLD(p, q, mask, swap) _mm512_add_ps(_mm512_mask_blend_ps(mask, p, q), swap(_mm512_mask_blend_ps(mask, q, p)))
#define SWAP8(v) _mm512_shuffle_f32x4(v, v, 0x4E)
#define SWAP4(v) _mm512_shuffle_f32x4(v, v, 0xB1)
#define SWAP2(v) _mm512_permute_ps(v, 0x4E)
#define SWAP1(v) _mm512_permute_ps(v, 0xB1)

/* sums[i] += the 16 lanes of v[i] added up, i < 16: 15 folds (2 blends, 1 shuffle, 1 add each) for
 * all 16 rather than one _mm512_reduce_add_ps (~9 dependent operations) per row. */
static inline void add_lane_sums16(const __m512 v[16], float *sums) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i) a[i] = FOLD(v[2 * i], v[2 * i + 1], 0xFF00, SWAP8);  /* lane bit 3 = i's bit 0 */
    for (int i = 0; i < 4; ++i) b[i] = FOLD(a[2 * i], a[2 * i + 1], 0xF0F0, SWAP4);  /* bit 2 = bit 1 */
    for (int i = 0; i < 2; ++i) c[i] = FOLD(b[2 * i], b[2 * i + 1], 0xCCCC, SWAP2);  /* bit 1 = bit 2 */
    const __m512 d = FOLD(c[0], c[1], 0xAAAA, SWAP1);                                 /* bit 0 = bit 3 */
    /* lane l holds row bitreverse4(l) */
    const __m512i bit_reversed = _mm512_setr_epi32(0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
    _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), _mm512_permutexvar_ps(bit_reversed, d)));
}
#endif

/* sums (rows, 1) = outliers of rows row_ptr[0 .. rows] against x (M = 1), piece by piece: each
 * row's products summed lane-wise into partial (rows, CHUNK_LANES), then reduced across lanes
 * (AVX-512: 16 rows at a time). sums must have room for rows rounded up to 16. */
static inline int single_x_outliers(const ql_weight *w, const int32_t *row_ptr, int64_t rows, const float *x,
                                    float *sums, float *products, float *partial) {
    memset(partial, 0, sizeof(float) * (size_t)(rows * CHUNK_LANES));
    int64_t r = 0;
    for (int64_t p0 = row_ptr[0]; p0 < row_ptr[rows]; p0 += OUTLIER_PIECE) {
        const int64_t p1 = row_ptr[rows] - p0 < OUTLIER_PIECE ? row_ptr[rows] : p0 + OUTLIER_PIECE;
        if (!single_x_products(w, x, p0, p1 - p0, products)) return QL_ERR_BAD_OUTLIERS;
        for (; r < rows; ++r) {  /* rows that end in this piece, and the one running into the next */
            const int64_t begin = row_ptr[r] > p0 ? row_ptr[r] : p0, end = row_ptr[r + 1] < p1 ? row_ptr[r + 1] : p1;
            float *lanes = partial + r * CHUNK_LANES;
#if defined(__AVX512F__)
            _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), products_vector(products, begin - p0, end - p0)));
#else
            _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_loadu_ps(lanes), products_vector(products, begin - p0, end - p0)));
#endif
            if (row_ptr[r + 1] > p1) break;
        }
    }
#if defined(__AVX512F__)
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) v[i] = r0 + i < rows ? _mm512_loadu_ps(partial + (r0 + i) * 16) : _mm512_setzero_ps();
        add_lane_sums16(v, sums + r0);
    }
#else
    for (r = 0; r < rows; ++r) {
        const __m256 acc = _mm256_loadu_ps(partial + r * CHUNK_LANES);
        __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        sums[r] += _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
    }
#endif
    return QL_OK;
}

/* sums (rows, M) = outliers of rows row_ptr[0 .. rows] against x_columns (K, M), M > 1. */
static inline int multi_x_outliers(const ql_weight *w, const int32_t *row_ptr, int64_t rows, const float *x_columns,
                                   int64_t m_rows, float *sums) {
    for (int64_t r = 0; r < rows; ++r) {
        float *row_sums = sums + r * m_rows;
        for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) {
            const int64_t col = ql_outlier_col(w->cols, w->col_kind, e);
            if (col < 0 || col >= w->k) return QL_ERR_BAD_OUTLIERS;
            const float value = w->val_kind == QL_VALS_F16 ? _cvtsh_ss(((const uint16_t *)w->vals)[e]) : ((const float *)w->vals)[e];
            const float *x = x_columns + col * m_rows;
            for (int64_t m = 0; m < m_rows; ++m) row_sums[m] += value * x[m];
        }
    }
    return QL_OK;
}

/* The chunk's (rows, Kp / B) scales as float32: the stored array itself when it is float32, else
 * decoded into `scratch`. */
static inline const float *ql_chunk_scales(const ql_weight *w, int64_t padded_k, int64_t n0, int64_t rows, float *scratch) {
    const int64_t n_blocks = padded_k / w->block_size;
    if (w->scale_kind == QL_SCALES_F32) return (const float *)w->scales + n0 * n_blocks;
    ql_decode_scales(w, n0 * n_blocks, rows * n_blocks, scratch);
    return scratch;
}

/* Whether row_ptr rises within [0, nnz] over the chunk's rows (their columns are checked where read). */
static inline int ql_chunk_row_ptr_ok(const ql_weight *w, int64_t n0, int64_t rows) {
    const int32_t *row_ptr = w->row_ptr + n0;
    if (row_ptr[0] < 0 || row_ptr[rows] > w->nnz) return 0;
    for (int64_t r = 0; r < rows; ++r)
        if (row_ptr[r + 1] < row_ptr[r]) return 0;
    return 1;
}

/* The chunk of weight rows [n0, n0 + rows): its float32 scales and its outlier sums, in `scratch`
 * (ql_chunk_scratch_floats). QL_OK or QL_ERR_BAD_OUTLIERS. */
static inline int ql_chunk_begin(const ql_matmul_job *job, int64_t n0, int64_t rows, float *scratch, ql_chunk *chunk) {
    const ql_weight *w = job->w;
    const int64_t n_blocks = job->padded_k / w->block_size;
    float *sums = scratch + QL_ROW_GRAIN * n_blocks;
    float *products = sums + QL_ROW_GRAIN * job->m + 16, *partial = products + OUTLIER_PIECE + 16;
    chunk->scales = ql_chunk_scales(w, job->padded_k, n0, rows, scratch);
    chunk->outliers = sums;
    memset(sums, 0, sizeof(float) * (size_t)(rows * job->m));
    if (w->nnz == 0) return QL_OK;
    if (!ql_chunk_row_ptr_ok(w, n0, rows)) return QL_ERR_BAD_OUTLIERS;
    const int32_t *row_ptr = w->row_ptr + n0;
    return job->m == 1 ? single_x_outliers(w, row_ptr, rows, job->x_columns, sums, products, partial)
                       : multi_x_outliers(w, row_ptr, rows, job->x_columns, job->m, sums);
}

/* A chunk's failure, kept for the call to report (any thread may set it; nothing else is read). */
static inline void ql_chunk_fail(const ql_matmul_job *job, int status) {
    __atomic_store_n(job->status, status, __ATOMIC_RELAXED);
}

/* y's rows m0 .. m0 + x_rows - 1 at the chunk's columns [n0, n0 + rows): a tile's sums (rows, x_rows)
 * plus the chunk's outlier sums, in y's dtype. */
static inline void ql_chunk_store(const ql_matmul_job *job, const ql_chunk *chunk, int64_t n0, int64_t rows, int64_t m0,
                                  int x_rows, const float *sums) {
    for (int64_t r = 0; r < rows; ++r)
        for (int m = 0; m < x_rows; ++m)
            ql_store(job->y, job->dtype, (m0 + m) * job->y_row_stride + n0 + r,
                     sums[r * x_rows + m] + chunk->outliers[r * job->m + m0 + m]);
}

/* The GEMV kernels' walk over their rows [n0, n_end) in grains: begins the grain at n0 (up to
 * QL_ROW_GRAIN rows) and returns its row count, or 0 when it failed (then kept by ql_chunk_fail and
 * the kernel returns):
 *     for (int64_t n0 = n_begin, rows; n0 < n_end; n0 += rows) {
 *         ql_chunk chunk;
 *         if (!(rows = ql_chunk_next(job, n0, n_end, scratch, &chunk))) return;
 *         ... rows [n0, n0 + rows) ... } */
static inline int64_t ql_chunk_next(const ql_matmul_job *job, int64_t n0, int64_t n_end, float *scratch, ql_chunk *chunk) {
    const int64_t rows = n_end - n0 < QL_ROW_GRAIN ? n_end - n0 : QL_ROW_GRAIN;
    const int status = ql_chunk_begin(job, n0, rows, scratch, chunk);
    if (status == QL_OK) return rows;
    ql_chunk_fail(job, status);
    return 0;
}

#endif

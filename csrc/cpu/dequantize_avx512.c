/* AVX-512 dequantization of a range of weight rows into a dense row-major buffer (compiled with
 * -mavx512f like qmatmul_avx512.c; api.c calls it only when cpuid reports AVX-512 F), in the
 * natural column order: ql_cpu_dequantize_rows, native.dequantize_cpu (a dense copy of a weight).
 *
 * Layout: codes (N, Kp / 2) uint8 as stored, low nibble = even column; scales and outliers as stored
 * (read through ql_scale_at, once per 16 columns, and ql_outlier_col / ql_outlier_val);
 * out rows of out_row_stride elements. Tiling: 16 columns (8 code bytes) per zmm. 16 divides B, so a
 * group lies in one block and takes one broadcast scale. Decode of a group: ql_avx512_levels16
 * (levels_avx512.h: one vpermps on the 16 levels held in one register). level * scale is the
 * scalar dequantize's float32
 * product (ql_weight_at), the outliers are added to the float32 row afterwards in CSR order as
 * the scalar code does, and only then is the row rounded to fp16 / bf16 (ql_store): every dtype is
 * bit-identical with the scalar path (tested). */
#include <immintrin.h>

#include "kernels.h"
#include "levels_avx512.h"
#include "quantlite_decode.h"

#define GROUP_COLUMNS 16
#define TILE_COLUMNS 256  /* fp16 / bf16 out: columns built in float32 on the stack, then rounded */

/* Columns [c0, c1) of row n without outliers (c0 a multiple of 16) into dst[0 .. c1 - c0). */
static void dequantize_columns(const ql_weight *w, int64_t padded_k, int64_t n, int64_t c0, int64_t c1,
                               __m512 codebook, float *dst) {
    const uint8_t *codes = w->codes + n * (padded_k / 2);
    const int64_t first_scale = n * (padded_k / w->block_size);
    for (int64_t c = c0; c < c1; c += GROUP_COLUMNS) {
        const __m512 value = _mm512_mul_ps(ql_avx512_levels16(codes + c / 2, codebook), _mm512_set1_ps(ql_scale_at(w, first_scale + c / w->block_size)));
        const int64_t left = c1 - c;
        _mm512_mask_storeu_ps(dst + (c - c0), left >= GROUP_COLUMNS ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1), value);
    }
}

void ql_dequantize_rows_avx512(const ql_dequantize_job *job, int64_t begin, int64_t end) {
    const ql_weight *w = job->w;
    const __m512 codebook = _mm512_loadu_ps(w->codebook);
    for (int64_t n = begin; n < end; ++n) {
        const int64_t out_row = (n - job->n_begin) * job->out_row_stride;
        if (job->dtype == QL_F32) {
            float *row = (float *)job->out + out_row;
            dequantize_columns(w, job->padded_k, n, 0, w->k, codebook, row);
            for (int64_t e = w->row_ptr[n]; e < w->row_ptr[n + 1]; ++e) row[ql_outlier_col(w->cols, w->col_kind, e)] += ql_outlier_val(w->vals, w->val_kind, e);
            continue;
        }
        int64_t e = w->row_ptr[n];  /* next outlier of the row; columns ascend (quantlite.h) */
        for (int64_t c0 = 0; c0 < w->k; c0 += TILE_COLUMNS) {
            const int64_t c1 = c0 + TILE_COLUMNS < w->k ? c0 + TILE_COLUMNS : w->k;
            float tile[TILE_COLUMNS];
            dequantize_columns(w, job->padded_k, n, c0, c1, codebook, tile);
            for (; e < w->row_ptr[n + 1] && ql_outlier_col(w->cols, w->col_kind, e) < c1; ++e) tile[ql_outlier_col(w->cols, w->col_kind, e) - c0] += ql_outlier_val(w->vals, w->val_kind, e);
            for (int64_t c = c0; c < c1; ++c) ql_store(job->out, job->dtype, out_row + c, tile[c - c0]);
        }
    }
}

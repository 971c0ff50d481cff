/* Portable C kernels: qmatmul and the quantizer's encoder, written entirely in the per-element
 * functions of quantlite_decode.h (the ones the CUDA kernels call), so that testing this file tests
 * the GPU's math. Used on CPUs without AVX2 and by the tests; the AVX2 file is the fast path.
 *
 * qmatmul, per output row n and input row m, in groups of 16 columns (8 bytes), like the GEMV:
 *     acc = 0
 *     for each group g:  acc += scale[n, block of g] * sum_{k in g, k < K} codebook[code(n, k)] * x[m, k]
 *     (the scale as stored, decoded by ql_scale_at: float32, float16 or double-quantized)
 *     y[m, n] = acc + sum over row n's outliers of val * x[m, col]
 * (the scale is factored out of its group: one multiply per 16 weights). */
#include <string.h>

#include "kernels.h"
#include "quantlite_decode.h"

void ql_qmatmul_rows_scalar(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    (void)thread_index;  /* needs no scratch */
    const ql_weight *w = job->w;
    const int64_t n_blocks = job->padded_k / w->block_size;
    for (int64_t n = n_begin; n < n_end; ++n) {
        const uint8_t *code_row = w->codes + n * (job->padded_k / 2);   /* (Kp / 2,) */
        for (int64_t m = 0; m < job->m; ++m) {
            const void *x_row = (const char *)job->x + m * job->x_row_stride * ql_dtype_size(job->dtype);
            float acc = 0.0f;
            for (int64_t col0 = 0; col0 < job->padded_k; col0 += 16) {  /* as the CUDA GEMV: 8 bytes at a time */
                uint32_t words[2];
                memcpy(words, code_row + col0 / 2, sizeof words);  /* little-endian, as on the GPU */
                float levels[16];
                ql_group_levels(words[0], words[1], w->codebook, levels);
                acc += ql_group_dot(levels, x_row, job->dtype, col0, w->k) * ql_scale_at(w, n * n_blocks + col0 / w->block_size);
            }
            acc += ql_outlier_partial(w->row_ptr, w->cols, w->col_kind, w->vals, w->val_kind, n, x_row, job->dtype, 0, 1);
            ql_store(job->y, job->dtype, m * job->y_row_stride + n, acc);
        }
    }
}

void ql_encode_rows_scalar(const ql_encode_job *job, int64_t n_begin, int64_t n_end) {
    const int64_t block = job->block_size, n_blocks = job->padded_k / block;
    float mid[15];
    ql_midpoints(job->codebook, mid);
    uint8_t block_codes[4096];  /* one block's codes, unpacked; B <= 4096 is checked by the caller */
    for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t b = 0; b < n_blocks; ++b) {
            const float *w = job->blocks + n * job->padded_k + b * block;
            const float scale = job->scales[n * n_blocks + b];
            const float reciprocal = ql_block_reciprocal(scale);
            for (int64_t j = 0; j < block; ++j) block_codes[j] = (uint8_t)ql_encode_value(w[j] * reciprocal, mid);
            ql_finish_block(job, n, b, block_codes, w, scale);
        }
    }
}

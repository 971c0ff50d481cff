/* The int8-activation qmatmul (ql_cpu_qmatmul_q8act, an opt-in: docs/native.md, "Issue 12, seventh
 * round"): its one rule, in portable C. This file is the reference; qmatmul_q8act_avx512.c (AVX-512
 * VNNI) and qmatmul_q8act_avx2.c (AVX2) compute the same integers and sum the same terms in another
 * float32 order.
 *
 * The rule (llama.cpp's Q8_0 activations against IQ4_NL-style int8 levels):
 *   levels  L = max |codebook[i]|; level_q[i] = round(127 * codebook[i] / L) (int8; NF4: L = 1, so
 *           round(127 * level), llama.cpp's IQ4_NL table); level_unit = L / 127 (float32).
 *   x       per row and activation block of A = QL_Q8ACT_BLOCK(B) columns (32, or 16 when 32 does
 *           not divide B: a block never straddles two weight blocks): xs = absmax / 127 (float32),
 *           x_q = round-half-even(x / xs) in [-127, 127] (0 for an all-zero block; padding columns
 *           0); factor = xs * level_unit (float32).
 *   y[m, n] = sum over activation blocks a, in order, of
 *               (float)(sum_{k in a} level_q[code(n, k)] * x_q[m, k])  (exact, int32)
 *               * (scale(n, k / B) * factor[m, a])                     (float32)
 *             accumulated in float32, plus the row's outliers times the float x (exactly as the
 *             default path: sum_e vals[e] * x[m, cols[e]]). scale as stored (ql_scale_at: float32,
 *             float16 or double-quantized, decoded as the default path decodes it).
 * Work partition (api.c): chunks of output rows over the pool, every row of x per chunk. */
#include <math.h>
#include <stddef.h>

#include "kernels.h"
#include "quantlite_decode.h"

void ql_q8act_levels(const float *codebook, int8_t levels[16], float *level_unit) {
    float largest = 0.0f;
    for (int i = 0; i < 16; ++i) largest = fabsf(codebook[i]) > largest ? fabsf(codebook[i]) : largest;
    for (int i = 0; i < 16; ++i) levels[i] = largest > 0.0f ? (int8_t)nearbyintf(127.0f * codebook[i] / largest) : 0;
    *level_unit = largest / 127.0f;
}

void ql_q8act_quantize_x(const void *x, int dtype, int64_t x_row_stride, int64_t m, int64_t k, int64_t padded_k,
                         int64_t act_block, float level_unit, int8_t *x_q, float *factor) {
    const int64_t n_blocks = padded_k / act_block;
    for (int64_t r = 0; r < m; ++r) {
        const char *x_row = (const char *)x + r * x_row_stride * ql_dtype_size(dtype);
        for (int64_t a = 0; a < n_blocks; ++a) {
            const int64_t begin = a * act_block, end = begin + act_block < k ? begin + act_block : k;
            float largest = 0.0f;
            for (int64_t c = begin; c < end; ++c) largest = fmaxf(largest, fabsf(ql_load(x_row, dtype, c)));
            const float scale = largest / 127.0f;
            int8_t *q = x_q + r * padded_k + begin;
            for (int64_t c = begin; c < begin + act_block; ++c)
                q[c - begin] = c < end && scale > 0.0f ? (int8_t)nearbyintf(ql_load(x_row, dtype, c) / scale) : 0;
            factor[r * n_blocks + a] = scale * level_unit;
        }
    }
}

void ql_q8act_rows_scalar(const ql_q8act_job *job, int64_t n_begin, int64_t n_end) {
    const ql_weight *w = job->base.w;
    const int64_t padded_k = job->base.padded_k, act_block = job->act_block;
    const int64_t weight_blocks = padded_k / w->block_size, act_blocks = padded_k / act_block;
    for (int64_t n = n_begin; n < n_end; ++n) {
        const uint8_t *code_row = w->codes + n * (padded_k / 2);  /* (Kp / 2,) */
        for (int64_t m = 0; m < job->base.m; ++m) {
            const int8_t *x_q = job->x_q + m * padded_k;
            const float *factor = job->x_factor + m * act_blocks;
            float acc = 0.0f;
            for (int64_t a = 0; a < act_blocks; ++a) {
                int32_t dot = 0;
                for (int64_t c = a * act_block; c < (a + 1) * act_block; ++c) dot += job->levels[ql_code_at(code_row, c)] * x_q[c];
                const float scale = ql_scale_at(w, n * weight_blocks + a * act_block / w->block_size);
                acc += (float)dot * (scale * factor[a]);
            }
            const void *x_row = (const char *)job->base.x + m * job->base.x_row_stride * ql_dtype_size(job->base.dtype);
            acc += ql_outlier_partial(w->row_ptr, w->cols, w->col_kind, w->vals, w->val_kind, n, x_row, job->base.dtype, 0, 1);
            ql_store(job->base.y, job->base.dtype, m * job->base.y_row_stride + n, acc);
        }
    }
}

/* AVX-512 prefill GEMM, y (M, N) = x (M, K) @ W^T for M >= QL_GEMM_MIN_M (kernels.h): the
 * vector code of gemm.h's plan (layout, blocking, outliers and numerics are described there), this
 * file alone compiled with -mavx512f (api.c calls it only when cpuid reports AVX-512 F). Every
 * instruction used is AVX-512 F.
 *
 * x in groups of 16 rows (one zmm per column). Panel decode: ql_avx512_levels16 (a load, 3 shuffles,
 * a shift, the multiply by the scale and a store per 16 weights: one vpermps looks the levels up in
 * one register).
 * Micro-kernel: MR = 8 weight rows x V = 1..3 groups of 16 x rows (8 x 3 = 24 zmm accumulators, 3 x
 * vectors, 1 broadcast); per column k: V vector loads of x, 8 vbroadcastss of panel[r][k] (a load
 * port each, no shuffle) and 8 V FMAs. From V = 2 on the two FMA ports bound it, not the loads (11
 * loads per 24 FMAs at V = 3); 4 x 6 tiles (10 loads per 24) measured the same.
 * Output: per x row, 16 weight rows' lanes gathered (stride 16 floats) and stored as one vector
 * (float32) or rounded by ql_store; 3-4 % faster at M = 64-128 than one by one. */
#include <immintrin.h>

#include "kernels.h"
#include "levels_avx512.h"

#define GEMM_GROUP QL_GEMM_AVX512_X_GROUP
#define GEMM_MR 8               /* weight rows per micro-tile */
#define GEMM_MAX_GROUPS 3       /* x groups per micro-tile: 8 x 3 accumulators + 3 x = 27 zmm */
typedef __m512 gemm_codebook;

#include "gemm.h"

static inline gemm_codebook gemm_load_codebook(const float *codebook) { return _mm512_loadu_ps(codebook); }

static inline __attribute__((always_inline)) void gemm_levels16(const uint8_t *bytes, gemm_codebook codebook, float scale,
                                                                float *out) {
    _mm512_store_ps(out, _mm512_mul_ps(ql_avx512_levels16(bytes, codebook), _mm512_set1_ps(scale)));
}

static inline __attribute__((always_inline)) void gemm_micro_tile(const float *panel, const float *x, int64_t x_group_stride,
                                                                  int64_t kc, float *acc, const int V) {
    __m512 c[GEMM_MR][GEMM_MAX_GROUPS];
    for (int r = 0; r < GEMM_MR; ++r)
        for (int v = 0; v < V; ++v) c[r][v] = _mm512_load_ps(acc + (v * ACC_ROWS + r) * GEMM_GROUP);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
        __m512 b[GEMM_MAX_GROUPS];
        for (int v = 0; v < V; ++v) b[v] = _mm512_load_ps(x + v * x_group_stride + k * GEMM_GROUP);
        for (int r = 0; r < GEMM_MR; ++r) {
            const __m512 a = _mm512_set1_ps(panel[r * K_C + k]);
            for (int v = 0; v < V; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < GEMM_MR; ++r)
        for (int v = 0; v < V; ++v) _mm512_store_ps(acc + (v * ACC_ROWS + r) * GEMM_GROUP, c[r][v]);
}

static void gemm_store_outputs(const ql_matmul_job *job, const float *acc, int64_t n0, int64_t rows) {
    const __m512i row_lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(GEMM_GROUP));
    for (int64_t m = 0; m < job->m; ++m) {
        const float *lanes = acc + (m / GEMM_GROUP) * ACC_ROWS * GEMM_GROUP + m % GEMM_GROUP;
        const int64_t y_row = m * job->y_row_stride + n0;
        for (int64_t r0 = 0; r0 < rows; r0 += 16) {
            const __mmask16 real = lanes_below(rows - r0);
            const __m512 values = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, row_lanes, lanes + r0 * GEMM_GROUP, 4);
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

int64_t ql_gemm_avx512_scratch_floats(const ql_matmul_job *job) { return gemm_scratch_floats(job); }

void ql_gemm_rows_avx512(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    gemm_rows(job, n_begin, n_end, thread_index);
}

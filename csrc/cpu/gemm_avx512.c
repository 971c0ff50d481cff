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
 * Output (gemm.h's store_outputs): 16 weight rows' lanes gathered (stride 16 floats), a masked store. */
#include <immintrin.h>

#include "chunk.h"
#include "kernels.h"
#include "levels_avx512.h"

#define GEMM_GROUP QL_GEMM_AVX512_X_GROUP
#define GEMM_MR 8               /* weight rows per micro-tile */
#define GEMM_MAX_GROUPS 3       /* x groups per micro-tile: 8 x 3 accumulators + 3 x = 27 zmm */
typedef __m512 gemm_codebook;

/* the micro-kernel's operations (gemm.h) */
typedef __m512 gemm_vector;
static inline __attribute__((always_inline)) gemm_vector gemm_load(const float *p) { return _mm512_load_ps(p); }
static inline __attribute__((always_inline)) gemm_vector gemm_broadcast(const float *p) { return _mm512_set1_ps(*p); }
static inline __attribute__((always_inline)) gemm_vector gemm_fmadd(gemm_vector a, gemm_vector b, gemm_vector c) {
    return _mm512_fmadd_ps(a, b, c);
}
static inline __attribute__((always_inline)) void gemm_store(float *p, gemm_vector v) { _mm512_store_ps(p, v); }

static inline gemm_codebook gemm_load_codebook(const float *codebook) { return _mm512_loadu_ps(codebook); }

static inline __attribute__((always_inline)) void gemm_levels16(const uint8_t *bytes, gemm_codebook codebook, float scale,
                                                                float *out) {
    _mm512_store_ps(out, _mm512_mul_ps(ql_avx512_levels16(bytes, codebook), _mm512_set1_ps(scale)));
}

static inline __attribute__((always_inline)) void gemm_gather_lanes(const float *lanes, int64_t count, float *out) {
    const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(GEMM_GROUP));
    const __mmask16 real = lanes_below(count);
    _mm512_mask_storeu_ps(out, real, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, stride, lanes, 4));
}

#include "gemm.h"

int64_t ql_gemm_avx512_scratch_floats(const ql_matmul_job *job) { return gemm_scratch_floats(job); }

void ql_gemm_rows_avx512(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    gemm_rows(job, n_begin, n_end, thread_index);
}

/* AVX2 + FMA prefill GEMM, y (M, N) = x (M, K) @ W^T for M >= QL_GEMM_MIN_M (kernels.h): the
 * vector code of gemm.h's plan (layout, blocking, outliers and numerics are described there), this
 * file alone compiled with -mavx2 -mfma (api.c calls it only when cpuid reports both). The same plan
 * as gemm_avx512.c, shaped for 16 ymm registers of 8 floats.
 *
 * x in groups of 8 rows (one ymm per column). Panel decode, 16 columns (8 code bytes) at a time: the
 * bytes doubled (b0 b0 b1 b1 ..), widened to 2 x 8 dwords and shifted right by 0 / 4 alternately, so
 * that dword i holds column i's nibble in its low 4 bits; vpermps reads only the low 3 of them, so
 * each 8 columns take two lookups (levels 0-7 and 8-15, each in one register) and a vblendvps on bit
 * 3 (shifted up to the sign bit); then the multiply by the block's scale and a store. About 10
 * instructions per 8 weights, which feed M FMA lanes each: a few percent of the call from M = 64 on.
 * Micro-kernel: MR = 6 weight rows x V = 1..2 groups of 8 x rows (6 x 2 = 12 ymm accumulators, 2 x
 * vectors, 1 broadcast: 15 of the 16 registers; BLIS haswell's 6 x 16 with the operands turned
 * around); per column k: V vector loads of x, 6 vbroadcastss of panel[r][k] (a load port each) and
 * 6 V FMAs: 8 loads per 12 FMAs, so the two FMA ports bound it. A 256-row block is 43 micro-tiles,
 * the last with 2 zero rows (gemm.h's ACC_ROWS). 4 x 24 (12 accumulators, 3 x vectors: all 16
 * registers, 7 loads per 12 FMAs) measured 3 % slower in a C loop over one block and 0-5 % slower
 * in the benchmark (one thread, loaded machine).
 * Output (gemm.h's store_outputs): 8 weight rows' lanes gathered (stride 8 floats), a masked store. */
#include <immintrin.h>

#include "chunk.h"
#include "kernels.h"

#define GEMM_GROUP QL_GEMM_AVX2_X_GROUP
#define GEMM_MR 6               /* weight rows per micro-tile */
#define GEMM_MAX_GROUPS 2       /* x groups per micro-tile: 6 x 2 accumulators + 2 x + 1 broadcast = 15 ymm */
typedef struct {
    __m256 low, high;           /* levels 0-7, 8-15 */
} gemm_codebook;

/* the micro-kernel's operations (gemm.h) */
typedef __m256 gemm_vector;
static inline __attribute__((always_inline)) gemm_vector gemm_load(const float *p) { return _mm256_load_ps(p); }
static inline __attribute__((always_inline)) gemm_vector gemm_broadcast(const float *p) { return _mm256_broadcast_ss(p); }
static inline __attribute__((always_inline)) gemm_vector gemm_fmadd(gemm_vector a, gemm_vector b, gemm_vector c) {
    return _mm256_fmadd_ps(a, b, c);
}
static inline __attribute__((always_inline)) void gemm_store(float *p, gemm_vector v) { _mm256_store_ps(p, v); }

static inline gemm_codebook gemm_load_codebook(const float *codebook) {
    return (gemm_codebook){_mm256_loadu_ps(codebook), _mm256_loadu_ps(codebook + 8)};
}

/* The levels of the 8 columns whose nibbles are in the low 4 bits of index's dwords. */
static inline __attribute__((always_inline)) __m256 levels8(__m256i index, gemm_codebook codebook) {
    const __m256 low = _mm256_permutevar8x32_ps(codebook.low, index), high = _mm256_permutevar8x32_ps(codebook.high, index);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

static inline __attribute__((always_inline)) void gemm_levels16(const uint8_t *bytes, gemm_codebook codebook, float scale,
                                                                float *out) {
    const __m256i nibble_shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const __m128i pair = _mm_loadl_epi64((const __m128i *)bytes);
    const __m128i doubled = _mm_unpacklo_epi8(pair, pair);
    const __m256i first = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(doubled), nibble_shift);
    const __m256i second = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(doubled, doubled)), nibble_shift);
    const __m256 scale_vector = _mm256_set1_ps(scale);
    _mm256_store_ps(out, _mm256_mul_ps(levels8(first, codebook), scale_vector));
    _mm256_store_ps(out + 8, _mm256_mul_ps(levels8(second, codebook), scale_vector));
}

static inline __attribute__((always_inline)) void gemm_gather_lanes(const float *lanes, int64_t count, float *out) {
    const __m256i stride = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(GEMM_GROUP));
    const __m256i real = lanes_below(count);
    _mm256_maskstore_ps(out, real, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), lanes, stride, _mm256_castsi256_ps(real), 4));
}

#include "gemm.h"

int64_t ql_gemm_avx2_scratch_floats(const ql_matmul_job *job) { return gemm_scratch_floats(job); }

void ql_gemm_rows_avx2(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    gemm_rows(job, n_begin, n_end, thread_index);
}

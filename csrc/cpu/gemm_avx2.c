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
 * Output: per x row, 8 weight rows' lanes gathered (stride 8 floats) and stored as one vector
 * (float32) or rounded by ql_store. */
#include <immintrin.h>

#include "kernels.h"

#define GEMM_GROUP QL_GEMM_AVX2_X_GROUP
#define GEMM_MR 6               /* weight rows per micro-tile */
#define GEMM_MAX_GROUPS 2       /* x groups per micro-tile: 6 x 2 accumulators + 2 x + 1 broadcast = 15 ymm */
typedef struct {
    __m256 low, high;           /* levels 0-7, 8-15 */
} gemm_codebook;

#include "gemm.h"

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

static inline __attribute__((always_inline)) void gemm_micro_tile(const float *panel, const float *x, int64_t x_group_stride,
                                                                  int64_t kc, float *acc, const int V) {
    __m256 c[GEMM_MR][GEMM_MAX_GROUPS];
    for (int r = 0; r < GEMM_MR; ++r)
        for (int v = 0; v < V; ++v) c[r][v] = _mm256_load_ps(acc + (v * ACC_ROWS + r) * GEMM_GROUP);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
        __m256 b[GEMM_MAX_GROUPS];
        for (int v = 0; v < V; ++v) b[v] = _mm256_load_ps(x + v * x_group_stride + k * GEMM_GROUP);
        for (int r = 0; r < GEMM_MR; ++r) {
            const __m256 a = _mm256_broadcast_ss(panel + r * K_C + k);
            for (int v = 0; v < V; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < GEMM_MR; ++r)
        for (int v = 0; v < V; ++v) _mm256_store_ps(acc + (v * ACC_ROWS + r) * GEMM_GROUP, c[r][v]);
}

static void gemm_store_outputs(const ql_matmul_job *job, const float *acc, int64_t n0, int64_t rows) {
    const __m256i row_lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(GEMM_GROUP));
    for (int64_t m = 0; m < job->m; ++m) {
        const float *lanes = acc + (m / GEMM_GROUP) * ACC_ROWS * GEMM_GROUP + m % GEMM_GROUP;
        const int64_t y_row = m * job->y_row_stride + n0;
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            const __m256i real = lanes_below(rows - r0);
            const __m256 values = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), lanes + r0 * GEMM_GROUP, row_lanes,
                                                           _mm256_castsi256_ps(real), 4);
            if (job->dtype == QL_F32) {
                _mm256_maskstore_ps((float *)job->y + y_row + r0, real, values);
                continue;
            }
            float rounded[8];
            _mm256_storeu_ps(rounded, values);
            for (int64_t i = 0; i < 8 && r0 + i < rows; ++i) ql_store(job->y, job->dtype, y_row + r0 + i, rounded[i]);
        }
    }
}

int64_t ql_gemm_avx2_scratch_floats(const ql_matmul_job *job) { return gemm_scratch_floats(job); }

void ql_gemm_rows_avx2(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    gemm_rows(job, n_begin, n_end, thread_index);
}

/* y (M, N) = x (M, K) @ W^T for a block-scaled int8 weight (docs/FORMAT.md, section 1b):
 *
 *     W[n, k] = qs[n, k] * scales[n, k / B]        qs (N, Kp) int8, padding columns 0
 *                                                  scales (N, Kp / B) float16 bits
 *
 * The output head and the embedding are stored this way (a 4-bit head costs > 1 % perplexity,
 * docs/accuracy.md). At decode (M = 1) the head is the largest weight of a small model, so the loop
 * is shaped for streaming qs once:
 *
 *   x32 = x in float32, (M, Kp), padding columns 0           -- once per call, shared by the threads
 *   rows n split over the thread pool in shrinking chunks (kernels.h: ql_row_grain)
 *   for n in chunk:                                          -- one weight row: Kp bytes, stays in L1
 *       for m in 0..M:
 *           acc[0..16) = 0
 *           for b in blocks:
 *               lanes[0..16) = sum over j of x32[m, bB + 16j + l] * qs[n, bB + 16j + l]
 *               acc += scale(n, b) * lanes                   -- the scale once per block, after the products
 *           y[m, n] = sum(acc)
 *
 * Three versions of the row's dot product, chosen by cpuid (ql_cpu_best_isa) per call: AVX-512 F,
 * AVX2 + FMA, and portable C with 16 independent lanes.
 * Float32 accumulation, in another order than a dense matmul: tests/test_q8weight.py derives the
 * tolerance from it. */
#include <stdlib.h>
#include <immintrin.h>

#include "kernels.h"
#include "pool.h"
#include "quantlite.h"
#include "quantlite_checks.h"
#include "quantlite_decode.h"

#define LANES 16

/* One row's dot product: sum over blocks b of scale(b) * sum_{k in b} x[k] * q[k]; x padded with 0. */
typedef float (*row_dot_fn)(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_blocks, int64_t block);

typedef struct {
    const ql_weight_int8 *w;
    int64_t padded_k, m;
    const float *x32;        /* (M, Kp) float32, padding columns 0 */
    void *y;                 /* (M, N) in dtype, rows y_row_stride apart */
    int64_t y_row_stride;
    int dtype;
    row_dot_fn row_dot;      /* the best of row_dot_avx512, row_dot_avx2, row_dot_scalar for this CPU */
} int8_job;

static float row_dot_scalar(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_blocks, int64_t block) {
    float acc[LANES] = {0};
    for (int64_t b = 0; b < n_blocks; ++b, x += block, q += block) {
        float lanes[LANES] = {0};
        for (int64_t j = 0; j < block; j += LANES)
            for (int l = 0; l < LANES; ++l) lanes[l] += x[j + l] * (float)q[j + l];
        const float scale = ql_f16_to_f32(scales[b]);
        for (int l = 0; l < LANES; ++l) acc[l] += scale * lanes[l];
    }
    float sum = 0.0f;
    for (int l = 0; l < LANES; ++l) sum += acc[l];
    return sum;
}

/* The same with AVX2 + FMA: 16 weights per step as two vectors of 8 (vpmovsxbd widens 8 int8 in one
 * instruction, which compilers do not emit for the portable loop above). */
__attribute__((target("avx2,fma")))
static float row_dot_avx2(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_blocks, int64_t block) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b, x += block, q += block) {
        __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
        for (int64_t j = 0; j < block; j += LANES) {
            const __m256 q_low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j))));
            const __m256 q_high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j + 8))));
            low = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), q_low, low);
            high = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), q_high, high);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(ql_f16_to_f32(scales[b])), _mm256_add_ps(low, high), acc);
    }
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* The same with AVX-512 F: 16 weights a vector, two partial sums per block to overlap the FMAs'
 * latency (the AVX2 version above is bound by its widening instructions: 6.3 ms against 3.6 ms here
 * for SmolLM2's 49152 x 576 head at M = 1, one thread). */
__attribute__((target("avx512f")))
static float row_dot_avx512(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_blocks, int64_t block) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b, x += block, q += block) {
        __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
        for (int64_t j = 0; j < block; j += 2 * LANES) {  /* block is a multiple of 32 (ql_cpu_qmatmul_int8) */
            const __m512 q_even = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j))));
            const __m512 q_odd = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j + LANES))));
            even = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), q_even, even);
            odd = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + LANES), q_odd, odd);
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(ql_f16_to_f32(scales[b])), _mm512_add_ps(even, odd), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static void int8_rows(const int8_job *job, int64_t n_begin, int64_t n_end) {
    const ql_weight_int8 *w = job->w;
    const int64_t n_blocks = job->padded_k / w->block_size;
    for (int64_t n = n_begin; n < n_end; ++n)
        for (int64_t m = 0; m < job->m; ++m) {
            const float sum = job->row_dot(job->x32 + m * job->padded_k, w->qs + n * job->padded_k,
                                           w->scales + n * n_blocks, n_blocks, w->block_size);
            ql_store(job->y, job->dtype, m * job->y_row_stride + n, sum);
        }
}

static void int8_chunk(void *job, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    int8_rows((const int8_job *)job, begin, end);
}

int ql_cpu_qmatmul_int8(const ql_weight_int8 *w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                        int64_t y_row_stride, int dtype, int n_threads) {
    if (w == NULL || w->qs == NULL || w->scales == NULL || x == NULL || y == NULL) return QL_ERR_NULL_POINTER;
    if (w->n <= 0 || w->k <= 0 || m <= 0) return QL_ERR_BAD_SIZE;
    if (!ql_block_size_ok(w->block_size)) return QL_ERR_BAD_BLOCK_SIZE;
    if (x_row_stride < w->k || y_row_stride < w->n) return QL_ERR_BAD_STRIDE;
    const int status = ql_check_dtype(dtype);
    if (status != QL_OK) return status;

    const int64_t padded_k = (w->k + w->block_size - 1) / w->block_size * w->block_size;
    float *x32 = malloc(sizeof(float) * (size_t)(m * padded_k));
    if (x32 == NULL) return QL_ERR_OUT_OF_MEMORY;
    for (int64_t r = 0; r < m; ++r) {
        const char *x_row = (const char *)x + r * x_row_stride * ql_dtype_size(dtype);
        for (int64_t c = 0; c < padded_k; ++c) x32[r * padded_k + c] = c < w->k ? ql_load(x_row, dtype, c) : 0.0f;
    }
    const int isa = ql_cpu_best_isa();
    const row_dot_fn row_dot = isa >= QL_ISA_AVX512 && w->block_size % (2 * LANES) == 0 ? row_dot_avx512
                             : isa >= QL_ISA_AVX2 ? row_dot_avx2 : row_dot_scalar;
    int8_job job = {w, padded_k, m, x32, y, y_row_stride, dtype, row_dot};
    ql_parallel_for(w->n, ql_row_grain(w->n, padded_k * m, QL_MIN_CHUNK_ROWS, n_threads), n_threads, int8_chunk, &job);
    free(x32);
    return QL_OK;
}

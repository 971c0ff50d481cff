/* GPTQ's column loop (quantlite/gptq.py, _gptq_pass; the Python loop there is the reference and the
 * fallback): the columns of one sub-block rounded one after the other, each column's rounding error
 * flowing into the columns after it in the sub-block.
 *
 * Layout. GPTQ holds the weight W (N, K) transposed and in its processing order (act-order), so a
 * column of W is a contiguous row of N floats here; a sub-block is S <= 16 consecutive such rows.
 * Every (S, N) array is row-major with rows N floats apart:
 *     work          (S, N) float32   the error-compensated weights, updated in place
 *     column_scale  (S, N) float32   each weight's block scale (fixed before GPTQ)
 *     upper         (S, S) float32   U[j, j'] at upper[j * row_stride + j' * column_stride] (torch's
 *                                    strides; the factorisation leaves U column-major): the sub-block's
 *                                    diagonal block of U, the upper Cholesky factor of H^-1 (processing order)
 *     is_outlier    (S, N) uint8     0 / 1, in and out: the quota's choices are marked here
 *     quota         (S,) int64       per column, how many more weights to keep exact; NULL: none
 *     codes         (S, N) uint8     out: the code of each weight (the code of 0 at outliers)
 *     errors        (S, N) float32   out: each weight's scaled rounding error e = (w - q) / U[j, j]
 *
 * Structure. GPTQ's lazy blocks of 128 columns are cut into sub-blocks of 16 (gptq.LAZY_BLOCK,
 * gptq.SUB_BLOCK). This function is the innermost level: the rank-1 updates inside a sub-block.
 * The two outer levels, one matmul per sub-block onto the rest of its lazy block and one per lazy
 * block onto the rest of W, stay torch matmuls between calls (BLAS, whose sums run in an order this
 * file cannot reproduce), so the whole pass is bit-identical with the Python loop.
 *
 * Per column j of the sub-block, over its N weights w (the Python loop's operations, in its order):
 *     code  = #{i : mid[i] < w * r}           r = 1 / max(scale, FLT_MIN), 0 for a zero scale;
 *                                             mid the codebook's midpoints (torch.bucketize, right=False)
 *     q     = codebook[code] * scale
 *     quota[j] > 0: the quota[j] weights of the largest |w - q| become outliers (existing outliers
 *             count as -1, so they come last; equal errors: the lower row first)
 *     at an outlier: q = w (kept exact; the caller stores the compensated w), code = the code of 0
 *     e     = (w - q) / U[j, j]
 *     w'    = fma(-U[j, j'], e, w')           for each later column j' of the sub-block: one
 *                                             rounding, as torch's addcmul_ on an FMA CPU
 * A copy of the loop compiled for AVX2 + FMA runs when cpuid has them (fmaf one instruction, the
 * loops 8 wide); elsewhere fmaf is the C library's (the same results, slower). Single-threaded.
 */
#include <math.h>
#include <stdlib.h>

#include "quantlite.h"
#include "quantlite_decode.h"

/* The quota weights of the largest rounding error in a column: a min-heap of `size` (error, row)
 * entries whose root is the worst kept; "better" = larger error, or equal error and lower row. */
typedef struct {
    float error;
    int64_t row;
} ranked;

static int better(ranked a, ranked b) { return a.error > b.error || (a.error == b.error && a.row < b.row); }

static void sift_down(ranked *heap, int64_t size, int64_t at) {
    for (;;) {
        int64_t worst = at;
        const int64_t left = 2 * at + 1, right = left + 1;
        if (left < size && better(heap[worst], heap[left])) worst = left;
        if (right < size && better(heap[worst], heap[right])) worst = right;
        if (worst == at) return;
        const ranked swap = heap[at];
        heap[at] = heap[worst];
        heap[worst] = swap;
        at = worst;
    }
}

/* Marks in is_outlier the `quota` rows of the largest |w - q| (q: quantized), existing outliers as -1. */
static void choose_outliers(const float *w, const float *quantized, uint8_t *is_outlier, int64_t n, int64_t quota,
                            ranked *heap) {
    for (int64_t i = 0; i < n; ++i) {
        const ranked candidate = {is_outlier[i] ? -1.0f : fabsf(w[i] - quantized[i]), i};
        if (i < quota) {
            heap[i] = candidate;
            if (i == quota - 1)
                for (int64_t at = quota / 2; at-- > 0;) sift_down(heap, quota, at);
        } else if (better(candidate, heap[0])) {
            heap[0] = candidate;
            sift_down(heap, quota, 0);
        }
    }
    for (int64_t e = 0; e < quota; ++e) is_outlier[heap[e].row] = 1;
}

/* The arguments of one call (the layout above). */
typedef struct {
    float *work;
    const float *column_scale, *upper;
    int64_t upper_row_stride, upper_column_stride;
    const float *codebook;
    uint8_t *is_outlier;
    const int64_t *quota;
    int64_t columns, n;
    uint8_t *codes;
    float *errors;
} sub_block;

/* The sub-block's columns one after the other (the loop in the opening comment); heap holds the
 * largest quota's entries. */
static inline void round_columns(const sub_block *b, ranked *heap) {
    const int64_t n = b->n;
    float mid[15];
    ql_midpoints(b->codebook, mid);
    const uint8_t zero_code = (uint8_t)ql_encode_value(0.0f, mid);  /* the zero level's code */
    for (int64_t j = 0; j < b->columns; ++j) {
        float *w = b->work + j * n;
        const float *scale = b->column_scale + j * n;
        uint8_t *code = b->codes + j * n, *outlier = b->is_outlier + j * n;
        float *e = b->errors + j * n;  /* holds q until the errors are known */
        /* --- round: the code and the quantized value of each weight (three loops that vectorise) */
        for (int64_t i = 0; i < n; ++i) e[i] = w[i] * ql_block_reciprocal(scale[i]);
        for (int64_t i = 0; i < n; ++i) code[i] = (uint8_t)ql_encode_value(e[i], mid);
        for (int64_t i = 0; i < n; ++i) e[i] = ql_weight_at(b->codebook, code[i], scale[i]);
        /* --- the column's quota of new outliers */
        if (b->quota != NULL && b->quota[j] > 0) choose_outliers(w, e, outlier, n, b->quota[j], heap);
        /* --- outliers stay exact; the scaled errors */
        const float *u_row = b->upper + j * b->upper_row_stride;  /* U[j, j'] = u_row[j' * upper_column_stride] */
        const float pivot = u_row[j * b->upper_column_stride];
        for (int64_t i = 0; i < n; ++i) {
            const float q = outlier[i] ? w[i] : e[i];
            code[i] = outlier[i] ? zero_code : code[i];
            e[i] = (w[i] - q) / pivot;
        }
        /* --- the error flows into the sub-block's later columns: w' = fma(-U[j, j'], e, w') */
        for (int64_t later = j + 1; later < b->columns; ++later) {
            float *row = b->work + later * n;
            const float minus_coefficient = -u_row[later * b->upper_column_stride];
            for (int64_t i = 0; i < n; ++i) row[i] = fmaf(minus_coefficient, e[i], row[i]);
        }
    }
}

#if defined(__x86_64__) || defined(__i386__)
/* The same loop compiled for AVX2 + FMA, where fmaf is one instruction and the loops are 8 wide; run
 * after cpuid says so (every result the same: -ffp-contract=off fuses nothing but the fmaf). */
__attribute__((target("avx2,fma"))) static void round_columns_avx2(const sub_block *b, ranked *heap) {
    round_columns(b, heap);
}
#endif

int ql_cpu_gptq_columns(float *work, const float *column_scale, const float *upper, int64_t upper_row_stride,
                        int64_t upper_column_stride, const float *codebook, uint8_t *is_outlier, const int64_t *quota,
                        int64_t columns, int64_t n, uint8_t *codes, float *errors) {
    if (work == NULL || column_scale == NULL || upper == NULL || codebook == NULL || is_outlier == NULL ||
        codes == NULL || errors == NULL)
        return QL_ERR_NULL_POINTER;
    if (columns <= 0 || n <= 0) return QL_ERR_BAD_SIZE;
    if (upper_row_stride <= 0 || upper_column_stride <= 0) return QL_ERR_BAD_STRIDE;
    int64_t largest_quota = 0;
    for (int64_t j = 0; quota != NULL && j < columns; ++j) {
        if (quota[j] < 0 || quota[j] > n) return QL_ERR_BAD_SIZE;
        if (quota[j] > largest_quota) largest_quota = quota[j];
    }
    ranked *heap = NULL;
    if (largest_quota > 0 && (heap = malloc((size_t)largest_quota * sizeof *heap)) == NULL) return QL_ERR_OUT_OF_MEMORY;
    const sub_block b = {work, column_scale, upper, upper_row_stride, upper_column_stride, codebook, is_outlier, quota,
                         columns, n, codes, errors};
#if defined(__x86_64__) || defined(__i386__)
    if (ql_cpu_best_isa() >= QL_ISA_AVX2) round_columns_avx2(&b, heap);
    else round_columns(&b, heap);
#else
    round_columns(&b, heap);
#endif
    free(heap);
    return QL_OK;
}

/* decode_ops.c: the float32 glue of one decode step on the CPU, between the matmuls
 * (quantlite/runtime/llama.py calls these through quantlite/kernels/cpu_ops.py; the torch code there
 * is the same math and the reference the tests hold these to).
 *
 *   ql_cpu_rms_norm          out (R, n) = weight * (x * 1 / sqrt(mean(x^2) + eps)), per row
 *   ql_cpu_silu_mul          out (R, n) = silu(gate) * up, gate_up (R, 2n) = [gate | up]
 *   ql_cpu_decode_attention  one new position per sequence: per-head q/k RMSNorm (optional), RoPE on
 *                            q and k, k and v written into the KV cache at `position`, grouped-query
 *                            attention of each query head over the cache [0, position], additive mask.
 *   ql_cpu_decode_layer      whole pre-norm decoder layers at one position, one after another: the two
 *                            norms, the four matmuls (ql_cpu_qmatmul, or ql_cpu_qmatmul_q8act where
 *                            the caller opts in to int8 activations), the attention above, silu_mul,
 *                            the residual adds; the per-op calls' exact arithmetic in their order, in
 *                            one call (a decode step's Python between these ops cost as much as the
 *                            ops, and more after each matmul had emptied the caches it runs from).
 *
 * Layouts (row-major, float32):
 *   qkv     (B, (H + 2 Hkv) * D)    one row per sequence: H query heads, then Hkv key, Hkv value heads
 *   cos,sin (B, D)                  RoPE at each sequence's position; sin's first half negated
 *                                   (llama.rope_cos_sin), so rope(x) = x * cos + roll(x, D / 2) * sin
 *   keys, values (B, Hkv, L, D)     the cache, L = its capacity; positions [0, position) are filled
 *   mask    (B, T) or NULL          additive, T = position + 1 (0 or the dtype's lowest: padding, window)
 *   out     (B, H * D)              the attention output, heads side by side
 *
 * Work partition: first every (sequence, kv head)'s new key and value are written into the cache
 * (the caller's thread: B * Hkv rows). Then one chunk per (sequence, kv head) attends for the H / Hkv
 * query heads that read it (GQA: query head h reads kv head h / (H / Hkv), as transformers'
 * repeat_kv), each key and value row read once for the group; where those chunks are too few for
 * the threads (one sequence: SmolLM2 has 3 kv heads for 2 threads), one chunk per query head. A
 * query head's arithmetic is the same in either partition and on any thread, so the result does not
 * depend on the thread count. Below ATTENTION_PARALLEL_MIN multiply-adds everything runs on the
 * caller's thread (a hand-off to the pool costs more than the work).
 *
 * Per query head:  q = rope(norm(q));  s[t] = (q . k[t]) * scale + mask[t];  p = softmax(s) (float32,
 * max subtracted);  out = sum_t p[t] v[t].  A row whose keys are all masked gets equal weights (every
 * s[t] is the dtype's lowest), as SDPA does with the same mask.
 *
 * Sums over D or n run in 16 partial sums (one 16-float vector; a single running sum would be a
 * chain of dependent adds), added pairwise at the end: a different order than torch's, within
 * float32 roundoff of it (tests/test_cpu_ops.py derives the bounds). Measured on this project's
 * 2-core Xeon (AVX-512), one thread: attention at T = 100 for SmolLM2's 9 / 3 heads of 64 in 13 us
 * (docs/runtime.md, "Native decode-step primitives").
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Comparisons may be evaluated for every lane (the selects of exp_f32, the max of the scores): GCC
 * vectorizes such loops only when it need not keep the FP exception flags of untaken branches. The
 * values computed are the same; nothing here reads the flags. */
#pragma GCC optimize("no-trapping-math")

#include "pool.h"
#include "quantlite.h"

#define PARTIAL_SUMS 16
/* Below this many multiply-adds (QK and PV over every head) the caller's thread does it all (SmolLM2's
 * 9 heads of 64: below ~228 cached positions). 1 << 15 (from ~28 positions) was slower on the loaded
 * machine, where the worker is often descheduled (docs/runtime.md, session 13); not measured quiet. */
#define ATTENTION_PARALLEL_MIN (1 << 18)

/* x86-64: each exported function is also built for AVX2 and AVX-512 and the loader picks the best the
 * CPU has (GCC function multi-versioning, an ifunc: no -m flags on this file, so it runs on any
 * x86-64). The arithmetic is the same in every version (no FMA: -ffp-contract=off; the same partial
 * sums), only the vector width differs. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QL_VECTOR_CLONES
#endif

/* ---------------------------------------------------------------- helpers */
/* 16 floats as one value (GCC vector extension: one zmm, two ymm or four xmm registers, as the
 * version's instruction set has them); aligned(4) lets it load from any float address. */
typedef float vec16 __attribute__((vector_size(PARTIAL_SUMS * sizeof(float)), aligned(4)));

typedef float vec8 __attribute__((vector_size(8 * sizeof(float)), aligned(4)));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float)), aligned(4)));

/* The 16 partial sums added pairwise, halves first (p[j] += p[j + 8], then + 4, + 2, + 1): 4 rounds
 * of vector adds, not 15 dependent scalar ones (written out: GCC left the loop form a scalar loop,
 * a third of the attention's time). */
static inline float tree_sum(const float partial[PARTIAL_SUMS]) {
    const vec8 eight = *(const vec8 *)partial + *(const vec8 *)(partial + 8);
    const vec4 four = (vec4){eight[0], eight[1], eight[2], eight[3]} + (vec4){eight[4], eight[5], eight[6], eight[7]};
    return (four[0] + four[2]) + (four[1] + four[3]);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    vec16 acc = {0};
    int64_t i = 0;
    for (; i + PARTIAL_SUMS <= n; i += PARTIAL_SUMS) acc += *(const vec16 *)(a + i) * *(const vec16 *)(b + i);
    float partial[PARTIAL_SUMS];
    memcpy(partial, &acc, sizeof partial);
    for (int j = 0; i < n; ++i, ++j) partial[j] += a[i] * b[i];
    return tree_sum(partial);
}

/* y += p * x over n floats */
static inline void axpy(float p, const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + PARTIAL_SUMS <= n; i += PARTIAL_SUMS) *(vec16 *)(y + i) += p * *(const vec16 *)(x + i);
    for (; i < n; ++i) y[i] += p * x[i];
}

static inline float sum(const float *a, int64_t n) {
    float partial[PARTIAL_SUMS] = {0};
    int64_t i = 0;
    for (; i + PARTIAL_SUMS <= n; i += PARTIAL_SUMS)
        for (int j = 0; j < PARTIAL_SUMS; ++j) partial[j] += a[i + j];
    for (int j = 0; i < n; ++i, ++j) partial[j] += a[i];
    return tree_sum(partial);
}

/* e^x in float32 without libm's scalar call (expf cost 30 us for the 1536 gates of one SmolLM2
 * layer), so that loops over it vectorize: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6
 * polynomial (relative error < 2 ulp), times 2^(n - 1) written into the exponent bits, times 2 (n
 * reaches 128 just below ln(FLT_MAX)). 0 below about -87 (n reaches -126, the exponent field 0: where
 * expf turns subnormal; softmax weights that small vanish against the largest, which is 1), +inf above ln(FLT_MAX), NaN stays NaN. n is
 * rounded by adding and subtracting 1.5 * 2^23 (round to nearest; the library is built without
 * -ffast-math, which would fold it away). */
static inline float exp_f32(float x) {
    const float high = 88.72283935546875f, low = -87.3365447504019f, round = 12582912.0f;
    const float clamped = x > high ? high : x < low ? low : x;
    const float n = (clamped * 1.44269504088896341f + round) - round;
    const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t bits = ((int32_t)n + 126) << 23;
    float two_to_n_minus_1;
    memcpy(&two_to_n_minus_1, &bits, sizeof two_to_n_minus_1);
    const float y = p * two_to_n_minus_1 * 2.0f;
    return x < low ? 0.0f : x > high ? INFINITY : y;
}

/* out[i] = weight[i] * (x[i] * r), r = 1 / sqrt(mean(x^2) + eps); out may be x. */
static inline void rms_norm_row(const float *x, const float *weight, int64_t n, float eps, float *out) {
    const float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

/* out = x * cos + roll(x, D / 2) * sin (sin signed), out != x. */
static inline void rope_row(const float *x, const float *cos_row, const float *sin_row, int64_t d, float *out) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos_row[i] + x[i + half] * sin_row[i];
    for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos_row[i] + x[i - half] * sin_row[i];
}

/* ---------------------------------------------------------------- rms_norm, silu_mul */
QL_VECTOR_CLONES int ql_cpu_rms_norm(const float *x, int64_t rows, int64_t n, int64_t x_row_stride, const float *weight,
                    float eps, float *out) {
    if (rows < 0 || n <= 0) return QL_ERR_BAD_SIZE;
    if (x_row_stride < n) return QL_ERR_BAD_STRIDE;
    if (rows == 0) return QL_OK;  /* an empty tensor's pointers may be NULL */
    if (x == NULL || weight == NULL || out == NULL) return QL_ERR_NULL_POINTER;
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * x_row_stride, weight, n, eps, out + r * n);
    return QL_OK;
}

QL_VECTOR_CLONES int ql_cpu_silu_mul(const float *gate_up, int64_t rows, int64_t n, int64_t row_stride, float *out) {
    if (rows < 0 || n <= 0) return QL_ERR_BAD_SIZE;
    if (row_stride < 2 * n) return QL_ERR_BAD_STRIDE;
    if (rows == 0) return QL_OK;
    if (gate_up == NULL || out == NULL) return QL_ERR_NULL_POINTER;
    for (int64_t r = 0; r < rows; ++r) {
        const float *gate = gate_up + r * row_stride, *up = gate + n;
        float *o = out + r * n;
        for (int64_t i = 0; i < n; ++i) o[i] = gate[i] / (1.0f + exp_f32(-gate[i])) * up[i];
    }
    return QL_OK;
}

/* ---------------------------------------------------------------- decode attention */
typedef struct {
    const ql_decode_attention_args *a;
    int64_t qkv_row;      /* (H + 2 Hkv) * D */
    int64_t group;        /* H / Hkv query heads per kv head */
    int64_t per_chunk;    /* query heads of one kv head per chunk: the group, or 1 */
    float *scratch;       /* (threads, scratch_floats) */
} attention_job;

/* Per thread: a normed head (D), the chunk's rotated queries (per_chunk, D), scores (per_chunk, T),
 * sums (per_chunk). */
static int64_t scratch_floats(const ql_decode_attention_args *a, int64_t per_chunk) {
    return a->head_dim + per_chunk * (a->head_dim + a->position + 2);
}

/* Each (sequence, kv head)'s new key (normed, rotated) and value into the cache at `position`. */
static QL_VECTOR_CLONES void write_new_position(const attention_job *job, float *normed) {
    const ql_decode_attention_args *a = job->a;
    const int64_t d = a->head_dim, kv_heads = a->kv_heads;
    for (int64_t b = 0; b < a->batch; ++b)
        for (int64_t kv = 0; kv < kv_heads; ++kv) {
            const float *row = a->qkv + b * job->qkv_row;
            float *keys = a->keys + ((b * kv_heads + kv) * a->capacity + a->position) * d;
            float *values = a->values + ((b * kv_heads + kv) * a->capacity + a->position) * d;
            const float *k_new = row + (a->heads + kv) * d;
            if (a->k_norm != NULL) rms_norm_row(k_new, a->k_norm, d, a->eps, normed), k_new = normed;
            rope_row(k_new, a->cos + b * d, a->sin + b * d, d, keys);
            memcpy(values, row + (a->heads + kv_heads + kv) * d, sizeof(float) * (size_t)d);
        }
}

/* Chunk c: sequence b, kv head kv, its query heads [first, first + count) (per_chunk of them). */
static QL_VECTOR_CLONES void attention_chunk(void *context, int64_t begin, int64_t end, int thread_index) {
    const attention_job *job = context;
    const ql_decode_attention_args *a = job->a;
    const int64_t d = a->head_dim, kv_heads = a->kv_heads, total = a->position + 1, group = job->group;
    const int64_t per_chunk = job->per_chunk, chunks_per_kv = group / per_chunk;
    float *normed = job->scratch + thread_index * scratch_floats(a, per_chunk);  /* (D,) */
    float *queries = normed + d;                                                  /* (per_chunk, D) */
    float *scores = queries + per_chunk * d;                                      /* (per_chunk, T) */
    float *sums = scores + per_chunk * total;                                     /* (per_chunk,) */

    for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t b = chunk / (kv_heads * chunks_per_kv), kv = chunk / chunks_per_kv % kv_heads;
        const int64_t first = kv * group + chunk % chunks_per_kv * per_chunk;  /* query head */
        const float *row = a->qkv + b * job->qkv_row;
        const float *cos_row = a->cos + b * d, *sin_row = a->sin + b * d;
        const float *mask = a->mask == NULL ? NULL : a->mask + b * a->mask_row_stride;
        const float *keys = a->keys + ((b * kv_heads + kv) * a->capacity) * d;   /* (L, D) of this kv head */
        const float *values = a->values + ((b * kv_heads + kv) * a->capacity) * d;

        /* --- the chunk's query heads, normed and rotated */
        for (int64_t j = 0; j < per_chunk; ++j) {
            const float *q = row + (first + j) * d;
            if (a->q_norm != NULL) rms_norm_row(q, a->q_norm, d, a->eps, normed), q = normed;
            rope_row(q, cos_row, sin_row, d, queries + j * d);
        }

        /* --- scores (each key row read once for the chunk), softmax in float32, max subtracted */
        for (int64_t t = 0; t < total; ++t)
            for (int64_t j = 0; j < per_chunk; ++j)
                scores[j * total + t] = dot(queries + j * d, keys + t * d, d) * a->scale + (mask == NULL ? 0.0f : mask[t]);
        for (int64_t j = 0; j < per_chunk; ++j) {
            float *s = scores + j * total, high = -INFINITY;
            for (int64_t t = 0; t < total; ++t) high = s[t] > high ? s[t] : high;
            for (int64_t t = 0; t < total; ++t) s[t] = exp_f32(s[t] - high);
            sums[j] = sum(s, total);
        }

        /* --- out = sum_t p[t] v[t] (each value row read once for the chunk) */
        float *out = a->out + b * a->heads * d + first * d;  /* (per_chunk, D) */
        for (int64_t i = 0; i < per_chunk * d; ++i) out[i] = 0.0f;
        for (int64_t t = 0; t < total; ++t)
            for (int64_t j = 0; j < per_chunk; ++j) {
                axpy(scores[j * total + t] / sums[j], values + t * d, out + j * d, d);
            }
    }
}

int ql_cpu_decode_attention(const ql_decode_attention_args *a, int n_threads) {
    if (a == NULL || a->qkv == NULL || a->cos == NULL || a->sin == NULL || a->keys == NULL ||
        a->values == NULL || a->out == NULL)
        return QL_ERR_NULL_POINTER;
    if (a->batch <= 0 || a->heads <= 0 || a->kv_heads <= 0 || a->heads % a->kv_heads != 0 ||
        a->head_dim <= 0 || a->head_dim % 2 != 0 || a->position < 0 || a->position >= a->capacity)
        return QL_ERR_BAD_SIZE;
    if (a->mask != NULL && a->mask_row_stride < a->position + 1) return QL_ERR_BAD_STRIDE;
    const int64_t work = 2 * a->batch * a->heads * (a->position + 1) * a->head_dim;
    const int threads = work < ATTENTION_PARALLEL_MIN ? 1 : n_threads > 0 ? n_threads : ql_available_cores();
    const int64_t group = a->heads / a->kv_heads;
    /* a chunk per query head where the kv heads alone are too few to share between the threads */
    const int64_t per_chunk = threads > 1 && a->batch * a->kv_heads < 2 * threads ? 1 : group;
    float *scratch = malloc(sizeof(float) * (size_t)(threads * scratch_floats(a, per_chunk)));
    if (scratch == NULL) return QL_ERR_OUT_OF_MEMORY;
    attention_job job = {a, (a->heads + 2 * a->kv_heads) * a->head_dim, group, per_chunk, scratch};
    write_new_position(&job, scratch);
    const int64_t chunks = a->batch * a->kv_heads * (group / per_chunk);
    if (threads == 1)
        attention_chunk(&job, 0, chunks, 0);
    else
        ql_parallel_for(chunks, 1, threads, attention_chunk, &job);
    free(scratch);
    return QL_OK;
}

/* ---------------------------------------------------------------- a whole decoder layer */
static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* y (rows, N) = x (rows, K) @ W^T (+ bias), rows contiguous, by ql_cpu_qmatmul or, with int8_activations,
 * ql_cpu_qmatmul_q8act; the call's wall time added to *seconds. */
static int projection(const ql_weight *w, const float *bias, const float *x, int64_t rows, float *y, int n_threads,
                      int int8_activations, double *seconds) {
    const double start = seconds_now();
    const int status = (int8_activations ? ql_cpu_qmatmul_q8act : ql_cpu_qmatmul)(w, x, rows, w->k, y, w->n, QL_F32,
                                                                                   QL_ISA_AUTO, n_threads);
    *seconds += seconds_now() - start;
    if (status == QL_OK && bias != NULL)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < w->n; ++i) y[r * w->n + i] += bias[i];
    return status;
}

/* out (n,) = x + delta, element by element (torch's float32 add) */
static void add_rows(const float *x, const float *delta, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] + delta[i];
}

static int decode_one_layer(ql_decode_layer_args *a, int n_threads) {
    if (a->qkv == NULL || a->o == NULL || a->gate_up == NULL || a->down == NULL || a->input_norm == NULL ||
        a->post_attention_norm == NULL || a->x == NULL || a->out == NULL)
        return QL_ERR_NULL_POINTER;
    const ql_decode_attention_args *at = &a->attention;
    const int64_t rows = at->batch, e = a->hidden, f = a->intermediate;
    const int64_t qkv_n = (at->heads + 2 * at->kv_heads) * at->head_dim, attention_n = at->heads * at->head_dim;
    if (rows <= 0 || e <= 0 || f <= 0 || a->qkv->n != qkv_n || a->qkv->k != e || a->o->n != e ||
        a->o->k != attention_n || a->gate_up->n != 2 * f || a->gate_up->k != e || a->down->n != e || a->down->k != f)
        return QL_ERR_BAD_SIZE;
    /* scratch, (B, ...) each: h (E), qkv, attention out (H D), gate_up (2F), silu_mul (F), a projection (E) */
    float *scratch = malloc(sizeof(float) * (size_t)(rows * (e + qkv_n + attention_n + 2 * f + f + e)));
    if (scratch == NULL) return QL_ERR_OUT_OF_MEMORY;
    float *h = scratch, *qkv = h + rows * e, *attended = qkv + rows * qkv_n, *gate_up = attended + rows * attention_n;
    float *activated = gate_up + rows * 2 * f, *delta = activated + rows * f;

    int status = ql_cpu_rms_norm(a->x, rows, e, e, a->input_norm, a->eps, h);
    if (status == QL_OK) status = projection(a->qkv, a->qkv_bias, h, rows, qkv, n_threads, a->int8_activations, &a->matmul_seconds);
    if (status == QL_OK) {
        ql_decode_attention_args attention = *at;
        attention.qkv = qkv;
        attention.out = attended;
        const double start = seconds_now();
        status = ql_cpu_decode_attention(&attention, n_threads);
        a->attention_seconds += seconds_now() - start;
    }
    if (status == QL_OK) status = projection(a->o, a->o_bias, attended, rows, delta, n_threads, a->int8_activations, &a->matmul_seconds);
    if (status == QL_OK) {
        add_rows(a->x, delta, rows * e, a->out);  /* x1, kept in out (x is not read after this) */
        status = ql_cpu_rms_norm(a->out, rows, e, e, a->post_attention_norm, a->eps, h);
    }
    if (status == QL_OK) status = projection(a->gate_up, a->gate_up_bias, h, rows, gate_up, n_threads, a->int8_activations, &a->matmul_seconds);
    if (status == QL_OK) status = ql_cpu_silu_mul(gate_up, rows, f, 2 * f, activated);
    if (status == QL_OK) status = projection(a->down, a->down_bias, activated, rows, delta, n_threads, a->int8_activations, &a->matmul_seconds);
    if (status == QL_OK) add_rows(a->out, delta, rows * e, a->out);
    free(scratch);
    return status;
}

int ql_cpu_decode_layer(ql_decode_layer_args *layers, int64_t n_layers, int n_threads) {
    if (layers == NULL) return QL_ERR_NULL_POINTER;
    if (n_layers <= 0) return QL_ERR_BAD_SIZE;
    const ql_decode_layer_args *first = &layers[0];
    for (int64_t i = 0; i < n_layers; ++i) {
        ql_decode_layer_args *a = &layers[i];
        if (i > 0) {  /* the step's inputs are layers[0]'s; the stream runs in place in `out` */
            if (a->attention.batch != first->attention.batch || a->hidden != first->hidden ||
                a->attention.head_dim != first->attention.head_dim)
                return QL_ERR_BAD_SIZE;
            a->attention.position = first->attention.position;
            a->attention.cos = first->attention.cos;
            a->attention.sin = first->attention.sin;
            a->attention.mask = first->attention.mask;
            a->attention.mask_row_stride = first->attention.mask_row_stride;
            a->x = a->out = first->out;
            a->int8_activations = first->int8_activations;
        }
        const int status = decode_one_layer(a, n_threads);
        if (status != QL_OK) return status;
    }
    return QL_OK;
}

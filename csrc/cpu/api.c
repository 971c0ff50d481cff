/* The CPU entry points of quantlite.h: check the arguments, pick the instruction set, prepare x,
 * split the output rows over the thread pool. The arithmetic lives in qmatmul_scalar.c,
 * qmatmul_avx2.c, qmatmul_avx512.c and the prefill GEMMs gemm_avx2.c and gemm_avx512.c (from
 * QL_GEMM_MIN_M rows of x); the int8-activation opt-in in qmatmul_q8act_scalar.c,
 * qmatmul_q8act_avx2.c and qmatmul_q8act_avx512.c, and with VNNI its GEMM gemm_q8act_avx512.c
 * (from QL_Q8ACT_GEMM_MIN_M rows). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "pool.h"
#include "quantlite.h"
#include "quantlite_checks.h"
#include "quantlite_decode.h"
#include "quantlite_status.h"

/* ---------------------------------------------------------------- instruction sets */
/* Levels are ordered: a CPU with one runs every lower one (AVX-512 F CPUs all have AVX2, FMA and
 * F16C; the vector kernels widen float16 scales and outliers with F16C's vcvtph2ps).
 * __builtin_cpu_supports also checks that the OS saves the registers (XGETBV). */
int ql_cpu_best_isa(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
        return QL_ISA_SCALAR;
    return __builtin_cpu_supports("avx512f") ? QL_ISA_AVX512 : QL_ISA_AVX2;
}

const char *ql_cpu_isa_name(int isa) {
    switch (isa) {
        case QL_ISA_SCALAR: return "scalar";
        case QL_ISA_AVX2: return "avx2";
        case QL_ISA_AVX512: return "avx512";
        case QL_ISA_AUTO: return ql_cpu_isa_name(ql_cpu_best_isa());
        default: return "unknown";
    }
}

static int resolve_isa(int isa, int *resolved) {
    const int best = ql_cpu_best_isa();
    if (isa == QL_ISA_AUTO) isa = best;
    if (isa < QL_ISA_SCALAR || isa > best) return QL_ERR_BAD_ISA;
    *resolved = isa;
    return QL_OK;
}

/* row_ptr runs from 0 to nnz, and over the rows [n_begin, n_end) a call reads it rises and every
 * column lies in [0, K): the kernels index x (or the output row) with them. */
static int check_outliers(const ql_weight *w, int64_t n_begin, int64_t n_end) {
    if (w->row_ptr[0] != 0 || w->row_ptr[w->n] != w->nnz) return QL_ERR_BAD_OUTLIERS;
    if (w->row_ptr[n_begin] < 0 || w->row_ptr[n_end] > w->nnz) return QL_ERR_BAD_OUTLIERS;
    for (int64_t n = n_begin; n < n_end; ++n)
        if (w->row_ptr[n + 1] < w->row_ptr[n]) return QL_ERR_BAD_OUTLIERS;
    for (int64_t e = w->row_ptr[n_begin]; e < w->row_ptr[n_end]; ++e)
        if (ql_outlier_col(w->cols, w->col_kind, e) < 0 || ql_outlier_col(w->cols, w->col_kind, e) >= w->k) return QL_ERR_BAD_OUTLIERS;
    return QL_OK;
}

/* ---------------------------------------------------------------- qmatmul */
static void qmatmul_chunk_scalar(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_qmatmul_rows_scalar((const ql_matmul_job *)job, begin, end, thread_index);
}

static void qmatmul_chunk_avx2(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_qmatmul_rows_avx2((const ql_matmul_job *)job, begin, end, thread_index);
}

static void qmatmul_chunk_avx512(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_qmatmul_rows_avx512((const ql_matmul_job *)job, begin, end, thread_index);
}

static void gemm_chunk_avx512(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_gemm_rows_avx512((const ql_matmul_job *)job, begin, end, thread_index);
}

static void gemm_chunk_avx2(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_gemm_rows_avx2((const ql_matmul_job *)job, begin, end, thread_index);
}

/* The kernel a vector call runs: per instruction set, the GEMV / small-M kernel, or the prefill GEMM
 * (gemm.h) from QL_GEMM_MIN_M rows of x on; what api.c needs of each is one entry of VECTOR_KERNELS. */
enum { KERNEL_AVX2, KERNEL_AVX512, KERNEL_GEMM_AVX2, KERNEL_GEMM_AVX512 };

typedef struct {
    ql_chunk_fn rows;                                   /* a chunk of output rows (ql_parallel_for's fn) */
    int64_t (*scratch_floats)(const ql_matmul_job *);   /* per thread */
    int64_t gemm_x_group;                               /* a GEMM's rows of x per x_packed group (kernels.h); 0: not a GEMM */
    int64_t min_chunk_rows;                             /* ql_row_grain's min_rows */
} vector_kernel_entry;

static const vector_kernel_entry VECTOR_KERNELS[] = {
    [KERNEL_AVX2] = {qmatmul_chunk_avx2, ql_avx2_scratch_floats, 0, QL_MIN_CHUNK_ROWS},
    [KERNEL_AVX512] = {qmatmul_chunk_avx512, ql_avx512_scratch_floats, 0, QL_MIN_CHUNK_ROWS},
    [KERNEL_GEMM_AVX2] = {gemm_chunk_avx2, ql_gemm_avx2_scratch_floats, QL_GEMM_AVX2_X_GROUP, QL_GEMM_PANEL_ROWS},
    [KERNEL_GEMM_AVX512] = {gemm_chunk_avx512, ql_gemm_avx512_scratch_floats, QL_GEMM_AVX512_X_GROUP, QL_GEMM_PANEL_ROWS},
};

static int vector_kernel(int isa, int64_t m) {
    if (m >= QL_GEMM_MIN_M) return isa == QL_ISA_AVX2 ? KERNEL_GEMM_AVX2 : KERNEL_GEMM_AVX512;
    return isa == QL_ISA_AVX2 ? KERNEL_AVX2 : KERNEL_AVX512;
}

static int is_gemm(int kernel) { return VECTOR_KERNELS[kernel].gemm_x_group != 0; }

/* Floats of x_packed for each kernel (kernels.h); the AVX-512 one covers whole 128-column strips,
 * the GEMMs' whole groups of rows. */
static int64_t x_packed_floats(const ql_matmul_job *job, int kernel) {
    if (kernel == KERNEL_AVX2) return job->m * job->padded_k;
    const int64_t group = VECTOR_KERNELS[kernel].gemm_x_group;
    if (is_gemm(kernel)) return (job->m + group - 1) / group * group * job->padded_k;
    return job->m * ((job->padded_k + QL_AVX512_STRIP - 1) / QL_AVX512_STRIP * QL_AVX512_STRIP);
}

/* A GEMM's x (M, K) in any dtype -> x_packed (G, Kp, group) (ql_gemm_x_position), rows past M and
 * columns past K zero: groups [begin, end) (ql_parallel_for's chunk; every thread packs its share
 * before the GEMM starts). A tile of PACK_COLUMNS columns at a time, row by row: the group's rows
 * lie a multiple of 4 KiB apart at K = 4096, so reading all of them column by column thrashes one
 * L1 set (1.6 ns a float); whole rows at a time (as before) wrote with a 64-byte stride over the
 * group's whole slab (2.6 ns a float, 3-4 % of a one-thread M = 64-512 call, on the caller alone). */
typedef struct {
    const ql_matmul_job *job;
    int64_t group;
    float *x_packed;
} gemm_pack_job;

#define PACK_COLUMNS 16  /* per step: one 64-byte line of each row read, PACK_COLUMNS runs written */

static void pack_gemm_x_groups(void *context, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    const gemm_pack_job *pack = context;
    const ql_matmul_job *job = pack->job;
    const int64_t group = pack->group, k = job->w->k, kp = job->padded_k;
    const int64_t row_bytes = job->x_row_stride * ql_dtype_size(job->dtype);
    for (int64_t g = begin; g < end; ++g) {
        const int64_t rows = job->m - g * group < group ? job->m - g * group : group;
        const char *x_rows = (const char *)job->x + g * group * row_bytes;
        float *out = pack->x_packed + g * kp * group;
        if (rows < group || k < kp) memset(out, 0, sizeof(float) * (size_t)(kp * group));  /* the padding */
        for (int64_t c0 = 0; c0 < k; c0 += PACK_COLUMNS) {
            const int64_t columns = k - c0 < PACK_COLUMNS ? k - c0 : PACK_COLUMNS;
            for (int64_t i = 0; i < rows; ++i) {
                const char *x_row = x_rows + i * row_bytes;
                float *column = pack->x_packed + ql_gemm_x_position(c0, g * group + i, kp, group);
                if (job->dtype == QL_F32)  /* the common case, without ql_load's dtype test per float */
                    for (int64_t c = 0; c < columns; ++c) column[c * group] = ((const float *)x_row)[c0 + c];
                else
                    for (int64_t c = 0; c < columns; ++c) column[c * group] = ql_load(x_row, job->dtype, c0 + c);
            }
        }
    }
}

/* x (M, K) in any dtype -> x_packed in a GEMV kernel's order (kernels.h), every padding column
 * zero, and x_columns (K, M) float32 (at M = 1 that is x as float32: x_packed's source row). */
static void fill_x_columns(const ql_matmul_job *job, float *x_columns) {
    for (int64_t m = 0; m < job->m; ++m) {
        const char *x_row = (const char *)job->x + m * job->x_row_stride * ql_dtype_size(job->dtype);
        for (int64_t c = 0; c < job->w->k; ++c) x_columns[c * job->m + m] = ql_load(x_row, job->dtype, c);
    }
}

static void pack_x(const ql_matmul_job *job, int kernel, float *x_packed, int64_t x_packed_count, float *x_columns) {
    const int64_t k = job->w->k, m_rows = job->m;
    memset(x_packed, 0, sizeof(float) * (size_t)x_packed_count);
    fill_x_columns(job, x_columns);
    if (kernel == KERNEL_AVX2) {
        for (int64_t m = 0; m < m_rows; ++m)
            for (int64_t c = 0; c < k; ++c) x_packed[ql_packed_position(c, m, m_rows, job->padded_k)] = x_columns[c * m_rows + m];
        return;
    }
    /* AVX-512: per tile of up to 8 rows and strip of 128 columns, (8 v, x_rows, 16 lanes) with lane l
     * of vector v = column 8 l + v (ql_avx512_x_position, without its divisions per element) */
    const int64_t strips = (job->padded_k + QL_AVX512_STRIP - 1) / QL_AVX512_STRIP;
    for (int64_t m0 = 0; m0 < m_rows; m0 += QL_AVX512_X_TILE) {
        const int64_t x_rows = m_rows - m0 < QL_AVX512_X_TILE ? m_rows - m0 : QL_AVX512_X_TILE;
        float *tile = x_packed + m0 * strips * QL_AVX512_STRIP;
        for (int64_t c = 0; c < k; ++c) {
            const int64_t strip = c / QL_AVX512_STRIP, lane = (c % QL_AVX512_STRIP) / 8, v = c % 8;
            float *column = tile + ((strip * 8 + v) * x_rows) * 16 + lane;
            for (int64_t i = 0; i < x_rows; ++i) column[i * 16] = x_columns[c * m_rows + m0 + i];
        }
    }
}

/* The per-call buffers of a vector qmatmul (x_packed, x_columns, every thread's scratch), kept by
 * the calling thread from call to call up to KEPT_BUFFER_BYTES (a decode step makes ~200 calls;
 * malloc and its page faults per call were measurable at SmolLM2's sizes), allocated per call above.
 * The kept buffer is MIN_KEPT_BUFFER_BYTES, or as large as the largest call so far up to
 * KEPT_BUFFER_BYTES: a prefill's x_packed (M x K floats: 8 MiB at M = 512, K = 4096) would
 * otherwise be page-faulted in on every call (4-5 % of such a call's time, measured). */
#define MIN_KEPT_BUFFER_BYTES ((size_t)4 << 20)
#define KEPT_BUFFER_BYTES ((size_t)64 << 20)
static _Thread_local float *kept_buffer;
static _Thread_local size_t kept_buffer_bytes;

/* The kept buffer is also registered under a pthread key whose destructor frees it when its thread
 * exits (a loader or pool thread that called the kernels does not leave its buffer behind). */
static pthread_key_t kept_buffer_key;
static pthread_once_t kept_buffer_key_once = PTHREAD_ONCE_INIT;
static void make_kept_buffer_key(void) { pthread_key_create(&kept_buffer_key, free); }

static float *call_buffer(size_t bytes) {
    if (bytes > KEPT_BUFFER_BYTES) return aligned_alloc(64, bytes);
    if (bytes > kept_buffer_bytes) {
        pthread_once(&kept_buffer_key_once, make_kept_buffer_key);
        free(kept_buffer);
        const size_t size = bytes < MIN_KEPT_BUFFER_BYTES ? MIN_KEPT_BUFFER_BYTES : (bytes + 63) / 64 * 64;
        kept_buffer = aligned_alloc(64, size);
        kept_buffer_bytes = kept_buffer ? size : 0;
        pthread_setspecific(kept_buffer_key, kept_buffer);
    }
    return kept_buffer;
}

static void release_call_buffer(float *buffer) {
    if (buffer != kept_buffer) free(buffer);
}

static int64_t aligned_floats(int64_t count) { return (count + 15) / 16 * 16; }  /* 64-byte steps */

int ql_cpu_qmatmul(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                   int64_t y_row_stride, int dtype, int isa, int n_threads) {
    int status = ql_check_matmul(w, x, m, x_row_stride, y, y_row_stride, dtype);
    if (status == QL_OK && (w->row_ptr[0] != 0 || w->row_ptr[w->n] != w->nnz)) status = QL_ERR_BAD_OUTLIERS;
    if (status == QL_OK) status = resolve_isa(isa, &isa);
    /* the vector kernels check the CSR of each chunk as they read it (chunk.h) */
    if (status == QL_OK && isa == QL_ISA_SCALAR) status = check_outliers(w, 0, w->n);
    if (status != QL_OK) return status;

    static _Atomic uint64_t calls;
    ql_matmul_job job = {
        .w = w, .padded_k = ql_padded_k(w), .x = x, .m = m, .x_row_stride = x_row_stride,
        .y = y, .y_row_stride = y_row_stride, .dtype = dtype, .status = &status, .call = ++calls,
    };
    if (isa == QL_ISA_SCALAR) {
        ql_parallel_for(w->n, ql_row_grain(w->n, job.padded_k * m, QL_MIN_CHUNK_ROWS, n_threads), n_threads, qmatmul_chunk_scalar, &job);
        return QL_OK;
    }

    const int threads = n_threads > 0 ? n_threads : ql_available_cores();
    const int kernel = vector_kernel(isa, m);
    job.scratch_floats_per_thread = aligned_floats(VECTOR_KERNELS[kernel].scratch_floats(&job));
    const int64_t x_packed_count = aligned_floats(x_packed_floats(&job, kernel)), x_columns_count = is_gemm(kernel) ? 0 : aligned_floats(m * w->k);
    float *buffer = call_buffer(sizeof(float) * (size_t)(x_packed_count + x_columns_count + job.scratch_floats_per_thread * threads));
    if (buffer == NULL) return QL_ERR_OUT_OF_MEMORY;
    float *x_packed = buffer, *x_columns = buffer + x_packed_count;  /* x_packed 64-byte aligned: aligned loads */
    if (is_gemm(kernel)) {
        const int64_t group = VECTOR_KERNELS[kernel].gemm_x_group, groups = (m + group - 1) / group;
        gemm_pack_job pack = {&job, group, x_packed};
        ql_parallel_for(groups, (groups + threads - 1) / threads, threads, pack_gemm_x_groups, &pack);
    } else {
        pack_x(&job, kernel, x_packed, x_packed_count, x_columns);
    }
    job.x_packed = x_packed;
    job.x_columns = is_gemm(kernel) ? NULL : x_columns;
    job.scratch = x_columns + x_columns_count;
    ql_parallel_for(w->n, ql_row_grain(w->n, job.padded_k * m, VECTOR_KERNELS[kernel].min_chunk_rows, threads), threads,
                    VECTOR_KERNELS[kernel].rows, &job);
    release_call_buffer(buffer);
    return __atomic_load_n(&status, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- qmatmul with int8 activations */
static void q8act_chunk_scalar(void *job, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    ql_q8act_rows_scalar((const ql_q8act_job *)job, begin, end);
}

static void q8act_chunk_avx2(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_q8act_rows_avx2((const ql_q8act_job *)job, begin, end, thread_index);
}

static void q8act_chunk_avx512(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_q8act_rows_avx512((const ql_q8act_job *)job, begin, end, thread_index);
}

static void q8act_chunk_gemm_avx512(void *job, int64_t begin, int64_t end, int thread_index) {
    ql_q8act_gemm_rows_avx512((const ql_q8act_job *)job, begin, end, thread_index);
}

/* The int8 GEMM's x: per group of 16 rows, its int8 record (gemm_q8act_avx512.c) and, with
 * outliers, its float32 columns (the float GEMM's x_packed) and at once, while they are in L2, the
 * group's outlier sums of every row of W; each thread a share of the groups. */
typedef struct {
    const ql_q8act_job *job;
    float level_unit;
    void *x_groups;
    float *x_packed, *outlier_sums;  /* NULL: no outliers */
} q8act_gemm_pack_job;

static void pack_q8act_gemm_groups(void *context, int64_t begin, int64_t end, int thread_index) {
    const q8act_gemm_pack_job *pack = context;
    const ql_matmul_job *base = &pack->job->base;
    for (int64_t g = begin; g < end; g += QL_Q8ACT_OUTLIER_GROUPS) {  /* a few groups at a time: their floats in L2 */
        const int64_t g_end = end - g < QL_Q8ACT_OUTLIER_GROUPS ? end : g + QL_Q8ACT_OUTLIER_GROUPS;
        ql_q8act_gemm_pack_groups(pack->job, pack->level_unit, pack->x_groups, g, g_end,
                                  base->scratch + thread_index * base->scratch_floats_per_thread);
        if (pack->x_packed == NULL) continue;
        gemm_pack_job floats = {base, QL_GEMM_AVX512_X_GROUP, pack->x_packed};
        pack_gemm_x_groups(&floats, g, g_end, thread_index);
        ql_q8act_gemm_outliers(pack->job, pack->x_packed, pack->outlier_sums, g, g_end);
    }
}

/* ql_cpu_qmatmul_q8act from QL_Q8ACT_GEMM_MIN_M rows on, with VNNI: the call buffer holds the x
 * records, with outliers the float x_packed (G, Kp, 16) and the outlier sums (G, N, 16), and every
 * thread's scratch. The CSR is checked whole first (the outlier pass reads every row's). */
static int q8act_gemm(ql_q8act_job *job, float level_unit, int threads) {
    const ql_matmul_job *base = &job->base;
    const ql_weight *w = base->w;
    const int status = check_outliers(w, 0, w->n);
    if (status != QL_OK) return status;
    const int64_t group = QL_GEMM_AVX512_X_GROUP, groups = (base->m + group - 1) / group;
    const int64_t records_bytes = ql_aligned_bytes(ql_q8act_gemm_x_bytes(job));
    const int64_t packed_bytes = w->nnz ? ql_aligned_bytes(sizeof(float) * groups * group * base->padded_k) : 0;
    const int64_t sums_bytes = w->nnz ? ql_aligned_bytes(sizeof(float) * groups * group * w->n) : 0;
    job->base.scratch_floats_per_thread = aligned_floats(ql_q8act_gemm_scratch_floats(job));
    const int64_t scratch_bytes = (int64_t)sizeof(float) * job->base.scratch_floats_per_thread * threads;
    char *buffer = (char *)call_buffer((size_t)(records_bytes + packed_bytes + sums_bytes + scratch_bytes));
    if (buffer == NULL) return QL_ERR_OUT_OF_MEMORY;
    float *x_packed = w->nnz ? (float *)(buffer + records_bytes) : NULL;
    float *outlier_sums = w->nnz ? (float *)(buffer + records_bytes + packed_bytes) : NULL;
    job->x_groups = buffer;
    job->outlier_sums = outlier_sums;
    job->base.scratch = (float *)(buffer + records_bytes + packed_bytes + sums_bytes);
    q8act_gemm_pack_job pack = {job, level_unit, buffer, x_packed, outlier_sums};
    ql_parallel_for(groups, (groups + threads - 1) / threads, threads, pack_q8act_gemm_groups, &pack);
    ql_parallel_for(w->n, ql_row_grain(w->n, base->padded_k * base->m, QL_GEMM_PANEL_ROWS, threads), threads,
                    q8act_chunk_gemm_avx512, job);
    release_call_buffer((float *)buffer);
    return __atomic_load_n(base->status, __ATOMIC_RELAXED);
}

/* x is quantized once per call by the caller's thread (M x Kp values, against the N x Kp / 2 code
 * bytes the call reads), then the rows of W are split over the pool. The call buffer holds, 64-byte
 * aligned: the kernel's x records and strip table (AVX-512 and AVX2), for AVX-512 a float32 row of
 * x padded to whole strips, x_columns (K, M) float32 (the outliers') and every thread's scratch
 * (both vector kernels); for the portable rule and AVX2 x_q (M, Kp) int8 and x_factor (M, Kp / A),
 * which AVX2 then rearranges into its records. */
int ql_cpu_qmatmul_q8act(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                         int64_t y_row_stride, int dtype, int isa, int n_threads) {
    int status = ql_check_matmul(w, x, m, x_row_stride, y, y_row_stride, dtype);
    if (status == QL_OK) status = resolve_isa(isa, &isa);
    const int vnni = status == QL_OK && isa == QL_ISA_AVX512 && ql_q8act_avx512_supported();
    const int avx2 = status == QL_OK && !vnni && isa >= QL_ISA_AVX2;  /* AVX2, or AVX-512 without VNNI */
    /* the vector kernels' chunks check the CSR as they read it (chunk.h) */
    if (status == QL_OK && !vnni && !avx2) status = check_outliers(w, 0, w->n);
    if (status != QL_OK) return status;

    const int threads = n_threads > 0 ? n_threads : ql_available_cores();
    ql_q8act_job job = {
        .base = {.w = w, .padded_k = ql_padded_k(w), .x = x, .m = m, .x_row_stride = x_row_stride,
                 .y = y, .y_row_stride = y_row_stride, .dtype = dtype, .status = &status},
        .act_block = QL_Q8ACT_BLOCK(w->block_size),
    };
    float level_unit;
    ql_q8act_levels(w->codebook, job.levels, &level_unit);
    if (vnni && m >= QL_Q8ACT_GEMM_MIN_M) return q8act_gemm(&job, level_unit, threads);
    const int64_t padded_k = job.base.padded_k;
    int64_t x_q_bytes = 0, factor_bytes = 0, strip_bytes = 0, row_bytes = 0, columns_bytes = 0, scratch_bytes = 0;
    if (vnni || avx2) {
        strip_bytes = ql_aligned_bytes(vnni ? ql_q8act_avx512_strip_bytes(&job) : ql_q8act_avx2_strip_bytes(&job));
        columns_bytes = ql_aligned_bytes(sizeof(float) * m * w->k);
        job.base.scratch_floats_per_thread = aligned_floats(vnni ? ql_q8act_avx512_scratch_floats(&job)
                                                                 : ql_q8act_avx2_scratch_floats(&job));
        scratch_bytes = (int64_t)sizeof(float) * job.base.scratch_floats_per_thread * threads;
    }
    if (vnni) {
        row_bytes = ql_aligned_bytes(sizeof(float) * (padded_k + QL_AVX512_STRIP));
    } else {
        x_q_bytes = ql_aligned_bytes(m * padded_k);
        factor_bytes = ql_aligned_bytes(sizeof(float) * m * (padded_k / job.act_block));
    }
    char *buffer = (char *)call_buffer((size_t)(strip_bytes + row_bytes + columns_bytes + scratch_bytes + factor_bytes + x_q_bytes));
    if (buffer == NULL) return QL_ERR_OUT_OF_MEMORY;
    char *x_strips = buffer, *row = x_strips + strip_bytes, *x_columns = row + row_bytes, *scratch = x_columns + columns_bytes;
    float *x_factor = (float *)(scratch + scratch_bytes);
    int8_t *x_q = (int8_t *)((char *)x_factor + factor_bytes);
    if (vnni) {  /* x quantized straight into the kernel's records, in vectors */
        ql_q8act_pack_avx512(&job, level_unit, (float *)row, x_strips);
    } else {
        ql_q8act_quantize_x(x, dtype, x_row_stride, m, w->k, padded_k, job.act_block, level_unit, x_q, x_factor);
        job.x_q = x_q;
        job.x_factor = x_factor;
        if (avx2) ql_q8act_pack_avx2(&job, x_strips);  /* the rule's x_q and factors, rearranged */
    }
    if (vnni || avx2) {
        fill_x_columns(&job.base, (float *)x_columns);
        job.x_strips = x_strips;
        job.base.x_columns = (const float *)x_columns;
        job.base.scratch = (float *)scratch;
    }
    ql_parallel_for(w->n, ql_row_grain(w->n, padded_k * m, QL_MIN_CHUNK_ROWS, threads), threads,
                    vnni ? q8act_chunk_avx512 : avx2 ? q8act_chunk_avx2 : q8act_chunk_scalar, &job);
    release_call_buffer((float *)buffer);
    return __atomic_load_n(&status, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- dequantize */
void ql_dequantize_rows_scalar(const ql_dequantize_job *job, int64_t begin, int64_t end) {
    const ql_weight *w = job->w;
    const int64_t n_blocks = job->padded_k / w->block_size;
    for (int64_t n = begin; n < end; ++n) {
        const uint8_t *code_row = w->codes + n * (job->padded_k / 2);
        const int64_t out_row = (n - job->n_begin) * job->out_row_stride;
        int64_t e = w->row_ptr[n];  /* next outlier of this row; columns ascend */
        float scale = 0.0f;
        for (int64_t k = 0; k < w->k; ++k) {
            if (k % w->block_size == 0) scale = ql_scale_at(w, n * n_blocks + k / w->block_size);
            float value = ql_weight_at(w->codebook, ql_code_at(code_row, k), scale);
            for (; e < w->row_ptr[n + 1] && ql_outlier_col(w->cols, w->col_kind, e) == k; ++e) value += ql_outlier_val(w->vals, w->val_kind, e);
            ql_store(job->out, job->dtype, out_row + k, value);
        }
    }
}

/* The pool counts from 0: a chunk [begin, end) is rows n_begin + begin .. */
static void dequantize_chunk_scalar(void *context, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    const ql_dequantize_job *job = context;
    ql_dequantize_rows_scalar(job, job->n_begin + begin, job->n_begin + end);
}

static void dequantize_chunk_avx512(void *context, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    const ql_dequantize_job *job = context;
    ql_dequantize_rows_avx512(job, job->n_begin + begin, job->n_begin + end);
}

int ql_cpu_dequantize_rows(const ql_weight *w, int64_t n_begin, int64_t n_end, void *out, int64_t out_row_stride,
                           int dtype, int isa, int n_threads) {
    int status = ql_check_weight(w);
    if (status == QL_OK && out == NULL) status = QL_ERR_NULL_POINTER;
    if (status == QL_OK && (n_begin < 0 || n_end > w->n || n_begin >= n_end)) status = QL_ERR_BAD_SIZE;
    if (status == QL_OK && out_row_stride < w->k) status = QL_ERR_BAD_STRIDE;
    if (status == QL_OK) status = ql_check_dtype(dtype);
    if (status == QL_OK) status = check_outliers(w, n_begin, n_end);
    if (status == QL_OK) status = resolve_isa(isa, &isa);
    if (status != QL_OK) return status;
    ql_dequantize_job job = {w, ql_padded_k(w), n_begin, out, out_row_stride, dtype};
    /* no AVX2 code: an AVX2 CPU runs the scalar one (a dense copy is not on the decode path) */
    ql_parallel_for(n_end - n_begin, ql_row_grain(n_end - n_begin, job.padded_k, QL_MIN_CHUNK_ROWS, n_threads), n_threads,
                          isa == QL_ISA_AVX512 ? dequantize_chunk_avx512 : dequantize_chunk_scalar, &job);
    return QL_OK;
}

int ql_cpu_dequantize(const ql_weight *w, void *out, int64_t out_row_stride, int dtype, int n_threads) {
    return ql_cpu_dequantize_rows(w, 0, w == NULL ? 1 : w->n, out, out_row_stride, dtype, QL_ISA_AUTO, n_threads);
}

/* ---------------------------------------------------------------- the quantizer's encoder */
static void encode_chunk_scalar(void *job, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    ql_encode_rows_scalar((const ql_encode_job *)job, begin, end);
}

static void encode_chunk_avx2(void *job, int64_t begin, int64_t end, int thread_index) {
    (void)thread_index;
    ql_encode_rows_avx2((const ql_encode_job *)job, begin, end);
}

int ql_cpu_encode_codes(const float *blocks, const float *scales, const float *codebook, int64_t n,
                        int64_t padded_k, int64_t block_size, const float *column_weight, uint8_t *codes,
                        float *errors, int isa, int n_threads) {
    if (blocks == NULL || scales == NULL || codebook == NULL || codes == NULL) return QL_ERR_NULL_POINTER;
    if (!ql_block_size_ok(block_size)) return QL_ERR_BAD_BLOCK_SIZE;
    if (n <= 0 || padded_k <= 0 || padded_k % block_size != 0) return QL_ERR_BAD_SIZE;
    int status = resolve_isa(isa, &isa);
    if (status != QL_OK) return status;
    ql_encode_job job = {blocks, scales, codebook, column_weight, padded_k, block_size, codes, errors};
    /* the encoder has no AVX-512 code: an AVX-512 CPU runs its AVX2 code */
    ql_parallel_for(n, ql_row_grain(n, padded_k, QL_MIN_CHUNK_ROWS, n_threads), n_threads,
                    isa == QL_ISA_SCALAR ? encode_chunk_scalar : encode_chunk_avx2, &job);
    return QL_OK;
}
